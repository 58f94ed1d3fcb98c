"""Races on one hot SKU: many real clients, tasks and processes, then the book is checked.

One position holds 1,000 units. 200 asyncio tasks sharing one connection pool and 4 separate
OS processes (this file run as a worker script, each with its own client) send 5,000
requests between them: reserves of 1-3 units under unique ids (some as 1-second holds that
expire, most confirmed at once), confirmations of some holds, releases of their own
reservations, retries of an id with the same request (as after a timeout, some after a real
client-side timeout), and expire_holds calls. Every client records what was acknowledged.

Afterwards, once every hold has expired and been reaped, the book must say exactly what the
clients were told: no unit committed twice, committed equal to the acknowledged live
reservations (and ``verify`` balanced, log chain included), every acknowledged reservation
present once with its quantity and the status its client's actions imply, every movement in
the log, and proof that the SKU really sold out (demand above supply, refusals seen).

No sleep decides anything here: the race is real, the checks read the book afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atp import ATP, EmbeddedServer, HoldExpired, InsufficientStock, Settings
from atp.verify import verify

SKU, LOC = "HOT", "W1"
SUPPLY = 1000
CHANNELS = ("web", "app")
TASKS = 200
PER_TASK = 17  # 200 x 17 = 3,400 requests from tasks in this process
PROCS = 4
PROC_TASKS = 16
PER_PROC_TASK = 25  # 4 x 16 x 25 = 1,600 requests from the worker processes
TOTAL = TASKS * PER_TASK + PROCS * PROC_TASKS * PER_PROC_TASK
HOLD_SECONDS = 1
THINK = 0.2  # seconds, at most, between two requests of one client


@dataclass
class ClientLog:
    """What one client sent and what it was told."""

    # reservation id -> {qty, ch, held, final, uncertain}; final is what the client's own
    # acknowledged actions imply: "held" (an unconfirmed hold), "confirmed", "released",
    # "expired"; uncertain: a timed-out attempt whose retry was refused (it may still land)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: int = 0
    reserves: int = 0
    demanded: int = 0
    insufficient: int = 0
    replays: int = 0
    timeouts: int = 0
    releases: int = 0
    confirms: int = 0
    hold_expired: int = 0
    expire_calls: int = 0
    expired_reported: list[str] = field(default_factory=list)


async def run_client(
    core: ATP, name: str, budget: int, seed: int, log: ClientLog, *, timeouts: bool
) -> None:
    """One client: ``budget`` requests, each outcome checked on the spot and recorded."""
    rng = random.Random(seed)
    live: list[str] = []  # acknowledged, not released, not known to be over
    seq = 0

    def check_ack(rid: str, res: Any, rec: dict[str, Any], *, replay: bool | None) -> None:
        assert res.id == rid and res.channel == rec["ch"], res
        assert [(ln.sku, ln.location, ln.qty) for ln in res.lines] == [(SKU, LOC, rec["qty"])], res
        if replay is not None:
            assert res.replayed is replay, res
        # a replay returns the original outcome (I3), whatever happened since
        assert res.status == ("held" if rec["held"] else "confirmed"), res
        assert res.lines[0].released == 0 and res.lines[0].shipped == 0, res

    async def reserve(rid: str, rec: dict[str, Any]) -> Any:
        log.requests += 1
        return await core.reserve(
            rid,
            rec["ch"],
            [(SKU, LOC, rec["qty"])],
            hold_seconds=HOLD_SECONDS if rec["held"] else 0,
            actor=name,
        )

    while log.requests < budget:
        # think time, as a shopper has: it spreads the race over a few seconds, so that
        # 1-second holds lapse while it is still going (reserves reclaim them, confirms
        # come too late, releases find them expired)
        await asyncio.sleep(rng.uniform(0, THINK))
        r = rng.random()
        sure = [x for x, rec in log.records.items() if not rec["uncertain"]]
        held = [x for x in live if log.records[x]["final"] == "held"]
        if r < 0.08 and sure:
            action = "retry"
        elif 0.08 <= r < 0.22 and live:
            action = "release"
        elif 0.22 <= r < 0.28 and held:
            action = "confirm"
        elif 0.28 <= r < 0.31:
            action = "expire"
        else:
            action = "reserve"
        if action == "retry":
            # a retry of an acknowledged id with the same request: the original outcome
            rid = rng.choice(sure)
            rec = log.records[rid]
            res = await reserve(rid, rec)
            check_ack(rid, res, rec, replay=True)
            log.replays += 1
        elif action == "release":
            rid = live.pop(rng.randrange(len(live)))
            rec = log.records[rid]
            log.requests += 1
            res = await core.release(rid, reason="customer cancelled", actor=name)
            log.releases += 1
            if res.status == "expired":
                assert rec["held"] and rec["final"] == "held", (rid, rec, res)
            else:
                assert res.status == "released", (rid, rec, res)
            assert res.lines[0].released == rec["qty"], res
            rec["final"] = res.status
        elif action == "confirm":
            rid = rng.choice(held)
            rec = log.records[rid]
            log.requests += 1
            try:
                res = await core.confirm(rid, actor=name)
            except HoldExpired:
                log.hold_expired += 1
                rec["final"] = "expired"
                live.remove(rid)
            else:
                assert res.status == "confirmed" and not res.replayed, res
                log.confirms += 1
                rec["final"] = "confirmed"
        elif action == "expire":
            log.requests += 1
            out = await core.expire_holds()
            log.expire_calls += 1
            log.expired_reported += out.expired
        else:
            seq += 1
            rid = f"{name}-{seq}"
            hold = rng.random() < 0.2
            rec = {
                "qty": rng.randint(1, 3),
                "ch": rng.choice(CHANNELS),
                "held": hold,
                "final": "held" if hold else "confirmed",
                "uncertain": False,
            }
            log.reserves += 1
            log.demanded += rec["qty"]
            replay: bool | None = False
            try:
                if timeouts and rng.random() < 0.1 and log.requests + 1 < budget:
                    # the client gives up waiting and retries: the first attempt may or may
                    # not have landed, so the retry may be a replay or the first to land
                    try:
                        log.requests += 1
                        res = await asyncio.wait_for(
                            core.reserve(
                                rid,
                                rec["ch"],
                                [(SKU, LOC, rec["qty"])],
                                hold_seconds=HOLD_SECONDS if hold else 0,
                                actor=name,
                            ),
                            timeout=rng.uniform(0, 0.001),
                        )
                    except TimeoutError:
                        log.timeouts += 1
                        replay = None
                        try:
                            res = await reserve(rid, rec)
                        except InsufficientStock:
                            rec["uncertain"] = True
                            log.records[rid] = rec
                            raise
                else:
                    res = await reserve(rid, rec)
            except InsufficientStock as e:
                log.insufficient += 1
                (line,) = e.lines
                assert line["requested"] == rec["qty"] and 0 <= line["available"] < rec["qty"], (
                    e.lines
                )
                continue
            check_ack(rid, res, rec, replay=replay)
            log.records[rid] = rec
            live.append(rid)
            if rng.random() < 0.1 and log.requests < budget:
                # an immediate retry, as if the answer had been lost on the way
                res = await reserve(rid, rec)
                check_ack(rid, res, rec, replay=True)
                log.replays += 1


async def monitor(core: ATP, stop: asyncio.Event, seen: dict[str, int]) -> None:
    """An outside reader during the race: I1 holds at every read; note a sell-out."""
    while not stop.is_set():
        p = await core.position(SKU, LOC)
        assert p is not None
        assert p.committed <= p.on_hand - p.safety_stock, p
        seen["reads"] += 1
        seen["max_committed"] = max(seen["max_committed"], p.committed)
        if p.available == 0:
            seen["sold_out_reads"] += 1
        await asyncio.sleep(0.002)


def _worker_argv(server: EmbeddedServer, settings: Settings, n: int) -> list[str]:
    cfg = {
        "url": server.url,
        "prefix": settings.key_prefix,
        "buckets": settings.buckets,
        "name": f"p{n}",
        "tasks": PROC_TASKS,
        "budget": PER_PROC_TASK,
        "seed": 1000 * (n + 1),
    }
    return [sys.executable, str(Path(__file__).resolve()), json.dumps(cfg)]


async def test_hot_sku_race(atp: ATP, server: EmbeddedServer, settings: Settings) -> None:
    core = atp
    pool_max = core.redis.connection_pool.max_connections
    assert pool_max >= 256, pool_max
    await core.set_position(SKU, LOC, SUPPLY, 0, reason="initial count")

    procs = [
        await asyncio.create_subprocess_exec(
            *_worker_argv(server, settings, n),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for n in range(PROCS)
    ]
    try:
        for p in procs:  # every worker connected and waiting: start everyone together
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 60)
            assert line == b"ready\n", line
        logs = [ClientLog() for _ in range(TASKS)]
        seen: dict[str, int] = Counter()
        stop = asyncio.Event()
        mon = asyncio.create_task(monitor(core, stop, seen))
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
        tasks = [
            run_client(core, f"t{i}", PER_TASK, i, logs[i], timeouts=True) for i in range(TASKS)
        ]
        done = await asyncio.gather(
            *tasks, *(p.communicate() for p in procs), return_exceptions=True
        )
        stop.set()
        await mon
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    errors = [d for d in done if isinstance(d, BaseException)]
    assert not errors, errors[:3]
    for p, (out, err) in zip(procs, done[TASKS:], strict=True):
        assert p.returncode == 0, err.decode()[-3000:]
        logs += [ClientLog(**d) for d in json.loads(out)]

    # -- the race is over: reap every hold -----------------------------------------------------
    ks = core.keys
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        reaped = await core.expire_holds()
        pipe = core.redis.pipeline(transaction=False)
        for key in ks.all_holds():
            pipe.zcard(key)
        pipe.zcard(ks.position(SKU, LOC).hx)
        if not reaped.expired and sum(await pipe.execute()) == 0:
            break
        assert loop.time() < deadline, "holds are still there 15 s after the race"
        await asyncio.sleep(0.1)  # a 1-second hold needs its second to pass

    # -- what the clients were told ----------------------------------------------------------
    records: dict[str, dict[str, Any]] = {}
    for lg in logs:
        assert not records.keys() & lg.records.keys()
        records.update(lg.records)
    total = Counter()
    for lg in logs:
        for k in (
            "requests",
            "reserves",
            "demanded",
            "insufficient",
            "replays",
            "timeouts",
            "releases",
            "confirms",
            "hold_expired",
            "expire_calls",
        ):
            total[k] += getattr(lg, k)
    assert total["requests"] == TOTAL == 5000, total

    # -- the book ----------------------------------------------------------------------------
    book: dict[str, dict[str, Any]] = {}
    where: Counter[str] = Counter()
    for b in range(ks.buckets):
        async for rid_raw, raw in core.redis.hscan_iter(ks.bucket_keys(b).res, count=1000):
            rid = rid_raw.decode()
            where[rid] += 1
            book[rid] = json.loads(raw)
    index = {}
    for b in range(ks.buckets):
        async for rid_raw, raw in core.redis.hscan_iter(f"{ks.tag(b)}:rix", count=1000):
            index[rid_raw.decode()] = json.loads(raw)
    assert all(n == 1 for n in where.values()), [r for r, n in where.items() if n != 1][:5]
    assert index.keys() == book.keys()

    acked = {rid: rec for rid, rec in records.items() if not rec["uncertain"]}
    uncertain = {rid: rec for rid, rec in records.items() if rec["uncertain"]}
    phantom = book.keys() - records.keys()
    assert not phantom, f"reservations nobody was told about: {sorted(phantom)[:5]}"
    missing = acked.keys() - book.keys()
    assert not missing, f"acknowledged reservations missing from the book: {sorted(missing)[:5]}"

    expect_status = {
        "held": "expired",
        "confirmed": "confirmed",
        "released": "released",
        "expired": "expired",
    }
    live_units = 0
    for rid, rec in records.items():
        if rid not in book:
            continue  # an uncertain attempt that never landed
        part = book[rid]
        (ln,) = part["lines"]
        assert (ln["sku"], ln["loc"], ln["qty"], part["ch"]) == (SKU, LOC, rec["qty"], rec["ch"]), (
            rid,
            part,
        )
        want = expect_status[rec["final"]]
        if rid in uncertain:  # the client never learnt its outcome; it landed as a new hold/confirm
            want = "expired" if rec["held"] else "confirmed"
        assert part["st"] == want, (rid, rec, part)
        assert ln["shipped"] == 0 and ln["short"] == 0
        assert ln["released"] == (0 if want == "confirmed" else rec["qty"]), (rid, rec, part)
        if want == "confirmed":
            live_units += rec["qty"]
    for rid in {x for lg in logs for x in lg.expired_reported}:
        assert rid in book and book[rid]["st"] == "expired" and records[rid]["held"], rid

    pos = await core.position(SKU, LOC)
    assert pos is not None
    assert pos.on_hand == SUPPLY
    assert live_units <= SUPPLY, "a unit was committed twice"
    assert pos.committed == live_units, (pos, live_units)
    assert sum(pos.committed_by_channel.values()) == pos.committed
    rep = await verify(core)
    assert rep.ok, rep.problems[:10]
    assert rep.reservations == len(book)

    # -- every movement is in the log: one reserve per reservation, one return per ended one
    moves: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    kinds: Counter[str] = Counter()
    last = "-"
    while rows := await core.redis.xrange(ks.position(SKU, LOC).log, last, "+", count=5000):
        for _mid, f in rows:
            f = {k.decode(): v.decode() for k, v in f.items()}
            kinds[f["kind"]] += 1
            if f["kind"] == "expire":  # reclaimed by the worker, or by a client's reserve
                kinds["expire by worker" if f["actor"] == "worker" else "expire by client"] += 1
            delta = int(f["committed_after"]) - int(f["committed_before"])
            moves[f["rid"]].append((f["kind"], f["reason"], delta))
        last = "(" + rows[-1][0].decode()
    assert moves.pop("") == [("set", "initial count", 0)]
    assert moves.keys() == book.keys()
    for rid, mv in moves.items():
        rec, st = records[rid], book[rid]["st"]
        first = ("reserve", "held" if rec["held"] else "confirmed", rec["qty"])
        if st == "confirmed":
            assert mv == [first], (rid, mv)
        else:
            kind = "release" if st == "released" else "expire"
            assert mv == [first, (kind, mv[1][1], -rec["qty"])], (rid, st, mv)
    assert kinds["reserve"] == len(book)

    # -- the test could have failed: the SKU sold out and refusals were seen ---------------------
    assert total["demanded"] > SUPPLY, total
    assert total["insufficient"] > 0, "InsufficientStock was never seen: nothing was contended"
    assert seen["sold_out_reads"] > 0 and seen["max_committed"] >= SUPPLY - 2, seen
    assert total["replays"] > 0 and total["releases"] > 0 and total["expire_calls"] > 0, total
    assert kinds["release"] > 0, kinds
    # holds lapsed while the race was on: reserves reclaimed them before deciding
    assert kinds["expire by client"] > 0, kinds
    assert len(acked) > 300, len(acked)


# -- the worker process ------------------------------------------------------------------------


def _worker(cfg: dict[str, Any]) -> None:
    from redis.asyncio import Redis

    async def main() -> list[dict[str, Any]]:
        settings = Settings(
            redis_url=None,
            key_prefix=cfg["prefix"],
            buckets=cfg["buckets"],
            data_dir=Path("/nonexistent"),
        )
        core = ATP(Redis.from_url(cfg["url"], max_connections=64), settings)
        try:
            await core.start()
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            logs = [ClientLog() for _ in range(cfg["tasks"])]
            await asyncio.gather(
                *(
                    run_client(
                        core,
                        f"{cfg['name']}.{i}",
                        cfg["budget"],
                        cfg["seed"] + i,
                        logs[i],
                        timeouts=False,
                    )
                    for i in range(cfg["tasks"])
                )
            )
            return [asdict(lg) for lg in logs]
        finally:
            await core.aclose()

    print(json.dumps(asyncio.run(main())), flush=True)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
