"""The worker: a long-running process (``atp worker``; ``atp serve`` runs one) that reaps
expired holds and applies the count batches queued in Redis (atp.counts).

Workers share the queue through a Redis Streams consumer group: each batch is delivered to
one worker, which applies it through :meth:`atp.ATP.apply_counts` chunk by chunk
(``ATP_WORKER_CHUNK`` rows per script call), writes the batch's progress and report after
every chunk, and acknowledges the batch once it is done. A worker that dies in the middle
of a batch leaves it pending; once it has made no progress for
``ATP_WORKER_CLAIM_IDLE_SECONDS``, another worker claims it (XAUTOCLAIM) and carries on from
the last recorded chunk. No row is applied twice: the count script applies a row at most
once per count id, and answers ``already`` (with the original figures) for a row of the
chunk that was in flight when the first worker died, so the report counts every row once
(those few as ``already_applied``).

Each run of a batch holds a *lease* (a token in the batch's result hash); progress is
written only under the lease (WATCH/MULTI), together with a heartbeat that resets the
batch's idle time, so a worker that was merely slow, and whose batch another worker took
over, stops at its next chunk instead of writing over the new owner's report.

SIGTERM or SIGINT stops a worker cleanly: it finishes the chunk in flight, records the
progress, and hands the unfinished batch back (still pending, not acknowledged, marked idle
so the next worker claims it at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError, WatchError

from .counts import GROUP
from .errors import ATPError, BackendError
from .models import CountResult, CountRow
from .reconcile import CountReport, parse_count
from .sources import RowError
from .store import ATP

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger("atp.worker")

MAX_ATTEMPTS = 10  # runs of one batch (crashed, stopped or failing), before it is failed
REAP_ROUNDS = 20  # expire_holds calls per reap, at most (each bounded per bucket)


@dataclass
class WorkerStats:
    batches: int = 0
    rows: int = 0
    holds: int = 0
    units: int = 0


class Worker:
    """Reaps expired holds and applies queued count batches, until :meth:`stop`.

    :param core: a started :class:`atp.ATP`.
    :param name: the consumer name in the group; unique per process by default
        (``<host>:<pid>:<random>``).
    :param chunk: rows per count script call (``ATP_WORKER_CHUNK``).
    :param claim_idle: seconds a batch may go without progress before another worker
        claims it (``ATP_WORKER_CLAIM_IDLE_SECONDS``).
    :param reaper_interval: seconds between reaps (``ATP_REAPER_INTERVAL``); 0: never.
    :param block: seconds one read of the queue waits for a batch (bounds how late a stop
        is seen while idle).
    :param parent_pid: stop when this process is no longer the parent (``atp serve``'s
        worker does not outlive it).
    """

    def __init__(
        self,
        core: ATP,
        *,
        name: str | None = None,
        chunk: int | None = None,
        claim_idle: float | None = None,
        reaper_interval: float | None = None,
        block: float = 1.0,
        parent_pid: int | None = None,
    ) -> None:
        s = core.settings
        self.core = core
        self.redis = core.redis
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.chunk = min(chunk or s.worker_chunk, 10_000)  # apply_counts' limit
        self.claim_idle = s.worker_claim_idle_seconds if claim_idle is None else claim_idle
        self.reaper_interval = s.reaper_interval if reaper_interval is None else reaper_interval
        self.block_ms = max(1, int(block * 1000))
        self.parent_pid = parent_pid
        self.queue = core.keys.counts_queue()
        self.stats = WorkerStats()
        self._stop = asyncio.Event()
        self._next_reap = 0.0
        self._next_claim = 0.0

    # -- running ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop after the chunk in flight (safe to call from a signal handler)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> WorkerStats:
        """Work until :meth:`stop`: reap every ``reaper_interval`` seconds, apply batches as
        they are queued, and claim batches other workers left unfinished. Errors (Redis
        down) are logged and retried; they never end the loop."""
        log.info("%s: started (chunk %d, claim idle %gs)", self.name, self.chunk, self.claim_idle)
        restamped = False
        try:
            while not self.stopping:
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.info("%s: parent process gone, stopping", self.name)
                    break
                try:
                    if not restamped:  # a rules apply interrupted before it re-stamped
                        n = await self.core.restamp_backorders()
                        restamped = True
                        if n:
                            log.info("%s: %d backorders re-stamped with the rules", self.name, n)
                    await self._maybe_reap()
                    item = await self._next(self._block_ms())
                    if item is not None:
                        await self._process(*item)
                except Exception:
                    log.exception("%s: failed; retrying", self.name)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 1.0)
        finally:
            await self._leave()
            log.info("%s: stopped", self.name)
        return self.stats

    async def run_once(self) -> WorkerStats:
        """Reap once, then apply every batch queued (and every batch left idle past
        ``claim_idle`` by another worker), and return: for cron and tests."""
        if self.reaper_interval:
            await self.reap()
        while not self.stopping:
            item = await self._next(None)
            if item is None:
                break
            await self._process(*item)
        await self._leave()
        return self.stats

    async def reap(self) -> tuple[int, int]:
        """Reclaim expired holds: ``expire_holds`` until a call reclaims nothing (at most
        ``REAP_ROUNDS`` calls). Returns (holds, units)."""
        holds = units = 0
        for _ in range(REAP_ROUNDS):
            res = await self.core.expire_holds()
            holds += len(res.expired)
            units += res.units
            if not res.expired:
                break
        if holds:
            log.info("%s: reclaimed %d expired holds, %d units", self.name, holds, units)
        self.stats.holds += holds
        self.stats.units += units
        return holds, units

    async def _maybe_reap(self) -> None:
        if self.reaper_interval and time.monotonic() >= self._next_reap:
            try:
                await self.reap()
            finally:
                self._next_reap = time.monotonic() + self.reaper_interval

    def _block_ms(self) -> int:
        ms = self.block_ms
        if self.reaper_interval:
            ms = min(ms, int((self._next_reap - time.monotonic()) * 1000))
        return max(1, ms)

    # -- the queue -------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        try:
            # from the stream's start: batches queued before any worker ever ran are read too
            await self.redis.xgroup_create(self.queue, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _next(self, block_ms: int | None) -> tuple[str, str] | None:
        """The next batch to work on, as (stream entry id, batch id): first one left idle
        by another worker, else a new one (waiting up to ``block_ms``; None: no wait)."""
        try:
            return await self._read(block_ms)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self._ensure_group()
            return await self._read(block_ms)

    async def _read(self, block_ms: int | None) -> tuple[str, str] | None:
        now = time.monotonic()
        if block_ms is None or now >= self._next_claim:
            self._next_claim = now + max(0.05, min(self.claim_idle / 2, 5.0))
            claimed = await self.redis.xautoclaim(
                self.queue, GROUP, self.name, int(self.claim_idle * 1000), "0-0", count=1
            )
            for entry_id, fields in claimed[1]:
                if fields:
                    log.info("%s: claimed %s, left idle by another worker", self.name, entry_id)
                    return _s(entry_id), _batch_of(fields)
                # its entry was deleted: nothing to do but acknowledge it
                await self.redis.xack(self.queue, GROUP, entry_id)
        got: Any = await self.redis.xreadgroup(
            GROUP, self.name, {self.queue: ">"}, count=1, block=block_ms
        )
        for _stream, entries in got or []:
            for entry_id, fields in entries:
                return _s(entry_id), _batch_of(fields)
        return None

    async def _leave(self) -> None:
        """Leave the group if nothing is pending on this consumer (deleting a consumer
        drops its pending entries: a batch left unfinished must stay pending)."""
        with contextlib.suppress(Exception):
            for c in await self.redis.xinfo_consumers(self.queue, GROUP):
                if _s(c["name"]) == self.name and int(c["pending"]) == 0:
                    await self.redis.xgroup_delconsumer(self.queue, GROUP, self.name)

    # -- one batch -------------------------------------------------------------------------

    async def _process(self, entry_id: str, batch_id: str) -> None:
        keys = self.core.keys
        rk, bk = keys.count_result(batch_id), keys.count_batch(batch_id)
        lease = f"{self.name}#{secrets.token_hex(4)}"
        h = await self._take(rk, entry_id, lease)
        if h.get("status") in ("done", "failed") or not h.get("rows"):
            # finished (the worker died between its last write and the acknowledgement),
            # or its record is gone (past retention)
            await self._ack(entry_id)
            return
        if int(h.get("attempts") or 0) > MAX_ATTEMPTS:
            await self._finish(rk, bk, entry_id, lease, h, "failed",
                               error=f"gave up after {MAX_ATTEMPTS} attempts")  # fmt: skip
            return
        raw = await self.redis.get(bk)
        try:
            rows: list[Any] = json.loads(raw) if raw is not None else []
        except ValueError:
            rows = []
        if not isinstance(rows, list) or not rows:
            await self._finish(rk, bk, entry_id, lease, h, "failed", error="the rows are gone")
            return
        count_id, source, actor = (
            h.get("count_id", batch_id),
            h.get("source", ""),
            h.get("actor", ""),
        )
        assume_utc = h.get("assume_utc") == "1"
        report = _report_from(h.get("report"), count_id, source)
        done = int(h.get("done") or 0)
        if done:
            log.info("%s: batch %s resumed at row %d of %d", self.name, batch_id, done, len(rows))
        while done < len(rows):
            part = rows[done : done + self.chunk]
            out: list[CountResult | None] = []
            good: list[CountRow] = []
            for number, fields in enumerate(part, start=done + 1):
                if not isinstance(fields, Mapping):
                    fields = RowError("bad_row", "a row must be an object")
                parsed = parse_count(number, fields, assume_utc=assume_utc)
                if isinstance(parsed, CountResult):
                    out.append(parsed)
                else:
                    out.append(None)
                    good.append(parsed)
            try:
                applied = iter(
                    await self.core.apply_counts(count_id, good, source=source, actor=actor)
                    if good
                    else []
                )
            except BackendError:
                raise  # Redis trouble: the batch stays pending and is retried
            except ATPError as e:  # the batch itself is wrong (cannot happen from the API)
                await self._finish(rk, bk, entry_id, lease, h, "failed", report, error=e.detail)
                return
            for r in out:
                report.add(r if r is not None else next(applied))
            done += len(part)
            self.stats.rows += len(part)
            if done < len(rows) and not await self._progress(rk, entry_id, lease, done, report):
                log.warning("%s: batch %s was taken over by another worker", self.name, batch_id)
                return
            if done < len(rows) and self.stopping:
                await self._hand_back(rk, entry_id, lease)
                log.info("%s: stopping; batch %s left at row %d of %d for the next worker",
                         self.name, batch_id, done, len(rows))  # fmt: skip
                return
            try:  # a reap that fails must not hold up the batch
                await self._maybe_reap()
            except Exception:
                log.exception("%s: reaping expired holds failed", self.name)
        if await self._finish(rk, bk, entry_id, lease, h, "done", report):
            self.stats.batches += 1
            log.info(
                "%s: batch %s done: %d rows, %d applied, %d already applied, %d refused",
                self.name, batch_id, report.rows, report.applied, report.already, report.refused,
            )  # fmt: skip

    async def _take(self, rk: str, entry_id: str, lease: str) -> dict[str, str]:
        """Take the batch under a new lease; returns its record as it was taken (empty
        when there is none; unchanged when it is finished)."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(rk)
                    h = {_s(k): _s(v) for k, v in (await pipe.hgetall(rk)).items()}
                    if not h or h.get("status") in ("done", "failed"):
                        return h  # leaving the block unwatches
                    pipe.multi()  # type: ignore[no-untyped-call]
                    fields: dict[Any, Any] = {
                        "status": "running",
                        "worker": self.name,
                        "lease": lease,
                    }
                    if not h.get("started_at"):
                        fields["started_at"] = int(time.time() * 1000)
                    pipe.hset(rk, mapping=fields)
                    pipe.hincrby(rk, "attempts", 1)
                    pipe.xclaim(self.queue, GROUP, self.name, 0, [entry_id], justid=True)
                    _, attempts, _ = await pipe.execute()
                except WatchError:
                    continue
            h.update({k: str(v) for k, v in fields.items()})
            h["attempts"] = str(attempts)
            return h

    async def _progress(
        self, rk: str, entry_id: str, lease: str, done: int, report: CountReport
    ) -> bool:
        """Record the progress under the lease, with a heartbeat (XCLAIM resets the
        entry's idle time, so nobody claims a batch that is moving). False: lease lost."""
        return await self._under_lease(
            rk, lease, lambda p: (
                p.hset(rk, mapping={"done": done, "report": json.dumps(report.to_dict())}),
                p.xclaim(self.queue, GROUP, self.name, 0, [entry_id], justid=True),
            ),
        )  # fmt: skip

    async def _hand_back(self, rk: str, entry_id: str, lease: str) -> None:
        """Leave an unfinished batch pending (not acknowledged) and idle past the claim
        time, so the next worker takes it over at once."""
        idle = int(self.claim_idle * 1000) + 1
        await self._under_lease(
            rk, lease, lambda p: (
                p.hset(rk, "status", "queued"),
                p.hdel(rk, "lease"),
                p.xclaim(self.queue, GROUP, self.name, 0, [entry_id], idle=idle, justid=True),
            ),
        )  # fmt: skip

    async def _finish(
        self,
        rk: str,
        bk: str,
        entry_id: str,
        lease: str,
        h: Mapping[str, str],
        status: str,
        report: CountReport | None = None,
        *,
        error: str | None = None,
    ) -> bool:
        """Mark the batch done (or failed), set its retention, and acknowledge it, in one
        transaction under the lease."""
        fields: dict[str, str | int] = {"status": status, "finished_at": int(time.time() * 1000)}
        if report is not None:
            fields["report"] = json.dumps(report.to_dict())
            fields["done"] = report.rows
        if error:
            fields["error"] = error
            log.error("%s: batch %s failed: %s", self.name, h.get("batch_id", rk), error)
        keep = self.core.settings.counts_retention_seconds

        def ops(p: Any) -> None:
            p.hset(rk, mapping=fields)
            p.hdel(rk, "lease")
            p.expire(rk, keep)
            p.expire(bk, keep)
            p.xack(self.queue, GROUP, entry_id)
            p.xdel(self.queue, entry_id)

        return await self._under_lease(rk, lease, ops)

    async def _under_lease(self, rk: str, lease: str, ops: Any) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(rk)
                if _s(await pipe.hget(rk, "lease") or b"") != lease:
                    return False  # leaving the block unwatches
                pipe.multi()  # type: ignore[no-untyped-call]
                ops(pipe)
                await pipe.execute()
            except WatchError:
                return False
        return True

    async def _ack(self, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.queue, GROUP, entry_id)
        pipe.xdel(self.queue, entry_id)
        await pipe.execute()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _batch_of(fields: Mapping[Any, Any]) -> str:
    for k, v in fields.items():
        if _s(k) == "batch":
            return _s(v)
    return ""


def _report_from(raw: str | None, count_id: str, source: str) -> CountReport:
    """A report as a worker left it (``CountReport.to_dict``), to carry on from."""
    if not raw:
        return CountReport(count_id, source)
    report = CountReport.from_dict(json.loads(raw))
    report.count_id, report.source = count_id, source
    return report
    d = json.loads(raw)
    for field, key in (
        ("rows", "rows"), ("applied", "applied"), ("already", "already_applied"),
        ("would_apply", "would_apply"), ("refused", "refused"),
        ("within_tolerance", "within_tolerance"), ("total_abs_drift", "total_abs_drift"),
        ("net_drift", "net_drift"), ("units_at_risk", "units_at_risk"),
    ):  # fmt: skip
        setattr(report, field, int(d.get(key) or 0))
    report.exceptions = list(d.get("exceptions") or [])
    report.refused_by_reason = Counter(d.get("refused_by_reason") or {})
    report.refused_rows = list(d.get("refused_rows") or [])
    return report
