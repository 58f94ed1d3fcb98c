"""The replenishment hook in every script that moves a position, on both backends (the
real server and fakeredis): short picks, counts, cluster-style rollbacks, multi-line and
routed reservations, and the levels script's refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest

from atp import ATP, FulfilLine, InvalidRequest, UnknownPosition
from atp.models import CountRow, ms_to_dt


async def signals(core: ATP, sku: str) -> list[tuple[str, int]]:
    """(type, inventory position) of the sku's signal events, oldest first."""
    out = []
    for _, f in await core.redis.xrange(core._events(sku), "-", "+"):
        t = f[b"type"].decode()
        if t in ("replenishment", "replenishment_cleared"):
            d: dict[str, Any] = json.loads(f[b"data"])
            if d["sku"] == sku:
                out.append((t, d.get("inventory_position", -1)))
    return out


async def is_open(core: ATP, sku: str, loc: str = "W1") -> bool:
    rs = await core.redis.hget(core.keys.position(sku, loc).pos, "rs")
    listed = await core.redis.hexists(
        core.keys.bucket_keys(core.keys.bucket(sku)).rp, f"{sku}|{loc}"
    )
    assert (rs == b"1") == listed  # the flag and the list agree
    return listed


async def test_short_pick_lowers_position(core: ATP) -> None:
    await core.set_position("A", "W1", 20, reason="init")
    await core.set_replenishment("A", "W1", 5, 30)
    await core.reserve("o1", "web", [("A", "W1", 10)], hold_seconds=0)  # IP 10
    assert not await is_open(core, "A")
    # 2 shipped, 6 found missing: on hand 20 -> 12, committed 10 -> 8, IP 4
    await core.fulfil("o1", [FulfilLine("A", "W1", shipped=2, short=6)])
    assert await is_open(core, "A")
    assert await signals(core, "A") == [("replenishment", 4)]


async def test_count_raises_and_clears(core: ATP) -> None:
    await core.set_position("C", "W1", 50, reason="init")
    await core.set_replenishment("C", "W1", 10, 40)
    t = await core._now_ms()
    [r] = await core.apply_counts("cnt-1", [CountRow("C", "W1", 8, ms_to_dt(t), 1)])
    assert r.status == "applied" and await is_open(core, "C")
    t = await core._now_ms() + 1
    [r] = await core.apply_counts("cnt-2", [CountRow("C", "W1", 60, ms_to_dt(t), 1)])
    assert r.status == "applied" and not await is_open(core, "C")
    assert await signals(core, "C") == [("replenishment", 8), ("replenishment_cleared", 60)]


async def test_multi_line_reservation_signals_each_position(core: ATP) -> None:
    for sku in ("M1", "M2", "M3"):
        await core.set_position(sku, "W1", 10, reason="init")
        await core.set_replenishment(sku, "W1", 5, 20)
    await core.reserve(
        "ml", "web", [("M1", "W1", 6), ("M2", "W1", 1), ("M3", "W1", 5)], hold_seconds=0
    )
    assert [await is_open(core, s) for s in ("M1", "M2", "M3")] == [True, False, True]
    await core.release("ml")
    assert [await is_open(core, s) for s in ("M1", "M2", "M3")] == [False, False, False]
    assert await signals(core, "M1") == [("replenishment", 4), ("replenishment_cleared", 10)]


async def test_rollback_clears(core: ATP) -> None:
    """The release script's rollback path (a cluster reserve undoing a part) re-evaluates."""
    await core.set_position("R", "W1", 10, reason="init")
    await core.set_replenishment("R", "W1", 5, 20)
    await core.reserve("rb", "web", [("R", "W1", 8)], hold_seconds=0)
    assert await is_open(core, "R")
    keys, parts = await core._reservation_keys("rb")
    req = {"id": "rb", "idx": True, "parts": parts, "rollback": True}
    out = await core._run("release", keys, core._cfg("", ""), req)
    assert out["rolled_back"] == 1
    assert not await is_open(core, "R")


async def test_refused_reserve_writes_no_signal(core: ATP) -> None:
    await core.set_position("N", "W1", 10, reason="init")
    await core.set_replenishment("N", "W1", 5, 20)
    from atp import InsufficientStock

    with pytest.raises(InsufficientStock):
        await core.reserve("too-many", "web", [("N", "W1", 11)], hold_seconds=0)
    assert await signals(core, "N") == []
    assert not await is_open(core, "N")


async def test_levels_script_validates_before_writing(core: ATP) -> None:
    await core.set_position("L", "W1", 10, reason="init")
    key = core.keys.position("L", "W1").pos
    before = await core.redis.hgetall(key)
    keys = core._replen_keys("L", "W1")
    b = core.keys.bucket("L")
    cfg = json.dumps({**json.loads(core._cfg("", "")), "risk_max": 10})
    for req, field in [
        ({"rop": 5, "out": 4}, "order_up_to"),
        ({"rop": -1, "out": 4}, "reorder_point"),
        ({"rop": 1.5, "out": 4}, "reorder_point"),
        ({"rop": "1", "out": 4}, "reorder_point"),
        ({"rop": 1, "out": 4, "ss": -2}, "safety_stock"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            await core._run(
                "replen_levels", keys, cfg, {"sku": "L", "loc": "W1", "b": b, "why": "set", **req}
            )
        assert e.value.field == field
    with pytest.raises(InvalidRequest):
        await core._run(
            "replen_levels",
            keys[:7],
            cfg,
            {"sku": "L", "loc": "W1", "b": b, "why": "set", "rop": 1, "out": 2},
        )
    assert await core.redis.hgetall(key) == before
    with pytest.raises(UnknownPosition):
        await core.set_replenishment("L", "W2", 1, 2)


async def test_routed_reservation_signals_the_location_that_took_it(core: ATP) -> None:
    from atp.rules import parse_rules

    await core.apply_rules(parse_rules({"channels": {"web": {"locations": ["W1", "W2"]}}}))
    for loc in ("W1", "W2"):
        await core.set_position("RT", loc, 10, reason="init")
        await core.set_replenishment("RT", loc, 5, 20)
    r = await core.reserve("rt1", "web", [("RT", None, 6)], hold_seconds=0)
    assert [ln.location for ln in r.lines] == ["W1"]
    assert (await is_open(core, "RT", "W1"), await is_open(core, "RT", "W2")) == (True, False)
    r = await core.reserve("rt2", "web", [("RT", None, 7)], hold_seconds=0)  # W1 has 4: W2
    assert [ln.location for ln in r.lines] == ["W2"]
    assert (await is_open(core, "RT", "W1"), await is_open(core, "RT", "W2")) == (True, True)
