"""Allocation rules under races on a real server (issue 4, "How it must be shown"; I2, I6).

Three races, each with many real clients (asyncio tasks over several clients and
connection pools, and, where said, OS processes running this file as a worker script),
each checked afterwards from three sides: what the clients were told, the book, and the
movement logs replayed step by step (every reserve, release and expiry, in the order the
server ran them).

* ``test_protection_cap_and_buyer_limit_race``: channels ``web`` (protected P units) and
  ``market`` (capped at C) hammer one position; buyers come from a small pool, with a
  buyer limit L. Web's demand stays within P, so web is never refused for stock, however
  hard market pushes, and afterwards web can still take its P units; market never has more
  than C committed; no customer ever holds more than L; no unit is committed twice; the
  book balances (``verify``). Run twice: once where the cap binds, once (with worker
  processes too) where the protection binds.
* ``test_rules_change_mid_load``: a new rules version (tighter caps, a new protection) is
  applied while tasks and two other processes keep reserving, some reservations with lines
  in two buckets. Every reservation records the version that decided it; the apply splits
  them in two in the server's order (every version-1 reservation was made before it, every
  version-2 one after it); every request sent after the apply returned is decided by
  version 2, in this process and in the others, without a restart; each step obeys, on
  both lines, the caps and protection of the one version that decided it (version 1 let
  market go past version 2's cap, version 2 never does); and ATP instances that cached
  version 1 have their next reserve and explain decided by version 2, refusals included.
* ``test_routed_multi_location_race``: two SKUs at three locations, routed lines (with and
  without split, by region) and lines with a location racing: the SKU-wide caps and buyer
  limits hold over all locations at every millisecond, protections and I1 hold per
  position at every step, routed lines land only where the channel's list (or the
  region's) allows, in its order, and split only when allowed.

No sleep decides anything: clients think a little between requests to spread the race,
and every check reads the book or the logs afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from atp import (
    ATP,
    EmbeddedServer,
    HoldExpired,
    InsufficientStock,
    Settings,
)
from atp.errors import BuyerLimitExceeded
from atp.verify import verify

# -- clients -------------------------------------------------------------------------------


@dataclass
class ClientLog:
    """What one client sent and what it was told."""

    # reservation id -> {ch, cu, req, lines, held, final, rv, cr, sent, split, region}:
    # cr is the server's time of creation (ms), sent the client's time.monotonic() before
    # it sent the request (one clock for every process on this machine)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    # refused reserves: {kind, ch, cu, req, sent, detail}
    refusals: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    releases: int = 0
    confirms: int = 0
    hold_expired: int = 0


def _ms(dt: Any) -> int:
    return round(dt.timestamp() * 1000)


async def run_client(
    core: ATP, spec: dict[str, Any], log: ClientLog, stop: asyncio.Event | None = None
) -> None:
    """One client, as ``spec`` describes it: reserves (line location ``None`` routes the
    line), confirmations of its holds and releases of its live reservations. It stops
    after ``spec["requests"]`` requests, or when ``spec["units"]`` units have been asked
    for, or (with ``stop``) when told to. Every outcome is checked and recorded."""
    rng = random.Random(spec["seed"])
    name, ch = spec["name"], spec["channel"]
    live: list[str] = []
    units_left: int | None = spec.get("units")
    seq = 0
    while not (stop.is_set() if stop is not None else log.requests >= spec["requests"]):
        await asyncio.sleep(rng.uniform(0, spec["think"]))
        r = rng.random()
        held = [x for x in live if log.records[x]["final"] == "held"]
        if r < spec["p_release"] and live:
            rid = live.pop(rng.randrange(len(live)))
            rec = log.records[rid]
            log.requests += 1
            res = await core.release(rid, reason="changed mind", actor=name)
            assert res.status in ("released", "expired"), res
            assert res.status == "released" or rec["final"] == "held", (rec, res)
            rec["final"] = res.status
            log.releases += 1
            continue
        if r < spec["p_release"] + spec["p_confirm"] and held:
            rid = rng.choice(held)
            rec = log.records[rid]
            log.requests += 1
            try:
                res = await core.confirm(rid, actor=name)
            except HoldExpired:
                rec["final"] = "expired"
                live.remove(rid)
                log.hold_expired += 1
            else:
                assert res.status == "confirmed", res
                rec["final"] = "confirmed"
                log.confirms += 1
            continue
        if units_left == 0:
            break
        seq += 1
        rid = f"{name}-{seq}"
        qty = rng.randint(*spec["qty"])
        if units_left is not None:
            qty = min(qty, units_left)
            units_left -= qty
        lines: list[tuple[str, str | None, int]] = [
            (spec["sku"], rng.choice(spec["locations"]), qty)
        ]
        extra = spec.get("extra")
        if extra and rng.random() < extra["p"]:
            line = (extra["sku"], extra["location"], rng.randint(1, 2))
            lines = [line] if rng.random() < 0.3 else [*lines, line]
        cu = rng.choice(spec["customers"]) if spec["customers"] else None
        hold = rng.random() < spec["p_hold"]
        split = rng.choice(spec.get("split", [None]))
        region = rng.choice(spec.get("regions", [None]))
        sent = time.monotonic()
        log.requests += 1
        try:
            res = await core.reserve(
                rid,
                ch,
                lines,
                hold_seconds=spec["hold"] if hold else 0,
                customer_id=cu,
                region=region,
                allow_split=split,
                actor=name,
            )
        except (InsufficientStock, BuyerLimitExceeded) as e:
            log.refusals.append(
                {
                    "kind": "buyer_limit" if isinstance(e, BuyerLimitExceeded) else "insufficient",
                    "ch": ch,
                    "cu": cu,
                    "req": lines,
                    "sent": sent,
                    "detail": e.extra,
                }
            )
            continue
        assert not res.replayed and res.id == rid and res.channel == ch, res
        assert res.status == ("held" if hold else "confirmed"), res
        assert res.customer_id == cu, res
        log.records[rid] = {
            "ch": ch,
            "cu": cu,
            "req": lines,
            "lines": [[ln.sku, ln.location, ln.qty] for ln in res.lines],
            "held": hold,
            "final": "held" if hold else "confirmed",
            "rv": res.rules_version,
            "cr": _ms(res.created_at),
            "sent": sent,
            "split": split,
            "region": region,
        }
        live.append(rid)


async def settle(clients: Iterable[Awaitable[None]]) -> None:
    """Run clients to their end, then raise the first failure: a client that fails must
    not leave the others running against connections about to be closed."""
    done = await asyncio.gather(*clients, return_exceptions=True)
    errors = [d for d in done if isinstance(d, BaseException)]
    if errors:
        raise errors[0]


# -- worker processes ----------------------------------------------------------------------


def _worker_argv(
    server: EmbeddedServer, settings: Settings, specs: list[dict[str, Any]]
) -> list[str]:
    cfg = {
        "url": server.url,
        "prefix": settings.key_prefix,
        "buckets": settings.buckets,
        "specs": specs,
    }
    return [sys.executable, str(Path(__file__).resolve()), json.dumps(cfg)]


async def start_workers(argvs: list[list[str]]) -> list[asyncio.subprocess.Process]:
    """Start worker processes and wait until each has connected and read the rules."""
    procs = [
        await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for argv in argvs
    ]
    for p in procs:
        assert p.stdout is not None
        line = await asyncio.wait_for(p.stdout.readline(), 60)
        assert line == b"ready\n", (line, await p.stderr.read() if p.stderr else b"")
    return procs


def tell(procs: list[asyncio.subprocess.Process], word: bytes) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(word + b"\n")


async def collect(procs: list[asyncio.subprocess.Process]) -> list[ClientLog]:
    """Wait for the workers and return their clients' logs."""
    logs: list[ClientLog] = []
    try:
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 90)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()[-3000:]
        logs += [ClientLog(**d) for d in json.loads(out)]
    return logs


def _worker(cfg: dict[str, Any]) -> None:
    """This file as a worker process: its own client and ATP instance, the rules it read
    at start cached. Prints ``ready``, waits for ``go``; then runs its clients until
    their budgets are spent, or, when they have none, until it reads ``stop``."""

    async def main() -> list[dict[str, Any]]:
        settings = Settings(
            redis_url=None,
            key_prefix=cfg["prefix"],
            buckets=cfg["buckets"],
            data_dir=Path("/nonexistent"),
        )
        core = ATP(aioredis.Redis.from_url(cfg["url"], max_connections=64), settings)
        loop = asyncio.get_running_loop()
        try:
            await core.start()
            print("ready", flush=True)
            assert (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go"
            specs = cfg["specs"]
            stop = None
            if any(s["requests"] == 0 for s in specs):
                stop = asyncio.Event()
                fut = loop.run_in_executor(None, sys.stdin.readline)
                fut.add_done_callback(lambda _f: stop.set())
            logs = [ClientLog() for _ in specs]
            await settle(run_client(core, s, lg, stop) for s, lg in zip(specs, logs, strict=True))
            return [asdict(lg) for lg in logs]
        finally:
            await core.aclose()

    print(json.dumps(asyncio.run(main())), flush=True)


# -- reading the book and the logs ---------------------------------------------------------


async def book(core: ATP) -> dict[str, dict[str, Any]]:
    """Every reservation in the book, its parts (one per bucket) merged: on one server
    they share status, times and version, and their lines add up."""
    out: dict[str, dict[str, Any]] = {}
    for b in range(core.keys.buckets):
        async for rid, raw in core.redis.hscan_iter(core.keys.bucket_keys(b).res, count=1000):
            part = json.loads(raw)
            have = out.setdefault(rid.decode(), {**part, "lines": []})
            for k in ("ch", "cu", "st", "cr", "rv"):
                assert have.get(k) == part.get(k), (have, part)
            have["lines"] += part["lines"]
    return out


async def movements(core: ATP, sku: str, loc: str) -> list[dict[str, Any]]:
    """A position's movement log, oldest first: (kind, rid, channel, at, delta, on_hand)."""
    key = core.keys.position(sku, loc).log
    out: list[dict[str, Any]] = []
    last = "-"
    while rows := await core.redis.xrange(key, last, "+", count=5000):
        for _mid, raw in rows:
            f = {k.decode(): v.decode() for k, v in raw.items()}
            out.append(
                {
                    "sku": sku,
                    "loc": loc,
                    "kind": f["kind"],
                    "rid": f["rid"],
                    "ch": f["channel"],
                    "at": int(f["at"]),
                    "delta": int(f["committed_after"]) - int(f["committed_before"]),
                    "committed": int(f["committed_after"]),
                    "on_hand": int(f["on_hand_after"]),
                }
            )
        last = "(" + rows[-1][0].decode()
    return out


class Replay:
    """The book rebuilt from movement logs: committed per position and channel, and per
    SKU by channel and by customer (as caps and buyer limits count them)."""

    def __init__(self, customer_of: dict[str, str | None]) -> None:
        self.customer_of = customer_of
        self.pos: dict[tuple[str, str], int] = Counter()
        self.pos_ch: dict[tuple[str, str, str], int] = Counter()
        self.sku_ch: dict[tuple[str, str], int] = Counter()
        self.sku_cu: dict[tuple[str, str], int] = Counter()

    def step(self, m: dict[str, Any]) -> None:
        sku, loc, d = m["sku"], m["loc"], m["delta"]
        if m["kind"] == "set" or d == 0:
            return
        assert m["kind"] in ("reserve", "release", "expire"), m
        self.pos[sku, loc] += d
        assert self.pos[sku, loc] == m["committed"], ("the log does not chain", m)
        self.pos_ch[sku, loc, m["ch"]] += d
        self.sku_ch[sku, m["ch"]] += d
        cu = self.customer_of[m["rid"]]
        if cu is not None:
            self.sku_cu[sku, cu] += d

    def customers(self, sku: str) -> dict[str, int]:
        return {cu: n for (s, cu), n in self.sku_cu.items() if s == sku and n}


def replay_exact(
    log: list[dict[str, Any]], rp: Replay, check: Callable[[dict[str, Any]], None]
) -> None:
    """One position's log, step by step in the server's order; ``check`` after each."""
    for m in log:
        rp.step(m)
        check(m)


def replay_by_ms(logs: list[list[dict[str, Any]]], rp: Replay, check: Callable[[int], None]) -> int:
    """Several positions' logs merged by the server time of the script that wrote each
    entry (``at``: one TIME per script, scripts run one at a time). Within one millisecond
    the order across positions is not known, so ``check`` runs after each millisecond,
    when the replayed state is one the server really passed through."""
    merged = sorted((m for lg in logs for m in lg), key=lambda m: m["at"])  # stable sort
    groups = 0
    for i, m in enumerate(merged):
        rp.step(m)
        if i + 1 == len(merged) or merged[i + 1]["at"] != m["at"]:
            groups += 1
            check(m["at"])
    return groups


def all_records(logs: list[ClientLog]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for lg in logs:
        assert not out.keys() & lg.records.keys()
        out.update(lg.records)
    return out


def check_book_matches_acks(
    records: dict[str, dict[str, Any]], the_book: dict[str, dict[str, Any]]
) -> None:
    """Every acknowledged reservation is in the book once, as acknowledged, and nothing
    else is (each line of the book names the location that took it)."""
    assert the_book.keys() == records.keys(), (
        sorted(the_book.keys() - records.keys())[:5],
        sorted(records.keys() - the_book.keys())[:5],
    )
    for rid, rec in records.items():
        part = the_book[rid]
        assert part["ch"] == rec["ch"] and part.get("cu") == rec["cu"], (rid, rec, part)
        assert part["rv"] == rec["rv"] and part["cr"] == rec["cr"], (rid, rec, part)
        lines = sorted([ln["sku"], ln["loc"], ln["qty"]] for ln in part["lines"])
        assert lines == sorted(rec["lines"]), (rid, rec, part)
        # a hold the client saw lapse may not have been reclaimed yet
        want = {"held": ("held", "expired"), "expired": ("held", "expired")}.get(
            rec["final"], (rec["final"],)
        )
        assert part["st"] in want, (rid, rec, part)


def live_units(part: dict[str, Any]) -> list[tuple[str, str, int]]:
    if part["st"] not in ("held", "confirmed"):
        return []
    return [
        (ln["sku"], ln["loc"], ln["qty"] - ln["shipped"] - ln["released"]) for ln in part["lines"]
    ]


# -- 1. two channels on one hot position ---------------------------------------------------

SKU, LOC = "HOT", "W1"
SAFETY = 10
P = 60  # units protected for web
L = 4  # buyer limit
WEB_CUSTOMERS = [f"c{i:02d}" for i in range(10)]
MARKET_CUSTOMERS = [f"c{i:02d}" for i in range(50)]  # ten shared with web


def _hot_rules(cap: int) -> dict[str, Any]:
    return {
        "channels": {"web": {"priority": 100}, "market": {"priority": 10}},
        "skus": {SKU: {"protect": {"web": P}, "cap": {"market": cap}, "buyer_limit": L}},
    }


def _hot_specs(prefix: str, n: int, channel: str, seed: int, **kw: Any) -> list[dict[str, Any]]:
    base = {
        "channel": channel,
        "sku": SKU,
        "locations": [LOC],
        "customers": MARKET_CUSTOMERS if channel == "market" else WEB_CUSTOMERS,
        "requests": 14,
        "qty": [1, 3],
        "p_hold": 0.3,
        "hold": 1,
        "p_release": 0.15,
        "p_confirm": 0.1,
        "think": 0.15,
    }
    return [{**base, **kw, "name": f"{prefix}{i}", "seed": seed + i} for i in range(n)]


async def _extra_cores(server: EmbeddedServer, settings: Settings, n: int) -> list[ATP]:
    """More ATP instances, each with its own client and pool, without autopipelining, so
    that tasks race over separate connections."""
    s = settings.model_copy(update={"autopipeline": False})
    cores = [ATP(aioredis.Redis.from_url(server.url, max_connections=128), s) for _ in range(n)]
    for c in cores:
        await c.start()
    return cores


async def _monitor(
    core: ATP,
    stop: asyncio.Event,
    seen: Counter[str],
    sku: str,
    *,
    cap: int,
    limit: int,
    protect: dict[str, int],
) -> None:
    """An outside reader during the race (each read of one hash is atomic): market within
    its cap, every buyer within the limit, and at each location (``protect``: web's
    protected units there) web's unused protection still free."""
    ks = core.keys
    while not stop.is_set():
        agg = {k.decode(): int(v) for k, v in (await core.redis.hgetall(ks.sku(sku))).items()}
        assert agg.get("ch:market", 0) <= cap, agg
        assert all(v <= limit for k, v in agg.items() if k.startswith("cu:")), agg
        for loc, units in protect.items():
            raw = await core.redis.hgetall(ks.position(sku, loc).pos)
            p = {k.decode(): int(v) for k, v in raw.items()}
            free = p["on_hand"] - p.get("safety_stock", 0) - p.get("committed", 0)
            assert free >= max(0, units - p.get("ch:web", 0)), p
        seen["reads"] += 1
        await asyncio.sleep(0.003)


async def _race_hot(
    atp: ATP,
    server: EmbeddedServer,
    settings: Settings,
    *,
    on_hand: int,
    cap: int,
    procs: int,
) -> None:
    core = atp
    await core.set_position(SKU, LOC, on_hand, SAFETY, reason="initial count")
    rules = await core.apply_rules(_hot_rules(cap))
    extra = await _extra_cores(server, settings, 3)
    cores = [core, *extra]
    # web asks for 50 units in all (10 clients x 5), within its protection of 60
    web = _hot_specs("web", 10, "web", 1, units=5, qty=[1, 2], requests=30, hold=30)
    market = _hot_specs("mk", 90, "market", 100)
    worker_specs = [_hot_specs(f"p{n}.", 12, "market", 1000 * (n + 1)) for n in range(procs)]
    workers = await start_workers([_worker_argv(server, settings, s) for s in worker_specs])
    try:
        specs = web + market
        logs = [ClientLog() for _ in specs]
        stop = asyncio.Event()
        seen: Counter[str] = Counter()
        mon = asyncio.create_task(
            _monitor(core, stop, seen, SKU, cap=cap, limit=L, protect={LOC: P})
        )
        tell(workers, b"go")
        await settle(
            run_client(cores[i % len(cores)], s, lg)
            for i, (s, lg) in enumerate(zip(specs, logs, strict=True))
        )
        logs += await collect(workers)
        stop.set()
        await mon
    finally:
        for c in extra:
            await c.aclose()
        for p in workers:
            if p.returncode is None:
                p.kill()
                await p.wait()

    records = all_records(logs)
    refusals = [r for lg in logs for r in lg.refusals]
    assert {r["rv"] for r in records.values()} == {rules.version}

    # what the clients were told: web never refused for stock, only for its buyers' limit
    web_refusals = [r for r in refusals if r["ch"] == "web"]
    assert all(r["kind"] == "buyer_limit" for r in web_refusals), web_refusals[:3]
    web_asked = sum(r["lines"][0][2] for r in records.values() if r["ch"] == "web")
    web_asked += sum(r["req"][0][2] for r in web_refusals)
    assert web_asked == 50, web_asked
    for r in refusals:
        if r["kind"] == "buyer_limit":
            d = r["detail"]
            assert d["held"] + d["requested"] > d["limit"] == L, r
        else:
            (ln,) = r["detail"]["lines"]
            assert ln["available"] < ln["requested"], r

    # the book: exactly what was acknowledged, balanced
    the_book = await book(core)
    check_book_matches_acks(records, the_book)
    rep = await verify(core)
    assert rep.ok, rep.problems[:5]
    pos = await core.position(SKU, LOC)
    assert pos is not None and pos.on_hand == on_hand
    live = [u for part in the_book.values() for u in live_units(part)]
    assert sum(q for *_, q in live) == pos.committed <= on_hand - SAFETY  # nothing twice
    final_cu: Counter[str] = Counter()
    final_ch: Counter[str] = Counter()
    for part in the_book.values():
        for *_, q in live_units(part):
            final_cu[part["cu"]] += q
            final_ch[part["ch"]] += q
    assert max(final_cu.values(), default=0) <= L, final_cu.most_common(3)
    assert final_ch["market"] <= cap, final_ch

    # every step the server took, replayed from the movement log
    rp = Replay({rid: rec["cu"] for rid, rec in records.items()})
    peak: Counter[str] = Counter()

    def check(m: dict[str, Any]) -> None:
        committed = rp.pos[SKU, LOC]
        web_c, market_c = rp.pos_ch[SKU, LOC, "web"], rp.pos_ch[SKU, LOC, "market"]
        assert committed <= on_hand - SAFETY, m  # I1: no unit committed twice
        # web's unused protection stays free, whoever reserves (I6)
        assert on_hand - SAFETY - committed >= max(0, P - web_c), m
        assert market_c <= cap, m
        assert all(n <= L for n in rp.customers(SKU).values()), m
        peak["market"] = max(peak["market"], market_c)

    moves = await movements(core, SKU, LOC)
    replay_exact(moves, rp, check)
    assert rp.pos[SKU, LOC] == pos.committed
    assert Counter(m["kind"] for m in moves)["reserve"] == len(records)
    assert {m["rid"] for m in moves if m["kind"] == "reserve"} == records.keys()

    # the race was real: market pushed against its limit and buyers against theirs
    kinds = Counter(
        (r["kind"], r["detail"]["lines"][0]["limited_by"] if r["kind"] == "insufficient" else "")
        for r in refusals
    )
    assert kinds["buyer_limit", ""] > 0, kinds
    binding = "cap" if cap < on_hand - SAFETY - P else "protection"
    assert kinds["insufficient", binding] > 0, kinds
    assert peak["market"] >= min(cap, on_hand - SAFETY - P) - 3, (peak, kinds)
    assert seen["reads"] > 10, seen
    assert sum(lg.releases for lg in logs) > 0 and sum(lg.confirms for lg in logs) > 0

    # and web still gets its protected units: it takes one unit at a time, for new buyers,
    # until refused, and then holds at least P
    n = 0
    while True:
        try:
            await core.reserve(f"top-{n}", "web", [(SKU, LOC, 1)], customer_id=f"new{n}")
        except InsufficientStock as e:
            assert e.lines[0]["available"] == 0, e.lines
            break
        n += 1
    p = await core.position(SKU, LOC)
    assert p is not None and p.committed_by_channel.get("web", 0) >= P, p
    assert p.committed == on_hand - SAFETY, p  # web took what market had left too
    assert (await verify(core)).ok


async def test_protection_cap_and_buyer_limit_race(
    atp: ATP, server: EmbeddedServer, settings: Settings
) -> None:
    """The cap binds: market could take 190 - 60 = 130 units, its cap is 100."""
    await _race_hot(atp, server, settings, on_hand=200, cap=100, procs=0)


async def test_protection_binds_race_with_processes(
    atp: ATP, server: EmbeddedServer, settings: Settings
) -> None:
    """The protection binds: market's cap is 120, but only 150 - 10 - 60 = 80 units are not
    set aside for web. Three worker processes race too."""
    await _race_hot(atp, server, settings, on_hand=150, cap=120, procs=3)


# -- 2. a rules change in the middle of a load run -----------------------------------------

FLASH, SIDE = "FLASH", "SIDE-2"  # in different buckets (asserted): two-part reservations
V1_CAP = {FLASH: 150, SIDE: 25}
V2_CAP = {FLASH: 40, SIDE: 200}
V2_PROTECT = 30  # web's, at FLASH@W1, new in version 2


def _versioned_rules(v: int) -> dict[str, Any]:
    caps = V1_CAP if v == 1 else V2_CAP
    skus: dict[str, Any] = {s: {"cap": {"market": c}} for s, c in caps.items()}
    if v == 2:
        skus[FLASH]["protect"] = {"web": V2_PROTECT}
    return {
        "description": f"version {v}",
        "channels": {"web": {"priority": 100}, "market": {"priority": 10}},
        "skus": skus,
    }


def _loader_specs(prefix: str, n: int, seed: int, *, web: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        ch = "web" if i < web else "market"
        out.append(
            {
                "name": f"{prefix}{i}",
                "seed": seed + i,
                "channel": ch,
                "sku": FLASH,
                "locations": [LOC],
                "customers": [],
                "requests": 0,  # until stopped
                "qty": [1, 3],
                "p_hold": 0.4,
                "hold": 60,
                "p_release": 0.3 if ch == "market" else 0.1,
                "p_confirm": 0.1,
                "think": 0.02,
                "extra": {"sku": SIDE, "location": LOC, "p": 0.5} if ch == "market" else None,
            }
        )
    return out


async def test_rules_change_mid_load(atp: ATP, server: EmbeddedServer, settings: Settings) -> None:
    core = atp
    assert core.keys.bucket(FLASH) != core.keys.bucket(SIDE)
    for sku in (FLASH, SIDE):
        await core.set_position(sku, LOC, 10_000, 0, reason="initial count")
    v1 = await core.apply_rules(_versioned_rules(1), actor="test")
    extra = await _extra_cores(server, settings, 2)
    stale = await _extra_cores(server, settings, 3)  # each keeps version 1 cached
    workers = await start_workers(
        [_worker_argv(server, settings, _loader_specs(f"p{n}.", 8, 1000 * n)) for n in (1, 2)]
    )
    cores = [core, *extra]
    specs = _loader_specs("t", 40, 0, web=8)
    logs = [ClientLog() for _ in specs]
    stop = asyncio.Event()
    load: asyncio.Future[Any] | None = None
    try:
        tell(workers, b"go")
        load = asyncio.ensure_future(
            settle(
                run_client(cores[i % len(cores)], s, lg, stop)
                for i, (s, lg) in enumerate(zip(specs, logs, strict=True))
            )
        )
        # let market's FLASH commitments climb past what version 2 will allow
        deadline = time.monotonic() + 20
        while (
            int(await core.redis.hget(core.keys.sku(FLASH), "ch:market") or 0) < V2_CAP[FLASH] + 20
            or sum(len(lg.records) for lg in logs) < 150
        ):
            assert time.monotonic() < deadline, "the load never got going"
            await asyncio.sleep(0.01)
        v2 = await core.apply_rules(_versioned_rules(2), expect_version=v1.version, actor="test")
        applied = time.monotonic()
        assert v2.version == v1.version + 1 and v2.applied_at is not None
        applied_ms = _ms(v2.applied_at)

        # an instance that cached version 1 is refused internally, reloads and retries
        for s in stale:
            assert (await s.rules(max_age=3600)).version == v1.version
        stale_sent = time.monotonic()
        res = await stale[0].reserve("stale-web", "web", [(FLASH, LOC, 1)], hold_seconds=0)
        assert res.rules_version == v2.version, res
        assert (await stale[0].rules(max_age=3600)).version == v2.version
        ex = await stale[1].explain(FLASH, LOC, "market")
        assert ex is not None and ex.rules_version == v2.version and ex.cap == V2_CAP[FLASH]

        # keep loading until version 2 has decided plenty, two-part reservations of
        # market's too (once releases bring its FLASH commitments under the new cap)
        def decided_by_v2() -> tuple[int, int]:
            v2_recs = [r for lg in logs for r in lg.records.values() if r["rv"] == v2.version]
            both = [r for r in v2_recs if len({ln[0] for ln in r["lines"]}) == 2]
            return len(v2_recs), len(both)

        deadline = time.monotonic() + 30
        while (n := decided_by_v2())[0] < 150 or n[1] < 10:
            assert time.monotonic() < deadline, f"the load stalled after the change: {n}"
            await asyncio.sleep(0.01)
        stop.set()
        tell(workers, b"stop")
        await load
        logs += await collect(workers)
    finally:
        stop.set()
        if load is not None:  # the clients finish their last request before closing
            await asyncio.gather(load, return_exceptions=True)
        for c in extra + stale[:2]:
            await c.aclose()
        for p in workers:
            if p.returncode is None:
                p.kill()
                await p.wait()

    # a third instance, stale too, asks for what version 1 allows and version 2 does not
    try:
        market_flash = int(await core.redis.hget(core.keys.sku(FLASH), "ch:market") or 0)
        want = max(1, V2_CAP[FLASH] - market_flash + 1)
        assert market_flash + want <= V1_CAP[FLASH]
        assert (await stale[2].rules(max_age=3600)).version == v1.version
        await stale[2].reserve("stale-mk", "market", [(FLASH, LOC, want)], hold_seconds=0)
        raise AssertionError("a stale instance reserved past version 2's cap")
    except InsufficientStock as e:
        assert e.lines[0]["limited_by"] == "cap", e.lines
    finally:
        await stale[2].aclose()

    records = all_records(logs)
    records["stale-web"] = {
        "ch": "web",
        "cu": None,
        "rv": res.rules_version,
        "cr": _ms(res.created_at),
        "lines": [[FLASH, LOC, 1]],
        "final": "confirmed",
        "sent": stale_sent,
    }
    versions = Counter(r["rv"] for r in records.values())
    assert set(versions) == {v1.version, v2.version}, versions
    assert versions[v1.version] > 100 and versions[v2.version] >= 150, versions

    # the apply cuts the server's order in two, and holds from the moment it returned
    for rid, r in records.items():
        if r["rv"] == v1.version:
            assert r["cr"] <= applied_ms, (rid, r, applied_ms)
        else:
            assert r["cr"] >= applied_ms, (rid, r, applied_ms)
        if r["sent"] > applied:
            assert r["rv"] == v2.version, (rid, r)
    late = [r for r in records.values() if r["sent"] > applied]
    assert len(late) > 100, len(late)
    # each worker process switched by itself, without a restart
    for lg_group in (logs[len(specs) : len(specs) + 8], logs[len(specs) + 8 :]):
        got = Counter(r["rv"] for lg in lg_group for r in lg.records.values())
        assert got[v1.version] > 0 and got[v2.version] > 0, got
    # requests refused after the apply were refused by version 2's figures
    for lg in logs:
        for r in lg.refusals:
            assert r["kind"] == "insufficient", r
            if r["sent"] > applied:
                for ln in r["detail"]["lines"]:
                    if ln["limited_by"] == "cap":
                        assert ln["available"] <= V2_CAP[ln["sku"]], r

    # the book is what was acknowledged, and balances
    the_book = await book(core)
    check_book_matches_acks(
        {rid: r for rid, r in records.items() if rid != "stale-web"},
        {rid: p for rid, p in the_book.items() if rid != "stale-web"},
    )
    assert the_book["stale-web"]["rv"] == v2.version
    rep = await verify(core)
    assert rep.ok, rep.problems[:5]

    # every step replayed: each reservation obeyed the caps (both lines) and protections
    # of the one version that decided it
    rp = Replay({rid: None for rid in records})
    rv_of = {rid: r["rv"] for rid, r in records.items()}
    reserve_at: dict[str, set[int]] = defaultdict(set)
    over_v2 = Counter()

    def check(m: dict[str, Any]) -> None:
        if m["kind"] != "reserve":
            return
        sku, rid = m["sku"], m["rid"]
        reserve_at[rid].add(m["at"])
        caps = V1_CAP if rv_of[rid] == v1.version else V2_CAP
        market = rp.sku_ch[sku, "market"]
        if m["ch"] == "market":
            assert market <= caps[sku], (m, market)
            if rv_of[rid] == v2.version and sku == FLASH:
                free = 10_000 - rp.pos[FLASH, LOC]
                assert free >= max(0, V2_PROTECT - rp.pos_ch[FLASH, LOC, "web"]), m
        if rv_of[rid] == v1.version and market > V2_CAP[sku]:
            over_v2[sku] += 1  # version 1 allowed what version 2 will not

    for sku in (FLASH, SIDE):
        replay_exact(await movements(core, sku, LOC), rp, check)
    assert all(len(ats) == 1 for ats in reserve_at.values())  # one script, two positions
    two_part = [rid for rid, r in records.items() if {ln[0] for ln in r["lines"]} == {FLASH, SIDE}]
    assert len(two_part) > 20 and {rv_of[rid] for rid in two_part} == {v1.version, v2.version}, (
        two_part[:3]
    )
    assert over_v2[FLASH] > 0 and over_v2[SIDE] == 0, over_v2


# -- 3. routed lines over multi-location SKUs ----------------------------------------------

# MULTI: protected for web at every location, a cap and a buyer limit that bind; WIDE: small
# positions, so that market's routed lines (split by default) often need two or three
SKUS3: dict[str, dict[str, Any]] = {
    "MULTI": {
        "sites": {"DC1": (40, 2), "DC2": (30, 0), "DC3": (50, 5)},  # on_hand, safety stock
        "protect": 8,
        "cap": 60,
        "limit": 12,
    },
    "WIDE": {
        "sites": {"DC1": (5, 0), "DC2": (4, 1), "DC3": (6, 0)},
        "protect": 0,
        "cap": 12,
        "limit": 8,
    },
}
ROUTES = {
    "web": {None: ["DC1", "DC2", "DC3"], "EU": ["DC2", "DC1"]},
    "market": {None: ["DC3", "DC2", "DC1"], "US": ["DC3"]},
}


def _position_check(
    rp: Replay, sku: str, loc: str, on_hand: int, safety: int, protect: int
) -> Callable[[dict[str, Any]], None]:
    """After each step at one position: I1, and web's unused protection still free."""

    def check(m: dict[str, Any]) -> None:
        c = rp.pos[sku, loc]
        assert c <= on_hand - safety, m
        assert on_hand - safety - c >= max(0, protect - rp.pos_ch[sku, loc, "web"]), m

    return check


async def test_routed_multi_location_race(
    atp: ATP, server: EmbeddedServer, settings: Settings
) -> None:
    core = atp
    for sku, cfg in SKUS3.items():
        for loc, (oh, ss) in cfg["sites"].items():
            await core.set_position(sku, loc, oh, ss, reason="initial count")
    rules = await core.apply_rules(
        {
            "channels": {
                "web": {
                    "priority": 100,
                    "locations": ROUTES["web"][None],
                    "regions": {"EU": ROUTES["web"]["EU"]},
                },
                "market": {
                    "priority": 10,
                    "locations": ROUTES["market"][None],
                    "regions": {"US": ROUTES["market"]["US"]},
                    "allow_split": True,
                },
            },
            "skus": {
                sku: {
                    "protect": {"web": cfg["protect"]},
                    "cap": {"market": cfg["cap"]},
                    "buyer_limit": cfg["limit"],
                }
                for sku, cfg in SKUS3.items()
            },
        }
    )
    common = {
        "sku": "MULTI",
        "requests": 14,
        "qty": [1, 4],
        "p_hold": 0.3,
        "hold": 1,
        "p_release": 0.15,
        "p_confirm": 0.1,
        "think": 0.15,
        "split": [None, True, False],
        "locations": [None, None, None, "DC1", "DC2", "DC3"],
    }
    market_customers = [f"c{j:02d}" for j in range(6)]
    specs = (
        [
            {
                **common,
                "name": f"web{i}",
                "seed": i,
                "channel": "web",
                "qty": [3, 10],
                "think": 0.3,
                "p_release": 0.35,
                "split": [True, True, None, False],
                "customers": [f"w{i}.{k}" for k in range(10)] + [f"c{i % 6:02d}"],
                "regions": [None, "EU", "XX"],
            }
            for i in range(16)
        ]
        + [
            {
                **common,
                "name": f"mk{i}",
                "seed": 100 + i,
                "channel": "market",
                "customers": market_customers,
                "regions": [None, None, "US"],
            }
            for i in range(90)
        ]
        + [
            {
                **common,
                "sku": "WIDE",
                "name": f"wide{i}",
                "seed": 500 + i,
                "channel": "market",
                "qty": [4, 8],
                "p_release": 0.3,
                "customers": market_customers,
                "locations": [None],
                "split": [None],
            }
            for i in range(24)
        ]
    )
    extra = await _extra_cores(server, settings, 3)
    cores = [core, *extra]
    logs = [ClientLog() for _ in specs]
    stop = asyncio.Event()
    seen: Counter[str] = Counter()
    mons = [
        asyncio.create_task(
            _monitor(
                core,
                stop,
                seen,
                sku,
                cap=cfg["cap"],
                limit=cfg["limit"],
                protect={loc: cfg["protect"] for loc in cfg["sites"]},
            )
        )
        for sku, cfg in SKUS3.items()
    ]
    try:
        await settle(
            run_client(cores[i % len(cores)], s, lg)
            for i, (s, lg) in enumerate(zip(specs, logs, strict=True))
        )
    finally:
        stop.set()
        for c in extra:
            await c.aclose()
    await settle(mons)
    records = all_records(logs)
    refusals = [r for lg in logs for r in lg.refusals]
    assert {r["rv"] for r in records.values()} == {rules.version}

    # routed lines landed where the channel's list (for the order's region) allows: at
    # distinct locations in the list's order, adding up to the line, split only if allowed
    routed: Counter[str] = Counter()
    for rid, r in records.items():
        ((sku, loc, qty),) = r["req"]
        if loc is not None:
            assert r["lines"] == [[sku, loc, qty]], (rid, r)
            continue
        route = ROUTES[r["ch"]].get(r["region"], ROUTES[r["ch"]][None])
        where = [route.index(ln[1]) for ln in r["lines"]]
        assert where == sorted(set(where)), (rid, r)
        assert all(ln[0] == sku for ln in r["lines"]), (rid, r)
        assert sum(ln[2] for ln in r["lines"]) == qty, (rid, r)
        split = r["split"] if r["split"] is not None else r["ch"] == "market"
        assert split or len(r["lines"]) == 1, (rid, r)
        routed[sku] += 1
        routed["split"] += len(r["lines"]) > 1
    assert routed["MULTI"] > 40 and routed["WIDE"] > 5 and routed["split"] > 3, routed

    the_book = await book(core)
    check_book_matches_acks(records, the_book)
    rep = await verify(core)
    assert rep.ok, rep.problems[:5]

    customer_of = {rid: r["cu"] for rid, r in records.items()}
    peak: Counter[str] = Counter()
    for sku, cfg in SKUS3.items():
        sites, cap, limit = cfg["sites"], cfg["cap"], cfg["limit"]
        logs_by_loc = {loc: await movements(core, sku, loc) for loc in sites}
        # each location's log in the server's order: I1 and web's protection
        rp = Replay(customer_of)
        for loc, lg in logs_by_loc.items():
            replay_exact(lg, rp, _position_check(rp, sku, loc, *sites[loc], cfg["protect"]))
        # all its locations together, millisecond by millisecond: the cap and buyer limit
        rp = Replay(customer_of)

        def sku_wide(
            at: int, sku: str = sku, cap: int = cap, limit: int = limit, rp: Replay = rp
        ) -> None:
            assert rp.sku_ch[sku, "market"] <= cap, at
            cus = rp.customers(sku)
            assert all(n <= limit for n in cus.values()), (at, cus)
            peak[f"{sku} market"] = max(peak[f"{sku} market"], rp.sku_ch[sku, "market"])
            peak[f"{sku} customer"] = max([peak[f"{sku} customer"], *cus.values()])

        assert replay_by_ms(list(logs_by_loc.values()), rp, sku_wide) > 10
        for loc in sites:
            p = await core.position(sku, loc)
            assert p is not None and p.committed == rp.pos[sku, loc], (p, rp.pos)
        assert peak[f"{sku} market"] >= cap - 4, peak  # the cap was reached
    assert peak["MULTI customer"] > SKUS3["MULTI"]["limit"] - 4, peak  # buyers were near it

    # the race pushed against the cap and the buyer limits, on both SKUs
    why = Counter(
        (r["req"][0][0], r["kind"] if r["kind"] == "buyer_limit" else ln["limited_by"])
        for r in refusals
        for ln in r["detail"].get("lines", [None])
    )
    for sku in SKUS3:
        assert why[sku, "buyer_limit"] > 0 and why[sku, "cap"] > 0, why


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
