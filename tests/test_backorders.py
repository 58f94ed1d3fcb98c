"""Backorders (issue 7), on a real server: a reservation that asks to wait instead of being
refused waits in its position's queue, ordered by channel priority then arrival, and is
filled, atomically and in that order, when supply arrives.

The race at the end: buyers of two channels backorder and reserve while a supplier
receives units in small batches and buyers cancel; replaying the bucket's outbox shows
every fill was the head of the queue at that moment (nothing skipped, nothing filled
twice), and ``atp.verify`` shows the book balances and the queue matches the records.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from support import snapshot

from atp import (
    ATP,
    FulfilLine,
    IdempotencyConflict,
    InsufficientStock,
    InvalidRequest,
)
from atp.errors import StillBackordered
from atp.models import CountRow
from atp.verify import verify

SKU, LOC = "BO-1", "DC1"
RULES = {"channels": {"web": {"priority": 100}, "market": {"priority": 10}}}
_ids = itertools.count()


async def bo(core: ATP, channel: str, qty: int, rid: str | None = None) -> str:
    rid = rid or f"bo-{next(_ids)}"
    await core.reserve(rid, channel, [(SKU, LOC, qty)], on_short="backorder")
    return rid


async def status(core: ATP, rid: str) -> str:
    return (await core.reservation(rid)).status


async def test_a_backorder_waits_and_is_filled_when_supply_arrives(atp: ATP) -> None:
    core = atp
    await core.set_position(SKU, LOC, 2, 0)
    r = await core.reserve("b1", "web", [(SKU, LOC, 3)], on_short="backorder")
    assert (r.status, r.backordered, r.open_units) == ("backordered", True, 0)
    pos = await core.position(SKU, LOC)
    assert pos and (pos.committed, pos.backordered) == (0, 3)
    # the 2 on the shelf are what b1 waits for: a later buyer may not take them
    with pytest.raises(InsufficientStock) as e:
        await core.reserve("late", "web", [(SKU, LOC, 1)], hold_seconds=0)
    assert e.value.lines[0]["limited_by"] == "backorders"
    ex = await core.explain(SKU, LOC, "web")
    assert ex and (ex.atp, ex.backorders_ahead, ex.limited_by) == (0, 3, "backorders")
    # a retry is the original answer; the same id asking to be refused instead conflicts
    again = await core.reserve("b1", "web", [(SKU, LOC, 3)], on_short="backorder")
    assert again.replayed and again.status == "backordered"
    with pytest.raises(IdempotencyConflict):
        await core.reserve("b1", "web", [(SKU, LOC, 3)], hold_seconds=0)
    with pytest.raises(StillBackordered):
        await core.confirm("b1")
    with pytest.raises(StillBackordered):
        await core.fulfil("b1", [FulfilLine(SKU, LOC, shipped=1)])
    await core.receive(SKU, LOC, 1, reference="PO-1")
    filled = await core.reservation("b1")
    assert (filled.status, filled.backordered, filled.open_units) == ("confirmed", True, 3)
    assert filled.filled_at is not None
    pos = await core.position(SKU, LOC)
    assert pos and (pos.on_hand, pos.committed, pos.backordered) == (3, 3, 0)
    moves = [(m.kind, m.reason, m.reservation_id) for m in await core.movements(SKU, LOC)]
    assert ("reserve", "backorder_filled", "b1") in moves
    # once filled, it ships like any confirmed reservation
    await core.fulfil("b1", [FulfilLine(SKU, LOC, shipped=3)])
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_the_queue_is_filled_by_priority_then_arrival_and_never_skipped(atp: ATP) -> None:
    core = atp
    await core.apply_rules(RULES)
    await core.set_position(SKU, LOC, 0, 0)
    m1 = await bo(core, "market", 2)
    w1 = await bo(core, "web", 3)
    m2 = await bo(core, "market", 1)
    w2 = await bo(core, "web", 1)
    await core.receive(SKU, LOC, 3, reference="PO-1")
    assert [await status(core, r) for r in (w1, w2, m1, m2)] == [
        "confirmed", "backordered", "backordered", "backordered"
    ]  # fmt: skip
    # 2 more: w2 takes 1; m1 needs 2 and finds 1, so m2 (1) must wait behind it
    await core.receive(SKU, LOC, 2, reference="PO-2")
    assert [await status(core, r) for r in (w2, m1, m2)] == [
        "confirmed",
        "backordered",
        "backordered",
    ]
    # a web buyer (priority above market) may take what market's backorders wait for
    await core.reserve("web-now", "web", [(SKU, LOC, 1)], hold_seconds=0)
    with pytest.raises(InsufficientStock):
        await core.reserve("market-now", "market", [(SKU, LOC, 1)], hold_seconds=0)
    await core.adjust(SKU, LOC, 3, reason="found")
    assert [await status(core, r) for r in (m1, m2)] == ["confirmed", "confirmed"]
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_a_cancelled_backorder_lets_the_next_one_fill(atp: ATP) -> None:
    core = atp
    await core.set_position(SKU, LOC, 2, 0)
    first = await bo(core, "web", 3)
    second = await bo(core, "web", 2)
    assert await status(core, second) == "backordered"  # behind first, though 2 are there
    r = await core.release(first, reason="customer cancelled")
    assert r.status == "released"
    assert await status(core, second) == "confirmed"
    pos = await core.position(SKU, LOC)
    assert pos and (pos.committed, pos.backordered) == (2, 0)
    assert (await core.release(first)).status == "released"  # again: no-op
    rep = await verify(core)
    assert rep.ok, rep.problems


async def _supply_by(core: ATP, how: str) -> None:
    if how == "receive":
        await core.receive(SKU, LOC, 2, reference="PO")
    elif how == "adjust":
        await core.adjust(SKU, LOC, 2, reason="found")
    elif how == "set":
        await core.set_position(SKU, LOC, 5, reason="recount")
    elif how == "count":
        t = await core.redis.time()
        at = datetime.fromtimestamp(int(t[0]), UTC) + timedelta(seconds=1)
        await asyncio.sleep(1.1)
        (res,) = await core.apply_counts("cnt-1", [CountRow(SKU, LOC, 5, at, 1)])
        assert res.status == "applied", res
    elif how == "release":
        await core.release("other")
    elif how == "expire":
        await asyncio.sleep(1.2)
        await core.expire_holds()
    elif how == "remainder":
        await core.fulfil(
            "other", [FulfilLine(SKU, LOC, shipped=0, short=0, release_remainder=True)]
        )
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["receive", "adjust", "set", "count", "release", "expire", "remainder"]
)
async def test_every_way_supply_arrives_fills_the_queue(atp: ATP, how: str) -> None:
    core = atp
    await core.set_position(SKU, LOC, 3, 0)
    hold = 1 if how == "expire" else 0
    await core.reserve("other", "market", [(SKU, LOC, 2)], hold_seconds=hold)
    waiting = await bo(core, "web", 3)
    assert await status(core, waiting) == "backordered"
    await _supply_by(core, how)
    assert await status(core, waiting) == "confirmed", how
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_backorder_requests_that_cannot_wait_are_refused(atp: ATP) -> None:
    core = atp
    await core.set_position(SKU, LOC, 0, 0)
    await core.set_position(SKU, "DC2", 0, 0)
    before = await snapshot(core)
    for kwargs in (
        {"hold_seconds": 60},
        {"requested_date": datetime.now(UTC).date() + timedelta(days=3)},
        {"lines": [(SKU, LOC, 1), (SKU, "DC2", 1)]},
        {"lines": [(SKU, None, 1)]},
        {"on_short": "wait"},
    ):
        lines = kwargs.pop("lines", [(SKU, LOC, 1)])
        on_short = kwargs.pop("on_short", "backorder")
        with pytest.raises(InvalidRequest):
            await core.reserve("x", "web", lines, on_short=on_short, **kwargs)  # type: ignore[arg-type]
    # straight to the script, past the Python checks: refused there too, nothing written
    b = core.keys.bucket(SKU)
    keys = [
        core.keys.index("x"),
        *core.keys.bucket_keys(b).tuple(),
        *core.keys.position(SKU, LOC).line(),
    ]
    cfg = core._cfg("", "")
    for req in (
        {"hold": 60000},
        {"rd": 30000},
        {"bo": "yes"},
        {"pp": -1},
    ):
        line = {"sku": SKU, "loc": LOC, "qty": 1}
        body = {
            "id": "x", "ch": "web", "hold": 0, "fp": "f", "idx": True,
            "home": core.keys.bucket("x"), "rv": 0, "bo": True,
            "parts": [{"b": b, "n": 1, "lines": [line]}], **req,
        }  # fmt: skip
        with pytest.raises(InvalidRequest):
            await core._run("reserve", keys, cfg, body)
    assert await snapshot(core) == before
    # a line its channel's cap holds back is refused, not queued
    await core.apply_rules({"channels": {"web": {}}, "default": {"cap": {"web": 0}}})
    with pytest.raises(InsufficientStock) as e:
        await core.reserve("capped", "web", [(SKU, LOC, 1)], on_short="backorder")
    assert e.value.lines[0]["limited_by"] == "cap"


async def test_backorders_race_supply_and_new_reservations(atp: ATP) -> None:
    """Buyers of two channels backorder or reserve at once, a supplier receives small
    batches, some buyers cancel their backorder. Afterwards, replaying the bucket's outbox
    in order: every fill was the head of the queue (highest priority, then earliest), no
    backorder filled twice or after being cancelled; the book balances (verify)."""
    core = atp
    await core.apply_rules(RULES)
    await core.set_position(SKU, LOC, 0, 0)
    rng = random.Random(7)
    made: list[str] = []
    stop = asyncio.Event()

    async def buyer(n: int) -> None:
        for i in range(25):
            ch = "web" if (n + i) % 3 == 0 else "market"
            rid = f"r-{n}-{i}"
            try:
                if rng.random() < 0.7:
                    r = await core.reserve(
                        rid, ch, [(SKU, LOC, rng.randint(1, 3))], on_short="backorder"
                    )
                    if r.status == "backordered":
                        made.append(rid)
                else:
                    await core.reserve(rid, ch, [(SKU, LOC, 1)], hold_seconds=0)
            except InsufficientStock:
                pass
            if made and rng.random() < 0.1:
                await core.release(rng.choice(made), reason="changed my mind")
            await asyncio.sleep(0)

    async def supplier() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            await core.receive(SKU, LOC, rng.randint(1, 5), reference=f"PO-{k}")
            await asyncio.sleep(0.002)

    sup = asyncio.create_task(supplier())
    await asyncio.gather(*(buyer(n) for n in range(24)))
    stop.set()
    await sup
    await core.receive(SKU, LOC, 1000, reference="PO-last")  # everything still waiting fills

    rep = await verify(core)
    assert rep.ok, rep.problems
    events = await core.redis.xrange(core.keys.events(core.keys.bucket(SKU)))
    waiting: dict[str, tuple[int, int]] = {}  # id -> (-priority, seq)
    fills = done = 0
    for _, f in events:
        kind = f[b"type"].decode()
        data = json.loads(f[b"data"]) if f.get(b"data") else {}
        rid = f[b"rid"].decode()
        if kind == "backordered":
            waiting[rid] = (-data["bq"][0], data["bq"][1])
        elif kind == "backorder_filled":
            assert rid in waiting, f"{rid} filled without waiting (twice, or after a cancel)"
            head = min(waiting, key=waiting.__getitem__)
            assert rid == head, f"{rid} filled while {head} waited ahead of it"
            del waiting[rid]
            fills += 1
        elif kind == "released" and data.get("backorder"):
            del waiting[rid]
            done += 1
    assert not waiting, f"still waiting after the last receipt: {sorted(waiting)[:5]}"
    assert fills > 20, (fills, done)
    pos = await core.position(SKU, LOC)
    assert pos and pos.backordered == 0


async def test_a_refusal_promises_no_date_that_backorders_ahead_will_take(atp: ATP) -> None:
    core = atp
    t = await core.redis.time()
    today = datetime.fromtimestamp(int(t[0]), UTC).date()
    await core.set_position(SKU, LOC, 0, 0)
    await core.expect_inbound(SKU, LOC, "PO-3", 5, today + timedelta(days=3))
    await bo(core, "web", 5)
    with pytest.raises(InsufficientStock) as e:
        await core.reserve("w2", "web", [(SKU, LOC, 5)], hold_seconds=0)
    assert "promise_date" not in e.value.lines[0]
    assert (await core.promise(SKU, LOC, "web", 5)).promise_date is None
    assert (await core.promise(SKU, LOC, "web", 5)).available_now == 0


async def test_a_rules_change_restamps_the_waiting_backorders(atp: ATP) -> None:
    """Backorders are filled by the rules in force, not those they were accepted under: a
    cap and a protection applied while market waits keep it from taking what the new rules
    give web; a priority raised moves a backorder up the queue."""
    core = atp
    await core.apply_rules(RULES)
    await core.set_position(SKU, LOC, 0, 0)
    m1 = await bo(core, "market", 3)
    w1 = await bo(core, "web", 2)
    # market is capped at 1 and web protects 5: market's 3 may not be filled at all
    await core.apply_rules({**RULES, "default": {"protect": {"web": 5}, "cap": {"market": 1}}})
    rec = json.loads(await core.redis.hget(core.keys.bucket_keys(core.keys.bucket(SKU)).res, m1))
    assert (rec["rv"], rec["cap"], rec["pr"]) == (2, 1, [["web", 5]])
    await core.receive(SKU, LOC, 5, reference="PO-1")
    assert (await status(core, w1), await status(core, m1)) == ("confirmed", "backordered")
    pos = await core.position(SKU, LOC)
    assert pos and pos.committed == 2
    # the queue order follows the priorities in force: market now above web
    w2 = await bo(core, "web", 4)
    m2 = await bo(core, "market", 1)
    await core.apply_rules({"channels": {"web": {"priority": 10}, "market": {"priority": 100}}})
    await core.receive(SKU, LOC, 1, reference="PO-2")
    # 4 free now: m1 (3, no cap any more) first, then m2 (1); w2 (4) waits
    assert [await status(core, r) for r in (m1, m2, w2)] == [
        "confirmed",
        "confirmed",
        "backordered",
    ]
    rep = await verify(core)
    assert rep.ok, rep.problems
