"""How close does ``ATP.reserve`` come to the client's ceiling for one script call, and
what do allocation rules cost it?

One run, one embedded server (started here in a temporary directory, loopback only,
stopped in a ``finally``), redis.asyncio with N concurrent asyncio tasks.

The default scenario, the ceiling:

* ``noop``    the client's ceiling: ``core.scripts.call(core.redis, "noop", [key], [])``,
              the same EVALSHA path ``reserve`` takes, on a script that does nothing;
* ``reserve`` ``core.reserve(...)`` through the public API on ONE hot SKU (on_hand huge,
              confirmed at once, a unique id per call, qty 1).

``--unbatched`` adds ``unbatch``: the same reserve calls with the auto-pipeline's
reserve_many off (each reserve its own EVALSHA in the batch's pipeline), interleaved with
``reserve``, so what running a batch's reserves in one script call buys is measured in one run.

``--dated``, the cost of a time-phased reservation (issue 7; aim: dated/undated >= 0.7):
see ``bench_dated``.

``--rules``, the cost of allocation rules (issue 4; aim: rules/norules >= 0.8):

* ``norules`` ``core.reserve(...)`` on a deployment with no rules applied (key prefix
              ``bnr:``);
* ``rules``   the same calls on a deployment (prefix ``bru:``, same server) under a rules
              document of 5 channels: priorities, default protection for 2 channels, caps
              for 2 channels, a buyer limit, and per-SKU overrides for every SKU benchmarked
              (``rules_document``). Both sides send the same requests: one line of qty 1 on
              one of ``--skus`` SKUs at DC1, the channel cycling over the 5 channels, a
              customer id from a pool of 100k, confirmed at once. The limits are set so they
              never bind (on_hand huge, caps and buyer limit far above what a run reserves):
              every call succeeds and both sides do the same work, so the ratio is what
              enforcing the rules costs, not the price of refusals.
              Afterwards ``atp.verify.verify`` checks both books (OK / FAILED).

Each measurement runs for ``--seconds`` after a warm-up of the same operation; the two
are interleaved for ``--rounds`` rounds (A, B, A, B, ...; with ``--rules`` the order
alternates, A B, B A, ...) and the medians are reported, since the machine is shared and
noisy. ``--rules`` also prints client + server CPU per call: on a busy 2-core machine it
is a steadier measure of the cost than ops/s.

    python benchmarks/bench_core.py [--seconds 5] [--tasks 64] [--appendfsync everysec]
    python benchmarks/bench_core.py --rules [--seconds 3] [--rounds 4] [--skus 8]
    python benchmarks/bench_core.py --dated [--seconds 3] [--rounds 4] [--skus 8]

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
from datetime import date, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.asyncio as aioredis

from atp import ATP, EmbeddedServer, Settings
from atp.verify import verify

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
    script_us: float  # the server's script time per operation (INFO commandstats: EVALSHA
    # time over ops, since reserve_many runs a batch's reserves in one EVALSHA)
    errors: int

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    @property
    def cpu_us(self) -> float:
        """Client and server CPU per call, in microseconds."""
        return 1e6 * (self.client_cpu + self.server_cpu) / self.rate


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
    usec = float(stats.get("cmdstat_evalsha", {}).get("usec", "nan"))
    script_us = usec / len(lat) if lat else float("nan")
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


# --rules: the same reserve calls without rules and under a rules document of 5 channels.
RULES_LOC = "DC1"
RULES_CHANNELS = ("web", "app", "stores", "marketplace", "b2b")
RULES_CUSTOMERS = 100_000  # customer ids cycle over this many
NEVER_BINDS = 10**10  # caps and buyer limit of the benchmarked SKUs: far above any run


def rules_sku(i: int) -> str:
    return f"BENCH-R-{i:02d}"


def rules_document(skus: list[str]) -> dict[str, Any]:
    """A realistic document of 5 channels: priorities and routing lists for each, default
    protection for 2 channels, default caps for 2, a default buyer limit, per-SKU overrides
    (protection, one location's protection, caps, buyer limit) for every benchmarked SKU,
    and 500 other SKUs with overrides of their own (so the lookups are not in a toy dict).
    The benchmarked SKUs' caps and buyer limit never bind (see the module docstring)."""
    other = {
        f"CAT-{i:05d}": {
            "protect": {"web": 5 + i % 20},
            "cap": {"marketplace": 50 + i % 100},
            "buyer_limit": 1 + i % 4,
        }
        for i in range(500)
    }
    bench = {
        sku: {
            "protect": {"web": 50, "app": 10},  # merged over the default's web and stores
            "cap": {"marketplace": NEVER_BINDS, "b2b": NEVER_BINDS},
            "buyer_limit": NEVER_BINDS,
            "locations": {RULES_LOC: {"protect": {"stores": 25}}},
        }
        for sku in skus
    }
    return {
        "description": "bench_core --rules: 5 channels",
        "channels": {
            "web": {"priority": 100, "locations": ["DC1", "DC2"], "regions": {"EU": ["DC2"]}},
            "app": {"priority": 90, "locations": ["DC1", "DC2"]},
            "stores": {"priority": 50, "locations": ["DC2", "DC1"], "allow_split": True},
            "marketplace": {"priority": 20, "locations": ["DC1"]},
            "b2b": {"priority": 10, "locations": ["DC2"]},
        },
        "default": {
            "protect": {"web": 20, "stores": 10},
            "cap": {"marketplace": 500, "b2b": 2000},
            "buyer_limit": 4,
        },
        "skus": {**other, **bench},
    }


async def bench_rules(
    args: argparse.Namespace, server_pid: int, client: aioredis.Redis, server: EmbeddedServer
) -> bool:
    """``norules`` vs ``rules``: the same reserve calls on two deployments of one server."""
    skus = [rules_sku(i) for i in range(args.skus)]
    cores: dict[str, ATP] = {}
    for name, prefix in (("norules", "bnr:"), ("rules", "bru:")):
        st = Settings(redis_url=server.url, key_prefix=prefix, data_dir=server.data_dir)
        core = cores[name] = ATP(client, st)  # one client: closed once, by the caller
        await core.start()
        for sku in skus:
            await core.set_position(sku, RULES_LOC, ON_HAND)
    applied = await cores["rules"].apply_rules(rules_document(skus), actor="bench")
    doc = applied.document
    print(
        f"rules       version {applied.version}: {len(doc.channels)} channels "
        f"({', '.join(f'{c} {r.priority}' for c, r in doc.channels.items())}); default "
        f"protect {dict(doc.default.protect)}, cap {dict(doc.default.cap)}, buyer limit "
        f"{doc.default.buyer_limit}; {len(doc.skus)} SKU overrides"
    )
    sample = skus[0]
    caps = [(c, applied.cap(sample, c)) for c in RULES_CHANNELS if applied.cap(sample, c)]
    print(
        f"            {sample} at {RULES_LOC}: protections "
        f"{applied.protections(sample, RULES_LOC)}, caps {caps}, "
        f"buyer limit {applied.buyer_limit(sample)}"
    )
    print(
        f"requests    1 line, qty 1, {len(skus)} SKUs at {RULES_LOC}, channels "
        f"{'/'.join(RULES_CHANNELS)} in turn, customer ids from a pool of "
        f"{RULES_CUSTOMERS:,}, confirmed at once; the same on both sides"
    )
    print()

    run_tag = f"r{int(time.time())}"
    nsku, nch = len(skus), len(RULES_CHANNELS)

    def reserve_on(core: ATP) -> Callable[[], Awaitable[object]]:
        ids = itertools.count()

        async def reserve() -> object:
            i = next(ids)
            return await core.reserve(
                f"{run_tag}-{i}",
                RULES_CHANNELS[i % nch],
                [(skus[i % nsku], RULES_LOC, 1)],
                hold_seconds=0,
                customer_id=f"cust-{i % RULES_CUSTOMERS}",
            )

        return reserve

    ops = [(name, reserve_on(core)) for name, core in cores.items()]
    results = await run_rounds(args, ops, server_pid, client, alternate=True)

    def med(name: str, attr: str) -> float:
        return float(statistics.median(getattr(p, attr) for p in results[name]))

    print()
    print_table(args, results, med)
    a, b = med("norules", "rate"), med("rules", "rate")
    ratio = b / a
    per_round = [r.rate / n.rate for n, r in zip(results["norules"], results["rules"], strict=True)]
    print()
    print(f"reservations/s: norules {a:,.0f}, rules {b:,.0f}")
    print(
        f"ratio rules/norules = {ratio:.2f} (per round: "
        f"{', '.join(f'{x:.2f}' for x in per_round)}; median of rounds "
        f"{statistics.median(per_round):.2f}); aim >= 0.80: "
        f"{'MET' if ratio >= 0.8 else 'NOT MET'}"
    )
    print(
        f"client time per call: norules {1e6 * med('norules', 'client_cpu') / a:.1f} us, "
        f"rules {1e6 * med('rules', 'client_cpu') / b:.1f} us; server time per call: "
        f"norules {1e6 * med('norules', 'server_cpu') / a:.1f} us, "
        f"rules {1e6 * med('rules', 'server_cpu') / b:.1f} us"
    )
    cn, cr = med("norules", "cpu_us"), med("rules", "cpu_us")
    print(
        f"client + server CPU per call: norules {cn:.1f} us, rules {cr:.1f} us; norules/rules "
        f"= {cn / cr:.2f}, what the throughput ratio tends to when the two processes share "
        "saturated cores (less sensitive to a noisy neighbour than ops/s)"
    )
    errors = any(p.errors for ps in results.values() for p in ps)
    if errors:
        print("WARNING: some calls failed (see the traceback above); figures are suspect")

    # the rules side really was decided under the rules (the version is on the reservation)
    first = {name: await core.reservation(f"{run_tag}-0") for name, core in cores.items()}
    print(
        f"rules versions on the first reservation: norules {first['norules'].rules_version}, "
        f"rules {first['rules'].rules_version}"
    )
    t0 = time.perf_counter()
    ok = first["rules"].rules_version == applied.version
    for name, core in cores.items():
        rep = await verify(core, check_log=not args.no_log_check)
        ok = ok and rep.ok
        print(f"verify {name:<8} {rep.summary()}")
        for msg in rep.problems[:10]:
            print(f"  {msg}")
    print(
        f"verify: {'OK' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s; "
        f"{'without' if args.no_log_check else 'with'} the movement logs)"
    )
    return ok


DATED_RECEIPTS = 30


async def bench_dated(
    args: argparse.Namespace, server_pid: int, client: aioredis.Redis, server: EmbeddedServer
) -> bool:
    """``undated`` vs ``dated`` (issue 7; aim dated/undated >= 0.7), on positions that each
    have 30 expected receipts, one a day for the next 30 days:

    * ``undated``  reserve qty 1, no requested date, on positions with no dated promises
                   (the plain check: the schedule is not read);
    * ``dated``    reserve qty 1 for a requested date 1 to 30 days ahead (in turn), on
                   other positions: the time-phased check walks the schedule (30 receipt
                   days and up to 30 days of dated promises);
    * ``mixed``    reserve qty 1 undated on the positions of ``dated``, which carry dated
                   promises (their check walks the schedule only when the shelf alone does
                   not settle it: here it does);
    * ``inbound``  reserve qty 1 for a date 1 to 30 days ahead on positions with nothing on
                   the shelf, so only the inbound covers it: every call walks the schedule
                   (30 receipt days and up to 30 days of promises), the worst case.

    Stock never binds (receipts are huge, and on hand too except for ``inbound``), so every
    call succeeds and all do the same writes; then ``atp.verify`` checks the book (I1
    time-phased, the schedule)."""
    st = Settings(redis_url=server.url, key_prefix="bdt:", data_dir=server.data_dir)
    core = ATP(client, st)
    await core.start()
    t = await client.time()
    today = date(1970, 1, 1) + timedelta(days=int(t[0]) // 86_400)
    plain = [f"DT-U-{i}" for i in range(args.skus)]
    dated = [f"DT-D-{i}" for i in range(args.skus)]
    bare = [f"DT-I-{i}" for i in range(args.skus)]
    for sku in plain + dated + bare:
        await core.set_position(sku, LOC, 0 if sku in bare else ON_HAND)
        for d in range(1, DATED_RECEIPTS + 1):
            await core.expect_inbound(sku, LOC, f"PO-{d}", 10**6, today + timedelta(days=d))
    print(
        f"positions   {len(plain)} + {len(dated)} + {len(bare)} SKUs at {LOC} (the last with "
        f"nothing on hand), each with {DATED_RECEIPTS} expected receipts (one a day, days "
        f"1-{DATED_RECEIPTS}); requests: 1 line, qty 1, confirmed at once"
    )
    print()
    run_tag = f"d{int(time.time())}"
    n = len(plain)

    def op(skus: list[str], with_date: bool, tag: str) -> Callable[[], Awaitable[object]]:
        ids = itertools.count()

        async def reserve() -> object:
            i = next(ids)
            when = today + timedelta(days=1 + i % DATED_RECEIPTS) if with_date else None
            return await core.reserve(
                f"{run_tag}-{tag}-{i}",
                CHANNEL,
                [(skus[i % n], LOC, 1)],
                hold_seconds=0,
                requested_date=when,
            )

        return reserve

    ops = [
        ("undated", op(plain, False, "u")),
        ("dated", op(dated, True, "d")),
        ("mixed", op(dated, False, "m")),
        ("inbound", op(bare, True, "i")),
    ]
    results = await run_rounds(args, ops, server_pid, client, alternate=True)

    def med(name: str, attr: str) -> float:
        return float(statistics.median(getattr(p, attr) for p in results[name]))

    print()
    print_table(args, results, med)
    u, d, m = med("undated", "rate"), med("dated", "rate"), med("mixed", "rate")
    w = med("inbound", "rate")
    per_round = [b.rate / a.rate for a, b in zip(results["undated"], results["dated"], strict=True)]
    print()
    print(
        f"reservations/s: undated {u:,.0f}, dated {d:,.0f}, undated beside dated promises {m:,.0f}"
    )
    print(
        f"ratio dated/undated = {d / u:.2f} (per round: "
        f"{', '.join(f'{x:.2f}' for x in per_round)}); aim >= 0.70: "
        f"{'MET' if d / u >= 0.7 else 'NOT MET'}; mixed/undated = {m / u:.2f}; "
        f"inbound (every call walks the schedule)/undated = {w / u:.2f}"
    )
    print(
        "server time per call (script, INFO commandstats): "
        + ", ".join(
            f"{k} {med(k, 'script_us'):.1f} us" for k in ("undated", "dated", "mixed", "inbound")
        )
    )
    if any(p.errors for ps in results.values() for p in ps):
        print("WARNING: some calls failed (see the traceback above); figures are suspect")
    t0 = time.perf_counter()
    rep = await verify(core, check_log=not args.no_log_check)
    print(f"verify      {rep.summary()} ({time.perf_counter() - t0:.1f} s)")
    for msg in rep.problems[:10]:
        print(f"  {msg}")
    return rep.ok


async def run_rounds(
    args: argparse.Namespace,
    ops: list[tuple[str, Callable[[], Awaitable[object]]]],
    server_pid: int,
    client: aioredis.Redis,
    *,
    alternate: bool = False,
) -> dict[str, list[Phase]]:
    """``--rounds`` rounds of every op in turn, each printed as it ends. ``alternate``
    reverses the order every other round (A B, B A, ...), so neither op always runs
    right after the other (an AOF rewrite or a neighbour's burst falls on both alike)."""
    results: dict[str, list[Phase]] = {name: [] for name, _ in ops}
    for rnd in range(1, args.rounds + 1):
        for name, op in ops[::-1] if alternate and rnd % 2 == 0 else ops:
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
    return results


def print_table(
    args: argparse.Namespace,
    results: dict[str, list[Phase]],
    med: Callable[[str, str], float],
) -> None:
    print(f"medians of {args.rounds} rounds, {args.tasks} tasks, appendfsync {args.appendfsync}")
    print("| op      |    ops/s | p50 ms | p99 ms | client CPU | server CPU | script us/op   |")
    print("| ------- | -------: | -----: | -----: | ---------: | ---------: | -------------: |")
    for name in results:
        print(
            f"| {name:<7} | {med(name, 'rate'):>8,.0f} | {med(name, 'p50_ms'):6.2f} | "
            f"{med(name, 'p99_ms'):6.2f} | {med(name, 'client_cpu'):>10.0%} | "
            f"{med(name, 'server_cpu'):>10.0%} | {med(name, 'script_us'):>14.1f} |"
        )


async def bench(args: argparse.Namespace, server: EmbeddedServer) -> int:
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
        print(
            f"server      {server_name} {server_version} ({server.binary}, allocator "
            f"{server.allocator}), {server.url}"
        )
        print(f"persistence appendonly yes, appendfsync {args.appendfsync}")
        print(
            f"load        {args.tasks} asyncio tasks, {args.seconds:g} s per measurement after "
            f"{args.warmup:g} s warm-up, {args.rounds} interleaved rounds, CPUs: {os.cpu_count()}"
        )
        print()
        if args.rules:
            return 0 if await bench_rules(args, server_pid, client, server) else 1
        if args.dated:
            return 0 if await bench_dated(args, server_pid, client, server) else 1

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
        tail = [*bk.tuple(), *pk.line()]  # part_keys in lua/_lib.lua
        req_fmt = (
            '{"id":"%s","ch":"' + CHANNEL + '","hold":0,"fp":"%040x","idx":true,"home":%d,'
            '"rv":'
            + str(core._rules.version)
            + ',"parts":[{"b":'
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
            out = await scripts.call(
                r, "reserve", [ks.index(rid), *tail], (cfg, req_fmt % (rid, i, ks.bucket(rid)))
            )
            if b'"ok":1' not in out:  # a refusal is not the work being measured
                raise RuntimeError(f"reserve script refused: {out!r:.200}")
            return out

        pipe = core._pipe

        async def unbatched() -> object:
            # only this op runs while it is measured, so its tasks may flip the switch
            assert pipe is not None
            pipe.reserve_many = False
            try:
                return await reserve()
            finally:
                pipe.reserve_many = True

        ops: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("noop", noop),
            ("reserve", reserve),
        ]
        if args.with_script:
            ops.append(("script", script))
        if args.unbatched:
            ops.append(("unbatch", unbatched))
        results = await run_rounds(args, ops, server_pid, client)

        pos = await core.position(SKU, LOC)
        reserved = sum(
            p.ops for name in ("reserve", "script", "unbatch") for p in results.get(name, [])
        )
        print()
        if pos is not None:
            print(
                f"check: committed on the hot SKU = {pos.committed:,} "
                f"(>= {reserved:,} measured reserve calls, plus warm-ups)"
            )

        def med(name: str, attr: str) -> float:
            return float(statistics.median(getattr(p, attr) for p in results[name]))

        print()
        print_table(args, results, med)
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
        if args.unbatched:
            u_med = med("unbatch", "rate")
            per = [
                r.rate / u.rate for u, r in zip(results["unbatch"], results["reserve"], strict=True)
            ]
            print(
                f"batched/unbatched reserve = {r_med / u_med:.2f} (per round: "
                f"{', '.join(f'{x:.2f}' for x in per)}); server time per reservation: batched "
                f"{1e6 * med('reserve', 'server_cpu') / r_med:.1f} us, unbatched "
                f"{1e6 * med('unbatch', 'server_cpu') / u_med:.1f} us; script time: "
                f"{med('reserve', 'script_us'):.1f} us vs {med('unbatch', 'script_us'):.1f} us"
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
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, help="per measurement (default 5; 3 with --rules)")
    ap.add_argument(
        "--warmup", type=float, help="before each measurement (default 1; 0.5 with --rules)"
    )
    ap.add_argument("--tasks", type=int, default=64, help="concurrent asyncio tasks (default 64)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 5; 4 with --rules)")
    ap.add_argument("--appendfsync", choices=("no", "everysec", "always"), default="everysec")
    ap.add_argument(
        "--allocator",
        choices=("auto", "jemalloc", "libc"),
        default="auto",
        help="the embedded server's allocator (atp.embedded; default auto, as atp serve)",
    )
    ap.add_argument(
        "--with-script",
        action="store_true",
        help="also measure the bare reserve script (no atp.store work): a diagnostic",
    )
    ap.add_argument(
        "--unbatched",
        action="store_true",
        help="also measure reserve with reserve_many off (one EVALSHA per reserve in the "
        "auto-pipeline's batch): what batching a batch's reserves into one call buys",
    )
    ap.add_argument(
        "--rules",
        action="store_true",
        help="reserve without rules vs under a rules document of 5 channels, then verify",
    )
    ap.add_argument(
        "--dated",
        action="store_true",
        help="dated vs undated reserve on positions with 30 expected receipts, then verify",
    )
    ap.add_argument(
        "--skus", type=int, default=8, help="SKUs reserved with --rules/--dated (default 8)"
    )
    ap.add_argument(
        "--no-log-check",
        action="store_true",
        help="with --rules, verify without reading the movement logs (faster)",
    )
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    args = ap.parse_args()
    # --rules runs short by default (about 30 s plus the check): two ops, 4 rounds of 3.5 s
    short = args.rules or args.dated
    for name, plain, rules in (("seconds", 5.0, 3.0), ("warmup", 1.0, 0.5), ("rounds", 5, 4)):
        if getattr(args, name) is None:
            setattr(args, name, rules if short else plain)
    if args.seconds <= 0 or args.tasks < 1 or args.rounds < 1 or args.warmup < 0:
        ap.error("--seconds > 0, --tasks >= 1, --rounds >= 1, --warmup >= 0")
    if not 1 <= args.skus <= 100:
        ap.error("--skus from 1 to 100")
    if (args.rules or args.dated) and (args.with_script or args.unbatched):
        ap.error("--with-script and --unbatched belong to the ceiling scenario")
    if args.rules and args.dated:
        ap.error("--rules or --dated, one at a time")

    # the whole run: rounds x ops x (warm-up + measurement), plus slack (and the check)
    n_ops = 2 + (args.with_script or args.dated) + args.unbatched + 2 * args.dated
    budget = args.rounds * n_ops * (args.seconds + args.warmup) + (180 if short else 60)
    with tempfile.TemporaryDirectory(prefix="atp-bench-") as tmp:
        server = EmbeddedServer(
            Path(tmp) / "data", appendfsync=args.appendfsync, allocator=args.allocator
        )
        server.start()
        try:
            coro = asyncio.wait_for(bench(args, server), timeout=budget)
            if args.uvloop:
                import uvloop

                rc = uvloop.run(coro)
            else:
                rc = asyncio.run(coro)
        except TimeoutError:
            print(f"benchmark exceeded its {budget:.0f} s budget; stopped", file=sys.stderr)
            return 1
        finally:
            server.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
