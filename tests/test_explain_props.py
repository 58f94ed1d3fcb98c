""" "Why is ATP N?": ``explain`` against ``reserve``, on a real server (issue 4).

Hypothesis draws a SKU at two locations (on hand, safety stock), reservations already made
there by three channels and several buyers (confirmed, held, some released again), and a
rules document with every layer that can set a figure (default and SKU protections, each
also per location; default and SKU caps; a default and a SKU buyer limit, ``null`` too).
For one channel and buyer at one position:

* every figure ``explain`` gives equals a pure-Python model computed from the drawn numbers
  (on hand, committed by channel, safety stock, what the other channels protect and have
  not used, cap used and left, buyer limit used and left);
* the breakdown adds up: ``committed == sum(committed_by_channel)``, ``position_atp ==
  on_hand - committed - safety_stock - protected_for_others_total`` and
  ``atp == max(0, min(position_atp, cap_left, buyer_left))``;
* ``atp`` is what ``reserve`` enforces: ``atp + 1`` units are refused (with the error the
  binding term calls for, reporting ``atp`` available, and nothing written) and ``atp``
  units are accepted, after which ``explain`` says 0;
* ``availability`` (the batch form) agrees with ``explain`` at both positions.

Holds here are long, so nothing lapses during an example. Holds that have lapsed but not
been reclaimed yet take real time to make; ``test_explain_counts_lapsed_holds_as_reserve_does``
waits for real 1-second holds once, outside hypothesis.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import snapshot

from atp import ATP, InsufficientStock
from atp.errors import BuyerLimitExceeded

SKU = "EXP-1"
LOCS = ("A", "B")
CHANNELS = ("web", "market", "app")
CUSTOMERS = ("c1", "c2", "c3")
_ids = itertools.count()

units = st.integers(0, 12)
protect = st.dictionaries(st.sampled_from(CHANNELS), units, max_size=3)
caps = st.dictionaries(st.sampled_from(CHANNELS), st.integers(0, 30), max_size=3)
limit = st.none() | st.integers(1, 20)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A rules document that sets figures for SKU at any layer."""
    default: dict[str, Any] = {"protect": draw(protect), "cap": draw(caps)}
    if draw(st.booleans()):
        default["buyer_limit"] = draw(limit)
    if draw(st.booleans()):
        default["locations"] = {draw(st.sampled_from(LOCS)): {"protect": draw(protect)}}
    sku: dict[str, Any] = {}
    if draw(st.booleans()):
        sku["protect"] = draw(protect)
    if draw(st.booleans()):
        sku["cap"] = draw(caps)
    if draw(st.booleans()):
        sku["buyer_limit"] = draw(limit)  # null: no limit, whatever the default says
    if draw(st.booleans()):
        sku["locations"] = {
            loc: {"protect": draw(protect)} for loc in draw(st.sets(st.sampled_from(LOCS)))
        }
    return {
        "channels": {ch: {"priority": p} for ch, p in zip(CHANNELS, (100, 50, 10), strict=True)},
        "default": default,
        "skus": {SKU: sku, "OTHER": {"cap": {"web": 0}, "buyer_limit": 1}},
    }


reservations = st.lists(
    st.fixed_dictionaries(
        {
            "ch": st.sampled_from(CHANNELS),
            "loc": st.sampled_from(LOCS),
            "qty": st.integers(1, 8),
            "cu": st.none() | st.sampled_from(CUSTOMERS),
            "then": st.sampled_from(["hold", "confirmed", "hold+confirm", "released"]),
        }
    ),
    max_size=8,
)


# -- the model ---------------------------------------------------------------------------


def protections(doc: dict[str, Any], loc: str) -> dict[str, int]:
    """Per channel, later layers winning: default, default at the location, SKU, SKU at
    the location (atp.rules)."""
    d, s = doc["default"], doc["skus"][SKU]
    merged: dict[str, int] = {}
    for layer in (
        d["protect"],
        d.get("locations", {}).get(loc, {}).get("protect", {}),
        s.get("protect", {}),
        s.get("locations", {}).get(loc, {}).get("protect", {}),
    ):
        merged.update(layer)
    return {g: q for g, q in merged.items() if q > 0}


def cap_of(doc: dict[str, Any], ch: str) -> int | None:
    s = doc["skus"][SKU]
    if ch in s.get("cap", {}):
        return int(s["cap"][ch])
    return doc["default"]["cap"].get(ch)


def limit_of(doc: dict[str, Any]) -> int | None:
    s = doc["skus"][SKU]
    return s["buyer_limit"] if "buyer_limit" in s else doc["default"].get("buyer_limit")


def model(
    pos: dict[str, dict[str, int]],
    live: list[dict[str, Any]],
    doc: dict[str, Any],
    loc: str,
    ch: str,
    cu: str | None,
) -> dict[str, Any]:
    """What explain must say for ``ch`` (and buyer ``cu``) at ``loc``."""
    by_ch: Counter[str] = Counter()
    for r in live:
        if r["loc"] == loc:
            by_ch[r["ch"]] += r["qty"]
    committed = sum(by_ch.values())
    others = {g: p - by_ch[g] for g, p in protections(doc, loc).items() if g != ch and p > by_ch[g]}
    position_atp = pos[loc]["on_hand"] - committed - pos[loc]["safety_stock"] - sum(others.values())
    out: dict[str, Any] = {
        "on_hand": pos[loc]["on_hand"],
        "safety_stock": pos[loc]["safety_stock"],
        "committed": committed,
        "committed_by_channel": {g: n for g, n in by_ch.items() if n},
        "protected_for_others": others,
        "protected_for_others_total": sum(others.values()),
        "position_atp": position_atp,
        "cap": None,
        "cap_used": None,
        "cap_left": None,
        "buyer_limit": None,
        "buyer_used": None,
        "buyer_left": None,
    }
    atp = max(0, position_atp)
    cap = cap_of(doc, ch)
    if cap is not None:
        used = sum(r["qty"] for r in live if r["ch"] == ch)
        out |= {"cap": cap, "cap_used": used, "cap_left": max(0, cap - used)}
        atp = min(atp, out["cap_left"])
    bl = limit_of(doc)
    out["buyer_limit"] = bl
    if bl is not None and cu is not None:
        used = sum(r["qty"] for r in live if r["cu"] == cu)
        out |= {"buyer_used": used, "buyer_left": max(0, bl - used)}
        atp = min(atp, out["buyer_left"])
    out["atp"] = atp
    return out


def adds_up(ex: Any) -> None:
    """The breakdown's own arithmetic, as the Explanation docstring states it."""
    assert ex.committed == sum(ex.committed_by_channel.values()), ex
    assert ex.protected_for_others_total == sum(ex.protected_for_others.values()), ex
    assert ex.position_atp == (
        ex.on_hand - ex.committed - ex.safety_stock - ex.protected_for_others_total
    ), ex
    terms = [ex.position_atp] + [t for t in (ex.cap_left, ex.buyer_left) if t is not None]
    assert ex.atp == max(0, min(terms)), ex
    if ex.cap is not None:
        assert ex.cap_left == max(0, ex.cap - ex.cap_used), ex
    if ex.buyer_left is not None:
        assert ex.buyer_left == max(0, ex.buyer_limit - ex.buyer_used), ex


async def set_up(
    core: ATP, pos: dict[str, dict[str, int]], made: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Positions and reservations without rules (version 0); the live ones are returned.
    Safety stock comes last, so a position may end up uncovered."""
    await core.redis.flushdb()
    await core.rules(max_age=0)  # the cache drops back to "no rules"
    for loc in LOCS:
        await core.set_position(SKU, loc, pos[loc]["on_hand"], 0)
    live = []
    for r in made:
        rid = f"pre-{next(_ids)}"
        held = r["then"] != "confirmed"
        try:
            await core.reserve(
                rid,
                r["ch"],
                [(SKU, r["loc"], r["qty"])],
                hold_seconds=3600 if held else 0,
                customer_id=r["cu"],
            )
        except InsufficientStock:
            continue
        if r["then"] == "hold+confirm":
            await core.confirm(rid)
        if r["then"] == "released":
            await core.release(rid)
        else:
            live.append(r)
    for loc in LOCS:
        if pos[loc]["safety_stock"]:
            await core.set_position(SKU, loc, pos[loc]["on_hand"], pos[loc]["safety_stock"])
    return live


async def check_position(
    core: ATP,
    pos: dict[str, dict[str, int]],
    live: list[dict[str, Any]],
    doc: dict[str, Any],
    version: int,
    loc: str,
    ch: str,
    cu: str | None,
) -> int:
    """explain at one position against the model, its arithmetic, availability and
    reserve; returns the ATP that was taken."""
    want = model(pos, live, doc, loc, ch, cu)
    ex = await core.explain(SKU, loc, ch, customer_id=cu)
    assert ex is not None and ex.rules_version == version
    adds_up(ex)
    got = {k: getattr(ex, k) for k in want}
    assert got == want, (got, want)
    assert ex.expired_holds_reclaimable == 0
    assert ex.holds_expiring_count == 0  # every hold here has an hour to go
    atp = ex.atp

    # the batch form agrees, at both positions (and says when a position does not exist)
    other = "B" if loc == "A" else "A"
    ex_other = await core.explain(SKU, other, ch, customer_id=cu)
    assert ex_other is not None
    adds_up(ex_other)
    rows = await core.availability([(SKU, loc), (SKU, other), (SKU, "NOPE")], ch, customer_id=cu)
    assert [(r.location, r.atp, r.exists) for r in rows] == [
        (loc, atp, True),
        (other, ex_other.atp, True),
        ("NOPE", 0, False),
    ]

    # reserve enforces exactly that figure: one more is refused, and writes nothing
    before = await snapshot(core)
    bl, q = want["buyer_limit"], atp + 1
    try:
        await core.reserve(f"over-{next(_ids)}", ch, [(SKU, loc, q)], customer_id=cu)
        raise AssertionError(f"{q} units accepted where explain said {atp}")
    except BuyerLimitExceeded as e:
        event("atp+1 refused: buyer limit")
        assert bl is not None and want["buyer_used"] + q > bl, (e.extra, want)
        assert e.extra["held"] == want["buyer_used"] and e.extra["limit"] == bl
    except InsufficientStock as e:
        assert bl is None or cu is None or want["buyer_used"] + q <= bl, (e.lines, want)
        (line,) = e.lines
        event(f"atp+1 refused: {line['limited_by']}")
        assert line["requested"] == q and line["available"] == atp, (line, want)
    assert await snapshot(core) == before
    if atp == 0:
        return 0
    # and exactly that much is accepted, after which there is none left
    res = await core.reserve(
        f"take-{next(_ids)}", ch, [(SKU, loc, atp)], customer_id=cu, hold_seconds=3600
    )
    assert res.rules_version == version and res.lines[0].qty == atp
    after = await core.explain(SKU, loc, ch, customer_id=cu)
    assert after is not None and after.atp == 0 and after.committed == ex.committed + atp, after
    adds_up(after)
    return atp


@settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    on_hand=st.tuples(st.integers(0, 40), st.integers(0, 40)),
    safety=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    made=reservations,
    doc=documents(),
    loc=st.sampled_from(LOCS),
    ch=st.sampled_from(CHANNELS),
    cu=st.sampled_from([*CUSTOMERS, "c9", None]),
)
async def test_explain_is_what_reserve_enforces(
    atp: ATP,
    on_hand: tuple[int, int],
    safety: tuple[int, int],
    made: list[dict[str, Any]],
    doc: dict[str, Any],
    loc: str,
    ch: str,
    cu: str | None,
) -> None:
    core = atp
    pos = {
        loc_: {"on_hand": oh, "safety_stock": ss}
        for loc_, oh, ss in zip(LOCS, on_hand, safety, strict=True)
    }
    live = await set_up(core, pos, made)
    if limit_of(doc) is not None and cu is None:
        cu = "c9"  # a SKU with a buyer limit needs a buyer (else CustomerRequired)
    rules = await core.apply_rules(doc)
    took = await check_position(core, pos, live, doc, rules.version, loc, ch, cu)
    event("atp > 0" if took else "atp == 0")


async def test_explain_counts_lapsed_holds_as_reserve_does(atp: ATP) -> None:
    """Holds that have lapsed but are not reclaimed yet: explain leaves them out, as the
    next reserve reclaims them before it decides. Real 1-second holds, once."""
    core = atp
    pos = {"A": {"on_hand": 20, "safety_stock": 2}, "B": {"on_hand": 10, "safety_stock": 0}}
    for loc, p in pos.items():
        await core.set_position(SKU, loc, p["on_hand"], p["safety_stock"])
    doc = {
        "channels": {"web": {"priority": 100}, "market": {"priority": 10}, "app": {}},
        "default": {"protect": {"web": 6}, "cap": {"market": 9}, "buyer_limit": 7},
        "skus": {SKU: {}},
    }
    rules = await core.apply_rules(doc)
    lapsing = [
        {"ch": "market", "loc": "A", "qty": 3, "cu": "c1"},
        {"ch": "web", "loc": "A", "qty": 2, "cu": "c2"},
        {"ch": "market", "loc": "B", "qty": 1, "cu": "c1"},
    ]
    lasting = [
        {"ch": "app", "loc": "A", "qty": 4, "cu": "c3"},
        {"ch": "market", "loc": "A", "qty": 2, "cu": "c2"},
        {"ch": "web", "loc": "A", "qty": 1, "cu": "c1"},
        {"ch": "market", "loc": "B", "qty": 3, "cu": "c3"},
    ]
    for r, hold in [(r, 1) for r in lapsing] + [(r, 3600) for r in lasting]:
        await core.reserve(
            f"h-{next(_ids)}",
            r["ch"],
            [(SKU, r["loc"], r["qty"])],
            hold_seconds=hold,
            customer_id=r["cu"],
        )
    # before they lapse, they count
    for ch in ("market", "web"):
        ex = await core.explain(SKU, "A", ch, customer_id="c1")
        assert ex is not None and ex.holds_expiring_count >= 2
        assert {k: getattr(ex, k) for k in ("committed", "cap_used", "buyer_used", "atp")} == {
            k: model(pos, lapsing + lasting, doc, "A", ch, "c1")[k]
            for k in ("committed", "cap_used", "buyer_used", "atp")
        }
    # wait for the server's clock to pass their expiry (nothing is reclaimed meanwhile)
    deadline = time.monotonic() + 10
    while (ex := await core.explain(SKU, "A", "market", customer_id="c1")) is not None and (
        ex.expired_holds_reclaimable < 5
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    p = await core.position(SKU, "A")
    assert p is not None and p.committed == 12  # still on the books: nothing reclaimed yet
    # explain at A leaves A's lapsed holds out; B's still count for the SKU-wide cap and
    # buyer limit, as they do for a reserve at A (which reclaims at A only)
    counted = [*lasting, lapsing[2]]
    for ch, cu in [("market", "c1"), ("web", "c2"), ("app", "c1"), ("market", "c3")]:
        want = model(pos, counted, doc, "A", ch, cu)
        ex = await core.explain(SKU, "A", ch, customer_id=cu)
        assert ex is not None and ex.expired_holds_reclaimable == 5
        adds_up(ex)
        assert {k: getattr(ex, k) for k in want} == want, (ch, ex, want)
    # reserve agrees: one more than explain says is refused (reclaiming the lapsed holds
    # first, which changes nothing explain said), exactly as many is accepted
    ex = await core.explain(SKU, "A", "market", customer_id="c4")
    assert ex is not None and ex.limited_by == "cap" and ex.atp == 9 - 2 - 3 - 1
    try:
        await core.reserve("m-over", "market", [(SKU, "A", ex.atp + 1)], customer_id="c4")
        raise AssertionError("reserve took more than explain said")
    except InsufficientStock as e:
        assert e.lines[0]["available"] == ex.atp and e.lines[0]["limited_by"] == "cap"
    again = await core.explain(SKU, "A", "market", customer_id="c4")
    assert again is not None and again.expired_holds_reclaimable == 0  # reclaimed at A
    assert (again.atp, again.committed, again.cap_used) == (ex.atp, ex.committed, ex.cap_used)
    p = await core.position(SKU, "A")
    assert p is not None and p.committed == 7
    res = await core.reserve("m-ok", "market", [(SKU, "A", ex.atp)], customer_id="c4")
    assert res.rules_version == rules.version
    last = await core.explain(SKU, "A", "market", customer_id="c4")
    assert last is not None and last.atp == 0
    # B's lapsed hold was not reclaimed (reserve touched A only), yet no figure counts it
    ex_b = await core.explain(SKU, "B", "market", customer_id="c1")
    assert ex_b is not None and ex_b.expired_holds_reclaimable == 1 and ex_b.committed == 3
