"""Reconciliation in the core: applying cycle-count rows as of their time (lua/count.lua),
queueing them for the workers (atp.counts), and the exceptions raised when a position no
longer covers its commitments (listing, resolving: lua/resolve.lua)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from . import counts
from ._base import CoreBase

if TYPE_CHECKING:
    from .store import ATP
from ._wire import (
    _dumps,
)
from .errors import (
    AlreadyFulfilled,
    InvalidRequest,
    UnknownException,
    UnknownReservation,
)
from .models import (
    IDENT_RE,
    CountResult,
    CountRow,
    ExceptionRecord,
    check_int,
    check_reservation_id,
    check_text,
    ms_to_dt,
)


class ReconcileMixin(CoreBase):
    """Counts and exceptions (see the module docstring)."""

    async def apply_counts(
        self,
        count_id: str,
        rows: Sequence[CountRow],
        *,
        dry_run: bool = False,
        source: str = "",
        actor: str = "",
    ) -> list[CountResult]:
        """Apply cycle-count rows, each as of its ``counted_at`` (lua/count.lua explains the
        arithmetic and every reason a row is refused). Rows are independent: a refused row
        changes nothing and the others apply. Applying the same rows again under the same
        ``count_id`` applies none twice (``already``), so a crashed batch can be retried.

        :param count_id: names the count (its movements' ``ref``), 1-128 characters.
        :param rows: at most 10,000 per call; results come back in the same order.
        :param dry_run: decide every row, write nothing (status ``dry``).
        """
        check_reservation_id(count_id)
        check_text(source, "source", 128, required=False)
        if len(rows) > 10_000:
            raise InvalidRequest("at most 10,000 count rows per call", field="rows")
        results: list[CountResult | None] = [None] * len(rows)
        groups: dict[int, list[tuple[int, CountRow]]] = {}
        for i, r in enumerate(rows):
            bad = _count_row_problem(r, self.settings.max_on_hand)
            if bad is not None:
                results[i] = CountResult(
                    row=r.row if isinstance(r.row, int) else 0, status="refused",
                    sku=str(getattr(r, "sku", "")), location=str(getattr(r, "location", "")),
                    reason=bad[0], detail=bad[1],
                )  # fmt: skip
                continue
            groups.setdefault(self.keys.bucket(r.sku), []).append((i, r))
        if groups:
            cfg = _dumps(
                {
                    **self._cfg_base, "actor": actor, "source": source,
                    "skew": self.settings.count_skew_seconds * 1000,
                    "risk_max": 500,
                }
            )  # fmt: skip
            prio = (await self.rules()).priorities()
            calls = [list(groups.items())] if not self.cluster else [[g] for g in groups.items()]
            for call in calls:
                keys: list[str] = []
                req_groups = []
                for b, members in call:
                    res, _, events, stats, exc, rp = self._bucket_keys(b)
                    keys += (events, res, stats, exc, rp)
                    for _, r in members:
                        # not through the reserve path's cache: a count names each
                        # position once, and would only push the hot ones out of it
                        agg, pos, _, log, lx, sch, bq = self._make_line_keys(r.sku, r.location)
                        keys += (pos, log, lx, sch, agg, bq)
                    req_groups.append(
                        {
                            "b": b,
                            "rows": [
                                {"sku": r.sku, "loc": r.location, "q": r.counted,
                                 "t": _dt_ms(r.counted_at), "row": r.row}
                                for _, r in members
                            ],
                        }
                    )  # fmt: skip
                req = {"cid": count_id, "dry": dry_run, "prio": prio, "groups": req_groups}
                out = await self._run("count", keys, cfg, req)
                flat = [(i, r) for _, members in call for i, r in members]
                for (i, r), o in zip(flat, out["rows"], strict=True):
                    results[i] = CountResult(
                        row=r.row, status=o["st"], sku=r.sku, location=r.location,
                        reason=o.get("reason"), detail=o.get("detail"),
                        on_hand_before=o.get("before"), on_hand_after=o.get("after"),
                        on_hand_at_count=o.get("at_t"), drift=o.get("drift"),
                        committed=o.get("committed"), safety_stock=o.get("safety_stock"),
                        units_at_risk=int(o.get("at_risk") or 0),
                        exception_id=o.get("exception"),
                    )  # fmt: skip
        return [r for r in results if r is not None]

    async def enqueue_counts(
        self,
        rows: Iterable[Mapping[str, Any]],
        *,
        count_id: str | None = None,
        source: str = "",
        assume_utc: bool = False,
        actor: str = "",
    ) -> str:
        """Queue a count for the workers (atp.worker) and return its batch id; rows are
        stored as received and each is parsed, or refused with its reason, by the worker.
        Parameters as :func:`atp.counts.enqueue_counts`."""
        return await counts.enqueue_counts(
            cast("ATP", self),
            rows,
            count_id=count_id,
            source=source,
            assume_utc=assume_utc,
            actor=actor,
        )

    async def count_batch(self, batch_id: str) -> dict[str, Any] | None:
        """A queued count batch: status, progress (``done`` of ``rows``) and, once done, its
        report; None for an unknown id. See :func:`atp.counts.count_batch`."""
        return await counts.count_batch(cast("ATP", self), batch_id)

    async def exceptions(
        self,
        *,
        status: str | None = "open",
        kind: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[ExceptionRecord]:
        """Exceptions over the whole deployment, newest first (by time raised, then id).

        Every bucket's exceptions hash is scanned (HSCAN, so the server is never blocked)
        on each call: fine for the thousands of exceptions operators work through, not an
        index for millions. Memory stays bounded by ``limit`` however many there are.

        :param status: ``open``, ``resolved`` or ``None`` for both.
        :param kind: ``oversell`` or ``short_pick``; ``None`` for every kind.
        :param limit: at most this many (1..1000).
        :param before: an exception id; only exceptions after it in this order (for
            paging: pass the last id of the previous page).
        :raises UnknownException: ``before`` names no exception.
        """
        if status not in (None, "open", "resolved"):
            raise InvalidRequest("status must be open or resolved", field="status")
        if kind is not None:
            check_text(kind, "kind", 32)
        check_int(limit, "limit", 1, 1000)
        top = None if before is None else _exception_order(await self.exception(before))
        kept: dict[str, tuple[tuple[int, int, int], ExceptionRecord]] = {}
        for b in range(self.keys.buckets):
            # HSCAN may return an entry twice (a rehash under way): keyed by id
            async for _, raw in self.redis.hscan_iter(self._bucket_keys(b)[4], count=500):
                rec = _exception(json.loads(raw))
                if (status is not None and rec.status != status) or (
                    kind is not None and rec.kind != kind
                ):
                    continue
                order = _exception_order(rec)
                if top is not None and order >= top:
                    continue
                kept[rec.id] = (order, rec)
                if len(kept) >= 2 * limit:
                    kept = dict(sorted(kept.items(), key=lambda kv: kv[1][0], reverse=True)[:limit])
        newest = sorted(kept.values(), key=lambda v: v[0], reverse=True)
        return [rec for _, rec in newest[:limit]]

    async def exception(self, exception_id: str) -> ExceptionRecord:
        """One exception by id.

        :raises UnknownException: no exception has that id.
        """
        b = self._exception_bucket(exception_id)
        raw = await self.redis.hget(self._bucket_keys(b)[4], exception_id)
        if raw is None:
            raise UnknownException(f"no exception with id {exception_id}")
        return _exception(json.loads(raw))

    async def resolve_exception(
        self,
        exception_id: str,
        action: str,
        *,
        note: str = "",
        actor: str = "",
        source: str = "",
    ) -> ExceptionRecord:
        """Resolve an exception: ``release`` releases the reservations it names at risk
        (those still live; each release is its own audited movement), ``keep`` leaves them.
        The resolution is claimed first (lua/resolve.lua), so no other action can win once
        releasing starts, and a retry after a crash continues it; it is then recorded
        (action, note, who, when, the at-risk reservations that stand released) and
        announced on the outbox. Resolving again the same way returns it; another way
        raises :class:`~atp.errors.AlreadyResolved`."""
        if action not in ("release", "keep"):
            raise InvalidRequest("action must be release or keep", field="action")
        check_text(note, "note", 1000, required=False)
        b = self._exception_bucket(exception_id)
        keys = (self._bucket_keys(b)[4], self._bucket_keys(b)[2])
        cfg = self._cfg(actor, source)
        req: dict[str, Any] = {
            "id": exception_id, "phase": "claim", "action": action, "note": note, "released": [],
        }  # fmt: skip
        out = await self._run("resolve", keys, cfg, req)
        current = _exception(out["exception"])
        if out["replay"]:
            return current
        released: list[str] = []
        if action == "release":
            reason = f"exception {exception_id}"
            for r in current.data.get("at_risk") or []:
                rid = r["reservation_id"]
                try:
                    await self.release(rid, reason=reason, actor=actor, source=source)
                    parts, _ = await self._parts(rid)
                except (UnknownReservation, AlreadyFulfilled):
                    continue
                # released by this resolution (now, or by an attempt a crash interrupted),
                # not by someone else before
                if any(p["st"] == "released" and p.get("rsn") == reason for p in parts):
                    released.append(rid)
        out = await self._run(
            "resolve", keys, cfg, {**req, "phase": "finish", "released": released}
        )
        return _exception(out["exception"])

    def _exception_bucket(self, exception_id: str) -> int:
        b, sep, n = exception_id.partition("-") if isinstance(exception_id, str) else ("", "", "")
        if not (sep and b.isascii() and b.isdigit() and n.isascii() and n.isdigit()):
            raise InvalidRequest(f"not an exception id: {exception_id!r:.40}", field="exception_id")
        if int(b) >= self.keys.buckets:
            raise UnknownException(f"no exception with id {exception_id}")
        return int(b)


def _dt_ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _count_row_problem(r: CountRow, max_on_hand: int) -> tuple[str, str] | None:
    """Why a count row cannot even be sent (reason, detail), or None."""
    if not isinstance(r, CountRow):
        return ("bad_row", f"not a count row: {r!r:.80}")
    if not isinstance(r.row, int) or isinstance(r.row, bool) or r.row < 0:
        return ("bad_row", "row must be a row number")
    for what, v in (("sku", r.sku), ("location", r.location)):
        if not isinstance(v, str) or not IDENT_RE.fullmatch(v):
            return ("bad_row", f"{what} must be 1-64 ASCII letters, digits or . _ -, got {v!r:.80}")
    if not isinstance(r.counted, int) or isinstance(r.counted, bool) or r.counted < 0:
        return (
            "bad_count",
            f"counted quantity must be a whole number of 0 or more, got {r.counted!r:.40}",
        )
    if r.counted > max_on_hand:
        return ("bad_count", f"counted quantity above the maximum {max_on_hand}")
    if not isinstance(r.counted_at, datetime) or r.counted_at.tzinfo is None:
        return ("bad_time", "counted_at must be a time with its time zone")
    return None


def _exception(d: dict[str, Any]) -> ExceptionRecord:
    return ExceptionRecord(
        id=d["id"],
        kind=d.get("kind", ""),
        status=d.get("status", "open"),
        raised_at=ms_to_dt(int(d.get("raised_at", 0))),
        data={k: v for k, v in d.items() if k != "resolution"},
        resolution=_resolution(d.get("resolution")),
    )


def _exception_order(e: ExceptionRecord) -> tuple[int, int, int]:
    """Where an exception sorts, oldest first: time raised (ms), then bucket and number of
    its id ("<bucket>-<n>")."""
    b, _, n = e.id.partition("-")
    return (
        int(e.data.get("raised_at", 0)),
        int(b) if b.isdigit() else 0,
        int(n) if n.isdigit() else 0,
    )


def _resolution(r: Any) -> dict[str, Any] | None:
    if not isinstance(r, dict):
        return None
    out = dict(r)
    if "at" in out:
        out["at"] = ms_to_dt(int(out["at"])).isoformat()
    out.setdefault("released", [])
    return out
