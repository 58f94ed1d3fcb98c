"""Helpers shared by test modules (``tests/`` is on ``sys.path``: ``from support import …``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from atp import ATP

Call = tuple[str, Sequence[str], Sequence[Any]]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def snapshot(core: ATP) -> dict[str, Any]:
    """Every key of the database and its full content, read type by type (so it works on
    fakeredis as on a real server): to show that something changed nothing."""
    r = core.redis
    out: dict[str, Any] = {}
    async for raw in r.scan_iter(count=1000):
        key = _s(raw)
        kind = _s(await r.type(key))
        value: Any
        if kind == "hash":
            value = sorted((await r.hgetall(key)).items())
        elif kind == "zset":
            value = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await r.xrange(key)
        elif kind == "string":
            value = await r.get(key)
        elif kind == "set":
            value = sorted(await r.smembers(key))
        elif kind == "list":
            value = await r.lrange(key, 0, -1)
        else:  # pragma: no cover - the core writes no other types
            value = kind
        out[key] = (kind, value)
    return out


class _Captured(Exception):
    pass


async def captured(core: ATP, *args: Any, **kwargs: Any) -> Call:
    """The (script, KEYS, ARGV) ``core.reserve(*args, **kwargs)`` would send, unsent."""
    seen: list[Call] = []

    async def grab(name: str, keys: Sequence[str], argv: Sequence[Any]) -> Any:
        seen.append((name, list(keys), tuple(argv)))
        raise _Captured

    real = core._call
    core._call = grab  # type: ignore[method-assign, assignment]
    try:
        with pytest.raises(_Captured):
            await core.reserve(*args, **kwargs)
    finally:
        core._call = real  # type: ignore[method-assign]
    [call] = seen
    return call
