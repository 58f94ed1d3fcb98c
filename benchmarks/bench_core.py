"""How close does ``ATP.reserve`` come to the client's ceiling for one script call?

One run, one embedded server (started here in a temporary directory, loopback only,
stopped in a ``finally``), redis.asyncio with N concurrent asyncio tasks:

* ``noop``    the client's ceiling: ``core.scripts.call(core.redis, "noop", [key], [])``,
              the same EVALSHA path ``reserve`` takes, on a script that does nothing;
* ``reserve`` ``core.reserve(...)`` through the public API on ONE hot SKU (on_hand huge,
              confirmed at once, a unique id per call, qty 1).

Each measurement runs for ``--seconds`` after a 1 s warm-up of the same operation; the two
are interleaved (noop, reserve, noop, reserve, ...) for ``--rounds`` rounds and the medians
are reported, since the machine is shared and noisy. The goal: reserve/noop >= 0.7.

    python benchmarks/bench_core.py [--seconds 5] [--tasks 64] [--appendfsync everysec]

Everything is bounded in time: every call has a socket timeout, every phase a deadline,
and the whole run a budget after which it is cancelled and the server stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.asyncio as aioredis

from atp import ATP, EmbeddedServer, Settings

SKU, LOC, CHANNEL = "BENCH-HOT-1", "DC1", "web"
ON_HAND = 10**11


@dataclass
class Phase:
    name: str
    ops: int
    seconds: float
    p50_ms: float
    p99_ms: float
    client_cpu: float  # fraction of one core
    server_cpu: float  # the server process, all of it (network, AOF writes, scripts)
    script_us: float  # the server's own time per EVALSHA (INFO commandstats)
    errors: int

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of another process (Linux); 0 when unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


async def run_phase(
    name: str,
    op: Callable[[], Awaitable[object]],
    tasks: int,
    seconds: float,
    warmup: float,
    server_pid: int,
    client: aioredis.Redis,
) -> Phase:
    """Warm up, then run ``tasks`` concurrent loops of ``op`` for ``seconds``."""

    async def loop(deadline: float, lat: list[float] | None, errs: list[int]) -> None:
        pc = time.perf_counter
        while True:
            t0 = pc()
            if t0 >= deadline:
                return
            try:
                await op()
            except Exception:  # counted and reported, never silent
                errs[0] += 1
                if errs[0] == 1:
                    import traceback

                    traceback.print_exc()
                continue
            if lat is not None:
                lat.append(pc() - t0)

    async def run(duration: float, lat: list[float] | None, errs: list[int]) -> None:
        deadline = time.perf_counter() + duration
        await asyncio.wait_for(
            asyncio.gather(*(loop(deadline, lat, errs) for _ in range(tasks))),
            timeout=duration + 30,
        )

    if warmup > 0:
        await run(warmup, None, [0])
    lat: list[float] = []
    errs = [0]
    await client.config_resetstat()
    c0, s0, t0 = time.process_time(), _proc_cpu_seconds(server_pid), time.perf_counter()
    await run(seconds, lat, errs)
    wall = time.perf_counter() - t0
    c1, s1 = time.process_time(), _proc_cpu_seconds(server_pid)
    stats = await client.info("commandstats")
    script_us = float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", "nan"))
    lat.sort()
    return Phase(
        name=name,
        ops=len(lat),
        seconds=wall,
        p50_ms=_pct(lat, 0.50) * 1000,
        p99_ms=_pct(lat, 0.99) * 1000,
        client_cpu=(c1 - c0) / wall,
        server_cpu=(s1 - s0) / wall,
        script_us=script_us,
        errors=errs[0],
    )


async def bench(args: argparse.Namespace, server: EmbeddedServer) -> None:
    assert server.proc is not None
    server_pid = server.proc.pid
    client = aioredis.Redis.from_url(
        server.url,
        max_connections=args.tasks + 8,
        # redis-py's defaults, as the API uses them: socket_timeout 5 s bounds every call
    )
    settings = Settings(redis_url=server.url, key_prefix="bench:", data_dir=server.data_dir)
    core = ATP(client, settings)
    try:
        await core.start()
        info = await client.info("server")
        conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            parser = type(conn._parser).__name__
        finally:
            await client.connection_pool.release(conn)
        server_name = "valkey" if "valkey_version" in info else "redis"
        server_version = info.get("valkey_version") or info.get("redis_version")
        try:
            import hiredis

            hiredis_version = hiredis.__version__
        except ImportError:
            hiredis_version = "not installed"
        uses_hiredis = "Hiredis" in parser
        print(
            f"python      {platform.python_version()} ({platform.python_implementation()}), "
            f"event loop: {type(asyncio.get_running_loop()).__module__}"
        )
        print(
            f"redis-py    {redis.__version__}; hiredis {hiredis_version}; "
            f"parser {parser} -> hiredis in use: {'yes' if uses_hiredis else 'NO'}"
        )
        print(f"server      {server_name} {server_version} ({server.binary}), {server.url}")
        print(f"persistence appendonly yes, appendfsync {args.appendfsync}")
        print(
            f"load        {args.tasks} asyncio tasks, {args.seconds:g} s per measurement after "
            f"{args.warmup:g} s warm-up, {args.rounds} interleaved rounds, CPUs: {os.cpu_count()}"
        )
        print()

        await core.set_position(SKU, LOC, ON_HAND)
        noop_key = core.keys.position(SKU, LOC).pos
        scripts, r = core.scripts, core.redis

        async def noop() -> object:
            return await scripts.call(r, "noop", [noop_key], [])

        ids = itertools.count()
        run_tag = f"b{int(time.time())}"

        async def reserve() -> object:
            return await core.reserve(
                f"{run_tag}-{next(ids)}", CHANNEL, [(SKU, LOC, 1)], hold_seconds=0
            )

        # --with-script: the reserve script itself through the same call, its arguments
        # formatted by the cheapest means (no validation, no reply decoding): what is left
        # of reserve when the Python in atp.store costs nothing. A diagnostic only.
        cfg = core._cfg("", "")
        ks = core.keys
        bk, pk = ks.bucket_keys(ks.bucket(SKU)), ks.position(SKU, LOC)
        tail = [bk.res, bk.holds, bk.events, pk.pos, pk.hx, pk.log]
        req_fmt = (
            '{"id":"%s","ch":"' + CHANNEL + '","hold":0,"fp":"%040x","idx":true,"home":%d,'
            '"parts":[{"b":'
            + str(ks.bucket(SKU))
            + ',"n":1,"lines":[{"sku":"'
            + SKU
            + '","loc":"'
            + LOC
            + '","qty":1}]}]}'
        )

        async def script() -> object:
            i = next(ids)
            rid = f"{run_tag}-{i}"
            return await scripts.call(
                r, "reserve", [ks.index(rid), *tail], (cfg, req_fmt % (rid, i, ks.bucket(rid)))
            )

        ops: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("noop", noop),
            ("reserve", reserve),
        ]
        if args.with_script:
            ops.append(("script", script))
        results: dict[str, list[Phase]] = {name: [] for name, _ in ops}
        for rnd in range(1, args.rounds + 1):
            for name, op in ops:
                ph = await run_phase(
                    name, op, args.tasks, args.seconds, args.warmup, server_pid, client
                )
                results[name].append(ph)
                print(
                    f"  round {rnd} {name:<8} {ph.rate:>9,.0f} ops/s  p50 {ph.p50_ms:6.2f} ms  "
                    f"p99 {ph.p99_ms:6.2f} ms  client CPU {ph.client_cpu:4.0%}  "
                    f"server CPU {ph.server_cpu:4.0%}  script {ph.script_us:5.1f} us  "
                    f"errors {ph.errors}",
                    flush=True,
                )

        pos = await core.position(SKU, LOC)
        reserved = sum(p.ops for name in ("reserve", "script") for p in results.get(name, []))
        print()
        if pos is not None:
            print(
                f"check: committed on the hot SKU = {pos.committed:,} "
                f"(>= {reserved:,} measured reserve calls, plus warm-ups)"
            )

        def med(name: str, attr: str) -> float:
            return float(statistics.median(getattr(p, attr) for p in results[name]))

        print()
        print(
            f"medians of {args.rounds} rounds, {args.tasks} tasks, appendfsync {args.appendfsync}"
        )
        print("| op      |    ops/s | p50 ms | p99 ms | client CPU | server CPU | script us/call |")
        print("| ------- | -------: | -----: | -----: | ---------: | ---------: | -------------: |")
        for name in results:
            print(
                f"| {name:<7} | {med(name, 'rate'):>8,.0f} | {med(name, 'p50_ms'):6.2f} | "
                f"{med(name, 'p99_ms'):6.2f} | {med(name, 'client_cpu'):>10.0%} | "
                f"{med(name, 'server_cpu'):>10.0%} | {med(name, 'script_us'):>14.1f} |"
            )
        ratio = med("reserve", "rate") / med("noop", "rate")
        per_round = [
            r.rate / n.rate for n, r in zip(results["noop"], results["reserve"], strict=True)
        ]
        print()
        print(
            f"ratio reserve/noop = {ratio:.2f} (per round: "
            f"{', '.join(f'{x:.2f}' for x in per_round)}); goal >= 0.70: "
            f"{'MET' if ratio >= 0.7 else 'NOT MET'}"
        )
        n_med, r_med = med("noop", "rate"), med("reserve", "rate")
        print(
            f"client time per call: noop {1e6 * med('noop', 'client_cpu') / n_med:.1f} us, "
            f"reserve {1e6 * med('reserve', 'client_cpu') / r_med:.1f} us; server time per call: "
            f"noop {1e6 * med('noop', 'server_cpu') / n_med:.1f} us, "
            f"reserve {1e6 * med('reserve', 'server_cpu') / r_med:.1f} us"
        )
        if args.with_script:
            print(
                f"ratio script/noop = {med('script', 'rate') / n_med:.2f}: the ceiling for reserve "
                f"with no Python cost in atp.store; client time per call "
                f"{1e6 * med('script', 'client_cpu') / med('script', 'rate'):.1f} us"
            )
        pers = await client.info("persistence")
        st = await client.info("stats")
        print(
            f"server: {st.get('total_forks', '?')} forks (AOF rewrites) during the run, "
            f"aof_current_size {int(pers.get('aof_current_size', 0)) / 1e6:.0f} MB; "
            f"load average at the end {os.getloadavg()[0]:.2f}"
        )
        if any(p.errors for ps in results.values() for p in ps):
            print("WARNING: some calls failed (see the traceback above); figures are suspect")
    finally:
        await core.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="before each measurement (default 1)")
    ap.add_argument("--tasks", type=int, default=64, help="concurrent asyncio tasks (default 64)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--appendfsync", choices=("no", "everysec", "always"), default="everysec")
    ap.add_argument(
        "--with-script",
        action="store_true",
        help="also measure the bare reserve script (no atp.store work): a diagnostic",
    )
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    args = ap.parse_args()
    if args.seconds <= 0 or args.tasks < 1 or args.rounds < 1 or args.warmup < 0:
        ap.error("--seconds > 0, --tasks >= 1, --rounds >= 1, --warmup >= 0")

    # the whole run: rounds x (noop + reserve) x (warm-up + measurement), plus slack
    budget = args.rounds * (3 if args.with_script else 2) * (args.seconds + args.warmup) + 60
    with tempfile.TemporaryDirectory(prefix="atp-bench-") as tmp:
        server = EmbeddedServer(Path(tmp) / "data", appendfsync=args.appendfsync)
        server.start()
        try:
            coro = asyncio.wait_for(bench(args, server), timeout=budget)
            if args.uvloop:
                import uvloop

                uvloop.run(coro)
            else:
                asyncio.run(coro)
        except TimeoutError:
            print(f"benchmark exceeded its {budget:.0f} s budget; stopped", file=sys.stderr)
            return 1
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
