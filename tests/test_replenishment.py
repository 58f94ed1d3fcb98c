"""Replenishment signals that see the open order book (atp.replenishment), on the real
server: the blind-replenishment pattern, the planning formulas against worked textbook
examples, the demand history, tolerance of other features' position fields, and races."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from datetime import date, timedelta
from typing import Any

import pytest

from atp import ATP, FulfilLine, InvalidRequest, ReplenishmentSettings, UnknownPosition
from atp.replenishment import HISTORY_DAYS, compute_levels, day_of, levels_from
from atp.verify import verify


async def events(atp: ATP, sku: str, *types: str) -> list[dict[str, Any]]:
    """The bucket outbox's events of these types for ``sku``, oldest first."""
    out = []
    for _, f in await atp.redis.xrange(atp._events(sku), "-", "+"):
        f = {k.decode(): v.decode() for k, v in f.items()}
        data = json.loads(f["data"]) if f["data"].startswith("{") else {}
        if f["type"] in types and data.get("sku") == sku:
            out.append({"type": f["type"], **data})
    return out


async def today(atp: ATP) -> int:
    return day_of(await atp._now_ms())


# -- (1) blind replenishment: a large order makes its signal appear at once ------------------


async def test_large_order_raises_signal_at_once(atp: ATP) -> None:
    await atp.set_position("TEE", "DC1", 100, reason="init")
    lv = await atp.set_replenishment("TEE", "DC1", 30, 120)
    assert (lv.reorder_point, lv.order_up_to, lv.signal_open, lv.signal) == (30, 120, False, None)
    assert await atp.replenishment() == []
    assert await events(atp, "TEE", "replenishment") == []

    # nothing shipped, on_hand still 100: only the open order book knows
    await atp.reserve("big-1", "b2b", [("TEE", "DC1", 80)], hold_seconds=0)

    [ev] = await events(atp, "TEE", "replenishment")
    assert ev["location"] == "DC1"
    assert (ev["on_hand"], ev["inbound"], ev["committed"]) == (100, 0, 80)
    assert (ev["inventory_position"], ev["reorder_point"], ev["order_up_to"]) == (20, 30, 120)
    assert ev["suggested_qty"] == 100
    [sig] = await atp.replenishment()
    assert (sig.sku, sig.location, sig.inventory_position, sig.suggested_qty) == (
        "TEE",
        "DC1",
        20,
        100,
    )
    assert (await atp.position("TEE", "DC1")).on_hand == 100  # type: ignore[union-attr]


async def test_hold_counts_too_and_signal_shows_current_figures(atp: ATP) -> None:
    await atp.set_position("CAP", "DC1", 50, reason="init")
    await atp.set_replenishment("CAP", "DC1", 20, 60)
    await atp.reserve("h1", "web", [("CAP", "DC1", 35)], hold_seconds=600)
    [sig] = await atp.replenishment()
    assert (sig.inventory_position, sig.suggested_qty, sig.raised_inventory_position) == (
        15,
        45,
        15,
    )
    await atp.reserve("h2", "web", [("CAP", "DC1", 5)], hold_seconds=600)
    [sig] = await atp.replenishment()  # still one signal; the list shows what to order now
    assert (sig.inventory_position, sig.suggested_qty, sig.raised_inventory_position) == (
        10,
        50,
        15,
    )
    assert len(await events(atp, "CAP", "replenishment")) == 1


# -- (2) the planning formulas against worked textbook examples ------------------------------


def test_z_for_95_percent() -> None:
    z, *_ = levels_from(0, 0, ReplenishmentSettings(0.95, 1, 0, 28))
    assert z == pytest.approx(1.645, abs=5e-4)
    z99, *_ = levels_from(0, 0, ReplenishmentSettings(0.99, 1, 0, 28))
    assert z99 == pytest.approx(2.326, abs=5e-4)


@pytest.mark.parametrize(
    ("mu", "sigma", "p", "lead", "ss", "rop"),
    [
        # mean 100/day, sd 20/day, 4 days, 95%: SS = 1.645 * 20 * sqrt(4) = 65.8;
        # ROP = 100 * 4 + 65.8 = 465.8 -> 466
        (100, 20, 0.95, 4, 65.8, 466),
        # mean 50/day, sd 10/day, 9 days, 99%: SS = 2.326 * 10 * 3 = 69.8; ROP = 519.8 -> 520
        (50, 10, 0.99, 9, 69.8, 520),
        # mean 20/day, sd 4/day, 16 days, 90% (z 1.2816): SS = 1.2816 * 4 * 4 = 20.5;
        # ROP = 320 + 20.5 = 340.5 -> 341
        (20, 4, 0.90, 16, 20.5, 341),
        # no variability: no safety stock, ROP = mean x lead time exactly (no rounding up)
        (12, 0, 0.95, 5, 0.0, 60),
    ],
)
def test_textbook_reorder_points(
    mu: float, sigma: float, p: float, lead: float, ss: float, rop: int
) -> None:
    _, got_ss, got_rop, got_out = levels_from(mu, sigma, ReplenishmentSettings(p, lead, 0, 28))
    assert got_ss == pytest.approx(ss, abs=0.05)
    assert got_rop == rop
    assert got_out == rop  # no review period: order up to the reorder point


def test_square_root_of_lead_time_rule() -> None:
    """Safety stock grows with the square root of the lead time: 4x the lead time, 2x it."""
    _, ss1, _, _ = levels_from(10, 5, ReplenishmentSettings(0.95, 2, 0, 28))
    _, ss4, _, _ = levels_from(10, 5, ReplenishmentSettings(0.95, 8, 0, 28))
    assert ss4 == pytest.approx(2 * ss1)


def test_order_up_to_covers_lead_time_plus_review() -> None:
    # mean 100, sd 20, L 4, R 7, 95%: S = 100 * 11 + 1.645 * 20 * sqrt(11) = 1209.1 -> 1210
    _, _, rop, out = levels_from(100, 20, ReplenishmentSettings(0.95, 4, 7, 28))
    assert (rop, out) == (466, 1210)


def test_compute_levels_from_a_series_counts_zero_days() -> None:
    series = [0, 10, 0, 30, 20, 0, 10]
    mu, sigma, _, _, rop, out = compute_levels(series, ReplenishmentSettings(0.95, 3, 0, 7))
    assert mu == pytest.approx(10.0)
    assert sigma == pytest.approx(statistics.stdev(series))  # sample sd, n - 1
    assert rop == math.ceil(30 + 1.6448536 * sigma * math.sqrt(3))
    assert out == rop  # no review period


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"service_level": 1.0}, "service_level"),
        ({"service_level": 0}, "service_level"),
        ({"lead_time_days": 0}, "lead_time_days"),
        ({"review_days": -1}, "review_days"),
        ({"window_days": 1}, "window_days"),
        ({"window_days": HISTORY_DAYS + 1}, "window_days"),
    ],
)
async def test_bad_settings_refused(atp: ATP, kw: dict[str, Any], field: str) -> None:
    st = ReplenishmentSettings(**{"service_level": 0.95, "lead_time_days": 3, **kw})
    with pytest.raises(InvalidRequest) as e:
        await atp.set_replenishment_settings("A", st)
    assert e.value.field == field
    assert await atp.replenishment_settings("A") is None


async def test_plan_from_recorded_demand(atp: ATP) -> None:
    await atp.set_position("P", "DC1", 1000, reason="init")
    await atp.set_position("P", "DC2", 1000, reason="init")
    await atp.set_position("Q", "DC1", 1000, reason="init")  # no settings: not planned
    await atp.reserve("r1", "web", [("P", "DC1", 30)], hold_seconds=0)
    await atp.reserve("r2", "web", [("P", "DC1", 10)], hold_seconds=60)
    await atp.release("r2")  # gross demand: a release does not take it back
    st = ReplenishmentSettings(0.95, 4, 2, 4)
    await atp.set_replenishment_settings("P", st)
    assert await atp.replenishment_settings("P") == st
    d = await today(atp)
    assert await atp.demand_history("P", "DC1", days=4, end_day=d) == [0, 0, 0, 40]

    dry = await atp.plan_replenishment(end_day=d, dry_run=True)
    assert [(r.sku, r.location, r.applied) for r in dry] == [
        ("P", "DC1", False),
        ("P", "DC2", False),
    ]
    assert (await atp.replenishment_levels("P", "DC1")).reorder_point is None  # type: ignore[union-attr]

    rows = await atp.plan_replenishment(end_day=d)
    mu, sigma, _, ss, rop, out = compute_levels([0, 0, 0, 40], st)
    r1 = rows[0]
    assert (r1.mean_daily_demand, r1.std_daily_demand, r1.reorder_point, r1.order_up_to) == (
        mu, sigma, rop, out,
    )  # fmt: skip
    assert (mu, rop) == (10.0, math.ceil(40 + 1.6448536 * 20 * 2))  # sd of [0,0,0,40] is 20
    lv = await atp.replenishment_levels("P", "DC1")
    assert lv is not None and (lv.reorder_point, lv.order_up_to) == (rop, out)
    lv2 = await atp.replenishment_levels("P", "DC2")
    assert lv2 is not None and (lv2.reorder_point, lv2.order_up_to) == (0, 0)  # no demand there
    assert (await atp.replenishment_levels("Q", "DC1")).reorder_point is None  # type: ignore[union-attr]
    # the computed safety stock is not the ATP safety stock unless asked for
    assert (await atp.position("P", "DC1")).safety_stock == 0  # type: ignore[union-attr]
    await atp.plan_replenishment(["P"], end_day=d, apply_safety_stock=True)
    assert (await atp.position("P", "DC1")).safety_stock == math.ceil(ss)  # type: ignore[union-attr]
    with pytest.raises(InvalidRequest):
        await atp.plan_replenishment(["Q"], end_day=d)


# -- (3) once per fall, cleared on recovery, raised again on the next fall --------------------


async def test_once_per_fall(atp: ATP) -> None:
    await atp.set_position("S", "W1", 100, reason="init")
    await atp.set_replenishment("S", "W1", 30, 100)
    await atp.reserve("a", "web", [("S", "W1", 70)], hold_seconds=0)  # IP 30: at the ROP
    await atp.reserve("b", "web", [("S", "W1", 5)], hold_seconds=0)  # 25: still down
    await atp.adjust("S", "W1", -5, reason="damaged")  # 20: still down
    await atp.release("b")  # 25 -> still at or below: stays open
    await atp.adjust("S", "W1", 5, reason="found")  # 30: at the ROP, still open
    kinds = [e["type"] for e in await events(atp, "S", "replenishment", "replenishment_cleared")]
    assert kinds == ["replenishment"]
    assert len(await atp.replenishment()) == 1

    await atp.receive("S", "W1", 1, reference="PO-1")  # 31 > 30: recovered
    kinds = [e["type"] for e in await events(atp, "S", "replenishment", "replenishment_cleared")]
    assert kinds == ["replenishment", "replenishment_cleared"]
    assert await atp.replenishment() == []
    assert (await atp.replenishment_levels("S", "W1")).signal_open is False  # type: ignore[union-attr]

    await atp.reserve("c", "web", [("S", "W1", 1)], hold_seconds=0)  # 30 again: a new fall
    evs = await events(atp, "S", "replenishment", "replenishment_cleared")
    assert [e["type"] for e in evs] == ["replenishment", "replenishment_cleared", "replenishment"]
    assert evs[-1]["suggested_qty"] == 70
    assert (await verify(atp)).ok


async def test_every_script_that_moves_the_position_reevaluates(atp: ATP) -> None:
    await atp.set_position("M", "W1", 50, reason="init")
    await atp.set_replenishment("M", "W1", 10, 50)

    async def state() -> tuple[bool, int]:
        lv = await atp.replenishment_levels("M", "W1")
        assert lv is not None
        return lv.signal_open, len(await atp.replenishment())

    await atp.set_position("M", "W1", 10, reason="count")  # set_position: down
    assert await state() == (True, 1)
    await atp.set_position("M", "W1", 40, reason="count")
    assert await state() == (False, 0)
    await atp.reserve("f", "web", [("M", "W1", 35)], hold_seconds=0)  # reserve: down
    assert await state() == (True, 1)
    await atp.fulfil("f", [FulfilLine("M", "W1", shipped=5, release_remainder=True)])  # fulfil: up
    assert await state() == (False, 0)
    await atp.reserve("h", "web", [("M", "W1", 30)], hold_seconds=1)  # a hold: down
    assert await state() == (True, 1)
    await asyncio.sleep(1.1)
    assert (await atp.expire_holds()).units == 30  # expiry: up
    assert await state() == (False, 0)
    c = await atp.set_replenishment("M", "W1", 40, 80)  # new levels: evaluated at once
    assert (c.signal, c.signal_open) == ("raised", True)
    c = await atp.clear_replenishment("M", "W1")
    assert (c.reorder_point, c.signal, c.signal_open) == (None, "cleared", False)
    assert await atp.replenishment() == []
    kinds = [e["type"] for e in await events(atp, "M", "replenishment", "replenishment_cleared")]
    assert kinds == ["replenishment", "replenishment_cleared"] * 4


async def test_inbound_counts_in_inventory_position(atp: ATP) -> None:
    """`inbound` is kept by the dated-supply feature; stand in for it here."""
    await atp.set_position("I", "W1", 10, reason="init")
    await atp.redis.hset(atp.keys.position("I", "W1").pos, "inbound", 25)
    lv = await atp.set_replenishment("I", "W1", 30, 60)  # IP = 10 + 25 - 0 = 35 > 30
    assert lv.signal is None
    await atp.reserve("x", "web", [("I", "W1", 6)], hold_seconds=0)  # IP 29
    [ev] = await events(atp, "I", "replenishment")
    assert (ev["inbound"], ev["inventory_position"], ev["suggested_qty"]) == (25, 29, 31)


async def test_set_levels_validates_and_changes_nothing(atp: ATP) -> None:
    await atp.set_position("V", "W1", 10, reason="init")
    before = await atp.redis.hgetall(atp.keys.position("V", "W1").pos)
    for rop, out, field in [
        (5, 4, "order_up_to"),
        (-1, 4, "reorder_point"),
        (1.5, 4, "reorder_point"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            await atp.set_replenishment("V", "W1", rop, out)  # type: ignore[arg-type]
        assert e.value.field == field
    with pytest.raises(UnknownPosition):
        await atp.set_replenishment("V", "NOPE", 1, 2)
    assert await atp.redis.hgetall(atp.keys.position("V", "W1").pos) == before
    assert not await atp.redis.exists(atp.keys.position("V", "NOPE").pos)


# -- demand history and the readers' tolerance ------------------------------------------------


async def test_demand_history_recorded_and_trimmed(atp: ATP) -> None:
    await atp.set_position("H", "W1", 100, reason="init")
    d = await today(atp)
    key = atp.keys.position("H", "W1").pos
    old = {f"h:{d - 200}": 3, f"h:{d - HISTORY_DAYS - 1}": 4, f"h:{d - HISTORY_DAYS}": 5}
    await atp.redis.hset(key, mapping=old)  # as if recorded on earlier days
    await atp.reserve("d1", "web", [("H", "W1", 2)], hold_seconds=0)
    await atp.reserve("d2", "web", [("H", "W1", 3)], hold_seconds=60)
    h = {
        k.decode(): int(v) for k, v in (await atp.redis.hgetall(key)).items() if k.startswith(b"h:")
    }
    # the day's first commit trimmed: a window of HISTORY_DAYS days ending yesterday stays
    assert h == {f"h:{d - HISTORY_DAYS}": 5, f"h:{d}": 5}
    # no levels set: a reserve pays no signal work and writes no signal state
    assert not await atp.redis.hexists(key, "rs")


async def test_readers_ignore_other_prefixed_fields(atp: ATP) -> None:
    await atp.set_position("U", "W1", 20, reason="init")
    key = atp.keys.position("U", "W1").pos
    await atp.redis.hset(key, mapping={"i:PO-1": '{"qty":5}', "d:20000": 7, "h:1": 9, "x:y": 1})
    p = await atp.adjust("U", "W1", 1, reason="found")  # pos_reply in lua/_lib.lua
    assert (p.on_hand, p.committed, p.safety_stock, p.committed_by_channel) == (21, 0, 0, {})
    await atp.reserve("u1", "web", [("U", "W1", 3)], hold_seconds=0)
    got = await atp.position("U", "W1")
    assert got is not None and got.committed_by_channel == {"web": 3}
    rep = await verify(atp)
    assert rep.ok, rep.problems


# -- (4) races on the real server --------------------------------------------------------------


async def test_race_exactly_one_signal_per_fall(atp: ATP) -> None:
    """Rounds of 60 concurrent reserves of 1 unit take IP from 100 to 40 (ROP 50), then 60
    concurrent releases bring it back: one raise and one clear per round, whatever the
    interleaving, and the book verifies."""
    await atp.set_position("HOT", "DC1", 100, reason="init")
    await atp.set_replenishment("HOT", "DC1", 50, 150)
    rounds = 4
    for n in range(rounds):
        ids = [f"r{n}-{i}" for i in range(60)]
        await asyncio.gather(
            *(
                atp.reserve(i, f"c{k % 4}", [("HOT", "DC1", 1)], hold_seconds=0)
                for k, i in enumerate(ids)
            )
        )
        assert len(await atp.replenishment()) == 1
        await asyncio.gather(*(atp.release(i) for i in ids))
        assert await atp.replenishment() == []
    evs = await events(atp, "HOT", "replenishment", "replenishment_cleared")
    assert [e["type"] for e in evs] == ["replenishment", "replenishment_cleared"] * rounds
    for e in evs:
        if e["type"] == "replenishment":
            assert e["inventory_position"] == 50 and e["suggested_qty"] == 100
        else:
            assert e["inventory_position"] == 51
    rep = await verify(atp)
    assert rep.ok, rep.problems


async def test_race_mixed_reserve_release_signals_alternate(atp: ATP) -> None:
    """Many clients reserving and releasing at random around the reorder point: raises and
    clears strictly alternate on the outbox, each at the right side of the reorder point,
    and the final state agrees with the position."""
    import random

    rng = random.Random(7)
    await atp.set_position("MIX", "DC1", 60, reason="init")
    await atp.set_replenishment("MIX", "DC1", 30, 90)

    async def client(c: int) -> None:
        for j in range(25):
            rid = f"m{c}-{j}"
            try:
                await atp.reserve(rid, "web", [("MIX", "DC1", rng.randint(1, 4))], hold_seconds=0)
            except Exception:
                continue
            await asyncio.sleep(0)
            if rng.random() < 0.8:
                await atp.release(rid)

    await asyncio.gather(*(client(c) for c in range(32)))
    evs = await events(atp, "MIX", "replenishment", "replenishment_cleared")
    assert evs, "the race never crossed the reorder point"
    for i, e in enumerate(evs):
        assert e["type"] == ("replenishment" if i % 2 == 0 else "replenishment_cleared")
        if e["type"] == "replenishment":
            assert e["inventory_position"] <= 30
        else:
            assert e["inventory_position"] > 30
    p = await atp.position("MIX", "DC1")
    assert p is not None
    below = p.on_hand - p.committed <= 30
    assert (len(await atp.replenishment()) == 1) == below
    assert (evs[-1]["type"] == "replenishment") == below
    rep = await verify(atp)
    assert rep.ok, rep.problems


async def test_verify_checks_signal_flag_against_list(atp: ATP) -> None:
    await atp.set_position("VF", "W1", 10, reason="init")
    await atp.set_replenishment("VF", "W1", 20, 40)  # raised at once
    assert (await verify(atp)).ok
    rp = atp.keys.bucket_keys(atp.keys.bucket("VF")).rp
    await atp.redis.hdel(rp, "VF|W1")  # break the book by hand
    rep = await verify(atp)
    assert any("VF@W1: signal flag 1 but not listed" in p for p in rep.problems), rep.problems
    await atp.redis.hset(rp, mapping={"VF|W1": "{}", "GHOST|W1": "{}"})
    rep = await verify(atp)
    assert rep.problems == [
        "GHOST@W1: an open replenishment signal for a position that does not exist"
    ]


async def test_expected_receipts_and_backorders_move_the_inventory_position(atp: ATP) -> None:
    """IP = on hand + inbound - committed - backordered: an expected receipt recorded
    clears the signal, backorders waiting raise it again, and their fill (a receipt) leaves
    the figures consistent."""
    await atp.set_position("IP-1", "DC1", 3, 0)
    await atp.set_replenishment("IP-1", "DC1", 5, 20)
    assert [e["inventory_position"] for e in await events(atp, "IP-1", "replenishment")] == [3]
    soon = date.fromordinal(date(1970, 1, 1).toordinal() + await today(atp)) + timedelta(days=4)
    await atp.expect_inbound("IP-1", "DC1", "PO-1", 10, soon)
    cleared = await events(atp, "IP-1", "replenishment_cleared")
    assert [e["inventory_position"] for e in cleared] == [13]
    await atp.reserve("bo-1", "web", [("IP-1", "DC1", 4)], on_short="backorder")  # 3 on hand
    await atp.reserve("bo-2", "web", [("IP-1", "DC1", 5)], on_short="backorder")
    raised = await events(atp, "IP-1", "replenishment")
    assert [(e["inventory_position"], e["backordered"]) for e in raised] == [(3, 0), (4, 9)]
    rep = await verify(atp)
    assert rep.ok, rep.problems
