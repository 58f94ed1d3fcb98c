"""Counts applied as of an earlier moment while the book keeps moving, on a real server.

Many clients (asyncio tasks over four separate connection pools) reserve, confirm, ship
(some with short picks), release, receive and adjust on four SKUs. Meanwhile a counter
records moments mid-flow (the server's clock, ``_now_ms``) and, later and still mid-flow,
applies cycle counts taken at those moments:

* HOT1: the on_hand at each moment is read back from the movement log (the last entry
  logged at or before it, once the server clock has left that millisecond). Two counts:
  one at T1 finding D1 units lost, one at T2 > T1 finding D2 more lost, and the T1 count
  is applied only after T2 (a batch applied late): its correction belongs before T2, so
  the T2 count must not carry it over a second time;
* HOT2: the clients are paused at the moment (a quiesced book), so its on_hand is known
  exactly from what they were told;
* HOT3: the same count applied twice at once by two clients (a worker retrying a batch it
  thinks failed): exactly one applies, the other answers ``already`` with the same figures;
* HOT4: the same count id with the row numbered differently by the retry (a batch chunked
  again): exactly one applies, the other is refused as ``duplicate``.

Afterwards, per SKU: on_hand equals the counted figure plus every on-hand movement logged
after the (last) count's time, read back from the log; it also equals the initial stock
plus what the clients were told they moved plus the drifts (no unit counted twice, none
lost); each count movement carries its drift; and ``verify`` passes (I1, I2, and the I5
chain through the count movements).
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from atp import (
    ATP,
    EmbeddedServer,
    FulfilLine,
    InsufficientStock,
    NegativeOnHand,
    Settings,
)
from atp.models import CountResult, CountRow, ms_to_dt
from atp.verify import verify

LOC = "W1"
SKUS = ("HOT1", "HOT2", "HOT3", "HOT4")
INITIAL = 5000
POOLS = 4
TASKS_PER_POOL = 8
OPS_PER_TASK = 45
TOTAL = POOLS * TASKS_PER_POOL * OPS_PER_TASK
D1, D2 = -25, -9  # HOT1: lost before T1, and between T1 and T2
D_HOT2, D_HOT3, D_HOT4 = 13, -7, 4


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def ms_of(mid: Any) -> int:
    return int(_s(mid).split("-")[0])


@dataclass
class Flow:
    """What the clients were told, shared by all of them (one event loop)."""

    done: int = 0
    in_flight: int = 0
    moved: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # on_hand deltas
    refused: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def reached(self, share: float) -> None:
        """Until the clients have done this share of their requests."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.done >= share * TOTAL)

    async def idle(self) -> None:
        """Until no client has a request in flight."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.in_flight == 0)


async def client(core: ATP, name: str, seed: int, flow: Flow) -> None:
    rng = random.Random(seed)
    held: list[tuple[str, list[tuple[str, int]]]] = []
    confirmed: list[tuple[str, list[tuple[str, int]]]] = []
    n = 0
    for _ in range(OPS_PER_TASK):
        while not flow.gate.is_set():  # woken, but the gate may have closed again since
            await flow.gate.wait()
        flow.in_flight += 1
        try:
            r = rng.random()
            sku = rng.choice(SKUS)
            if r < 0.35:
                n += 1
                rid = f"{name}-{n}"
                lines = [(sku, rng.randint(1, 3))]
                if rng.random() < 0.2:  # a two-line order
                    other = rng.choice([s for s in SKUS if s != sku])
                    lines.append((other, rng.randint(1, 2)))
                hold = 30 if rng.random() < 0.3 else 0
                try:
                    await core.reserve(
                        rid, "web", [(s, LOC, q) for s, q in lines], hold_seconds=hold, actor=name
                    )
                except InsufficientStock:
                    flow.refused += 1
                else:
                    (held if hold else confirmed).append((rid, lines))
            elif r < 0.45 and held:
                rid, lines = held.pop(rng.randrange(len(held)))
                await core.confirm(rid, actor=name)
                confirmed.append((rid, lines))
            elif r < 0.65 and confirmed:
                rid, lines = confirmed.pop(rng.randrange(len(confirmed)))
                short = rng.random() < 0.15
                fl = [
                    FulfilLine(s, LOC, shipped=q - 1, short=1) if short and q > 1
                    else FulfilLine(s, LOC, shipped=q)
                    for s, q in lines
                ]  # fmt: skip
                try:
                    await core.fulfil(rid, fl, actor=name)
                except NegativeOnHand:  # pragma: no cover - the stock is far from zero
                    flow.refused += 1
                    confirmed.append((rid, lines))
                else:
                    for ln in fl:
                        flow.moved[ln.sku] -= ln.shipped + ln.short
                    if any(ln.short for ln in fl):  # the short units stay open: release them
                        await core.release(rid, actor=name)
            elif r < 0.75 and (held or confirmed):
                pool = held if held and (not confirmed or rng.random() < 0.5) else confirmed
                rid, _ = pool.pop(rng.randrange(len(pool)))
                await core.release(rid, actor=name)
            elif r < 0.88:
                q = rng.randint(1, 10)
                await core.receive(sku, LOC, q, reference=f"PO-{name}-{n}", actor=name)
                flow.moved[sku] += q
            else:
                d = rng.choice([-4, -3, -2, -1, 1, 2, 3])
                await core.adjust(sku, LOC, d, reason="damaged" if d < 0 else "found", actor=name)
                flow.moved[sku] += d
        finally:
            flow.in_flight -= 1
            flow.done += 1
            async with flow.changed:
                flow.changed.notify_all()


async def clock_past(core: ATP, t: int) -> int:
    """Until the server clock has left millisecond ``t``; the new one."""
    for _ in range(100_000):
        n = await core._now_ms()
        if n > t:
            return n
        await asyncio.sleep(0.0005)
    raise AssertionError("the server clock does not move")


async def logged_on_hand_at(core: ATP, sku: str, t: int) -> int:
    """on_hand at the end of millisecond ``t``, from the log: the last movement logged in
    it or before. Read once the server clock has left ``t`` (nothing can be logged in it
    any more)."""
    await clock_past(core, t)
    [(_, f)] = await core.redis.xrevrange(core.keys.position(sku, LOC).log, str(t), "-", count=1)
    return int(_s(f[b"on_hand_after"]))


async def quiesced_moment(core: ATP, sku: str, flow: Flow) -> tuple[int, int]:
    """Pause the clients, let what they have in flight finish; the moment and the on_hand
    they were told (checked against the server), then let them go on."""
    flow.gate.clear()
    await flow.idle()
    known = INITIAL + flow.moved[sku]
    p = await core.position(sku, LOC)
    assert p is not None and p.on_hand == known
    t = await core._now_ms()
    await clock_past(core, t)  # nothing resumed may land in the moment itself
    flow.gate.set()
    return t, known


def one(rows: list[CountResult]) -> CountResult:
    [r] = rows
    return r


async def counter(cores: list[ATP], flow: Flow, out: dict[str, Any]) -> None:
    core = cores[0]
    await flow.reached(0.15)
    t1 = await core._now_ms()
    at1 = await logged_on_hand_at(core, "HOT1", t1)
    await flow.reached(0.25)
    t_hot2, known2 = await quiesced_moment(core, "HOT2", flow)
    await flow.reached(0.3)
    t3 = await core._now_ms()
    at3 = await logged_on_hand_at(core, "HOT3", t3)
    t4 = await core._now_ms()
    at4 = await logged_on_hand_at(core, "HOT4", t4)
    await flow.reached(0.4)
    t2 = await core._now_ms()
    at2 = await logged_on_hand_at(core, "HOT1", t2)
    await flow.reached(0.5)
    # the T1 count, applied after T2
    c1 = one(await core.apply_counts("c1", [CountRow("HOT1", LOC, at1 + D1, ms_to_dt(t1), 1)]))
    await flow.reached(0.55)
    c_hot2 = one(
        await cores[1].apply_counts(
            "c-hot2", [CountRow("HOT2", LOC, known2 + D_HOT2, ms_to_dt(t_hot2), 1)]
        )
    )
    # the T2 count: the shelf holds what the log says plus both losses
    c2 = one(
        await cores[2].apply_counts("c2", [CountRow("HOT1", LOC, at2 + D1 + D2, ms_to_dt(t2), 1)])
    )
    await flow.reached(0.6)
    # a worker and its retry at once: the same count id, the same row
    row3 = CountRow("HOT3", LOC, at3 + D_HOT3, ms_to_dt(t3), 1)
    r3a, r3b = await asyncio.gather(
        cores[1].apply_counts("c-hot3", [row3]), cores[3].apply_counts("c-hot3", [row3])
    )
    # and a retry that numbers the row differently
    row4 = CountRow("HOT4", LOC, at4 + D_HOT4, ms_to_dt(t4), 3)
    row4_again = CountRow("HOT4", LOC, at4 + D_HOT4, ms_to_dt(t4), 17)
    r4a, r4b = await asyncio.gather(
        cores[2].apply_counts("c-hot4", [row4]), cores[3].apply_counts("c-hot4", [row4_again])
    )
    out.update(
        t1=t1, at1=at1, t2=t2, at2=at2, c1=c1, c2=c2, t_hot2=t_hot2, known2=known2,
        c_hot2=c_hot2, t3=t3, at3=at3, r3=(one(r3a), one(r3b)), t4=t4, at4=at4,
        r4=(one(r4a), one(r4b)),
    )  # fmt: skip
    assert flow.done < TOTAL * 0.95, "the counts were applied after the flow: not a race"


async def movements(core: ATP, sku: str) -> list[tuple[int, dict[str, str]]]:
    rows = await core.redis.xrange(core.keys.position(sku, LOC).log)
    return [(ms_of(mid), {_s(k): _s(v) for k, v in f.items()}) for mid, f in rows]


def moved_after(log: list[tuple[int, dict[str, str]]], t: int) -> int:
    """The on-hand movements logged after ``t``, counts left out (a count corrects the
    past; it is not a movement after its own time)."""
    return sum(
        int(f["on_hand_after"]) - int(f["on_hand_before"])
        for ms, f in log
        if ms > t and f["kind"] != "count"
    )


@pytest.mark.parametrize("seed", [0, 1])
async def test_counts_as_of_earlier_moments_while_the_book_moves(
    server: EmbeddedServer, settings: Settings, atp: ATP, seed: int
) -> None:
    for sku in SKUS:
        await atp.set_position(sku, LOC, INITIAL, reason="init")
    cores = [
        ATP(aioredis.Redis.from_url(server.url, max_connections=64), settings) for _ in range(POOLS)
    ]
    try:
        for c in cores:
            await c.start()
        flow = Flow()
        flow.gate.set()
        out: dict[str, Any] = {}
        await asyncio.gather(
            counter(cores, flow, out),
            *[
                client(cores[p], f"p{p}t{t}", 100_000 * seed + 1000 * p + t, flow)
                for p in range(POOLS)
                for t in range(TASKS_PER_POOL)
            ],
        )
    finally:
        for c in cores:
            await c.aclose()
    assert flow.done == TOTAL

    # what each count answered
    c1, c2 = out["c1"], out["c2"]
    assert (c1.status, c1.on_hand_at_count, c1.drift) == ("applied", out["at1"], D1)
    # the T1 count's correction is part of the book as of T2
    assert (c2.status, c2.on_hand_at_count, c2.drift) == ("applied", out["at2"] + D1, D2)
    ch2 = out["c_hot2"]
    assert (ch2.status, ch2.on_hand_at_count, ch2.drift) == ("applied", out["known2"], D_HOT2)
    # the same row twice at once: one applied, the other already, same figures
    r3 = sorted(out["r3"], key=lambda r: r.status)
    assert [r.status for r in r3] == ["already", "applied"]
    assert {(r.on_hand_at_count, r.drift, r.on_hand_before, r.on_hand_after) for r in r3} == {
        (out["at3"], D_HOT3, r3[1].on_hand_before, r3[1].on_hand_after)
    }
    # renumbered: one applied, the other refused as a duplicate
    r4 = sorted(out["r4"], key=lambda r: r.status)
    assert [(r.status, r.reason) for r in r4] == [("applied", None), ("refused", "duplicate")]
    assert (r4[0].on_hand_at_count, r4[0].drift) == (out["at4"], D_HOT4)

    # the book, read back
    counts = {"HOT1": ("c2", out["t2"]), "HOT2": ("c-hot2", out["t_hot2"]),
              "HOT3": ("c-hot3", out["t3"]), "HOT4": ("c-hot4", out["t4"])}  # fmt: skip
    drifts = {"HOT1": D1 + D2, "HOT2": D_HOT2, "HOT3": D_HOT3, "HOT4": D_HOT4}
    for sku in SKUS:
        p = await atp.position(sku, LOC)
        assert p is not None
        log = await movements(atp, sku)
        last_id, last_t = counts[sku]
        [last] = [f for _, f in log if f["kind"] == "count" and f["ref"] == last_id]
        # on_hand = the last count plus the movements logged after its time
        assert p.on_hand == int(last["counted"]) + moved_after(log, last_t), sku
        # = the initial stock, what the clients were told, and the drifts found: no unit
        # counted twice, none lost
        assert p.on_hand == INITIAL + flow.moved[sku] + drifts[sku], sku
        # each count movement once, with its drift, chained where it was applied
        cm = [f for _, f in log if f["kind"] == "count"]
        assert len(cm) == (2 if sku == "HOT1" else 1), (sku, cm)
        for f in cm:
            assert f["reason"] == "cycle_count"
            assert int(f["on_hand_after"]) - int(f["on_hand_before"]) == int(f["drift"])
        assert [int(f["drift"]) for f in cm] == ([D1, D2] if sku == "HOT1" else [drifts[sku]])
        # a race, not a quiet book: movements between the count's time and its
        # application, and after it
        applied_at = next(ms for ms, f in log if f["kind"] == "count" and f["ref"] == last_id)
        between = [f for ms, f in log if last_t < ms < applied_at and f["kind"] != "count"]
        after = [f for ms, f in log if ms > applied_at and f["kind"] != "count"]
        assert len(between) >= 10 and len(after) >= 10, (sku, len(between), len(after))
        assert any(f["on_hand_after"] != f["on_hand_before"] for f in between + after)
    hot1 = [f for _, f in await movements(atp, "HOT1") if f["kind"] == "count"]
    assert [(f["ref"], int(f["counted_at"])) for f in hot1] == [
        ("c1", out["t1"]),
        ("c2", out["t2"]),
    ]
    rep = await verify(atp)
    assert rep.ok, rep.problems
    assert rep.movements > TOTAL // 2
    assert flow.refused == 0  # the stock never ran out: every outcome was an acknowledged one
