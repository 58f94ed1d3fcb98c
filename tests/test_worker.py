"""The worker (atp.worker) on the session's real server: queued count batches applied,
shared by a consumer group, finished by another worker after a crash (kill -9) or a clean
stop, with no row applied twice; bad rows refused row by row; expired holds reaped. And
`atp serve` with its worker child, and without (`--no-worker`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from atp import ATP, EmbeddedServer, Settings
from atp.counts import GROUP
from atp.embedded import free_port
from atp.worker import Worker

LOC = "DC1"


def _row(sku: str, qty: Any, at: Any = None, loc: str = LOC) -> dict[str, Any]:
    when = at if at is not None else datetime.now(UTC).isoformat()
    return {"sku": sku, "location": loc, "counted_qty": qty, "counted_at": when}


async def _seed(atp: ATP, skus: list[str], on_hand: int = 10) -> None:
    await asyncio.gather(*(atp.set_position(s, LOC, on_hand, reason="init") for s in skus))


async def _count_movements(atp: ATP, sku: str, count_id: str) -> list[Any]:
    return [
        m
        for m in await atp.movements(sku, LOC, count=1000)
        if m.kind == "count" and m.ref == count_id
    ]


async def _assert_applied_once(atp: ATP, counted: dict[str, int], count_id: str) -> None:
    """Every position carries its count, and exactly one `count` movement of it."""

    async def one(sku: str, qty: int) -> None:
        pos = await atp.position(sku, LOC)
        assert pos is not None and pos.on_hand == qty, (sku, pos)
        moves = await _count_movements(atp, sku, count_id)
        assert len(moves) == 1, (sku, moves)
        assert moves[0].on_hand_after == qty

    items = list(counted.items())
    for i in range(0, len(items), 200):  # a few hundred at a time: the pool is bounded
        await asyncio.gather(*(one(s, q) for s, q in items[i : i + 200]))


def _worker(core: ATP, **kw: Any) -> Worker:
    kw.setdefault("reaper_interval", 0)
    kw.setdefault("block", 0.05)
    return Worker(core, **kw)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATP_")}
    env.update({"ATP_DATA_DIR": str(tmp_path / "data"), **extra})
    return env


def _worker_env(server: EmbeddedServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    # the `atp` fixture's prefix and buckets, so its core sees the worker's writes
    return _env(
        tmp_path,
        ATP_REDIS_URL=server.url,
        ATP_KEY_PREFIX="t:",
        ATP_BUCKETS="16",
        **{"ATP_REAPER_INTERVAL": "0", **extra},
    )


async def _atp_worker(
    server: EmbeddedServer, tmp_path: Path, *args: str, **env: str
) -> asyncio.subprocess.Process:
    """``python -m atp worker`` on the session server, chunks of 3 rows unless told."""
    env = {"ATP_WORKER_CHUNK": "3", **env}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "atp", "worker", *args,
        env=_worker_env(server, tmp_path, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _wait_for(check: Any, what: str, within: float = 30) -> Any:
    """Poll ``check()`` (async) until it returns something truthy, within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


# -- one worker -----------------------------------------------------------------------------


async def test_a_queued_batch_is_applied_by_a_worker(atp: ATP) -> None:
    skus = [f"W{i}" for i in range(25)]
    await _seed(atp, skus)
    counted = {s: i for i, s in enumerate(skus)}
    bid = await atp.enqueue_counts(
        [_row(s, q) for s, q in counted.items()], count_id="cc-1", source="wms", actor="ops"
    )
    assert re.fullmatch(r"cnt-\d+-[0-9a-f]{8}", bid)
    queued = await atp.count_batch(bid)
    assert queued is not None
    assert (queued["status"], queued["rows"], queued["done"], queued["report"]) == (
        "queued", 25, 0, None,
    )  # fmt: skip
    w = _worker(atp, chunk=7)
    stats = await w.run_once()
    assert (stats.batches, stats.rows) == (1, 25)
    done = await atp.count_batch(bid)
    assert done is not None
    assert done["status"] == "done" and done["done"] == 25 and done["attempts"] == 1
    assert done["worker"] == w.name and done["count_id"] == "cc-1" and done["source"] == "wms"
    assert done["finished_at"] and done["started_at"] and done["error"] is None
    rep = done["report"]
    assert (rep["rows"], rep["applied"], rep["already_applied"], rep["refused"]) == (25, 25, 0, 0)
    assert rep["total_abs_drift"] == sum(abs(q - 10) for q in counted.values())
    assert rep["within_tolerance"] == 1  # W10: counted 10, as the book said
    await _assert_applied_once(atp, counted, "cc-1")
    m = (await _count_movements(atp, "W3", "cc-1"))[0]
    assert (m.source, m.actor, m.reason) == ("wms", "ops", "cycle_count")
    # acknowledged and removed from the queue; kept for the retention time
    assert await atp.redis.xlen(atp.keys.counts_queue()) == 0
    assert (await atp.redis.xpending(atp.keys.counts_queue(), GROUP))["pending"] == 0
    ttl = await atp.redis.ttl(atp.keys.count_result(bid))
    assert 0 < ttl <= atp.settings.counts_retention_seconds
    assert 0 < await atp.redis.ttl(atp.keys.count_batch(bid)) <= ttl
    # nothing left: another pass does nothing
    assert (await _worker(atp).run_once()).batches == 0


async def test_the_count_id_defaults_to_the_batch_id_and_a_resent_count_applies_nothing_twice(
    atp: ATP,
) -> None:
    await _seed(atp, ["A", "B"])
    rows = [_row("A", 3), _row("B", 4)]
    first = await atp.enqueue_counts(rows)
    again = await atp.enqueue_counts(rows, count_id=first)
    assert first != again
    await _worker(atp).run_once()
    b1, b2 = await atp.count_batch(first), await atp.count_batch(again)
    assert b1 is not None and b2 is not None
    assert b1["count_id"] == b2["count_id"] == first
    assert (b1["report"]["applied"], b2["report"]["applied"]) == (2, 0)
    assert b2["report"]["already_applied"] == 2
    await _assert_applied_once(atp, {"A": 3, "B": 4}, first)


async def test_bad_rows_are_refused_row_by_row_and_the_rest_apply(atp: ATP) -> None:
    await _seed(atp, ["OK-1", "OK-2", "DUP"])
    now = datetime.now(UTC)
    rows: list[Any] = [
        _row("OK-1", 7),                                   # 1 applies
        _row("NOPE", 5),                                   # 2 unknown position
        _row("OK-2", -1),                                  # 3 negative
        _row("OK-2", 4, at="yesterday"),                   # 4 malformed date
        _row("OK-2", 4, at="2025-01-01T00:00:00"),          # 5 no time zone
        _row("DUP", 2),                                    # 6 applies
        _row("DUP", 3),                                    # 7 duplicate of row 6
        {"sku": "OK-2", "location": LOC, "counted_qty": 1},  # 8 missing counted_at
        _row("bad sku!", 1),                               # 9 not an identifier
        _row("OK-2", 9, at=(now + timedelta(hours=2)).isoformat()),  # 10 from the future
        _row("OK-2", "12"),                                # 11 applies (a number as text)
    ]  # fmt: skip
    bid = await atp.enqueue_counts(rows, count_id="bad-1")
    await _worker(atp, chunk=4).run_once()
    batch = await atp.count_batch(bid)
    assert batch is not None and batch["status"] == "done"
    rep = batch["report"]
    assert (rep["rows"], rep["applied"], rep["refused"]) == (11, 3, 8)
    assert rep["refused_by_reason"] == {
        "unknown_position": 1, "bad_count": 1, "bad_time": 2, "duplicate": 1, "bad_row": 2,
        "future": 1,
    }  # fmt: skip
    why = {r["row"]: r["reason"] for r in rep["refused_rows"]}
    assert why == {2: "unknown_position", 3: "bad_count", 4: "bad_time", 5: "bad_time",
                   7: "duplicate", 8: "bad_row", 9: "bad_row", 10: "future"}  # fmt: skip
    assert all(r["detail"] for r in rep["refused_rows"])
    await _assert_applied_once(atp, {"OK-1": 7, "DUP": 2, "OK-2": 12}, "bad-1")
    assert await atp.position("NOPE", LOC) is None


async def test_assume_utc_reads_times_without_a_zone(atp: ATP) -> None:
    await _seed(atp, ["U"])
    naive = datetime.now(UTC).replace(tzinfo=None).isoformat()
    bid = await atp.enqueue_counts([_row("U", 6, at=naive)], assume_utc=True)
    await _worker(atp).run_once()
    batch = await atp.count_batch(bid)
    assert batch is not None and batch["report"]["applied"] == 1


@pytest.mark.parametrize(
    ("rows", "kw", "field"),
    [
        ([], {}, "rows"),
        ([1, 2], {}, "rows"),
        ("sku,location", {}, "rows"),
        ([_row("A", 1)], {"count_id": "no spaces"}, "count_id"),
        ([_row("A", 1)], {"source": "x" * 200}, "source"),
        ([_row("A", 1)] * 6, {}, "rows"),  # more than counts_max_rows (5 here)
    ],
)
async def test_enqueue_refuses_what_is_not_a_batch(
    server: EmbeddedServer, rows: Any, kw: dict[str, Any], field: str
) -> None:
    from atp import InvalidRequest

    settings = Settings(redis_url=None, key_prefix="t:", buckets=16, counts_max_rows=5)
    async with ATP(aioredis.Redis.from_url(server.url), settings) as core:
        await core.redis.flushdb()
        with pytest.raises(InvalidRequest) as e:
            await core.enqueue_counts(rows, **kw)
        assert e.value.field == field
        assert [k async for k in core.redis.scan_iter()] == []  # nothing queued


def test_the_queue_keys_share_one_slot() -> None:
    from redis.crc import key_slot

    from atp import KeySpace

    ks = KeySpace("atp:", 128)
    keys = [ks.counts_queue(), ks.count_batch("cnt-1-0a0b0c0d"), ks.count_result("cnt-1-0a0b0c0d")]
    assert keys[0] == "{atp:counts}:queue"
    assert len({key_slot(k.encode()) for k in keys}) == 1


async def test_unknown_batches_read_as_none(atp: ATP) -> None:
    assert await atp.count_batch("cnt-1-00000000") is None
    assert await atp.count_batch("../etc") is None
    assert await atp.count_batch("") is None


# -- several workers ------------------------------------------------------------------------


async def test_two_workers_share_the_queue_each_batch_applied_by_one(
    atp: ATP, server: EmbeddedServer, settings: Settings
) -> None:
    skus = [f"S{i}" for i in range(60)]
    await _seed(atp, skus)
    batches = {}
    for b in range(12):
        part = skus[b * 5 : b * 5 + 5]
        bid = await atp.enqueue_counts([_row(s, 20 + b) for s in part], count_id=f"share-{b}")
        batches[bid] = (f"share-{b}", {s: 20 + b for s in part})
    cores = [ATP(aioredis.Redis.from_url(server.url), settings) for _ in range(2)]
    workers = []
    tasks = []
    try:
        for core in cores:
            await core.start()
            w = _worker(core, chunk=2, name=f"w{len(workers)}")
            workers.append(w)
            tasks.append(asyncio.create_task(w.run()))

        async def all_done() -> bool:
            got = [await atp.count_batch(b) for b in batches]
            return all(g is not None and g["status"] == "done" for g in got)

        await _wait_for(all_done, "every batch done")
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
        for core in cores:
            await core.aclose()
    assert sum(w.stats.batches for w in workers) == 12
    assert sum(w.stats.rows for w in workers) == 60
    for bid, (cid, counted) in batches.items():
        b = await atp.count_batch(bid)
        assert b is not None
        assert b["attempts"] == 1 and b["worker"] in ("w0", "w1")
        assert (b["report"]["applied"], b["report"]["already_applied"]) == (5, 0)
        await _assert_applied_once(atp, counted, cid)
    # both left the group cleanly (nothing pending on them)
    assert await atp.redis.xinfo_consumers(atp.keys.counts_queue(), GROUP) == []


async def _batch_started(atp: ATP, bid: str, rows: int) -> int:
    raw = await atp.redis.hget(atp.keys.count_result(bid), "done")
    done = int(raw or 0)
    # started, and far enough from the end that the kill lands before it
    return done if 0 < done < rows * 9 // 10 else 0


async def test_a_worker_killed_mid_batch_is_finished_by_another_with_no_row_twice(
    atp: ATP, server: EmbeddedServer, tmp_path: Path
) -> None:
    n = 3000
    skus = [f"K{i}" for i in range(n)]
    await _seed(atp, skus, on_hand=50)
    counted = {s: i % 97 for i, s in enumerate(skus)}
    bid = await atp.enqueue_counts([_row(s, q) for s, q in counted.items()], count_id="crash-1")
    proc = await _atp_worker(server, tmp_path, "--name", "victim")
    try:
        done_at_kill = await _wait_for(lambda: _batch_started(atp, bid, n), "the batch to start")
        proc.kill()  # SIGKILL: no clean-up of any kind
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()
    left = await atp.count_batch(bid)
    assert left is not None
    assert left["status"] == "running" and left["worker"] == "victim"
    assert done_at_kill <= left["done"] < n
    pending = await atp.redis.xpending(atp.keys.counts_queue(), GROUP)
    assert pending["pending"] == 1
    # a worker that claims at once (its claim idle time is 0): the victim is gone
    rescuer = _worker(atp, chunk=500, claim_idle=0, name="rescuer")
    stats = await rescuer.run_once()
    assert stats.batches == 1 and stats.rows == n - left["done"]
    batch = await atp.count_batch(bid)
    assert batch is not None
    assert batch["status"] == "done" and batch["worker"] == "rescuer" and batch["attempts"] == 2
    rep = batch["report"]
    assert rep["rows"] == n and rep["refused"] == 0
    assert rep["applied"] + rep["already_applied"] == n
    # only the chunk in flight when the victim died can come back `already`
    assert rep["already_applied"] <= 3
    assert rep["total_abs_drift"] == sum(abs(q - 50) for q in counted.values())
    await _assert_applied_once(atp, counted, "crash-1")
    assert (await atp.redis.xpending(atp.keys.counts_queue(), GROUP))["pending"] == 0


async def test_a_stopped_worker_hands_its_batch_back_unacknowledged(
    atp: ATP, server: EmbeddedServer, tmp_path: Path
) -> None:
    n = 3000
    skus = [f"T{i}" for i in range(n)]
    await _seed(atp, skus, on_hand=5)
    counted = {s: 1 + i % 13 for i, s in enumerate(skus)}
    bid = await atp.enqueue_counts([_row(s, q) for s, q in counted.items()], count_id="stop-1")
    proc = await _atp_worker(server, tmp_path, "--name", "stopped")
    try:
        await _wait_for(lambda: _batch_started(atp, bid, n), "the batch to start")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, err
    assert b"left at row" in err
    left = await atp.count_batch(bid)
    assert left is not None and left["status"] == "queued" and 0 < left["done"] < n
    # still pending, not acknowledged; marked idle, so a worker with the default claim
    # idle time (30 s) takes it over at once
    assert (await atp.redis.xpending(atp.keys.counts_queue(), GROUP))["pending"] == 1
    stats = await _worker(atp, chunk=1000).run_once()
    assert stats.batches == 1
    batch = await atp.count_batch(bid)
    assert batch is not None and batch["status"] == "done"
    # a clean stop records the chunk it finished: nothing comes back `already`
    assert (batch["report"]["applied"], batch["report"]["already_applied"]) == (n, 0)
    await _assert_applied_once(atp, counted, "stop-1")


async def test_a_slow_worker_whose_batch_was_taken_over_stops_writing(atp: ATP) -> None:
    """The lease: after another worker took the batch over, the first one's next progress
    write is refused, so it cannot overwrite the new owner's report."""
    skus = [f"L{i}" for i in range(10)]
    await _seed(atp, skus)
    bid = await atp.enqueue_counts([_row(s, 1) for s in skus], count_id="lease-1")
    slow = _worker(atp, chunk=2, name="slow")
    await slow._ensure_group()
    item = await slow._next(None)
    assert item is not None
    entry, got = item
    assert got == bid
    h = await slow._take(atp.keys.count_result(bid), entry, "slow#1")
    assert h is not None and h["status"] == "running"
    # the other worker claims it (as if slow had been idle past the claim time)
    fast = _worker(atp, claim_idle=0, name="fast")
    assert (await fast.run_once()).batches == 1
    from atp.reconcile import CountReport

    ok = await slow._progress(atp.keys.count_result(bid), entry, "slow#1", 2, CountReport("x"))
    assert not ok
    batch = await atp.count_batch(bid)
    assert batch is not None and batch["status"] == "done" and batch["worker"] == "fast"
    assert batch["report"]["applied"] == 10


async def test_a_batch_whose_rows_are_gone_fails(atp: ATP) -> None:
    await _seed(atp, ["G"])
    bid = await atp.enqueue_counts([_row("G", 1)])
    await atp.redis.delete(atp.keys.count_batch(bid))
    await _worker(atp).run_once()
    batch = await atp.count_batch(bid)
    assert batch is not None and batch["status"] == "failed" and batch["error"]
    assert (await atp.redis.xpending(atp.keys.counts_queue(), GROUP))["pending"] == 0


async def test_a_batch_that_keeps_failing_is_given_up(atp: ATP) -> None:
    from atp.worker import MAX_ATTEMPTS

    await _seed(atp, ["P"])
    bid = await atp.enqueue_counts([_row("P", 1)])
    await atp.redis.hset(atp.keys.count_result(bid), "attempts", MAX_ATTEMPTS)
    await _worker(atp).run_once()
    batch = await atp.count_batch(bid)
    assert batch is not None and batch["status"] == "failed"
    assert batch["error"] == f"gave up after {MAX_ATTEMPTS} attempts"
    pos = await atp.position("P", LOC)
    assert pos is not None and pos.on_hand == 10  # nothing applied


# -- reaping --------------------------------------------------------------------------------


async def test_the_worker_reaps_expired_holds(atp: ATP) -> None:
    await atp.set_position("H", LOC, 10, reason="init")
    for i in range(3):
        await atp.reserve(f"h{i}", "web", [("H", LOC, 2)], hold_seconds=1)
    await atp.reserve("kept", "web", [("H", LOC, 1)], hold_seconds=600)
    assert await atp.totals() == (7, 7)
    w = _worker(atp, reaper_interval=0.05)
    task = asyncio.create_task(w.run())
    try:

        async def reaped() -> bool:
            return await atp.totals() == (1, 1)

        await _wait_for(reaped, "the expired holds to be reaped", within=10)
    finally:
        w.stop()
        await task
    assert w.stats.holds == 3 and w.stats.units == 6
    assert (await atp.reservation("h0")).status == "expired"
    assert (await atp.reservation("kept")).status == "held"


async def test_worker_once_from_the_command_line(
    atp: ATP, server: EmbeddedServer, tmp_path: Path
) -> None:
    await _seed(atp, ["C1", "C2"])
    bid = await atp.enqueue_counts([_row("C1", 1), _row("C2", 2)], count_id="cli-1")
    proc = await _atp_worker(server, tmp_path, "--once", ATP_REAPER_INTERVAL="1")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert b"1 count batches done (2 rows)" in out
    batch = await atp.count_batch(bid)
    assert batch is not None and batch["status"] == "done"
    await _assert_applied_once(atp, {"C1": 1, "C2": 2}, "cli-1")


def test_worker_without_a_server_says_how(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "atp", "worker", "--once"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "ATP_REDIS_URL" in out.stderr


# -- atp serve and its worker ---------------------------------------------------------------


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[tuple[int, str]]:
    """Live processes whose parent is ``pid``, with their command lines."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.append((int(d.name), cmd))
    return out


def _http(port: int, method: str, path: str, key: str, body: object = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Served:
    """A running `atp serve`; its output is collected by a thread, line by line."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc, self.port = proc, port
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._collect, daemon=True)
        self.reader.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def read(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, n: int = 1) -> list[str]:
        """The first group of the first ``n`` matches of ``pattern`` in the output, once
        there are that many (within 30 s)."""
        deadline = time.monotonic() + 30
        while len(found := re.findall(pattern, self.read())) < n:
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.read()}"
            time.sleep(0.02)
        return found[:n]


@pytest.fixture
def serve(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    port = free_port()
    args = getattr(request, "param", [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "atp", "serve", "--demo", "--port", str(port),
         "--log-level", "warning", *args],
        env=_env(tmp_path, ATP_REAPER_INTERVAL="0.2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    served: Served | None = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _port_open(port):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        assert _port_open(port), "atp serve did not listen"
        served = Served(proc, port)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if served is not None:
            served.reader.join(10)  # it ends at the end of the output
        if proc.stdout is not None:
            proc.stdout.close()


def test_serve_runs_a_worker_that_applies_counts_and_stops_it(serve: Served) -> None:
    pid = int(serve.wait_for(r"worker started \(pid (\d+)\)")[0])
    serve.wait_for(r"demo admin key: (\S+)")
    text = serve.read()
    assert (pid,) in [(p,) for p, _ in _children(serve.proc.pid)]
    assert "atp" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    key = re.search(r"demo admin key: (\S+)", text).group(1)  # type: ignore[union-attr]
    at = datetime.now(UTC).isoformat()
    status, body = _http(serve.port, "POST", "/v1/counts", key, {"count_id": "srv-1", "rows": [
        {"sku": "DEMO-TEE", "location": "WH1", "counted_qty": 97, "counted_at": at},
        {"sku": "DEMO-NONE", "location": "WH1", "counted_qty": 1, "counted_at": at},
    ]})  # fmt: skip
    assert status == 202, body
    deadline = time.monotonic() + 30
    while True:
        status, batch = _http(serve.port, "GET", f"/v1/counts/{body['batch_id']}", key)
        assert status == 200, batch
        if batch["status"] == "done" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert batch["status"] == "done", batch
    assert (batch["report"]["applied"], batch["report"]["refused"]) == (1, 1)
    assert _http(serve.port, "GET", "/v1/positions/DEMO-TEE/WH1", key)[1]["on_hand"] == 97
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(30) == 0
    serve.wait_for(r"(worker stopped)")
    assert not _alive(pid), "the worker outlived atp serve"


def test_serve_starts_another_worker_when_its_worker_dies(serve: Served) -> None:
    first = int(serve.wait_for(r"worker started \(pid (\d+)\)")[0])
    os.kill(first, signal.SIGKILL)
    second = int(serve.wait_for(r"worker started \(pid (\d+)\)", 2)[1])
    serve.wait_for(r"(starting another)")
    assert _alive(second) and not _alive(first)
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(30) == 0
    assert not _alive(second)


@pytest.mark.parametrize("serve", [["--no-worker"]], indirect=True)
def test_serve_no_worker_starts_none(serve: Served) -> None:
    serve.wait_for(r"demo admin key: (\S+)")
    text = serve.read()
    assert "worker started" not in text
    assert not [c for c in _children(serve.proc.pid) if " worker" in c[1]]
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(30) == 0
