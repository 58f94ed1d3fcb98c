"""The allocation rules as the scripts enforce them (I6), through the core, on a real server
and on fakeredis: protections, caps, buyer limits, routing, the explanation's figures and
the shortage rule. Every refusal is shown to change nothing (a snapshot of every key:
positions, SKU totals, live indexes, logs, events), and the book is checked with
:func:`atp.verify.verify` after every test that changes it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from support import snapshot

from atp import ATP, FulfilLine, IdempotencyConflict, InsufficientStock, Line, Refused
from atp.errors import ATPError, BuyerLimitExceeded, CustomerRequired, NoRoute
from atp.verify import verify

HOLD_WAIT = 1.1  # seconds: a hold of 1 s has lapsed after this

E = TypeVar("E", bound=ATPError)


# -- helpers ---------------------------------------------------------------------------------


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def balanced(core: ATP, *, allow_uncovered: bool = False) -> None:
    rep = await verify(core, allow_uncovered=allow_uncovered)
    assert rep.ok, rep.problems


async def refused(core: ATP, exc: type[E], call: Awaitable[Any]) -> E:
    """``call`` raises ``exc`` and changes nothing at all."""
    before = await snapshot(core)
    with pytest.raises(exc) as ei:
        await call
    assert await snapshot(core) == before
    return ei.value


async def short(core: ATP, call: Awaitable[Any]) -> list[dict[str, Any]]:
    """``call`` is refused for insufficient stock, changing nothing; its lines."""
    return (await refused(core, InsufficientStock, call)).lines


def line(sku: str, loc: str | None, req: int, avail: int, by: str) -> dict[str, Any]:
    return {"sku": sku, "location": loc, "requested": req, "available": avail, "limited_by": by}


def taken(r: Any) -> list[tuple[str, str, int]]:
    return sorted((ln.sku, ln.location, ln.qty) for ln in r.lines)


async def events(core: ATP, sku: str, etype: str) -> list[dict[str, Any]]:
    rows = await core.redis.xrange(core.keys.events(core.keys.bucket(sku)))
    out = []
    for _, fields in rows or []:
        f: dict[str, Any] = {_s(k): _s(v) for k, v in (fields or {}).items()}
        if f["type"] == etype:
            f["data"] = json.loads(f["data"])
            out.append(f)
    return out


async def committed(core: ATP, sku: str, loc: str) -> dict[str, int]:
    p = await core.position(sku, loc)
    assert p is not None
    return p.committed_by_channel


def rules(**default: Any) -> dict[str, Any]:
    """The channels of these tests, with ``default`` as the rule for every SKU."""
    return {
        "channels": {
            "web": {
                "priority": 10,
                "locations": ["W1", "W2", "W3"],
                "regions": {"EU": ["W3", "W1"]},
            },
            "app": {"priority": 5, "locations": ["W1", "W2"], "allow_split": True},
            "market": {"priority": 1},
        },
        "default": default,
    }


# -- protection -------------------------------------------------------------------------------


async def test_protection_keeps_units_for_the_protected_channel(core: ATP) -> None:
    await core.apply_rules(rules(protect={"web": 5}))
    await core.set_position("P", "W1", 20, 2)
    e = await core.explain("P", "W1", "market")
    assert e is not None
    assert (e.atp, e.position_atp, e.limited_by) == (13, 13, "protection")
    assert (e.protected_for_others, e.protected_for_others_total) == ({"web": 5}, 5)
    # other channels: on_hand - committed - safety stock - web's unused protection
    assert await short(core, core.reserve("m", "market", [("P", "W1", 14)])) == [
        line("P", "W1", 14, 13, "protection")
    ]
    await core.reserve("m1", "market", [("P", "W1", 4)])
    await core.reserve("w1", "web", [("P", "W1", 2)])
    assert await short(core, core.reserve("m", "market", [("P", "W1", 10)])) == [
        line("P", "W1", 10, 9, "protection")  # 20 - 6 - 2 - (5 - 2)
    ]
    e = await core.explain("P", "W1", "market")
    assert e is not None and (e.atp, e.protected_for_others) == (9, {"web": 3})
    await core.reserve("m2", "market", [("P", "W1", 9)])
    assert await short(core, core.reserve("m", "market", [("P", "W1", 1)])) == [
        line("P", "W1", 1, 0, "protection")
    ]
    # the protected channel still gets its protected units, and no more
    e = await core.explain("P", "W1", "web")
    assert e is not None and (e.atp, e.protected_for_others_total, e.limited_by) == (3, 0, "stock")
    await core.reserve("w2", "web", [("P", "W1", 3)])
    assert await short(core, core.reserve("w", "web", [("P", "W1", 1)])) == [
        line("P", "W1", 1, 0, "stock")
    ]
    assert await committed(core, "P", "W1") == {"market": 13, "web": 5}

    # protection is per position: W2 keeps 5 for web until web has used them there
    await core.set_position("P", "W2", 10)
    assert await short(core, core.reserve("m", "market", [("P", "W2", 6)])) == [
        line("P", "W2", 6, 5, "protection")
    ]
    await core.reserve("w3", "web", [("P", "W2", 7)])  # more than its protection
    e = await core.explain("P", "W2", "market")
    assert e is not None and (e.atp, e.protected_for_others_total, e.limited_by) == (3, 0, "stock")
    await core.reserve("m3", "market", [("P", "W2", 3)])
    assert (await core.position("P", "W2")).committed == 10  # type: ignore[union-attr]
    await balanced(core)


async def test_protection_returns_when_the_protected_channel_releases(core: ATP) -> None:
    await core.apply_rules(rules(protect={"web": 4}))
    await core.set_position("P", "W1", 10)
    await core.reserve("w1", "web", [("P", "W1", 4)])
    await core.reserve("m1", "market", [("P", "W1", 6)])  # web used its units: none blocked
    await core.release("w1")
    # web's protection is unused again, and market has already taken the rest
    assert await short(core, core.reserve("m", "market", [("P", "W1", 1)])) == [
        line("P", "W1", 1, 0, "protection")
    ]
    await core.reserve("w2", "web", [("P", "W1", 4)])
    await balanced(core)


# -- caps -------------------------------------------------------------------------------------


async def test_cap_holds_per_sku_across_locations(core: ATP) -> None:
    await core.apply_rules(rules(cap={"market": 6}))
    for loc in ("W1", "W2"):
        await core.set_position("P", loc, 100)
    await core.set_position("Q", "W1", 100)
    await core.reserve("m1", "market", [("P", "W1", 4)])
    assert await short(core, core.reserve("m", "market", [("P", "W2", 3)])) == [
        line("P", "W2", 3, 2, "cap")
    ]
    e = await core.explain("P", "W2", "market")
    assert e is not None
    assert (e.cap, e.cap_used, e.cap_left, e.atp, e.position_atp, e.limited_by) == (
        6,
        4,
        2,
        2,
        100,
        "cap",
    )
    # one reservation with lines at both locations counts them together
    assert await short(core, core.reserve("m", "market", [("P", "W1", 1), ("P", "W2", 2)])) == [
        line("P", "W1", 1, 2, "cap"),
        line("P", "W2", 2, 2, "cap"),
    ]
    await core.reserve("m2", "market", [("P", "W1", 1), ("P", "W2", 1)])
    assert await short(core, core.reserve("m", "market", [("P", "W1", 1)])) == [
        line("P", "W1", 1, 0, "cap")
    ]
    # other channels and other SKUs are not capped by it
    await core.reserve("w1", "web", [("P", "W1", 50)])
    await core.reserve("q1", "market", [("Q", "W1", 6)])
    # released units free the cap
    await core.release("m1")
    await core.reserve("m3", "market", [("P", "W2", 4)])
    assert await short(core, core.reserve("m", "market", [("P", "W2", 1)])) == [
        line("P", "W2", 1, 0, "cap")
    ]
    # shipped units are no longer committed: they free it too
    await core.fulfil("m3", [FulfilLine("P", "W2", shipped=3)])
    await core.reserve("m4", "market", [("P", "W1", 3)])
    e = await core.explain("P", "W1", "market")
    assert e is not None and (e.cap_used, e.cap_left, e.atp) == (6, 0, 0)
    await balanced(core)


# -- buyer limits -----------------------------------------------------------------------------


async def test_buyer_limit_across_reservations_and_locations(core: ATP) -> None:
    doc = rules(buyer_limit=3)
    doc["skus"] = {"OPEN": {"buyer_limit": None}}
    await core.apply_rules(doc)
    for loc in ("W1", "W2"):
        await core.set_position("P", loc, 100)
    await core.set_position("OPEN", "W1", 100)
    await core.reserve("r1", "web", [("P", "W1", 2)], customer_id="c1")
    err = await refused(
        core, BuyerLimitExceeded, core.reserve("r", "web", [("P", "W2", 2)], customer_id="c1")
    )
    assert err.extra == {"sku": "P", "limit": 3, "held": 2, "requested": 2}
    await core.reserve("r2", "market", [("P", "W2", 1)], customer_id="c1")  # any channel counts
    err = await refused(
        core, BuyerLimitExceeded, core.reserve("r", "app", [("P", "W1", 1)], customer_id="c1")
    )
    assert err.extra == {"sku": "P", "limit": 3, "held": 3, "requested": 1}
    # one reservation's lines over two locations count together
    err = await refused(
        core,
        BuyerLimitExceeded,
        core.reserve("r", "web", [("P", "W1", 2), ("P", "W2", 2)], customer_id="c2"),
    )
    assert err.extra == {"sku": "P", "limit": 3, "held": 0, "requested": 4}
    await core.reserve("r3", "web", [("P", "W1", 2), ("P", "W2", 1)], customer_id="c2")
    e = await core.explain("P", "W1", "web", customer_id="c1")
    assert e is not None
    assert (e.buyer_limit, e.buyer_used, e.buyer_left, e.atp, e.limited_by) == (
        3,
        3,
        0,
        0,
        "buyer_limit",
    )
    e = await core.explain("P", "W1", "web", customer_id="c3")
    assert e is not None and (e.buyer_used, e.buyer_left, e.atp) == (0, 3, 3)

    # a SKU with a buyer limit needs the customer; null in the rules: no limit, no customer
    err2 = await refused(core, CustomerRequired, core.reserve("r", "web", [("P", "W1", 1)]))
    assert err2.extra["sku"] == "P" and err2.field == "customer_id"
    await refused(
        core, CustomerRequired, core.reserve("r", "web", [("OPEN", "W1", 1), ("P", "W2", 1)])
    )
    await core.reserve("o1", "web", [("OPEN", "W1", 10)])
    await core.reserve("o2", "web", [("OPEN", "W1", 10)], customer_id="c1")

    # released and shipped units free the limit again
    await core.release("r1")
    await core.reserve("r4", "web", [("P", "W2", 2)], customer_id="c1")
    await refused(
        core, BuyerLimitExceeded, core.reserve("r", "web", [("P", "W1", 1)], customer_id="c1")
    )
    await core.fulfil("r2", [FulfilLine("P", "W2", shipped=1)])
    await core.reserve("r5", "web", [("P", "W1", 1)], customer_id="c1")
    assert (await core.reservation("r5")).customer_id == "c1"
    await balanced(core)


async def test_expired_holds_free_cap_and_buyer_limit_and_explain_counts_them(core: ATP) -> None:
    doc = rules(cap={"market": 5}, buyer_limit=4)
    doc["skus"] = {"Q": {"buyer_limit": None}}
    await core.apply_rules(doc)
    await core.set_position("P", "W1", 10)
    await core.set_position("Q", "W1", 10)
    await core.reserve("h1", "market", [("P", "W1", 4)], customer_id="c1", hold_seconds=1)
    await core.reserve("k1", "market", [("P", "W1", 1)], customer_id="c2", hold_seconds=0)
    await core.reserve("h2", "web", [("Q", "W1", 6)], customer_id="c1", hold_seconds=1)
    await core.reserve("k2", "web", [("Q", "W1", 2)], customer_id="c2", hold_seconds=0)
    assert await short(core, core.reserve("m", "market", [("P", "W1", 1)], customer_id="c3")) == [
        line("P", "W1", 1, 0, "cap")
    ]
    await refused(
        core, BuyerLimitExceeded, core.reserve("m", "web", [("P", "W1", 1)], customer_id="c1")
    )
    await asyncio.sleep(HOLD_WAIT)

    # lapsed, not yet reclaimed: explain counts them as the next reserve will
    e = await core.explain("Q", "W1", "web", customer_id="c1")
    assert e is not None
    assert (e.on_hand, e.committed, e.expired_holds_reclaimable) == (10, 2, 6)
    assert (e.committed_by_channel, e.atp, e.limited_by) == ({"web": 2}, 8, "stock")
    assert (e.buyer_limit, e.buyer_used, e.buyer_left) == (None, None, None)
    # reserve enforces that figure: one more is refused (reclaiming the lapsed hold
    # first), exactly that many is taken
    with pytest.raises(InsufficientStock) as ei:
        await core.reserve("q", "web", [("Q", "W1", 9)], customer_id="c1")
    assert ei.value.lines == [line("Q", "W1", 9, 8, "stock")]
    assert (await core.reservation("h2")).status == "expired"
    e = await core.explain("Q", "W1", "web", customer_id="c1")
    assert e is not None and (e.atp, e.expired_holds_reclaimable, e.committed) == (8, 0, 2)
    await core.reserve("q1", "web", [("Q", "W1", 8)], customer_id="c1")

    e = await core.explain("P", "W1", "market", customer_id="c1")
    assert e is not None
    assert (e.expired_holds_reclaimable, e.cap_used, e.cap_left, e.buyer_used) == (4, 1, 4, 0)
    assert (e.atp, e.limited_by) == (4, "cap")
    await core.reserve("m1", "market", [("P", "W1", 4)], customer_id="c1")  # cap and limit free
    assert (await core.reservation("h1")).status == "expired"
    assert await short(core, core.reserve("m", "market", [("P", "W1", 1)], customer_id="c3")) == [
        line("P", "W1", 1, 0, "cap")
    ]
    await balanced(core)


# -- routing ----------------------------------------------------------------------------------


async def test_routing_follows_the_channel_order_and_splits_only_when_allowed(core: ATP) -> None:
    await core.apply_rules(rules())
    for loc, n in [("W1", 2), ("W2", 5), ("W3", 10)]:
        await core.set_position("P", loc, n)
    # the first location that holds the whole line takes it
    r = await core.reserve("r1", "web", [("P", None, 4)])
    assert taken(r) == [("P", "W2", 4)]
    assert taken(await core.reservation("r1")) == [("P", "W2", 4)]
    assert taken(await core.reserve("r2", "web", [Line("P", None, 2)])) == [("P", "W1", 2)]
    # web does not split: refused with the most one location can give
    assert await short(core, core.reserve("r", "web", [("P", None, 11)])) == [
        line("P", None, 11, 10, "stock")
    ]
    r = await core.reserve("r3", "web", [("P", None, 11)], allow_split=True)
    assert taken(r) == [("P", "W2", 1), ("P", "W3", 10)]
    assert taken(await core.reservation("r3")) == [("P", "W2", 1), ("P", "W3", 10)]
    assert await short(core, core.reserve("r", "web", [("P", None, 1)], allow_split=True)) == [
        line("P", None, 1, 0, "stock")
    ]

    # app splits by default (its rule), over its own list only (W1, W2)
    await core.set_position("Q", "W1", 3)
    await core.set_position("Q", "W2", 4)
    await core.set_position("Q", "W3", 100)
    assert taken(await core.reserve("a1", "app", [("Q", None, 6)])) == [
        ("Q", "W1", 3),
        ("Q", "W2", 3),
    ]
    assert await short(core, core.reserve("a", "app", [("Q", None, 2)])) == [
        line("Q", None, 2, 1, "stock")  # split: what the list gives in all
    ]
    assert await short(core, core.reserve("a", "app", [("Q", None, 2)], allow_split=False)) == [
        line("Q", None, 2, 1, "stock")
    ]

    # a listed location without the position is passed over; none at all: nothing available
    await core.set_position("R", "W3", 5)
    r = await core.reserve("r4", "web", [("R", None, 1), ("Q", "W2", 1)])
    assert taken(r) == [("Q", "W2", 1), ("R", "W3", 1)]
    assert taken(await core.reservation("r4")) == [("Q", "W2", 1), ("R", "W3", 1)]
    assert await short(core, core.reserve("r", "web", [("NONE", None, 1)])) == [
        line("NONE", None, 1, 0, "stock")
    ]
    # a channel without locations cannot route
    await refused(core, NoRoute, core.reserve("m", "market", [("P", None, 1)]))
    await refused(core, NoRoute, core.reserve("m", "unlisted", [("P", None, 1)]))
    await balanced(core)


async def test_routing_respects_protection_at_each_candidate(core: ATP) -> None:
    doc = rules()
    doc["skus"] = {"PR": {"locations": {"W1": {"protect": {"web": 5}}}}}
    await core.apply_rules(doc)
    await core.set_position("PR", "W1", 6)
    await core.set_position("PR", "W2", 6)
    # W1 comes first for app, but only 1 unit there is not protected for web
    assert taken(await core.reserve("a1", "app", [("PR", None, 3)])) == [("PR", "W2", 3)]
    assert taken(await core.reserve("a2", "app", [("PR", None, 4)])) == [
        ("PR", "W1", 1),
        ("PR", "W2", 3),
    ]
    assert await short(core, core.reserve("a", "app", [("PR", None, 1)])) == [
        line("PR", None, 1, 0, "protection")
    ]
    assert taken(await core.reserve("w1", "web", [("PR", None, 5)])) == [("PR", "W1", 5)]
    await balanced(core)


async def test_routing_by_region(core: ATP) -> None:
    await core.apply_rules(rules())
    for loc in ("W1", "W3"):
        await core.set_position("P", loc, 10)
    assert taken(await core.reserve("eu", "web", [("P", None, 3)], region="EU")) == [("P", "W3", 3)]
    # a region the channel does not list: the channel's own list (W2 does not exist)
    assert taken(await core.reserve("us", "web", [("P", None, 3)], region="US")) == [("P", "W1", 3)]
    assert taken(await core.reserve("no", "web", [("P", None, 1)])) == [("P", "W1", 1)]
    assert await short(core, core.reserve("r", "web", [("P", None, 8)], region="EU")) == [
        line("P", None, 8, 7, "stock")
    ]
    assert taken(
        await core.reserve("eu2", "web", [("P", None, 8)], region="EU", allow_split=True)
    ) == [
        ("P", "W1", 1),
        ("P", "W3", 7),
    ]
    # the region is part of the request: the same id with another region is another request
    await refused(
        core, IdempotencyConflict, core.reserve("eu", "web", [("P", None, 3)], region="US")
    )
    await balanced(core)


async def test_replay_of_a_routed_reservation_returns_the_same_locations(core: ATP) -> None:
    await core.apply_rules(rules())
    await core.set_position("P", "W1", 1)
    await core.set_position("P", "W2", 10)
    first = await core.reserve("r1", "web", [("P", None, 3)], customer_id="c1")
    split = await core.reserve("r2", "web", [("P", None, 8)], allow_split=True)
    assert taken(first) == [("P", "W2", 3)]
    assert taken(split) == [("P", "W1", 1), ("P", "W2", 7)]
    # stock and even the channel's list change; a retry still returns what was taken
    await core.set_position("P", "W1", 100)
    doc = rules()
    doc["channels"]["web"]["locations"] = ["W1", "W2"]
    await core.apply_rules(doc)
    before = await snapshot(core)
    again = await core.reserve("r1", "web", [("P", None, 3)], customer_id="c1")
    again2 = await core.reserve("r2", "web", [("P", None, 8)], allow_split=True)
    assert await snapshot(core) == before
    assert again.replayed and again2.replayed
    assert (taken(again), taken(again2)) == (taken(first), taken(split))
    assert (again.rules_version, again.customer_id, again.created_at) == (1, "c1", first.created_at)
    await refused(
        core, IdempotencyConflict, core.reserve("r1", "web", [("P", None, 3)], customer_id="c2")
    )
    await refused(core, IdempotencyConflict, core.reserve("r1", "web", [("P", "W2", 3)]))
    # rules that no longer route web at all: a retry still returns the original outcome
    doc["channels"]["web"]["locations"] = []
    await core.apply_rules(doc)
    before = await snapshot(core)
    again = await core.reserve("r1", "web", [("P", None, 3)], customer_id="c1")
    assert again.replayed and taken(again) == taken(first)
    assert await snapshot(core) == before
    await refused(
        core, IdempotencyConflict, core.reserve("r1", "web", [("P", None, 4)], customer_id="c1")
    )
    await refused(core, NoRoute, core.reserve("r9", "web", [("P", None, 3)]))
    await balanced(core)


async def test_the_rules_version_is_recorded_on_the_reservation(core: ATP) -> None:
    await core.set_position("P", "W1", 10)
    assert (await core.reserve("r0", "web", [("P", "W1", 1)])).rules_version == 0
    await core.apply_rules(rules())
    r1 = await core.reserve("r1", "web", [("P", "W1", 1)], hold_seconds=60)
    await core.apply_rules(rules(cap={"market": 3}))
    r2 = await core.reserve("r2", "market", [("P", "W1", 1)])
    assert (r1.rules_version, r2.rules_version) == (1, 2)
    got = {rid: (await core.reservation(rid)).rules_version for rid in ("r0", "r1", "r2")}
    assert got == {"r0": 0, "r1": 1, "r2": 2}
    assert (await core.confirm("r1")).rules_version == 1
    evs = {e["rid"]: e["data"]["rv"] for e in await events(core, "P", "reserved")}
    assert evs == {"r0": 0, "r1": 1, "r2": 2}
    await balanced(core)


# -- explain equals what reserve enforces ----------------------------------------------------


async def test_explain_figures_are_what_reserve_enforces(core: ATP) -> None:
    """Random positions, protections, caps, limits and prior reservations: for each channel
    and buyer, a reserve of explain's ATP + 1 is refused (with the same figure and reason),
    and of exactly ATP succeeds."""
    rnd = random.Random(4)
    skus: dict[str, Any] = {}
    for i in range(10):
        rule: dict[str, Any] = {"protect": {"web": rnd.randint(0, 8), "app": rnd.randint(0, 4)}}
        if rnd.random() < 0.6:
            rule["cap"] = {"market": rnd.randint(0, 15), "app": rnd.randint(0, 20)}
        rule["buyer_limit"] = rnd.choice([None, 2, 5, 9])
        skus[f"E{i}"] = rule
    doc = rules()
    doc["skus"] = skus
    await core.apply_rules(doc)
    n = 0
    seen: Counter[str] = Counter()
    for i, sku in enumerate(skus):
        await core.set_position(sku, "W1", rnd.randint(0, 30), rnd.randint(0, 3))
        for _ in range(3):  # prior reservations, some refused
            ch, cu = rnd.choice(["web", "app", "market"]), rnd.choice(["c1", "c2"])
            with contextlib.suppress(Refused):
                await core.reserve(f"p{n}", ch, [(sku, "W1", rnd.randint(1, 6))], customer_id=cu)
            n += 1
        for ch in ("market", "app", "web"):
            cu = rnd.choice(["c1", "c2", "c3"])
            e = await core.explain(sku, "W1", ch, customer_id=cu)
            assert e is not None
            pos_atp = e.on_hand - e.committed - e.safety_stock - e.protected_for_others_total
            assert e.position_atp == pos_atp
            want = max(0, min([pos_atp] + [x for x in (e.cap_left, e.buyer_left) if x is not None]))
            assert e.atp == want, e
            seen[e.limited_by or ""] += 1
            seen["zero" if e.atp == 0 else "some"] += 1
            over = core.reserve(f"x{i}{ch}", ch, [(sku, "W1", e.atp + 1)], customer_id=cu)
            if e.buyer_left is not None and e.atp + 1 > e.buyer_left:
                err = await refused(core, BuyerLimitExceeded, over)
                seen["buyer_refused"] += 1
                assert err.extra["limit"] - err.extra["held"] == e.buyer_left
            else:
                seen["short"] += 1
                assert await short(core, over) == [
                    line(sku, "W1", e.atp + 1, e.atp, e.limited_by or "")
                ]
            if e.atp:
                await core.reserve(f"ok{i}{ch}", ch, [(sku, "W1", e.atp)], customer_id=cu)
            after = await core.availability([(sku, "W1")], ch, customer_id=cu)
            assert after[0].atp == 0
    # the cases drawn cover every reason, and both refusals
    assert {"stock", "protection", "cap", "buyer_limit", "zero", "some"} <= set(seen), seen
    assert seen["buyer_refused"] and seen["short"], seen
    await balanced(core)


# -- the shortage rule ------------------------------------------------------------------------


async def test_shortage_names_lowest_priority_holds_newest_first(core: ATP) -> None:
    await core.apply_rules(
        {
            "channels": {
                "gold": {"priority": 10},
                "silver": {"priority": 5},
                "bronze": {"priority": 1},
            }
        }
    )
    await core.set_position("S", "W1", 40)
    book = [  # in the order they are made; zinc is not in the rules (priority 0)
        ("z-conf", "zinc", 1, 0),
        ("b-held", "bronze", 2, 600),
        ("b-old", "bronze", 3, 0),
        ("g-conf", "gold", 10, 0),
        ("s-held", "silver", 5, 600),
        ("b-new", "bronze", 4, 0),
        ("s-conf", "silver", 5, 0),
        ("g-held", "gold", 5, 600),
    ]
    for rid, ch, qty, hold in book:
        await core.reserve(rid, ch, [("S", "W1", qty)], hold_seconds=hold)
    prio = {"zinc": 0, "bronze": 1, "silver": 5, "gold": 10}
    info = {rid: (ch, qty, "held" if hold else "confirmed") for rid, ch, qty, hold in book}

    def named(ex: dict[str, Any]) -> list[str]:
        for a in ex["at_risk"]:
            ch, qty, st = info[a["reservation_id"]]
            assert (a["channel"], a["qty"], a["status"], a["priority"]) == (ch, qty, st, prio[ch])
        return [a["reservation_id"] for a in ex["at_risk"]]

    # a short pick of 10 on gold's order: 35 committed, 30 on hand, 5 short
    await core.fulfil("g-conf", [FulfilLine("S", "W1", short=10)])
    [pick, over] = await events(core, "S", "exception")
    assert pick["rid"] == "g-conf" and pick["data"]["kind"] == "short_pick"
    assert (pick["data"]["short"], pick["data"]["shortfall"]) == (10, 5)
    assert named(pick["data"]) == ["z-conf", "b-held", "b-new"]  # 1 + 2 + 4 >= 5
    assert over["data"]["kind"] == "oversell" and over["data"]["cause"] == "short_pick"
    assert named(over["data"]) == ["z-conf", "b-held", "b-new"]
    assert (over["data"]["units_at_risk"], over["data"]["truncated"]) == (7, False)
    await balanced(core, allow_uncovered=True)

    # a count finds 6 fewer: 11 short, bronze is not enough, silver's hold goes next
    await core.adjust("S", "W1", -6, reason="damaged")
    ex = (await events(core, "S", "exception"))[-1]["data"]
    assert (ex["cause"], ex["shortfall"]) == ("adjust", 11)
    assert named(ex) == ["z-conf", "b-held", "b-new", "b-old", "s-held"]
    # and 25 short reaches gold's hold, never gold's confirmed order
    await core.set_position("S", "W1", 10, reason="recount")
    ex = (await events(core, "S", "exception"))[-1]["data"]
    assert (ex["cause"], ex["shortfall"]) == ("set_position", 25)
    assert named(ex) == ["z-conf", "b-held", "b-new", "b-old", "s-held", "s-conf", "g-held"]
    assert ex["units_at_risk"] == 25
    await balanced(core, allow_uncovered=True)
