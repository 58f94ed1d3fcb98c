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

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .models import IDENT_RE, CountResult, CountRow
from .sources import RowError
from .store import ATP

__all__ = ["CountReport", "parse_count", "reconcile"]

SAMPLE = 1000  # refused rows and exception ids kept in a report, at most


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
        if r.exception_id and len(self.exceptions) < SAMPLE:
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
            "exceptions": self.exceptions,
            "refused_by_reason": dict(self.refused_by_reason),
            "refused_rows": self.refused_rows,
        }

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
            ("exceptions raised", f"{len(self.exceptions):,}"),
        ]  # fmt: skip
        lines += [(f"  refused: {k}", f"{v:,}") for k, v in self.refused_by_reason.most_common()]
        width = max(len(k) for k, _ in lines)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)


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


async def reconcile(
    atp: ATP,
    rows: Iterable[tuple[int, Mapping[str, Any] | RowError]],
    *,
    count_id: str,
    source: str = "",
    dry_run: bool = False,
    tolerance: int = 0,
    assume_utc: bool = False,
    chunk: int = 2000,
    actor: str = "",
    progress: Callable[[int], None] | None = None,
) -> CountReport:
    """Apply a count from ``rows`` (``atp.sources.open_source(...)``) and report.

    :param count_id: names the count; running it again with the same id applies no row
        twice (rows already applied come back as ``already``).
    :param tolerance: drift (units, absolute) still counted as accurate.
    :param chunk: rows per call of the count script (up to 10,000).
    :param progress: called with the number of rows done after each chunk.
    """
    report = CountReport(count_id, source, dry_run, tolerance)
    batch: list[CountRow] = []

    async def flush() -> None:
        if batch:
            for r in await atp.apply_counts(
                count_id, batch, dry_run=dry_run, source=source, actor=actor
            ):
                report.add(r)
            batch.clear()
        if progress is not None:
            progress(report.rows)

    for number, fields in rows:
        parsed = parse_count(number, fields, assume_utc=assume_utc)
        if isinstance(parsed, CountResult):
            report.add(parsed)
            continue
        batch.append(parsed)
        if len(batch) >= chunk:
            await flush()
    await flush()
    return report
