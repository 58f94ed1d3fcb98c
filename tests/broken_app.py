"""The API with a deliberately broken reserve, to show the flash-sale check can fail
(tests/test_loadtest.py). Test-only: the product carries no switch for this.

Served with ``uvicorn --factory --app-dir tests broken_app:create`` and the usual ``ATP_*``
environment. Its reserve is the classic read-then-write: it reads ``on_hand`` and
``committed`` with ``HMGET``, decides in Python, and after the round trip a remote client
would pay (20 ms) writes. To keep every record a reservation needs (so the buyers can
confirm, release and read it back), the write goes through the real script with the stock
check taken out of its way: ``on_hand`` is raised by the quantity for the call
(``HINCRBY``) and lowered after. Two buyers who read the same last unit both get it.
Expired holds come back only through the reaper (a refusal here never reaches the
script, which would reclaim them before deciding).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from api.app import create_app
from atp import ATP, Line, Reservation
from atp.errors import InsufficientStock

_real_reserve = ATP.reserve


async def _naive_reserve(
    self: ATP,
    reservation_id: str,
    channel: str,
    lines: Sequence[Line | tuple[str, str | None, int]],
    **kw: Any,
) -> Reservation:
    parts = [(ln.sku, ln.location, ln.qty) if isinstance(ln, Line) else ln for ln in lines]
    keys = [(self.keys.position(sku, loc or "").pos, qty) for sku, loc, qty in parts]
    if await self.redis.hexists(self.keys.index(reservation_id), reservation_id):
        return await _real_reserve(self, reservation_id, channel, lines, **kw)  # a replay
    for pos, qty in keys:  # read...
        on_hand, committed = await self.redis.hmget(pos, "on_hand", "committed")
        available = int(on_hand or 0) - int(committed or 0)
        if available < qty:
            raise InsufficientStock(
                "not enough stock",
                lines=[{"sku": parts[0][0], "requested": qty, "available": max(available, 0)}],
            )
    await asyncio.sleep(0.02)  # ...the network between the read and the write...
    for pos, qty in keys:  # ...then write, whatever happened meanwhile
        await self.redis.hincrby(pos, "on_hand", qty)
    try:
        return await _real_reserve(self, reservation_id, channel, lines, **kw)
    finally:
        for pos, qty in keys:
            await self.redis.hincrby(pos, "on_hand", -qty)


def create() -> FastAPI:
    """The normal app (settings from the environment) over the broken reserve."""
    ATP.reserve = _naive_reserve  # type: ignore[method-assign]
    return create_app()
