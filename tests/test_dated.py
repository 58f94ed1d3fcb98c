"""Dated inbound supply, time-phased ATP and promise dates (issue 7), on a real server.

The property test draws a position (on hand, safety stock, expected receipts over the next
week) and a sequence of reservations, some for a requested date, and replays them against
a small model that evaluates every day one by one (not the scripts' point walk):

* the server accepts exactly what the model accepts, so no accepted set ever leaves a day
  where what is due exceeds what is there (on hand + inbound due by then, less safety
  stock), nor the shelf short of the undated commitments;
* a refusal's ``promise_date``, and ``ATP.promise``, are the earliest date the model would
  accept;
* ``atp.verify`` (I1 in its time-phased form, the dated schedule and the inbound records)
  passes after every example.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import snapshot

from atp import (
    ATP,
    FulfilLine,
    IdempotencyConflict,
    InboundExists,
    InsufficientStock,
    InvalidRequest,
    UnknownInbound,
)
from atp.models import CountRow, date_of, day_of, ms_to_dt
from atp.verify import verify

SKU, LOC = "DT-1", "DC1"
HORIZON = 12  # days the model looks at; every drawn date is within it
_ids = itertools.count()


async def server_today(core: ATP) -> int:
    t = await core.redis.time()
    return (int(t[0]) * 1000 + int(t[1]) // 1000) // 86_400_000


# -- the model ---------------------------------------------------------------------------


def supply(on_hand: int, inbound: list[tuple[int, int]], day: int) -> int:
    """On hand + what is expected by ``day`` (an offset from today; overdue counts today)."""
    return on_hand + sum(q for d, q in inbound if max(d, 0) <= day)


def due(commits: list[tuple[int | None, int]], day: int | None) -> int:
    """Commitments due at ``day``: undated ones always; dated ones due by then.
    ``day=None`` is the now point (the shelf), where only undated ones are due."""
    return sum(q for d, q in commits if d is None or (day is not None and d <= day))


def accepts(
    on_hand: int,
    ss: int,
    inbound: list[tuple[int, int]],
    commits: list[tuple[int | None, int]],
    qty: int,
    rd: int | None,
) -> bool:
    """Would adding (rd, qty) keep every point it must not break covered?"""
    after = [*commits, (rd, qty)]
    points: list[int | None] = [None] if rd is None else []
    points += list(range(0 if rd is None else max(rd, 0), HORIZON + 1))
    for p in points:
        s = on_hand if p is None else supply(on_hand, inbound, p)
        if due(after, p) > s - ss:
            return False
    return True


def earliest(
    on_hand: int,
    ss: int,
    inbound: list[tuple[int, int]],
    commits: list[tuple[int | None, int]],
    qty: int,
) -> int | None:
    for d in range(HORIZON + 1):
        if accepts(on_hand, ss, inbound, commits, qty, d):
            return d
    return None


def covered(on_hand: int, ss: int, inbound: list[tuple[int, int]], commits: Any) -> bool:
    """Nothing due at any point beyond what is there (a point with nothing due is fine even
    when safety stock exceeds the supply)."""

    def ok(owed: int, there: int) -> bool:
        return owed == 0 or owed <= there - ss

    return ok(due(commits, None), on_hand) and all(
        ok(due(commits, d), supply(on_hand, inbound, d)) for d in range(HORIZON + 1)
    )


# -- the property ------------------------------------------------------------------------


requests = st.lists(
    st.tuples(st.integers(1, 6), st.none() | st.integers(-1, 9)), min_size=1, max_size=10
)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    on_hand=st.integers(0, 12),
    ss=st.integers(0, 3),
    inbound=st.lists(st.tuples(st.integers(-1, 7), st.integers(1, 8)), max_size=4),
    reqs=requests,
)
async def test_time_phased_reserve_matches_the_model(
    atp: ATP,
    on_hand: int,
    ss: int,
    inbound: list[tuple[int, int]],
    reqs: list[tuple[int, int | None]],
) -> None:
    core = atp
    await core.redis.flushdb()
    today = await server_today(core)
    await core.set_position(SKU, LOC, on_hand, ss)
    for i, (off, q) in enumerate(inbound):
        await core.expect_inbound(SKU, LOC, f"PO-{i}", q, date_of(today + off))
    commits: list[tuple[int | None, int]] = []
    for qty, rd in reqs:
        want = accepts(on_hand, ss, inbound, commits, qty, rd)
        rid = f"r{next(_ids)}"
        when = None if rd is None else date_of(today + rd)
        try:
            r = await core.reserve(
                rid, "web", [(SKU, LOC, qty)], hold_seconds=0, requested_date=when
            )
        except InsufficientStock as e:
            assert not want, (qty, rd, commits)
            (line,) = e.lines
            promised = line.get("promise_date")
            best = earliest(on_hand, ss, inbound, commits, qty)
            if any(q for _, q in inbound):  # a promise date is given from an inbound schedule
                expect = None if best is None else date_of(today + best).isoformat()
                assert promised == expect, (qty, rd, commits, line)
            else:
                assert promised is None
        else:
            assert want, (qty, rd, commits)
            # a date before today is taken as today
            assert r.requested_date == (None if rd is None else date_of(today + max(rd, 0)))
            commits.append((None if rd is None else max(rd, 0), qty))
        assert covered(on_hand, ss, inbound, commits)
        p = await core.promise(SKU, LOC, "web", qty)
        best = earliest(on_hand, ss, inbound, commits, qty)
        assert p.promise_date == (None if best is None else date_of(today + best)), (qty, commits)
    if await server_today(core) != today:
        return  # midnight (UTC) passed during the example: the offsets moved
    rep = await verify(core, allow_uncovered=on_hand < ss)  # safety stock above the shelf
    assert rep.ok, rep.problems


# -- examples ----------------------------------------------------------------------------


async def test_a_dated_promise_counts_inbound_and_the_shelf_is_not_oversold(atp: ATP) -> None:
    core = atp
    today = date_of(await server_today(core))
    await core.set_position(SKU, LOC, 0, 0)
    res = await core.expect_inbound(SKU, LOC, "PO-1", 10, today + timedelta(days=5))
    assert res.position.in_transit == 10 and res.inbound and res.inbound.qty == 10
    # nothing on the shelf: undated refused, and told when
    with pytest.raises(InsufficientStock) as e:
        await core.reserve("now-1", "web", [(SKU, LOC, 4)], hold_seconds=0)
    assert e.value.lines[0]["promise_date"] == (today + timedelta(days=5)).isoformat()
    # too early, same answer
    with pytest.raises(InsufficientStock) as e:
        await core.reserve("d2", "web", [(SKU, LOC, 4)], requested_date=today + timedelta(days=2))
    assert e.value.lines[0]["promise_date"] == (today + timedelta(days=5)).isoformat()
    r = await core.reserve("d5", "web", [(SKU, LOC, 7)], requested_date=today + timedelta(days=5))
    assert r.requested_date == today + timedelta(days=5)
    pos = await core.position(SKU, LOC)
    assert pos and (pos.committed, pos.committed_dated, pos.on_hand) == (7, 7, 0)
    # a later date sees the 3 left; more is refused with no date (nothing more expected)
    r9 = await core.reserve("d9", "web", [(SKU, LOC, 3)], requested_date=today + timedelta(days=9))
    assert r9.requested_date == today + timedelta(days=9)
    with pytest.raises(InsufficientStock) as e:
        await core.reserve("d9b", "web", [(SKU, LOC, 1)], requested_date=today + timedelta(days=9))
    assert "promise_date" not in e.value.lines[0]
    assert (await core.promise(SKU, LOC, "web", 1)).promise_date is None
    # the receipt arrives: the shelf has 10, all promised for later dates: still no undated sale
    got = await core.receive_inbound(SKU, LOC, 10, reference="PO-1")
    assert got.inbound is None and got.position.in_transit == 0 and got.position.on_hand == 10
    with pytest.raises(InsufficientStock):
        await core.reserve("now-2", "web", [(SKU, LOC, 1)], hold_seconds=0)
    await core.release("d9")
    r2 = await core.reserve("now-3", "web", [(SKU, LOC, 3)], hold_seconds=0)
    assert r2.requested_date is None
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_a_later_promise_never_starves_an_earlier_one(atp: ATP) -> None:
    """On hand 10: 10 promised for day 3. A promise for day 6 finds nothing (day 6 counts
    the day-3 promise too); an inbound of 5 on day 6 lets 5 be promised for day 6, not
    for day 3 nor now."""
    core = atp
    today = date_of(await server_today(core))
    await core.set_position(SKU, LOC, 10, 0)
    await core.reserve(
        "d3", "web", [(SKU, LOC, 10)], hold_seconds=0, requested_date=today + timedelta(days=3)
    )
    for rid, when in (("d6", today + timedelta(days=6)), ("now", None)):
        with pytest.raises(InsufficientStock):
            await core.reserve(rid, "web", [(SKU, LOC, 1)], hold_seconds=0, requested_date=when)
    await core.expect_inbound(SKU, LOC, "PO-6", 5, today + timedelta(days=6))
    for rid, when in (("d3b", today + timedelta(days=3)), ("now2", None)):
        with pytest.raises(InsufficientStock) as e:
            await core.reserve(rid, "web", [(SKU, LOC, 5)], hold_seconds=0, requested_date=when)
        assert e.value.lines[0]["promise_date"] == (today + timedelta(days=6)).isoformat()
    await core.reserve(
        "d6b", "web", [(SKU, LOC, 5)], hold_seconds=0, requested_date=today + timedelta(days=6)
    )
    ex = await core.explain(SKU, LOC, "web", requested_date=today + timedelta(days=6), qty=1)
    assert ex is not None and ex.atp == 0 and ex.promise_date is None
    assert [(d.date, d.inbound, d.dated, d.atp) for d in ex.schedule] == [
        (today + timedelta(days=3), 0, 10, 0),
        (today + timedelta(days=6), 5, 5, 0),
    ]
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_an_undated_sale_may_take_what_dated_promises_do_not_need(atp: ATP) -> None:
    """On hand 5, an inbound of 10 on day 4 covers a promise of 10 for day 4: the 5 on the
    shelf are still for sale now (the plain rule would refuse them)."""
    core = atp
    today = date_of(await server_today(core))
    await core.set_position(SKU, LOC, 5, 0)
    await core.expect_inbound(SKU, LOC, "PO-4", 10, today + timedelta(days=4))
    await core.reserve(
        "d4", "web", [(SKU, LOC, 10)], hold_seconds=0, requested_date=today + timedelta(days=4)
    )
    await core.reserve("now", "web", [(SKU, LOC, 5)], hold_seconds=0)
    with pytest.raises(InsufficientStock):
        await core.reserve("now2", "web", [(SKU, LOC, 1)], hold_seconds=0)
    pos = await core.position(SKU, LOC)
    assert pos and (pos.on_hand, pos.committed, pos.committed_dated, pos.in_transit) == (
        5,
        15,
        10,
        10,
    )
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_cancelled_supply_puts_the_dated_promises_at_risk(atp: ATP) -> None:
    core = atp
    today = date_of(await server_today(core))
    await core.set_position(SKU, LOC, 2, 0)
    await core.expect_inbound(SKU, LOC, "PO-1", 8, today + timedelta(days=2))
    await core.reserve(
        "old", "web", [(SKU, LOC, 6)], hold_seconds=0, requested_date=today + timedelta(days=2)
    )
    await core.reserve(
        "new", "web", [(SKU, LOC, 4)], hold_seconds=0, requested_date=today + timedelta(days=3)
    )
    # the supplier ships a week late: both promises lose their cover
    res = await core.amend_inbound(SKU, LOC, "PO-1", expected_at=today + timedelta(days=9))
    assert (
        res.exception_id is not None
        and res.inbound
        and res.inbound.expected_date == today + timedelta(days=9)
    )
    rec = await core.exception(res.exception_id)
    assert rec is not None and rec.kind == "oversell"
    ex = rec.data
    assert ex["cause"] == "inbound_amended" and ex["shortfall"] == 8
    # the newest reservation goes first (the shortage rule)
    assert [r["reservation_id"] for r in ex["at_risk"]][:1] == ["new"]
    rep = await verify(core)
    assert not rep.ok and f"{SKU}@{LOC}" in rep.uncovered
    # cancelled outright, then gone
    res = await core.cancel_inbound(SKU, LOC, "PO-1")
    assert res.inbound is None and res.position.in_transit == 0
    with pytest.raises(UnknownInbound):
        await core.cancel_inbound(SKU, LOC, "PO-1")
    assert await core.inbound(SKU, LOC) == []
    # releasing the promises covers the position again
    await core.release("new")
    await core.release("old")
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_expected_receipts_amend_receive_and_close(atp: ATP) -> None:
    core = atp
    today = date_of(await server_today(core))
    at = datetime.combine(today + timedelta(days=3), datetime.min.time(), UTC) + timedelta(hours=9)
    first = await core.expect_inbound(SKU, LOC, "PO-7/1", 12, at)
    assert first.position.on_hand == 0 and not first.replayed  # the position was created
    again = await core.expect_inbound(SKU, LOC, "PO-7/1", 12, at)
    assert again.replayed and again.position.in_transit == 12
    before = await snapshot(core)
    with pytest.raises(InboundExists) as e:
        await core.expect_inbound(SKU, LOC, "PO-7/1", 13, at)
    assert e.value.extra["inbound"]["qty"] == 12
    assert await snapshot(core) == before
    await core.expect_inbound(SKU, LOC, "ASN-2", 5, today + timedelta(days=1))
    assert [i.reference for i in await core.inbound(SKU, LOC)] == ["ASN-2", "PO-7/1"]
    amended = await core.amend_inbound(SKU, LOC, "PO-7/1", qty=10)
    assert amended.inbound and (amended.inbound.qty, amended.inbound.ordered) == (10, 10)
    # a partial receipt leaves the rest expected; an over-receipt adds all it brought
    part = await core.receive_inbound(SKU, LOC, 4, reference="PO-7/1")
    assert part.inbound and (part.inbound.qty, part.inbound.received) == (6, 4)
    assert (part.position.on_hand, part.position.in_transit) == (4, 11)
    over = await core.receive_inbound(SKU, LOC, 7, reference="ASN-2")
    assert over.inbound is None and (over.position.on_hand, over.position.in_transit) == (11, 6)
    # a short shipment closes what is left
    short = await core.receive_inbound(SKU, LOC, 1, reference="PO-7/1", close=True)
    assert short.inbound is None and (short.position.on_hand, short.position.in_transit) == (12, 0)
    # a receipt with no expected receipt behind it is a plain receipt; close needs one
    plain = await core.receive_inbound(SKU, LOC, 2, reference="walk-in")
    assert plain.inbound is None and plain.position.on_hand == 14
    with pytest.raises(UnknownInbound):
        await core.receive_inbound(SKU, LOC, 2, reference="walk-in", close=True)
    rep = await verify(core)
    assert rep.ok, rep.problems
    kinds = [m.kind for m in reversed(await core.movements(SKU, LOC))]
    assert kinds.count("receive") == 4


async def test_dated_holds_and_releases_keep_the_schedule(atp: ATP) -> None:
    core = atp
    today = date_of(await server_today(core))
    await core.set_position(SKU, LOC, 20, 0)
    when = today + timedelta(days=2)
    await core.reserve("h", "web", [(SKU, LOC, 3)], hold_seconds=1, requested_date=when)
    await core.reserve("c", "web", [(SKU, LOC, 4)], hold_seconds=0, requested_date=when)
    await core.reserve("u", "web", [(SKU, LOC, 5)], hold_seconds=0)
    sch = await core.redis.hgetall(core.keys.position(SKU, LOC).sch)
    assert {k.decode(): int(v) for k, v in sch.items()} == {f"-{day_of(when)}": 7}
    await core.fulfil("c", [FulfilLine(SKU, LOC, shipped=4)])
    await asyncio.sleep(1.2)
    await core.expire_holds()
    pos = await core.position(SKU, LOC)
    assert pos and (pos.committed, pos.committed_dated) == (5, 0)
    assert await core.redis.hgetall(core.keys.position(SKU, LOC).sch) == {}
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_bad_dates_are_refused_before_anything_is_written(atp: ATP) -> None:
    core = atp
    await core.set_position(SKU, LOC, 5, 0)
    before = await snapshot(core)
    for call in (
        core.reserve("x", "web", [(SKU, LOC, 1)], requested_date=datetime.now(UTC)),  # type: ignore[arg-type]
        core.reserve("x", "web", [(SKU, LOC, 1)], requested_date=date(1999, 12, 31)),
        core.reserve("x", "web", [(SKU, LOC, 1)], requested_date="2026-12-01"),  # type: ignore[arg-type]
        core.expect_inbound(SKU, LOC, "P", 1, datetime(2026, 12, 1, 9)),  # naive
        core.expect_inbound(SKU, LOC, "P", 0, date(2026, 12, 1)),
        core.expect_inbound(SKU, LOC, "", 1, date(2026, 12, 1)),
        core.amend_inbound(SKU, LOC, "P"),
    ):
        with pytest.raises(InvalidRequest):
            await call
    assert await snapshot(core) == before
    with pytest.raises(UnknownInbound):
        await core.amend_inbound(SKU, LOC, "nope", qty=3)
    assert await snapshot(core) == before


async def test_a_reservation_retried_with_another_date_conflicts(atp: ATP) -> None:
    core = atp
    today = date_of(await server_today(core))
    await core.set_position(SKU, LOC, 5, 0)
    r = await core.reserve("same", "web", [(SKU, LOC, 1)], requested_date=today + timedelta(days=1))
    again = await core.reserve(
        "same", "web", [(SKU, LOC, 1)], requested_date=today + timedelta(days=1)
    )
    assert again.replayed and again.requested_date == r.requested_date
    with pytest.raises(IdempotencyConflict):
        await core.reserve("same", "web", [(SKU, LOC, 1)], requested_date=today + timedelta(days=2))
    with pytest.raises(IdempotencyConflict):
        await core.reserve("same", "web", [(SKU, LOC, 1)])
    got = await core.reservation("same")
    assert got.requested_date == today + timedelta(days=1)


async def test_a_short_shelf_puts_undated_orders_at_risk_not_later_dated_ones(atp: ATP) -> None:
    """The shelf is short, the dated promise is covered by its inbound: the exception names
    (and its resolution would release) the undated order, though the dated one is of a
    lower priority and newer: releasing it would not cover the shelf."""
    core = atp
    await core.apply_rules({"channels": {"web": {"priority": 100}, "market": {"priority": 10}}})
    today = date_of(await server_today(core))
    await core.set_position(SKU, LOC, 10, 0)
    await core.reserve("web-now", "web", [(SKU, LOC, 10)], hold_seconds=0)
    await core.expect_inbound(SKU, LOC, "PO-5", 5, today + timedelta(days=5))
    await core.reserve(
        "mk-later",
        "market",
        [(SKU, LOC, 5)],
        hold_seconds=0,
        requested_date=today + timedelta(days=6),
    )
    pos = await core.adjust(SKU, LOC, -3, reason="damaged")
    assert pos.on_hand == 7
    (ex,) = [e for e in await core.exceptions() if e.kind == "oversell"]
    assert ex.data["shortfall"] == 3 and "short_on" not in ex.data  # the shelf (now) is short
    assert [r["reservation_id"] for r in ex.data["at_risk"]] == ["web-now"]


async def test_an_expected_receipt_retried_after_it_closed_is_not_counted_again(atp: ATP) -> None:
    core = atp
    today = date_of(await server_today(core))
    await core.set_position(SKU, LOC, 0, 0)
    when = today + timedelta(days=2)
    await core.expect_inbound(SKU, LOC, "PO-9", 5, when)
    got = await core.receive_inbound(SKU, LOC, 5, reference="PO-9")
    assert got.inbound is None and got.position.in_transit == 0
    again = await core.expect_inbound(SKU, LOC, "PO-9", 5, when)
    assert again.replayed and again.inbound is None
    assert (again.position.on_hand, again.position.in_transit) == (5, 0)
    with pytest.raises(InboundExists):
        await core.expect_inbound(SKU, LOC, "PO-9", 6, when)
    with pytest.raises(UnknownInbound):
        await core.amend_inbound(SKU, LOC, "PO-9", qty=2)
    # cancelled ones too
    await core.expect_inbound(SKU, LOC, "PO-10", 3, when)
    await core.cancel_inbound(SKU, LOC, "PO-10")
    assert (await core.expect_inbound(SKU, LOC, "PO-10", 3, when)).replayed
    # a receipt against a closed reference is a plain receipt
    plain = await core.receive_inbound(SKU, LOC, 1, reference="PO-9")
    assert plain.inbound is None and plain.position.on_hand == 6
    assert (await core.position(SKU, LOC)).in_transit == 0  # type: ignore[union-attr]
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_a_dry_count_reports_the_time_phased_risk(atp: ATP) -> None:
    """A count that leaves the shelf below what is committed, but whose dated promises are
    covered by inbound, puts nothing at risk, dry or applied."""
    core = atp
    today = date_of(await server_today(core))
    await core.set_position(SKU, LOC, 4, 0)
    await core.expect_inbound(SKU, LOC, "PO-1", 10, today + timedelta(days=2))
    await core.reserve(
        "d2", "web", [(SKU, LOC, 8)], hold_seconds=0, requested_date=today + timedelta(days=2)
    )
    await core.reserve("now", "web", [(SKU, LOC, 2)], hold_seconds=0)
    t = await core._now_ms()
    await asyncio.sleep(0.01)
    row = CountRow(SKU, LOC, 3, ms_to_dt(t + 5), 1)  # the shelf: 3 for 2 undated + 8 dated
    (dry,) = await core.apply_counts("c-dry", [row], dry_run=True)
    assert dry.status == "dry" and dry.units_at_risk == 0, dry
    (applied,) = await core.apply_counts("c-1", [row])
    assert applied.status == "applied" and applied.exception_id is None, applied
    # 1 on the shelf for 2 undated: both figures say 1 short
    row2 = CountRow(SKU, LOC, 1, ms_to_dt(await core._now_ms() + 5), 1)
    await asyncio.sleep(0.01)
    (dry2,) = await core.apply_counts("c-dry2", [row2], dry_run=True)
    assert dry2.units_at_risk == 1, dry2
