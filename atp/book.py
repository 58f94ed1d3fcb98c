"""The reservation book against the system of record's open orders.

Reservations are made by order management and should mirror its open orders. They drift
apart: a cancellation whose release never arrived leaves a **ghost** (live here, held or
confirmed, but no open order there), holding units nobody will ship; a reserve call lost
on the way leaves a **missing** reservation (an open order there, nothing here), whose
units can be promised twice. :func:`reconcile_orders` finds both, and **mismatches**
(present on both sides but with other lines or quantities, another channel or customer,
or open there while released, fulfilled or expired here).

* A ghost is only a ghost once it is older than the grace period (``grace_seconds``,
  default 15 minutes), measured on the server's clock from when the run started: a
  reservation made moments ago may simply not have reached the system of record yet.
* Open orders may carry an ``ordered_at`` time (optional column); a missing one placed
  within the grace period is counted as young, not missing (its reserve call may still be
  on the way). Without the column every absent order counts as missing.
* Mismatches are reported and never fixed: which side is right takes a person.
* With ``fix=True`` the ghosts are released (reason ``ghost: absent from the system of
  record``, with actor and source: the release movements are the audit) and the missing
  ones recreated as confirmed reservations with the same id, channel, lines and customer.
  A refusal (insufficient stock, a cap, a buyer limit) is reported for that order and the
  run carries on. Ghosts are *not* released when the source cannot be trusted to be
  complete: when it had no rows at all, or rows whose reservation id could not be read
  (the report says why; fix the source and run again).

Memory: the system of record's open orders are held in memory (id, channel, customer and
lines per order: a few hundred bytes each, so a million open orders is a few hundred MB)
because each of our reservations must be looked up among them. Our side is streamed
(:meth:`atp.ATP.reservations`, a bounded batch per round trip); only the ghosts found and
bounded samples for the report are kept.

Source columns: ``reservation_id, channel, sku, location, qty`` and optionally
``customer_id`` and ``ordered_at`` (ISO 8601; without a time zone it is read as UTC).
Several rows for one reservation are its lines; two rows for the same position add up.
Quantities compared are the ordered ones (a line's ``qty``, shipped or not).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import ATPError, UnknownReservation
from .models import CHANNEL_RE, CUSTOMER_RE, IDENT_RE, RESERVATION_ID_RE, Line, Reservation
from .sources import RowError
from .store import ATP

__all__ = ["GHOST_REASON", "BookReport", "reconcile_orders"]

GHOST_REASON = "ghost: absent from the system of record"
SAMPLE = 1000  # orders listed per kind in a report, at most
_LOOKUPS = 100  # reservations looked up at once


@dataclass(slots=True)
class _Order:
    """One open order of the system of record, as its rows describe it."""

    channel: str
    customer_id: str | None
    lines: dict[tuple[str, str], int]
    ordered_at: datetime | None = None
    seen: bool = False  # met a reservation here with that id


@dataclass
class BookReport:
    """What a run found and, with ``fix``, did. Counts are complete; the lists are samples
    of at most :data:`SAMPLE` entries each."""

    source: str = ""
    fix: bool = False
    grace_seconds: int = 900
    rows: int = 0
    orders: int = 0
    refused: int = 0
    refused_by_reason: Counter[str] = field(default_factory=Counter)
    refused_rows: list[dict[str, Any]] = field(default_factory=list)
    live: int = 0
    matched: int = 0
    ghosts: int = 0
    young_ghosts: int = 0
    missing: int = 0
    young_missing: int = 0
    mismatches: int = 0
    unjudged: int = 0
    released: int = 0
    recreated: int = 0
    failed: int = 0
    held_back: str | None = None
    ghost_list: list[dict[str, Any]] = field(default_factory=list)
    missing_list: list[dict[str, Any]] = field(default_factory=list)
    mismatch_list: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing left to act on: the book agrees, or ``fix`` mended every ghost and
        missing reservation and no mismatch remains."""
        if self.mismatches or self.failed:
            return False
        if self.fix and self.held_back is None:
            return True
        return not (self.ghosts or self.missing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "fix": self.fix,
            "grace_seconds": self.grace_seconds,
            "ok": self.ok,
            "rows": self.rows,
            "open_orders": self.orders,
            "refused_rows": self.refused,
            "refused_by_reason": dict(self.refused_by_reason),
            "live_reservations": self.live,
            "matched": self.matched,
            "ghosts": self.ghosts,
            "ghosts_within_grace": self.young_ghosts,
            "missing": self.missing,
            "missing_within_grace": self.young_missing,
            "mismatches": self.mismatches,
            "not_judged": self.unjudged,
            "released": self.released,
            "recreated": self.recreated,
            "failed": self.failed,
            "ghosts_held_back": self.held_back,
            "ghost_list": self.ghost_list,
            "missing_list": self.missing_list,
            "mismatch_list": self.mismatch_list,
            "failures": self.failures,
            "refused_sample": self.refused_rows,
        }

    def table(self) -> str:
        """The report as a plain-text table, for the terminal."""
        ghosts = f"{self.ghosts:,} (+{self.young_ghosts:,} within the grace period)"
        missing = f"{self.missing:,} (+{self.young_missing:,} within the grace period)"
        rows: list[tuple[str, str]] = [
            ("source", self.source + ("" if self.fix else " (dry run: nothing changed)")),
            ("rows read", f"{self.rows:,} ({self.refused:,} refused)"),
            ("open orders there", f"{self.orders:,}"),
            ("live reservations here", f"{self.live:,}"),
            ("matched", f"{self.matched:,}"),
            (f"ghosts (older than {self.grace_seconds}s)", ghosts),
            ("missing", missing),
            ("mismatches (never fixed)", f"{self.mismatches:,}"),
        ]
        if self.unjudged:
            rows.append(("not judged (refused rows)", f"{self.unjudged:,}"))
        if self.fix:
            rows += [
                ("ghosts released", f"{self.released:,}"),
                ("missing recreated", f"{self.recreated:,}"),
                ("failed", f"{self.failed:,}"),
            ]
        if self.held_back:
            rows.append(("ghosts NOT released", self.held_back))
        rows += [(f"  refused: {k}", f"{v:,}") for k, v in self.refused_by_reason.most_common()]
        width = max(len(k) for k, _ in rows)
        out = [f"{k.ljust(width)}  {v}" for k, v in rows]
        for title, items in (
            ("ghosts", self.ghost_list),
            ("missing", self.missing_list),
            ("mismatches", self.mismatch_list),
            ("failed", self.failures),
        ):
            if items:
                out.append(f"{title}:")
                out += [f"  {_one_line(i)}" for i in items[:20]]
                if len(items) > 20:
                    out.append(f"  … {len(items) - 20} more in the JSON report")
        return "\n".join(out)

    def _refuse(self, number: int, reason: str, detail: str, rid: str | None) -> None:
        self.refused += 1
        self.refused_by_reason[reason] += 1
        if len(self.refused_rows) < SAMPLE:
            self.refused_rows.append(
                {"row": number, "reservation_id": rid, "reason": reason, "detail": detail}
            )


def _one_line(item: Mapping[str, Any]) -> str:
    rid = item.get("reservation_id", "?")
    rest = ", ".join(f"{k} {v}" for k, v in item.items() if k not in ("reservation_id", "lines"))
    return f"{rid}: {rest}" if rest else str(rid)


def _lines_out(lines: Mapping[tuple[str, str], int]) -> list[dict[str, Any]]:
    return [{"sku": s, "location": loc, "qty": q} for (s, loc), q in sorted(lines.items())]


_ORDER_FIELDS = ("reservation_id", "channel", "sku", "location", "qty")


def _parse(
    fields: Mapping[str, Any],
) -> tuple[str, str, str | None, str, str, int, datetime | None] | tuple[str, str]:
    """One order line, or (reason, detail)."""
    missing = [f for f in _ORDER_FIELDS if fields.get(f) in (None, "")]
    if missing:
        return ("bad_row", "missing " + ", ".join(missing))
    rid, ch, sku, loc, q = (fields[f] for f in _ORDER_FIELDS)
    for what, v, rx in (
        ("reservation_id", rid, RESERVATION_ID_RE),
        ("channel", ch, CHANNEL_RE),
        ("sku", sku, IDENT_RE),
        ("location", loc, IDENT_RE),
    ):
        if not isinstance(v, str) or not rx.fullmatch(v):
            return ("bad_row", f"{what} is not valid: {v!r:.80}")
    if isinstance(q, str) and q.strip().isdigit():
        q = int(q.strip())
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        return ("bad_qty", f"qty must be a whole number of 1 or more, got {q!r:.40}")
    cu = fields.get("customer_id")
    if cu in (None, ""):
        cu = None
    elif not isinstance(cu, str) or not CUSTOMER_RE.fullmatch(cu):
        return ("bad_row", f"customer_id is not valid: {cu!r:.80}")
    at = fields.get("ordered_at")
    when: datetime | None = None
    if isinstance(at, datetime):
        when = at
    elif at not in (None, ""):
        try:
            when = datetime.fromisoformat(str(at).strip().replace("Z", "+00:00"))
        except ValueError:
            return ("bad_time", f"ordered_at is not an ISO 8601 time: {str(at)!r:.40}")
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (rid, ch, cu, sku, loc, q, when)


def _read_orders(
    rows: Iterable[tuple[int, Mapping[str, Any] | RowError]], report: BookReport
) -> tuple[dict[str, _Order], set[str], int]:
    """The open orders by reservation id; the ids of orders with a refused row (not
    judged: their lines are not known for sure); rows whose reservation id is unknown."""
    orders: dict[str, _Order] = {}
    doubtful: set[str] = set()
    blind = 0
    for number, fields in rows:
        report.rows += 1
        if isinstance(fields, RowError):
            report._refuse(number, fields.reason, fields.detail, None)
            blind += 1
            continue
        got = _parse(fields)
        rid_raw = fields.get("reservation_id")
        rid = rid_raw if isinstance(rid_raw, str) and RESERVATION_ID_RE.fullmatch(rid_raw) else None
        if len(got) == 2:
            report._refuse(number, got[0], got[1], rid)
            if rid is None:
                blind += 1
            else:
                doubtful.add(rid)
            continue
        rid, ch, cu, sku, loc, q, when = got
        o = orders.get(rid)
        if o is None:
            orders[rid] = _Order(ch, cu, {(sku, loc): q}, when)
            continue
        if o.channel != ch or o.customer_id != cu:
            report._refuse(
                number,
                "conflict",
                f"rows of {rid} disagree: channel {o.channel}/{ch}, customer {o.customer_id}/{cu}",
                rid,
            )
            doubtful.add(rid)
            continue
        o.lines[(sku, loc)] = o.lines.get((sku, loc), 0) + q
        if when is not None and (o.ordered_at is None or when < o.ordered_at):
            o.ordered_at = when
    for rid in doubtful:
        orders.pop(rid, None)
    report.orders = len(orders)
    return orders, doubtful, blind


def _differences(o: _Order, r: Reservation) -> list[str]:
    out = []
    if r.channel != o.channel:
        out.append(f"channel {o.channel} there, {r.channel} here")
    if o.customer_id is not None and o.customer_id != r.customer_id:
        out.append(f"customer {o.customer_id} there, {r.customer_id} here")
    here = {(ln.sku, ln.location): ln.qty for ln in r.lines}
    for key in sorted(o.lines.keys() | here.keys()):
        a, b = o.lines.get(key), here.get(key)
        where = f"{key[0]}@{key[1]}"
        if b is None:
            out.append(f"{where}: {a} ordered there, no line here")
        elif a is None:
            out.append(f"{where}: no line there, {b} reserved here")
        elif a != b:
            out.append(f"{where}: {a} ordered there, {b} reserved here")
    return out


async def reconcile_orders(
    atp: ATP,
    rows: Iterable[tuple[int, Mapping[str, Any] | RowError]],
    *,
    source: str = "",
    fix: bool = False,
    grace_seconds: int = 900,
    actor: str = "",
    progress: Callable[[str], None] | None = None,
) -> BookReport:
    """Compare the live reservations with the system of record's open order lines.

    :param rows: the open order lines (``atp.sources.open_source(...)``); read whole
        before anything is compared or changed.
    :param source: names the source in the report and in the movements a fix writes.
    :param fix: release the ghosts and recreate the missing (else nothing is written).
    :param grace_seconds: a reservation this young is not a ghost (nor an order this young,
        by ``ordered_at``, missing).
    :param actor: who runs it (written to the movements with ``source``).
    :param progress: called with a short message as each phase starts.
    """
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int) or grace_seconds < 0:
        raise ValueError("grace_seconds must be a whole number of 0 or more")
    report = BookReport(source=source, fix=fix, grace_seconds=grace_seconds)
    note = progress or (lambda _msg: None)
    sec, usec = await atp.redis.time()
    start_ms = int(sec) * 1000 + int(usec) // 1000
    cutoff = datetime.fromtimestamp((start_ms - grace_seconds * 1000) / 1000, tz=UTC)

    note("reading the open orders")
    orders, doubtful, blind = _read_orders(rows, report)

    note("walking the live reservations")
    ghosts: set[str] = set()
    async for r in atp.reservations():
        if r.id in ghosts:
            continue  # HSCAN can return an entry twice
        o = orders.get(r.id)
        if o is not None:
            if not o.seen:
                o.seen = True
                report.live += 1
                _judge(report, o, r)
            continue
        if r.id in doubtful:
            report.live += 1
            report.unjudged += 1
            doubtful.discard(r.id)  # counted once
            continue
        report.live += 1
        if r.created_at > cutoff:
            report.young_ghosts += 1
            continue
        ghosts.add(r.id)
        report.ghosts += 1
        if len(report.ghost_list) < SAMPLE:
            report.ghost_list.append(
                {
                    "reservation_id": r.id,
                    "channel": r.channel,
                    "status": r.status,
                    "created_at": r.created_at.isoformat(),
                    "age_seconds": (start_ms - int(r.created_at.timestamp() * 1000)) // 1000,
                    "open_units": r.open_units,
                }
            )

    note("looking up the orders not seen live")
    unseen = [rid for rid, o in orders.items() if not o.seen]
    missing: list[str] = []
    for i in range(0, len(unseen), _LOOKUPS):
        chunk = unseen[i : i + _LOOKUPS]
        found = await asyncio.gather(*(_lookup(atp, rid) for rid in chunk))
        for rid, here in zip(chunk, found, strict=True):
            o = orders[rid]
            if here is not None and here.status in ("held", "confirmed"):
                report.live += 1  # made (or missed by the walk) while it ran
                _judge(report, o, here)
            elif here is not None:
                _mismatch(report, rid, [f"open there, {here.status} here"], here.status)
            elif o.ordered_at is not None and o.ordered_at > cutoff:
                report.young_missing += 1
            else:
                missing.append(rid)
                report.missing += 1
                if len(report.missing_list) < SAMPLE:
                    report.missing_list.append(
                        {
                            "reservation_id": rid,
                            "channel": o.channel,
                            "customer_id": o.customer_id,
                            "lines": _lines_out(o.lines),
                        }
                    )

    if ghosts and report.rows == 0:
        report.held_back = "the source had no rows at all: is it the right one?"
    elif ghosts and blind:
        report.held_back = (
            f"{blind} source rows could not be read well enough to know their reservation "
            "id, so absence there is not certain"
        )
    if not fix:
        return report
    src = (f"reconcile-orders {source}" if source else "reconcile-orders")[:128]
    if report.held_back is None and ghosts:
        note(f"releasing {len(ghosts)} ghosts")
        for rid in ghosts:
            try:
                res = await atp.release(rid, reason=GHOST_REASON, actor=actor, source=src)
            except ATPError as e:
                _failed(report, rid, "release", e)
                continue
            if not res.replayed:
                report.released += 1
    if missing:
        note(f"recreating {len(missing)} missing reservations")
    for rid in missing:
        o = orders[rid]
        try:
            await atp.reserve(
                rid,
                o.channel,
                [Line(s, loc, q) for (s, loc), q in sorted(o.lines.items())],
                hold_seconds=0,
                customer_id=o.customer_id,
                actor=actor,
                source=src,
            )
        except ATPError as e:
            _failed(report, rid, "recreate", e)
            continue
        report.recreated += 1
    return report


async def _lookup(atp: ATP, rid: str) -> Reservation | None:
    try:
        return await atp.reservation(rid)
    except UnknownReservation:
        return None


def _judge(report: BookReport, o: _Order, r: Reservation) -> None:
    diffs = _differences(o, r)
    if diffs:
        _mismatch(report, r.id, diffs, r.status)
    else:
        report.matched += 1


def _mismatch(report: BookReport, rid: str, problems: list[str], status: str) -> None:
    report.mismatches += 1
    if len(report.mismatch_list) < SAMPLE:
        report.mismatch_list.append(
            {"reservation_id": rid, "status_here": status, "problems": problems}
        )


def _failed(report: BookReport, rid: str, action: str, e: ATPError) -> None:
    report.failed += 1
    if len(report.failures) < SAMPLE:
        report.failures.append(
            {"reservation_id": rid, "action": action, "code": e.code, "detail": e.detail}
        )
