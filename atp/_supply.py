"""Inbound supply with dates: expected receipts (purchase order lines, ASNs) per position,
amended or cancelled, turned into on hand by a receipt against the same reference
(lua/inbound.lua, lua/receive.lua). Their units count as supply for time-phased ATP from
the day they are due (``ATP.reserve(requested_date=…)``, ``ATP.promise``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from ._base import CoreBase
from ._wire import _position
from .errors import InvalidRequest
from .models import (
    Inbound,
    Position,
    check_ident,
    check_int,
    check_text,
    check_when,
    date_of,
    ms_to_dt,
)

__all__ = ["InboundResult", "SupplyMixin"]


@dataclass(frozen=True, slots=True)
class InboundResult:
    """What an expected-receipt call or a receipt left behind."""

    position: Position
    inbound: Inbound | None
    """The expected receipt after the call; ``None`` when it is closed (cancelled, or
    received in full) or the receipt matched none."""
    replayed: bool = False
    """An identical ``expect_inbound`` again: nothing changed."""
    exception_id: str | None = None
    """The oversell exception raised when less supply left dated promises uncovered."""


class SupplyMixin(CoreBase):
    """Expected receipts and receipts (see the module docstring)."""

    def _supply_keys(self, sku: str, location: str) -> tuple[str, ...]:
        """KEYS of inbound.lua and receive.lua: set_position's, then the expected receipts."""
        return (*self._cover_keys(sku, location), self.keys.position(sku, location).ib)

    async def _supply(
        self, script: str, sku: str, location: str, req: dict[str, Any], actor: str, source: str
    ) -> InboundResult:
        req = {"sku": sku, "loc": location, "b": self.keys.bucket(sku), **req}
        await self._with_priorities(req)
        out = await self._run(
            script, self._supply_keys(sku, location), self._cfg(actor, source), req
        )
        ent = out.get("inbound")
        return InboundResult(
            position=_position(sku, location, out["position"]),
            inbound=_inbound(sku, location, ent)
            if isinstance(ent, dict) and ent["qty"] > 0
            else None,
            replayed=bool(out.get("replay")),
            exception_id=out.get("exception"),
        )

    async def expect_inbound(
        self,
        sku: str,
        location: str,
        reference: str,
        qty: int,
        expected_at: date | datetime,
        *,
        actor: str = "",
        source: str = "",
    ) -> InboundResult:
        """Record an expected receipt of ``qty`` units due at ``expected_at`` (a date, or
        an aware datetime; it counts as supply from its UTC day). Creates the position
        (on hand 0) when it does not exist. The same call again is a no-op
        (``replayed``); the same reference with other figures raises
        :class:`~atp.errors.InboundExists` (amend it instead)."""
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_text(reference, "reference")
        check_int(qty, "qty", 1, self.settings.max_on_hand)
        at = check_when(expected_at, "expected_at")
        req = {"op": "expect", "ref": reference, "qty": qty, "at": at}
        return await self._supply("inbound", sku, location, req, actor, source)

    async def amend_inbound(
        self,
        sku: str,
        location: str,
        reference: str,
        *,
        qty: int | None = None,
        expected_at: date | datetime | None = None,
        actor: str = "",
        source: str = "",
    ) -> InboundResult:
        """Change an open expected receipt: ``qty`` is the number of units *still*
        expected, ``expected_at`` its new time. Less supply, or supply later, that leaves
        dated promises uncovered raises an oversell exception (``exception_id``).

        :raises UnknownInbound: nothing open under that reference.
        """
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_text(reference, "reference")
        req: dict[str, Any] = {"op": "amend", "ref": reference}
        if qty is not None:
            req["qty"] = check_int(qty, "qty", 1, self.settings.max_on_hand)
        if expected_at is not None:
            req["at"] = check_when(expected_at, "expected_at")
        if qty is None and expected_at is None:
            raise InvalidRequest("give qty or expected_at to amend", field="qty")
        return await self._supply("inbound", sku, location, req, actor, source)

    async def cancel_inbound(
        self, sku: str, location: str, reference: str, *, actor: str = "", source: str = ""
    ) -> InboundResult:
        """Cancel an open expected receipt: its units leave the schedule.

        :raises UnknownInbound: nothing open under that reference.
        """
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_text(reference, "reference")
        req = {"op": "cancel", "ref": reference}
        return await self._supply("inbound", sku, location, req, actor, source)

    async def receive(
        self,
        sku: str,
        location: str,
        qty: int,
        *,
        reference: str,
        close: bool = False,
        actor: str = "",
        source: str = "",
    ) -> Position:
        """Inbound units arrive: on_hand goes up by ``qty`` against ``reference`` (PO, ASN).
        See :meth:`receive_inbound` for what happens to a matching expected receipt."""
        return (
            await self.receive_inbound(
                sku, location, qty, reference=reference, close=close, actor=actor, source=source
            )
        ).position

    async def receive_inbound(
        self,
        sku: str,
        location: str,
        qty: int,
        *,
        reference: str,
        close: bool = False,
        actor: str = "",
        source: str = "",
    ) -> InboundResult:
        """Receive ``qty`` units against ``reference``. When it is an open expected
        receipt of the position, they come off what is still expected (an over-receipt
        still adds all it brought to on hand) and it closes when nothing more is expected,
        or at once with ``close=True`` (the rest will not come: its units leave the
        schedule). Creates the position on a first receipt.

        :raises UnknownInbound: ``close`` for a reference with nothing open.
        """
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_int(qty, "qty", 1, self.settings.max_on_hand)
        check_text(reference, "reference")
        if not isinstance(close, bool):
            raise InvalidRequest("close must be true or false", field="close")
        req: dict[str, Any] = {"qty": qty, "ref": reference}
        if close:
            req["close"] = True
        return await self._supply("receive", sku, location, req, actor, source)

    async def inbound(self, sku: str, location: str) -> list[Inbound]:
        """The position's open expected receipts, soonest first."""
        check_ident(sku, "sku")
        check_ident(location, "location")
        flat = await self.redis.hgetall(self.keys.position(sku, location).ib)
        recs = [json.loads(v) for v in flat.values()]
        items = [_inbound(sku, location, e) for e in recs if e.get("st", "open") == "open"]
        items.sort(key=lambda i: (i.expected_at, i.reference))
        return items


def _inbound(sku: str, location: str, e: dict[str, Any]) -> Inbound:
    return Inbound(
        sku=sku,
        location=location,
        reference=e["ref"],
        qty=int(e["qty"]),
        ordered=int(e["ordered"]),
        received=int(e["received"]),
        expected_at=ms_to_dt(e["at"]),
        expected_date=date_of(int(e["day"])),
        created_at=ms_to_dt(e["cr"]),
        updated_at=ms_to_dt(e["up"]),
    )
