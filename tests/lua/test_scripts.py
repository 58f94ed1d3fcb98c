"""Behaviour of every Lua script, through the core, on a real server and on fakeredis.

Every test runs twice (``core`` is parametrized over the session's real server and
fakeredis with Lua). After each state change the whole book is checked with
:func:`atp.verify.verify` (I1, I2, I5), and refusals are shown to change nothing by
comparing a full snapshot of the keyspace before and after.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from support import snapshot

from atp import (
    ATP,
    AlreadyFulfilled,
    AlreadyReleased,
    FulfilLine,
    HoldExpired,
    IdempotencyConflict,
    InsufficientStock,
    InvalidRequest,
    Line,
    NegativeOnHand,
    NotConfirmed,
    OverFulfil,
    UnknownLine,
    UnknownPosition,
    UnknownReservation,
)
from atp.verify import VerifyReport, verify

HOLD_WAIT = 1.1  # seconds: a hold of 1 s has lapsed after this


# -- helpers ---------------------------------------------------------------------------------


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def balanced(core: ATP, *, allow_uncovered: bool = False) -> VerifyReport:
    rep = await verify(core, allow_uncovered=allow_uncovered)
    assert rep.ok, rep.problems
    return rep


def distinct_bucket_skus(core: ATP, n: int) -> list[str]:
    """``n`` SKUs that fall in ``n`` different buckets."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < n:
        found.setdefault(core.keys.bucket(f"SKU-{i}"), f"SKU-{i}")
        i += 1
    return list(found.values())


def same_bucket_skus(core: ATP, n: int) -> list[str]:
    """``n`` SKUs that share one bucket."""
    groups: dict[int, list[str]] = defaultdict(list)
    i = 0
    while True:
        g = groups[core.keys.bucket(f"SKU-{i}")]
        g.append(f"SKU-{i}")
        if len(g) == n:
            return g
        i += 1


def other_bucket_sku(core: ATP, sku: str) -> str:
    """A SKU in another bucket than ``sku``."""
    return next(
        s for s in distinct_bucket_skus(core, 2) if core.keys.bucket(s) != core.keys.bucket(sku)
    )


async def events(core: ATP, sku: str, etype: str | None = None) -> list[dict[str, Any]]:
    """The entries of the outbox stream of ``sku``'s bucket (``data`` decoded)."""
    rows = await core.redis.xrange(core.keys.events(core.keys.bucket(sku)))
    out = []
    for _, fields in rows:
        f: dict[str, Any] = {_s(k): _s(v) for k, v in fields.items()}
        f["data"] = json.loads(f["data"])
        if etype is None or f["type"] == etype:
            out.append(f)
    return out


async def pos(core: ATP, sku: str, loc: str = "W1") -> tuple[int, int, int]:
    p = await core.position(sku, loc)
    assert p is not None
    return p.on_hand, p.committed, p.safety_stock


async def by_channel(core: ATP, sku: str, loc: str = "W1") -> dict[str, int]:
    p = await core.position(sku, loc)
    assert p is not None
    return p.committed_by_channel


async def hx_ids(core: ATP, sku: str, loc: str = "W1") -> list[str]:
    return [_s(m) for m in await core.redis.zrange(core.keys.position(sku, loc).hx, 0, -1)]


async def holds_ids(core: ATP, sku: str) -> list[str]:
    key = core.keys.bucket_keys(core.keys.bucket(sku)).holds
    return [_s(m) for m in await core.redis.zrange(key, 0, -1)]


# -- set_position -----------------------------------------------------------------------------


async def test_set_position_creates_and_logs(core: ATP) -> None:
    p = await core.set_position("A", "W1", 10, 2, reason="cycle count", actor="ann", source="wms")
    assert (p.on_hand, p.committed, p.safety_stock, p.available) == (10, 0, 2, 8)
    assert await pos(core, "A") == (10, 0, 2)
    [m] = await core.movements("A", "W1")
    assert (m.kind, m.reason, m.actor, m.source) == ("set", "cycle count", "ann", "wms")
    assert (m.on_hand_before, m.on_hand_after, m.committed_before, m.committed_after) == (
        0,
        10,
        0,
        0,
    )
    [ev] = await events(core, "A", "position_set")
    assert ev["data"]["on_hand_after"] == 10 and ev["data"]["safety_stock"] == 2
    await balanced(core)


async def test_set_position_keeps_safety_stock_and_committed(core: ATP) -> None:
    await core.set_position("A", "W1", 10, 3, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 4)], hold_seconds=0)
    p = await core.set_position("A", "W1", 20, reason="recount")
    assert (p.on_hand, p.committed, p.safety_stock) == (20, 4, 3)
    assert p.committed_by_channel == {"web": 4}
    p = await core.set_position("A", "W1", 20, 0, reason="drop safety stock")
    assert p.safety_stock == 0
    moves = await core.movements("A", "W1")
    assert [m.kind for m in moves] == ["set", "set", "reserve", "set"]
    assert not await events(core, "A", "exception")
    await balanced(core)


async def test_set_position_below_commitments_raises_oversell(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 8)], hold_seconds=0)
    p = await core.set_position("A", "W1", 5, 1, reason="count found less")
    assert (p.on_hand, p.committed, p.safety_stock) == (5, 8, 1)
    [ex] = await events(core, "A", "exception")
    assert ex["data"]["kind"] == "oversell"
    assert ex["data"]["cause"] == "set_position"
    assert ex["data"]["shortfall"] == 4
    rep = await balanced(core, allow_uncovered=True)
    assert rep.uncovered == ["A@W1"]
    assert not (await verify(core)).ok  # I1 is reported without allow_uncovered


# -- adjust -----------------------------------------------------------------------------------


async def test_adjust_changes_on_hand_with_reason(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    p = await core.adjust("A", "W1", -3, reason="damaged", reference="INC-1", actor="bob")
    assert p.on_hand == 7
    p = await core.adjust("A", "W1", 5, reason="found", source="scanner")
    assert p.on_hand == 12
    newest, older, _ = await core.movements("A", "W1")
    assert (
        newest.kind,
        newest.reason,
        newest.source,
        newest.on_hand_before,
        newest.on_hand_after,
    ) == (
        "adjust",
        "found",
        "scanner",
        7,
        12,
    )
    assert (older.reason, older.ref, older.actor, older.on_hand_before, older.on_hand_after) == (
        "damaged",
        "INC-1",
        "bob",
        10,
        7,
    )
    deltas = [e["data"]["delta"] for e in await events(core, "A", "adjusted")]
    assert deltas == [-3, 5]
    await balanced(core)


async def test_adjust_to_exactly_zero_is_allowed(core: ATP) -> None:
    await core.set_position("A", "W1", 4, reason="init")
    assert (await core.adjust("A", "W1", -4, reason="scrapped")).on_hand == 0
    await balanced(core)


async def test_adjust_below_zero_refused_and_changes_nothing(core: ATP) -> None:
    await core.set_position("A", "W1", 4, reason="init")
    before = await snapshot(core)
    with pytest.raises(NegativeOnHand) as ei:
        await core.adjust("A", "W1", -5, reason="damaged")
    assert ei.value.extra["on_hand"] == 4
    assert await snapshot(core) == before


async def test_adjust_unknown_position_refused(core: ATP) -> None:
    with pytest.raises(UnknownPosition):
        await core.adjust("NOPE", "W1", 1, reason="found")
    assert await snapshot(core) == {}


async def test_adjust_down_under_commitments_raises_oversell(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 9)], hold_seconds=0)
    await core.adjust("A", "W1", 3, reason="found")  # up: never an exception
    assert not await events(core, "A", "exception")
    await core.adjust("A", "W1", -6, reason="damaged")
    [ex] = await events(core, "A", "exception")
    assert (ex["data"]["kind"], ex["data"]["cause"], ex["data"]["shortfall"]) == (
        "oversell",
        "adjust",
        2,
    )
    await balanced(core, allow_uncovered=True)


# -- receive ----------------------------------------------------------------------------------


async def test_receive_creates_then_adds(core: ATP) -> None:
    p = await core.receive("A", "W1", 6, reference="PO-1", actor="dock")
    assert (p.on_hand, p.committed, p.safety_stock) == (6, 0, 0)
    p = await core.receive("A", "W1", 4, reference="ASN-7")
    assert p.on_hand == 10
    newest, first = await core.movements("A", "W1")
    assert (
        newest.kind,
        newest.reason,
        newest.ref,
        newest.on_hand_before,
        newest.on_hand_after,
    ) == (
        "receive",
        "receipt",
        "ASN-7",
        6,
        10,
    )
    assert (first.ref, first.actor, first.on_hand_before) == ("PO-1", "dock", 0)
    refs = [e["data"]["reference"] for e in await events(core, "A", "received")]
    assert refs == ["PO-1", "ASN-7"]
    await balanced(core)


async def test_receive_keeps_commitments(core: ATP) -> None:
    await core.set_position("A", "W1", 5, 1, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 4)], hold_seconds=0)
    p = await core.receive("A", "W1", 5, reference="PO-2")
    assert (p.on_hand, p.committed, p.safety_stock) == (10, 4, 1)
    assert p.committed_by_channel == {"web": 4}
    await balanced(core)


async def test_receive_beyond_max_on_hand_refused(core: ATP) -> None:
    m = core.settings.max_on_hand
    await core.set_position("A", "W1", m - 1, reason="init")
    before = await snapshot(core)
    with pytest.raises(InvalidRequest):
        await core.receive("A", "W1", 2, reference="PO-3")
    with pytest.raises(InvalidRequest):
        await core.adjust("A", "W1", 2, reason="found")
    assert await snapshot(core) == before
    assert (await core.receive("A", "W1", 1, reference="PO-4")).on_hand == m


# -- reserve ----------------------------------------------------------------------------------


async def test_reserve_held_single_line(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    r = await core.reserve("r1", "web", [("A", "W1", 3)], hold_seconds=60, actor="shop")
    assert (r.id, r.channel, r.status, r.replayed) == ("r1", "web", "held", False)
    assert r.lines[0].qty == 3 and r.lines[0].open == 3 and r.open_units == 3
    assert r.expires_at is not None and r.expires_at - r.created_at == timedelta(seconds=60)
    assert await pos(core, "A") == (10, 3, 0)
    assert await by_channel(core, "A") == {"web": 3}
    assert await hx_ids(core, "A") == ["r1"]
    assert await holds_ids(core, "A") == ["r1"]
    [m] = (await core.movements("A", "W1"))[:1]
    assert (m.kind, m.reason, m.actor, m.reservation_id, m.channel) == (
        "reserve",
        "held",
        "shop",
        "r1",
        "web",
    )
    assert (m.committed_before, m.committed_after) == (0, 3)
    [ev] = await events(core, "A", "reserved")
    # the event carries the reservation part as stored
    assert (ev["rid"], ev["channel"], ev["data"]["st"]) == ("r1", "web", "held")
    assert [(ln["sku"], ln["qty"]) for ln in ev["data"]["lines"]] == [("A", 3)]
    got = await core.reservation("r1")
    assert (got.status, got.lines, got.expires_at) == ("held", r.lines, r.expires_at)
    await balanced(core)


async def test_reserve_confirmed_at_once(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    r = await core.reserve("r1", "web", [Line("A", "W1", 10)], hold_seconds=0)
    assert r.status == "confirmed" and r.expires_at is None
    # hold_seconds=None takes the default (0 in the test settings): confirmed too
    await core.set_position("B", "W1", 1, reason="init")
    r2 = await core.reserve("r2", "web", [("B", "W1", 1)])
    assert r2.status == "confirmed"
    assert await hx_ids(core, "A") == [] and await holds_ids(core, "A") == []
    assert await pos(core, "A") == (10, 10, 0)
    await balanced(core)


async def test_reserve_respects_safety_stock_and_channels(core: ATP) -> None:
    await core.set_position("A", "W1", 10, 2, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    with pytest.raises(InsufficientStock) as ei:
        await core.reserve("r2", "store", [("A", "W1", 4)], hold_seconds=0)
    assert ei.value.lines == [
        {"sku": "A", "location": "W1", "requested": 4, "available": 3, "limited_by": "stock"}
    ]
    await core.reserve("r2", "store", [("A", "W1", 3)], hold_seconds=0)
    assert await pos(core, "A") == (10, 8, 2)
    assert await by_channel(core, "A") == {"web": 5, "store": 3}
    with pytest.raises(InsufficientStock) as ei:
        await core.reserve("r3", "web", [("A", "W1", 1)], hold_seconds=0)
    assert ei.value.lines[0]["available"] == 0
    await balanced(core)


async def test_reserve_multi_line_across_buckets(core: ATP) -> None:
    a, b = distinct_bucket_skus(core, 2)
    c = same_bucket_skus(core, 2)
    skus = [a, b, *c]
    for s in skus:
        await core.set_position(s, "W1", 10, reason="init")
    lines = [(s, "W1", i + 1) for i, s in enumerate(skus)]
    r = await core.reserve("multi", "web", lines, hold_seconds=60)
    assert r.status == "held"
    assert sorted((ln.sku, ln.qty) for ln in r.lines) == sorted((s, q) for s, _, q in lines)
    for s, _, q in lines:
        assert await pos(core, s) == (10, q, 0)
        assert await hx_ids(core, s) == ["multi"]
        assert "multi" in await holds_ids(core, s)
    index = json.loads(await core.redis.hget(core.keys.index("multi"), "multi"))
    buckets = {core.keys.bucket(s) for s in skus}
    assert {p["b"] for p in index["parts"]} == buckets
    assert sum(len(p["lines"]) for p in index["parts"]) == len(skus)
    for bk in buckets:
        assert await core.redis.hexists(core.keys.bucket_keys(bk).res, "multi")
    got = await core.reservation("multi")
    assert sorted(got.lines, key=lambda ln: ln.sku) == sorted(r.lines, key=lambda ln: ln.sku)
    await balanced(core)


async def test_reserve_all_or_nothing(core: ATP) -> None:
    a, b, c = distinct_bucket_skus(core, 3)
    await core.set_position(a, "W1", 10, reason="init")
    await core.set_position(b, "W1", 2, reason="init")
    await core.set_position(c, "W1", 10, reason="init")
    await core.reserve("held", "web", [(a, "W1", 1)], hold_seconds=60)
    before = await snapshot(core)
    with pytest.raises(InsufficientStock) as ei:
        await core.reserve(
            "big", "web", [(a, "W1", 5), (b, "W1", 3), (c, "W1", 5)], hold_seconds=60
        )
    assert ei.value.lines == [
        {"sku": b, "location": "W1", "requested": 3, "available": 2, "limited_by": "stock"}
    ]
    assert await snapshot(core) == before
    with pytest.raises(UnknownReservation):
        await core.reservation("big")
    # the same id is still free, and works once the request fits
    r = await core.reserve(
        "big", "web", [(a, "W1", 5), (b, "W1", 2), (c, "W1", 5)], hold_seconds=60
    )
    assert r.open_units == 12
    await balanced(core)


async def test_reserve_several_short_lines_all_reported(core: ATP) -> None:
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 1, reason="init")
    await core.set_position(b, "W1", 1, reason="init")
    before = await snapshot(core)
    with pytest.raises(InsufficientStock) as ei:
        await core.reserve("r", "web", [(a, "W1", 2), (b, "W1", 3)], hold_seconds=0)
    assert sorted((ln["sku"], ln["requested"], ln["available"]) for ln in ei.value.lines) == sorted(
        [(a, 2, 1), (b, 3, 1)]
    )
    assert await snapshot(core) == before


async def test_reserve_unknown_position_refused(core: ATP) -> None:
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 10, reason="init")
    before = await snapshot(core)
    with pytest.raises(UnknownPosition) as ei:
        await core.reserve("r", "web", [(a, "W1", 1), (b, "W1", 1)], hold_seconds=0)
    assert ei.value.extra["lines"] == [{"sku": b, "location": "W1"}]
    with pytest.raises(UnknownPosition):
        await core.reserve("r", "web", [(a, "W2", 1)], hold_seconds=0)  # other location
    assert await snapshot(core) == before


async def test_reserve_replay_returns_original_outcome(core: ATP) -> None:
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 10, reason="init")
    await core.set_position(b, "W1", 10, reason="init")
    first = await core.reserve("r1", "web", [(a, "W1", 2), (b, "W1", 3)], hold_seconds=60)
    before = await snapshot(core)
    again = await core.reserve("r1", "web", [(a, "W1", 2), (b, "W1", 3)], hold_seconds=60)
    # line order does not make it another request
    swapped = await core.reserve("r1", "web", [Line(b, "W1", 3), Line(a, "W1", 2)], hold_seconds=60)
    assert await snapshot(core) == before
    for r in (again, swapped):
        assert r.replayed is True
        assert (r.id, r.channel, r.status, r.created_at, r.expires_at) == (
            first.id,
            first.channel,
            first.status,
            first.created_at,
            first.expires_at,
        )
        assert sorted(r.lines, key=lambda ln: ln.sku) == sorted(first.lines, key=lambda ln: ln.sku)
    assert first.replayed is False
    assert await pos(core, a) == (10, 2, 0) and await pos(core, b) == (10, 3, 0)
    # still a replay after the reservation moved on, and it changes nothing then either
    await core.confirm("r1")
    before = await snapshot(core)
    late = await core.reserve("r1", "web", [(a, "W1", 2), (b, "W1", 3)], hold_seconds=60)
    assert late.replayed is True and late.created_at == first.created_at
    assert await snapshot(core) == before
    await balanced(core)


@pytest.mark.parametrize(
    "channel, lines, hold",
    [
        ("web", [("A", "W1", 3)], 60),  # other quantity
        ("store", [("A", "W1", 2)], 60),  # other channel
        ("web", [("A", "W1", 2)], 0),  # confirmed instead of held
        ("web", [("A", "W1", 2)], 30),  # other hold
        ("web", [("A", "W1", 2), ("B", "W1", 1)], 60),  # one more line
        ("web", [("B", "W1", 2)], 60),  # other sku
    ],
)
async def test_reserve_same_id_other_request_conflicts(
    core: ATP, channel: str, lines: list[tuple[str, str, int]], hold: int
) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.set_position("B", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 2)], hold_seconds=60)
    before = await snapshot(core)
    with pytest.raises(IdempotencyConflict):
        await core.reserve("r1", channel, lines, hold_seconds=hold)
    assert await snapshot(core) == before


async def test_reserve_replay_after_refusal_is_not_cached(core: ATP) -> None:
    """A refused reserve leaves no trace, so the same id may retry and succeed (I3, I7)."""
    await core.set_position("A", "W1", 1, reason="init")
    with pytest.raises(InsufficientStock):
        await core.reserve("r1", "web", [("A", "W1", 2)], hold_seconds=0)
    await core.receive("A", "W1", 1, reference="PO")
    r = await core.reserve("r1", "web", [("A", "W1", 2)], hold_seconds=0)
    assert r.replayed is False and r.status == "confirmed"
    await balanced(core)


# -- confirm ----------------------------------------------------------------------------------


async def test_confirm_held(core: ATP) -> None:
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 5, reason="init")
    await core.set_position(b, "W1", 5, reason="init")
    await core.reserve("r1", "web", [(a, "W1", 2), (b, "W1", 1)], hold_seconds=60)
    r = await core.confirm("r1", actor="checkout")
    assert (r.status, r.expires_at, r.replayed) == ("confirmed", None, False)
    for s in (a, b):
        assert await hx_ids(core, s) == [] and await holds_ids(core, s) == []
        [ev] = await events(core, s, "confirmed")
        assert ev["rid"] == "r1"
    assert (await core.reservation("r1")).status == "confirmed"
    assert await pos(core, a) == (5, 2, 0) and await pos(core, b) == (5, 1, 0)
    # confirming again is a no-op
    before = await snapshot(core)
    again = await core.confirm("r1")
    assert (again.status, again.replayed) == ("confirmed", True)
    assert await snapshot(core) == before
    await balanced(core)


async def test_confirm_of_confirmed_at_once_is_noop(core: ATP) -> None:
    await core.set_position("A", "W1", 5, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 2)], hold_seconds=0)
    before = await snapshot(core)
    r = await core.confirm("r1")
    assert (r.status, r.replayed) == ("confirmed", True)
    assert await snapshot(core) == before


async def test_confirm_after_release_or_fulfil_refused(core: ATP) -> None:
    await core.set_position("A", "W1", 5, reason="init")
    await core.reserve("rel", "web", [("A", "W1", 1)], hold_seconds=60)
    await core.release("rel")
    await core.reserve("ful", "web", [("A", "W1", 1)], hold_seconds=0)
    await core.fulfil("ful", [FulfilLine("A", "W1", shipped=1)])
    before = await snapshot(core)
    with pytest.raises(AlreadyReleased):
        await core.confirm("rel")
    with pytest.raises(AlreadyFulfilled):
        await core.confirm("ful")
    with pytest.raises(UnknownReservation):
        await core.confirm("nope")
    assert await snapshot(core) == before
    await balanced(core)


# -- release ----------------------------------------------------------------------------------


async def test_release_returns_units(core: ATP) -> None:
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 5, reason="init")
    await core.set_position(b, "W1", 5, reason="init")
    await core.reserve("keep", "web", [(a, "W1", 1)], hold_seconds=0)
    await core.reserve("r1", "web", [(a, "W1", 2), (b, "W1", 3)], hold_seconds=60)
    r = await core.release("r1", reason="cart abandoned", actor="shop")
    assert (r.status, r.replayed, r.open_units) == ("released", False, 0)
    assert all(ln.released == ln.qty for ln in r.lines)
    assert await pos(core, a) == (5, 1, 0) and await pos(core, b) == (5, 0, 0)
    assert await by_channel(core, a) == {"web": 1} and await by_channel(core, b) == {"web": 0}
    for s in (a, b):
        assert await hx_ids(core, s) == [] and await holds_ids(core, s) == []
        m = (await core.movements(s, "W1"))[0]
        assert (m.kind, m.reason, m.actor, m.reservation_id) == (
            "release",
            "cart abandoned",
            "shop",
            "r1",
        )
        [ev] = await events(core, s, "released")
        assert ev["rid"] == "r1" and ev["data"]["reason"] == "cart abandoned"
    assert (await core.reservation("r1")).status == "released"
    await balanced(core)
    # releasing again is a no-op
    before = await snapshot(core)
    again = await core.release("r1")
    assert (again.status, again.replayed) == ("released", True)
    assert await snapshot(core) == before


async def test_release_confirmed(core: ATP) -> None:
    await core.set_position("A", "W1", 5, reason="init")
    await core.reserve("r1", "store", [("A", "W1", 5)], hold_seconds=0)
    assert (await core.release("r1")).status == "released"
    assert await pos(core, "A") == (5, 0, 0)
    await core.reserve("r2", "web", [("A", "W1", 5)], hold_seconds=0)  # the units are back
    await balanced(core)


async def test_release_after_partial_fulfil(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    await core.fulfil("r1", [FulfilLine("A", "W1", shipped=2)], fulfilment_id="f1")
    assert await pos(core, "A") == (8, 3, 0)
    r = await core.release("r1")
    assert r.status == "released"
    [ln] = r.lines
    assert (ln.qty, ln.shipped, ln.released, ln.open) == (5, 2, 3, 0)
    assert await pos(core, "A") == (8, 0, 0)
    await balanced(core)


async def test_release_of_fulfilled_refused(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    await core.fulfil("r1", [FulfilLine("A", "W1", shipped=5)])
    before = await snapshot(core)
    with pytest.raises(AlreadyFulfilled):
        await core.release("r1")
    with pytest.raises(UnknownReservation):
        await core.release("nope")
    assert await snapshot(core) == before
    await balanced(core)


# -- fulfil -----------------------------------------------------------------------------------


async def test_fulfil_ships_everything(core: ATP) -> None:
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 10, reason="init")
    await core.set_position(b, "W1", 10, reason="init")
    await core.reserve("r1", "web", [(a, "W1", 4), (b, "W1", 1)], hold_seconds=0)
    r = await core.fulfil(
        "r1", [FulfilLine(a, "W1", shipped=4), FulfilLine(b, "W1", shipped=1)], actor="picker"
    )
    assert (r.status, r.replayed, r.open_units) == ("fulfilled", False, 0)
    assert await pos(core, a) == (6, 0, 0) and await pos(core, b) == (9, 0, 0)
    assert await by_channel(core, a) == {"web": 0}
    m = (await core.movements(a, "W1"))[0]
    assert (m.kind, m.reason, m.actor, m.reservation_id) == ("fulfil", "shipped", "picker", "r1")
    assert (m.on_hand_before, m.on_hand_after, m.committed_before, m.committed_after) == (
        10,
        6,
        4,
        0,
    )
    for s in (a, b):
        assert [e["rid"] for e in await events(core, s, "fulfilled")] == ["r1"]
        assert len(await events(core, s, "fulfil")) == 1
    assert (await core.reservation("r1")).status == "fulfilled"
    await balanced(core)


async def test_fulfil_partial_keeps_rest_committed(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    r = await core.fulfil("r1", [FulfilLine("A", "W1", shipped=2)], fulfilment_id="f1")
    assert r.status == "confirmed" and r.lines[0].shipped == 2 and r.lines[0].open == 3
    assert await pos(core, "A") == (8, 3, 0)
    await balanced(core)
    # the same quantities again under another id ship again
    r = await core.fulfil("r1", [FulfilLine("A", "W1", shipped=2)], fulfilment_id="f2")
    assert r.lines[0].shipped == 4 and r.status == "confirmed"
    r = await core.fulfil("r1", [FulfilLine("A", "W1", shipped=1)], fulfilment_id="f3")
    assert r.status == "fulfilled" and r.lines[0].open == 0
    assert await pos(core, "A") == (5, 0, 0)
    await balanced(core)


async def test_fulfil_partial_multi_line_then_rest(core: ATP) -> None:
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 10, reason="init")
    await core.set_position(b, "W1", 10, reason="init")
    await core.reserve("r1", "web", [(a, "W1", 2), (b, "W1", 2)], hold_seconds=0)
    r = await core.fulfil("r1", [FulfilLine(b, "W1", shipped=2)])
    assert r.status == "confirmed"
    assert await pos(core, a) == (10, 2, 0) and await pos(core, b) == (8, 0, 0)
    r = await core.fulfil("r1", [FulfilLine(a, "W1", shipped=2)])
    assert r.status == "fulfilled"
    await balanced(core)


async def test_fulfil_release_remainder(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    r = await core.fulfil("r1", [FulfilLine("A", "W1", shipped=2, release_remainder=True)])
    [ln] = r.lines
    assert (r.status, ln.shipped, ln.released, ln.open) == ("fulfilled", 2, 3, 0)
    assert await pos(core, "A") == (8, 0, 0)
    kinds = [m.kind for m in await core.movements("A", "W1")]
    assert kinds[:2] == ["release", "fulfil"]
    await balanced(core)


async def test_fulfil_releasing_everything_ends_released(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    r = await core.fulfil("r1", [FulfilLine("A", "W1", release_remainder=True)])
    assert r.status == "released" and r.lines[0].released == 5
    assert await pos(core, "A") == (10, 0, 0)
    await balanced(core)


async def test_fulfil_short_pick(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    r = await core.fulfil("r1", [FulfilLine("A", "W1", shipped=3, short=2)], fulfilment_id="f1")
    [ln] = r.lines
    assert (ln.shipped, ln.short, ln.released, ln.open) == (3, 2, 0, 2)
    assert r.status == "confirmed"
    # the missing units leave on_hand (they were never there); the unshipped rest stays
    # committed for the order
    assert await pos(core, "A") == (5, 2, 0)
    m = (await core.movements("A", "W1"))[0]
    assert (m.kind, m.on_hand_before, m.on_hand_after, m.committed_before, m.committed_after) == (
        "fulfil",
        10,
        5,
        5,
        2,
    )
    assert "short pick 2" in m.reason
    [ex] = await events(core, "A", "exception")
    assert ex["rid"] == "r1"
    b = core.keys.bucket("A")
    assert ex["data"] == {
        "id": f"{b}-1",
        "status": "open",
        "raised_at": int(ex["at"]),
        "reservation_id": "r1",
        "kind": "short_pick",
        "sku": "A",
        "location": "W1",
        "short": 2,
        "remainder": 2,
        "fulfilment": "f1",
    }
    # the same record is kept in the bucket's exceptions, open until resolved
    rec = await core.exception(f"{b}-1")
    assert (rec.kind, rec.status, rec.data) == ("short_pick", "open", ex["data"])
    assert [e.id for e in await core.exceptions()] == [f"{b}-1"]
    # the position is still covered (5 on hand, 2 committed): no oversell
    await balanced(core)


async def test_fulfil_short_pick_uncovering_raises_oversell(core: ATP) -> None:
    await core.set_position("A", "W1", 5, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    await core.fulfil("r1", [FulfilLine("A", "W1", shipped=3, short=2)])
    assert await pos(core, "A") == (0, 2, 0)
    kinds = [e["data"]["kind"] for e in await events(core, "A", "exception")]
    assert kinds == ["short_pick", "oversell"]
    # on the outbox: the exceptions, raised once the reservation is written, then the fulfil
    assert [e["type"] for e in await events(core, "A")][-3:] == ["exception", "exception", "fulfil"]
    b = core.keys.bucket("A")
    pick, over = await events(core, "A", "exception")
    assert (pick["data"]["id"], over["data"]["id"]) == (f"{b}-1", f"{b}-2")
    assert pick["data"]["shortfall"] == over["data"]["shortfall"] == 2
    assert [a["reservation_id"] for a in over["data"]["at_risk"]] == ["r1"]
    assert {e.id for e in await core.exceptions()} == {f"{b}-1", f"{b}-2"}
    rep = await balanced(core, allow_uncovered=True)
    assert rep.uncovered == ["A@W1"]
    # the rest can no longer ship: there is nothing on hand
    before = await snapshot(core)
    with pytest.raises(NegativeOnHand):
        await core.fulfil("r1", [FulfilLine("A", "W1", shipped=1)])
    assert await snapshot(core) == before
    # but it can be released
    assert (
        await core.fulfil("r1", [FulfilLine("A", "W1", release_remainder=True)])
    ).status == "fulfilled"
    await balanced(core)


async def test_fulfil_replay_same_id(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    first = await core.fulfil("r1", [FulfilLine("A", "W1", shipped=2)], fulfilment_id="f1")
    before = await snapshot(core)
    again = await core.fulfil("r1", [FulfilLine("A", "W1", shipped=2)], fulfilment_id="f1")
    assert again.replayed is True and again.lines == first.lines
    assert await snapshot(core) == before
    # without an id the lines are the id: an identical retry is a no-op too
    await core.fulfil("r1", [FulfilLine("A", "W1", shipped=1)])
    before = await snapshot(core)
    assert (await core.fulfil("r1", [FulfilLine("A", "W1", shipped=1)])).replayed is True
    assert await snapshot(core) == before
    assert await pos(core, "A") == (7, 2, 0)
    # a replay answers even once the reservation is fulfilled
    await core.fulfil("r1", [FulfilLine("A", "W1", shipped=2)], fulfilment_id="f9")
    assert (
        await core.fulfil("r1", [FulfilLine("A", "W1", shipped=2)], fulfilment_id="f1")
    ).replayed
    await balanced(core)


async def test_fulfil_same_id_other_lines_conflicts(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    await core.fulfil("r1", [FulfilLine("A", "W1", shipped=2)], fulfilment_id="f1")
    before = await snapshot(core)
    for other in (
        FulfilLine("A", "W1", shipped=3),
        FulfilLine("A", "W1", shipped=2, short=1),
        FulfilLine("A", "W1", shipped=2, release_remainder=True),
    ):
        with pytest.raises(IdempotencyConflict):
            await core.fulfil("r1", [other], fulfilment_id="f1")
    assert await snapshot(core) == before


async def test_fulfil_over_fulfil_refused(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    before = await snapshot(core)
    with pytest.raises(OverFulfil) as ei:
        await core.fulfil("r1", [FulfilLine("A", "W1", shipped=6)])
    assert ei.value.extra["open"] == 5
    with pytest.raises(OverFulfil):
        await core.fulfil("r1", [FulfilLine("A", "W1", shipped=4, short=2)])
    assert await snapshot(core) == before
    await core.fulfil("r1", [FulfilLine("A", "W1", shipped=3)], fulfilment_id="f1")
    before = await snapshot(core)
    with pytest.raises(OverFulfil) as ei:
        await core.fulfil("r1", [FulfilLine("A", "W1", shipped=3)], fulfilment_id="f2")
    assert ei.value.extra["open"] == 2
    assert await snapshot(core) == before
    await balanced(core)


async def test_fulfil_multi_line_one_bad_line_changes_nothing(core: ATP) -> None:
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 10, reason="init")
    await core.set_position(b, "W1", 10, reason="init")
    await core.reserve("r1", "web", [(a, "W1", 2), (b, "W1", 2)], hold_seconds=0)
    before = await snapshot(core)
    with pytest.raises(OverFulfil):
        await core.fulfil("r1", [FulfilLine(a, "W1", shipped=2), FulfilLine(b, "W1", shipped=3)])
    with pytest.raises(UnknownLine):
        await core.fulfil("r1", [FulfilLine(a, "W1", shipped=2), FulfilLine(b, "W2", shipped=1)])
    assert await snapshot(core) == before


async def test_fulfil_held_refused(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=60)
    before = await snapshot(core)
    with pytest.raises(NotConfirmed):
        await core.fulfil("r1", [FulfilLine("A", "W1", shipped=1)])
    assert await snapshot(core) == before
    await core.confirm("r1")
    assert (await core.fulfil("r1", [FulfilLine("A", "W1", shipped=1)])).status == "confirmed"


async def test_fulfil_unknown_line_refused(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.set_position("B", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5)], hold_seconds=0)
    before = await snapshot(core)
    with pytest.raises(UnknownLine):
        await core.fulfil("r1", [FulfilLine("B", "W1", shipped=1)])  # position exists
    with pytest.raises(UnknownLine):
        await core.fulfil("r1", [FulfilLine("A", "W9", shipped=1)])  # other location
    with pytest.raises(UnknownReservation):
        await core.fulfil("nope", [FulfilLine("A", "W1", shipped=1)])
    assert await snapshot(core) == before


async def test_fulfil_after_release_or_fulfilled_refused(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("rel", "web", [("A", "W1", 1)], hold_seconds=0)
    await core.release("rel")
    await core.reserve("ful", "web", [("A", "W1", 1)], hold_seconds=0)
    await core.fulfil("ful", [FulfilLine("A", "W1", shipped=1)], fulfilment_id="f1")
    before = await snapshot(core)
    with pytest.raises(AlreadyReleased):
        await core.fulfil("rel", [FulfilLine("A", "W1", shipped=1)])
    with pytest.raises(AlreadyFulfilled):
        await core.fulfil("ful", [FulfilLine("A", "W1", shipped=1)], fulfilment_id="f2")
    assert await snapshot(core) == before
    await balanced(core)


# -- hold expiry ------------------------------------------------------------------------------


async def test_hold_expiry_reclaimed_by_reserve_and_refusals_after_it(core: ATP) -> None:
    a, c = same_bucket_skus(core, 2)
    b = other_bucket_sku(core, a)
    for s in (a, b, c):
        await core.set_position(s, "W1", 5, reason="init")
    await core.reserve("h1", "web", [(a, "W1", 3), (c, "W1", 2)], hold_seconds=1)
    await core.reserve("h2", "web", [(b, "W1", 5)], hold_seconds=1)
    await core.reserve("h3", "web", [(a, "W1", 2)], hold_seconds=1)
    await core.reserve("long", "web", [(c, "W1", 1)], hold_seconds=600)
    assert await pos(core, a) == (5, 5, 0)
    await asyncio.sleep(HOLD_WAIT)

    # the holds have lapsed: reads say so although no units came back yet
    for rid in ("h1", "h2", "h3"):
        assert (await core.reservation(rid)).status == "expired"
    assert (await core.reservation("long")).status == "held"
    await balanced(core)

    # a refused reserve on A still reclaims what lapsed there (and only there) first
    with pytest.raises(InsufficientStock) as ei:
        await core.reserve("big", "web", [(a, "W1", 6)], hold_seconds=0)
    assert ei.value.lines[0]["available"] == 5
    assert await pos(core, a) == (5, 0, 0)
    assert await pos(core, c) == (5, 3, 0)  # h1's line on C waits for expire_holds
    assert await pos(core, b) == (5, 5, 0)
    assert await hx_ids(core, a) == []
    assert sorted(await hx_ids(core, c)) == ["h1", "long"]
    kinds = [(m.kind, m.reason) for m in (await core.movements(a, "W1"))[:2]]
    assert kinds == [("expire", "hold expired"), ("expire", "hold expired")]
    expired_ev = sorted(e["rid"] for e in await events(core, a, "expired"))
    assert expired_ev == ["h1", "h3"]
    await balanced(core)

    r = await core.reserve("r2", "web", [(a, "W1", 5)], hold_seconds=0)
    assert r.status == "confirmed"
    assert await pos(core, a) == (5, 5, 0)

    # an expired hold can no longer be confirmed or fulfilled; nothing changes
    before = await snapshot(core)
    with pytest.raises(HoldExpired):
        await core.confirm("h2")
    with pytest.raises(HoldExpired):
        await core.confirm("h1")
    with pytest.raises(HoldExpired):
        await core.fulfil("h2", [FulfilLine(b, "W1", shipped=1)])
    assert await snapshot(core) == before

    # releasing an expired hold is a no-op answer that reclaims what it still holds
    rel = await core.release("h2")
    assert (rel.status, rel.replayed, rel.open_units) == ("expired", True, 0)
    assert await pos(core, b) == (5, 0, 0)
    assert await holds_ids(core, b) == []
    before = await snapshot(core)
    assert (await core.release("h2")).status == "expired"
    assert await snapshot(core) == before

    # the worker reclaims the rest: h1's line on C; "long" is left alone
    res = await core.expire_holds()
    assert res.expired == ("h1",) and res.units == 2
    assert await pos(core, c) == (5, 1, 0)
    assert await hx_ids(core, c) == ["long"]
    assert await holds_ids(core, c) == ["long"]
    assert (await core.reservation("long")).status == "held"
    assert (await core.expire_holds()).expired == ()
    await balanced(core)


async def test_expire_holds_in_batches(core: ATP) -> None:
    a, a2 = same_bucket_skus(core, 2)
    b = other_bucket_sku(core, a)
    for s in (a, a2, b):
        await core.set_position(s, "W1", 100, reason="init")
    for i in range(5):
        await core.reserve(f"ha{i}", "web", [(a, "W1", i + 1), (a2, "W1", 1)], hold_seconds=1)
    for i in range(2):
        await core.reserve(f"hb{i}", "store", [(b, "W1", 10)], hold_seconds=1)
    await core.reserve("conf", "web", [(a, "W1", 7)], hold_seconds=1)
    await core.confirm("conf")
    await core.reserve("gone", "web", [(a, "W1", 1)], hold_seconds=1)
    await core.release("gone")
    await core.reserve("later", "web", [(a, "W1", 1)], hold_seconds=600)
    await asyncio.sleep(HOLD_WAIT)

    seen: list[str] = []
    batches: list[tuple[int, int]] = []
    while True:
        res = await core.expire_holds(limit=2)
        if not res.expired:
            assert res.units == 0
            break
        seen += res.expired
        batches.append((len(res.expired), res.units))
    # at most 2 per bucket per call: 2+2 (A's bucket, B's bucket), 2, 1
    assert [n for n, _ in batches] == [4, 2, 1]
    assert sorted(seen) == sorted([*(f"ha{i}" for i in range(5)), "hb0", "hb1"])
    assert sum(u for _, u in batches) == (1 + 2 + 3 + 4 + 5) + 5 + 20
    assert await pos(core, a) == (100, 7 + 1, 0)  # "conf" and "later" remain
    assert await pos(core, a2) == (100, 0, 0)
    assert await pos(core, b) == (100, 0, 0)
    assert await by_channel(core, b) == {"store": 0}
    assert await holds_ids(core, a) == ["later"]
    assert await hx_ids(core, a) == ["later"] and await hx_ids(core, a2) == []
    assert len(await events(core, b, "expired")) == 2
    for rid in seen:
        r = await core.reservation(rid)
        assert r.status == "expired" and r.open_units == 0
    assert (await core.reservation("conf")).status == "confirmed"
    assert (await core.reservation("gone")).status == "released"
    await balanced(core)


# -- movements --------------------------------------------------------------------------------


async def test_movements_newest_first_and_paging(core: ATP) -> None:
    await core.set_position("A", "W1", 10, 1, reason="init", actor="ann", source="wms")
    await core.receive("A", "W1", 5, reference="PO-1", actor="dock", source="edi")
    await core.reserve("r1", "web", [("A", "W1", 4)], hold_seconds=0, actor="shop", source="api")
    await core.adjust("A", "W1", -2, reason="damaged", reference="INC", actor="bob", source="ui")
    await core.fulfil(
        "r1", [FulfilLine("A", "W1", shipped=1)], fulfilment_id="f1", actor="pick", source="wms"
    )
    await core.release("r1", reason="cancelled", actor="cs", source="crm")
    full = await core.movements("A", "W1")
    assert [(m.kind, m.reason, m.actor, m.source) for m in full] == [
        ("release", "cancelled", "cs", "crm"),
        ("fulfil", "shipped", "pick", "wms"),
        ("adjust", "damaged", "bob", "ui"),
        ("reserve", "confirmed", "shop", "api"),
        ("receive", "receipt", "dock", "edi"),
        ("set", "init", "ann", "wms"),
    ]
    assert [
        (m.on_hand_before, m.on_hand_after, m.committed_before, m.committed_after) for m in full
    ] == [
        (12, 12, 3, 0),
        (13, 12, 4, 3),
        (15, 13, 4, 4),
        (15, 15, 0, 4),
        (10, 15, 0, 0),
        (0, 10, 0, 0),
    ]
    assert [m.ref for m in full] == ["", "f1", "INC", "", "PO-1", ""]
    assert [m.reservation_id for m in full] == ["r1", "r1", "", "r1", "", ""]
    assert full[0].channel == "web"
    ats = [m.at for m in full]
    assert ats == sorted(ats, reverse=True)
    # each entry starts where the older one ended
    for newer, older in itertools.pairwise(full):
        assert (newer.on_hand_before, newer.committed_before) == (
            older.on_hand_after,
            older.committed_after,
        )
    # paging with `before`
    pages: list[list[Any]] = []
    before: str | None = None
    while True:
        page = await core.movements("A", "W1", count=4, before=before)
        if not page:
            break
        pages.append(page)
        before = page[-1].id
    assert [len(p) for p in pages] == [4, 2]
    assert [m.id for p in pages for m in p] == [m.id for m in full]
    assert await core.movements("A", "W1", before=full[-1].id) == []
    assert [m.id for m in await core.movements("A", "W1", count=2, before=full[2].id)] == [
        full[3].id,
        full[4].id,
    ]
    # a bare time means "strictly before that millisecond"
    ms = int(full[1].id.split("-")[0])
    older = [m.id for m in full if int(m.id.split("-")[0]) < ms]
    assert [m.id for m in await core.movements("A", "W1", before=str(ms))] == older
    assert await core.movements("NOPE", "W1") == []
    await balanced(core)


# -- availability -----------------------------------------------------------------------------


async def test_availability_many_positions(core: ATP) -> None:
    await core.set_position("A", "W1", 10, 2, reason="init")
    await core.set_position("A", "W2", 3, reason="init")
    await core.set_position("B", "W1", 5, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 5), ("B", "W1", 5)], hold_seconds=0)
    await core.adjust("B", "W1", -2, reason="damaged")  # B is now uncovered
    items = [("A", "W1"), ("NOPE", "W1"), ("A", "W2"), ("B", "W1"), ("A", "W3")]
    got = await core.availability(items, "web")
    assert [(g.sku, g.location, g.channel, g.atp, g.exists) for g in got] == [
        ("A", "W1", "web", 3, True),
        ("NOPE", "W1", "web", 0, False),
        ("A", "W2", "web", 3, True),
        ("B", "W1", "web", 0, True),
        ("A", "W3", "web", 0, False),
    ]
    assert await core.availability([], "web") == []
    # the same figures the position reports
    p = await core.position("A", "W1")
    assert p is not None and p.available == got[0].atp
    assert await core.position("NOPE", "W1") is None
