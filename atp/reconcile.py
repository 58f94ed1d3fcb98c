"""Reconciliation after cycle counts: bring on-hand in line with the system of record's
counts, each as of the time it was taken (lua/count.lua), and report how far off the
book was.

:func:`reconcile` streams rows from a source (``atp.sources``), parses each into a
:class:`~atp.models.CountRow` (or refuses it with its reason), applies them in chunks
through :meth:`atp.ATP.apply_counts`, and folds every result into a
:class:`CountReport`: inventory record accuracy, total absolute drift, units at risk, the
exceptions raised, and the refused rows by reason. Memory stays flat however long the
source: only the report's totals and a bounded sample of refused rows are kept.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import InvalidRequest
from .models import IDENT_RE, RESERVATION_ID_RE, CountResult, CountRow, check_int
from .sources import RowError
from .store import ATP

__all__ = [
    "CountReport",
    "default_count_id",
    "parse_columns",
    "parse_count",
    "reconcile",
    "write_report",
]

SAMPLE = 1000  # refused rows and exception ids kept in a report, at most
_SHOWN = 10  # of them, in the table


@dataclass
class CountReport:
    """What a count did (or, dry, would do).

    ``accuracy`` is the inventory record accuracy: the share of counted positions whose
    absolute drift is within ``tolerance`` units (rows refused are not counted positions).
    """

    count_id: str
    source: str = ""
    dry_run: bool = False
    tolerance: int = 0
    rows: int = 0
    applied: int = 0
    already: int = 0
    would_apply: int = 0
    refused: int = 0
    within_tolerance: int = 0
    total_abs_drift: int = 0
    net_drift: int = 0
    units_at_risk: int = 0
    exceptions_raised: int = 0
    exceptions: list[str] = field(default_factory=list)
    refused_by_reason: Counter[str] = field(default_factory=Counter)
    refused_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counted_positions(self) -> int:
        return self.applied + self.already + self.would_apply

    @property
    def accuracy(self) -> float | None:
        n = self.counted_positions
        return self.within_tolerance / n if n else None

    def add(self, r: CountResult) -> None:
        self.rows += 1
        if r.status == "refused":
            self.refused += 1
            self.refused_by_reason[r.reason or "refused"] += 1
            if len(self.refused_rows) < SAMPLE:
                self.refused_rows.append(
                    {"row": r.row, "sku": r.sku, "location": r.location, "reason": r.reason,
                     "detail": r.detail}
                )  # fmt: skip
            return
        if r.status == "applied":
            self.applied += 1
        elif r.status == "already":
            self.already += 1
        else:
            self.would_apply += 1
        drift = r.drift or 0
        self.total_abs_drift += abs(drift)
        self.net_drift += drift
        if abs(drift) <= self.tolerance:
            self.within_tolerance += 1
        self.units_at_risk += r.units_at_risk
        if r.exception_id:
            self.exceptions_raised += 1
            if len(self.exceptions) < SAMPLE:
                self.exceptions.append(r.exception_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "count_id": self.count_id,
            "source": self.source,
            "dry_run": self.dry_run,
            "tolerance": self.tolerance,
            "rows": self.rows,
            "applied": self.applied,
            "already_applied": self.already,
            "would_apply": self.would_apply,
            "refused": self.refused,
            "counted_positions": self.counted_positions,
            "within_tolerance": self.within_tolerance,
            "inventory_record_accuracy": self.accuracy,
            "total_abs_drift": self.total_abs_drift,
            "net_drift": self.net_drift,
            "units_at_risk": self.units_at_risk,
            "exceptions_raised": max(self.exceptions_raised, len(self.exceptions)),
            "exceptions": self.exceptions,
            "refused_by_reason": dict(self.refused_by_reason),
            "refused_rows": self.refused_rows,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CountReport:
        """A report back from :meth:`to_dict` (a worker carries on from the one saved)."""
        report = cls(str(d.get("count_id", "")), str(d.get("source", "")))
        report.dry_run = bool(d.get("dry_run"))
        for attr, key in _SAVED:
            setattr(report, attr, int(d.get(key) or 0))
        report.exceptions = list(d.get("exceptions") or [])
        report.refused_by_reason = Counter(d.get("refused_by_reason") or {})
        report.refused_rows = list(d.get("refused_rows") or [])
        return report

    def table(self) -> str:
        """The report as a plain-text table, for the terminal."""
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.1%}"
        applied = f"{self.would_apply:,} would apply" if self.dry_run else f"{self.applied:,}"
        lines = [
            ("count", self.count_id + (" (dry run: nothing changed)" if self.dry_run else "")),
            ("source", self.source),
            ("rows read", f"{self.rows:,}"),
            ("applied", applied),
            ("already applied", f"{self.already:,}"),
            ("refused", f"{self.refused:,}"),
            (f"record accuracy (|drift| <= {self.tolerance})",
             f"{acc} of {self.counted_positions:,} positions"),
            ("total absolute drift", f"{self.total_abs_drift:,} units (net {self.net_drift:+,})"),
            ("units at risk", f"{self.units_at_risk:,}"),
            ("exceptions raised", f"{max(self.exceptions_raised, len(self.exceptions)):,}"),
        ]  # fmt: skip
        lines += [(f"  refused: {k}", f"{v:,}") for k, v in self.refused_by_reason.most_common()]
        width = max(len(k) for k, _ in lines)
        out = [f"{k.ljust(width)}  {v}" for k, v in lines]
        if self.exceptions:
            more = max(self.exceptions_raised, len(self.exceptions)) - _SHOWN
            out.append(
                "exceptions: " + ", ".join(self.exceptions[:_SHOWN])
                + (f" and {more:,} more" if more > 0 else "")
            )  # fmt: skip
        if self.refused_rows:
            out.append("refused rows:")
            for r in self.refused_rows[:_SHOWN]:
                where = f" {r['sku']} at {r['location']}" if r["sku"] else ""
                out.append(f"  row {r['row']}{where}: {r['reason']}: {r['detail']}")
            if self.refused > _SHOWN:
                out.append(f"  ... {self.refused - _SHOWN:,} more (the JSON report lists up to "
                           f"{SAMPLE:,})")  # fmt: skip
        return "\n".join(out)


# CountReport's figures as to_dict names them
_SAVED = (
    ("tolerance", "tolerance"), ("rows", "rows"), ("applied", "applied"),
    ("already", "already_applied"), ("would_apply", "would_apply"), ("refused", "refused"),
    ("within_tolerance", "within_tolerance"), ("total_abs_drift", "total_abs_drift"),
    ("net_drift", "net_drift"), ("units_at_risk", "units_at_risk"),
    ("exceptions_raised", "exceptions_raised"),
)  # fmt: skip

_COUNT_FIELDS = ("sku", "location", "counted_qty", "counted_at")


def parse_count(
    number: int, fields: Mapping[str, Any] | RowError, *, assume_utc: bool = False
) -> CountRow | CountResult:
    """One source row as a CountRow, or a refused CountResult saying why.

    Columns: ``sku``, ``location``, ``counted_qty`` (a whole number, 0 or more) and
    ``counted_at`` (ISO 8601 with a time zone; without one it is refused, unless
    ``assume_utc``).
    """
    if isinstance(fields, RowError):
        return CountResult(row=number, status="refused", reason=fields.reason, detail=fields.detail)
    sku, loc = fields.get("sku"), fields.get("location")

    def no(reason: str, detail: str) -> CountResult:
        return CountResult(
            row=number, status="refused", sku=str(sku or ""), location=str(loc or ""),
            reason=reason, detail=detail,
        )  # fmt: skip

    missing = [f for f in _COUNT_FIELDS if fields.get(f) in (None, "")]
    if missing:
        return no("bad_row", "missing " + ", ".join(missing))
    for what, v in (("sku", sku), ("location", loc)):
        if not isinstance(v, str) or not IDENT_RE.fullmatch(v):
            return no(
                "bad_row", f"{what} must be 1-64 ASCII letters, digits or . _ -, got {v!r:.80}"
            )
    q = fields["counted_qty"]
    if isinstance(q, bool) or not isinstance(q, int | str):
        return no("bad_count", f"counted_qty must be a whole number, got {q!r:.40}")
    if isinstance(q, str):
        if not q.strip().lstrip("-").isdigit():
            return no("bad_count", f"counted_qty must be a whole number, got {q!r:.40}")
        q = int(q)
    if q < 0:
        return no("bad_count", f"counted_qty must not be negative, got {q}")
    t = fields["counted_at"]
    if isinstance(t, datetime):
        at = t
    else:
        try:
            at = datetime.fromisoformat(str(t).strip().replace("Z", "+00:00"))
        except ValueError:
            return no("bad_time", f"counted_at is not an ISO 8601 time: {str(t)!r:.40}")
    if at.tzinfo is None:
        if not assume_utc:
            return no("bad_time", "counted_at has no time zone (give one, or assume UTC)")
        at = at.replace(tzinfo=UTC)
    return CountRow(sku, loc, q, at, number)  # type: ignore[arg-type]


DEFAULT_CHUNK = 100
"""Rows per count-script call. A call of 100 rows holds Redis for a few milliseconds, so
reservations made meanwhile wait no longer than that; larger calls are no faster (their
effects are kept in memory until the script ends, then written to the AOF as one block,
which costs the server more per row from about 1,000 rows), and ``inflight`` calls in
flight hide the round trips (benchmarks/bench_reconcile.py)."""
DEFAULT_INFLIGHT = 2


async def reconcile(
    atp: ATP,
    rows: Iterable[tuple[int, Mapping[str, Any] | RowError]],
    *,
    count_id: str,
    source: str = "",
    dry_run: bool = False,
    tolerance: int = 0,
    assume_utc: bool = False,
    chunk: int = DEFAULT_CHUNK,
    inflight: int = DEFAULT_INFLIGHT,
    actor: str = "",
    progress: Callable[[int], None] | None = None,
) -> CountReport:
    """Apply a count from ``rows`` (``atp.sources.open_source(...)``) and report.

    Rows are read one at a time and applied ``chunk`` at a time; the source is never
    held in memory whole. While one call runs in Redis the next chunk is parsed and sent
    (``inflight`` calls at once), except that a chunk naming a position a call still in
    flight counts waits for it: rows of one position are always applied in source order
    (the first of two rows of a position in one count applies, the second is refused as
    a ``duplicate``).

    :param count_id: names the count; running it again with the same id applies no row
        twice (rows already applied come back as ``already``), so an interrupted run is
        resumed by running it again.
    :param source: names the source in the movements (longer than 128 characters: its
        tail is kept).
    :param tolerance: drift (units, absolute) still counted as accurate.
    :param assume_utc: read a ``counted_at`` without a time zone as UTC (else refused).
    :param chunk: rows per call of the count script (1..10,000).
    :param inflight: calls in flight at once (1: one after the other).
    :param progress: called with the number of rows done (applied, refused or read and
        queued) as the count goes.
    :raises InvalidRequest: bad arguments (a malformed count id, chunk out of range...),
        or a source that failed while being read (an unreadable file, a database error):
        the calls already sent are seen through first, and ``extra["report"]`` holds the
        report of the rows done before it.
    """
    if not isinstance(count_id, str) or not RESERVATION_ID_RE.fullmatch(count_id):
        raise InvalidRequest(
            "a count id is 1-128 ASCII letters, digits or . _ : - (starting with a letter or "
            f"digit), got {count_id!r:.80}",
            field="count_id",
        )
    check_int(chunk, "chunk", 1, 10_000)
    check_int(inflight, "inflight", 1, 64)
    check_int(tolerance, "tolerance", 0, 10**15)
    if len(source.encode()) > 128:
        source = "..." + source.encode()[-125:].decode(errors="ignore")
    report = CountReport(count_id, source, dry_run, tolerance)
    pending: deque[tuple[asyncio.Task[list[CountResult]], set[tuple[str, str]]]] = deque()
    batch: list[CountRow] = []
    queued = 0  # rows sent and not yet folded into the report

    async def settle_oldest() -> None:
        nonlocal queued
        task, _ = pending[0]
        try:
            results = await task
        finally:
            pending.popleft()
        queued -= len(results)
        for r in results:
            report.add(r)
        if progress is not None:
            progress(report.rows + queued)

    async def send() -> None:
        nonlocal batch, queued
        positions = {(r.sku, r.location) for r in batch}
        # rows of one position keep their order: wait for every call that counts it
        while pending and any(not p.isdisjoint(positions) for _, p in pending):
            await settle_oldest()
        while len(pending) >= inflight:
            await settle_oldest()
        rows_, batch = batch, []
        task = asyncio.ensure_future(
            atp.apply_counts(count_id, rows_, dry_run=dry_run, source=source, actor=actor)
        )
        pending.append((task, positions))
        queued += len(rows_)

    source_error: Exception | None = None
    it = iter(rows)
    n = 0
    try:
        while True:
            try:
                number, fields = next(it)
            except StopIteration:
                break
            except (InvalidRequest, OSError, UnicodeError, csv.Error) as e:
                source_error = e
                break
            n += 1
            parsed = parse_count(number, fields, assume_utc=assume_utc)
            if isinstance(parsed, CountResult):
                report.add(parsed)
            else:
                batch.append(parsed)
                if len(batch) >= chunk:
                    await send()
            if pending and n % _YIELD_EVERY == 0:
                # the parsing is synchronous: let the calls in flight be written and read
                await asyncio.sleep(0)
        if batch and source_error is None:
            await send()
        while pending:  # calls already sent are seen through, even when the source failed
            await settle_oldest()
    finally:
        for task, _ in pending:  # a failure (Redis, a cancel): leave nothing running
            task.cancel()
        if pending:
            await asyncio.gather(*(t for t, _ in pending), return_exceptions=True)
    if source_error is not None:
        detail = (
            source_error.detail
            if isinstance(source_error, InvalidRequest)
            else f"reading the source failed: {source_error.__class__.__name__}: {source_error}"
        )
        raise InvalidRequest(
            f"{detail} (after {n:,} rows; the count stopped there: run it again with count id "
            f"{count_id} to resume)",
            field="source",
            report=report,
        ) from source_error
    if progress is not None:
        progress(report.rows)
    return report


_YIELD_EVERY = 32


def default_count_id(source: str, now: datetime | None = None) -> str:
    """A count id from the source's name and the time (UTC, to the second), e.g.
    ``counts-20261127T101500Z`` for ``/data/counts.csv``: what ``atp reconcile`` uses when
    it is given none (and prints, so the count can be resumed under the same id)."""
    at = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = source.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    stem = name.rsplit(".", 1)[0] if "." in name and "://" not in source else name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("._-")[:96] or "count"
    return f"{stem}-{at}"


def parse_columns(specs: Iterable[str]) -> dict[str, str]:
    """``["sku=item_no", "counted_qty=qty"]`` as ``{"sku": "item_no", ...}``: our column
    name, then the source's.

    :raises ValueError: a spec that is not ``ours=theirs``, or names one of ours twice.
    """
    out: dict[str, str] = {}
    for spec in specs:
        ours, eq, theirs = spec.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not eq or not ours or not theirs:
            raise ValueError(f"a column renaming is ours=theirs, e.g. sku=item_no; got {spec!r}")
        if ours in out:
            raise ValueError(f"column {ours!r} renamed twice")
        out[ours] = theirs
    return out


def write_report(report: CountReport, path: str | Path) -> None:
    """Write ``report.to_dict()`` as JSON to ``path`` (through a temporary file beside it,
    so a reader never sees half a report)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(target)
