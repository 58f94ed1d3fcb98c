"""The count script (lua/count.lua) and exception resolution (lua/resolve.lua), through the
core, on a real server and on fakeredis.

A count says how many units a position had at ``counted_at``; the script makes on_hand the
counted figure plus every on-hand movement logged after that time. The tests build each
position's history one server millisecond at a time (``tick``), so which movements come
before or after a count's time is known exactly. Refusals are shown to change nothing by a
full snapshot of the keyspace; every test that changes the book ends with ``verify``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from support import snapshot

from atp import ATP, FulfilLine, InvalidRequest
from atp.errors import AlreadyResolved, UnknownException
from atp.models import CountResult, CountRow, ExceptionRecord, ms_to_dt
from atp.verify import verify

# -- helpers ---------------------------------------------------------------------------------


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def balanced(core: ATP, *, allow_uncovered: bool = False) -> None:
    rep = await verify(core, allow_uncovered=allow_uncovered)
    assert rep.ok, rep.problems


async def tick(core: ATP) -> int:
    """Wait until the server clock has left its current millisecond; the new one."""
    t = await core._now_ms()
    for _ in range(100_000):
        n = await core._now_ms()
        if n > t:
            return n
        await asyncio.sleep(0.0005)
    raise AssertionError("the server clock does not move")


async def quiet_moment(core: ATP) -> int:
    """A server millisecond t such that t and t + 1 have no movement: nothing before this
    call is logged after t - 1, nothing after it before t + 2."""
    t = await tick(core)
    await tick(core)
    await tick(core)
    return t


def row(sku: str, counted: int, t_ms: int, n: int = 1, loc: str = "W1") -> CountRow:
    return CountRow(sku, loc, counted, ms_to_dt(t_ms), n)


async def count1(core: ATP, cid: str, r: CountRow, **kw: Any) -> CountResult:
    [res] = await core.apply_counts(cid, [r], **kw)
    return res


async def on_hand(core: ATP, sku: str, loc: str = "W1") -> int:
    p = await core.position(sku, loc)
    assert p is not None
    return p.on_hand


def ms_of(movement_id: str) -> int:
    return int(movement_id.split("-")[0])


async def events(core: ATP, sku: str, etype: str) -> list[dict[str, Any]]:
    rows = await core.redis.xrange(core.keys.events(core.keys.bucket(sku)))
    out = []
    for _, fields in rows:
        f: dict[str, Any] = {_s(k): _s(v) for k, v in fields.items()}
        if f["type"] == etype:
            f["data"] = json.loads(f["data"])
            out.append(f)
    return out


async def history(core: ATP, sku: str) -> dict[str, int]:
    """One position's history, each movement in a millisecond of its own and a quiet
    millisecond between each two:

    set 100 (init) | reserve 5 | t_mid | ship 5 -> 115 | adjust -3 -> 112 | receive 7 -> 119

    (plus a receipt of 20 before t_mid: 120 at t_mid). Returns the milliseconds: the ones
    the movements were logged in, and quiet ones between them.
    """
    t: dict[str, int] = {}
    await core.set_position(sku, "W1", 100, reason="init")
    await quiet_moment(core)
    await core.receive(sku, "W1", 20, reference="PO-1")
    await quiet_moment(core)
    await core.reserve(f"{sku}-r1", "web", [(sku, "W1", 5)], hold_seconds=0)
    t["mid"] = await quiet_moment(core)
    await core.fulfil(f"{sku}-r1", [FulfilLine(sku, "W1", shipped=5)])
    t["after_ship"] = await quiet_moment(core)
    await core.adjust(sku, "W1", -3, reason="damaged")
    await quiet_moment(core)
    await core.receive(sku, "W1", 7, reference="PO-2")
    t["end"] = await quiet_moment(core)
    for m in await core.movements(sku, "W1"):
        t[f"{m.kind}:{m.reason}" if m.kind != "receive" else f"receive:{m.ref}"] = ms_of(m.id)
    assert await on_hand(core, sku) == 119
    return t


# -- as of the count's time ------------------------------------------------------------------


async def test_count_carries_over_movements_after_its_time(core: ATP) -> None:
    t = await history(core, "A")
    # counted 110 at t_mid, when the book said 120: 10 lost; the shipment, the damage and
    # the receipt after t_mid are carried over: 110 - 5 - 3 + 7
    res = await count1(core, "c1", row("A", 110, t["mid"]))
    assert res.status == "applied", res
    assert (res.on_hand_at_count, res.drift, res.on_hand_before, res.on_hand_after) == (
        120,
        -10,
        119,
        109,
    )
    assert (res.committed, res.safety_stock, res.units_at_risk, res.exception_id) == (0, 0, 0, None)
    assert await on_hand(core, "A") == 109
    await balanced(core)


@pytest.mark.parametrize(
    ("moment", "at_count"),
    [
        ("set:init", 100),  # the set is counted as before the count
        ("receive:PO-1", 120),  # a movement in the count's very millisecond is before it
        ("fulfil:shipped", 115),
        ("after_ship", 115),
        ("adjust:damaged", 112),
        ("receive:PO-2", 119),
        ("end", 119),  # nothing after: the current figure
    ],
)
async def test_count_at_each_moment(core: ATP, moment: str, at_count: int) -> None:
    t = await history(core, "A")
    after = await count1(core, "c1", row("A", 50, t[moment]))
    assert after.status == "applied", after
    assert after.on_hand_at_count == at_count
    assert after.drift == 50 - at_count
    # 50 plus every on-hand movement logged after the count's time
    moved = sum(
        m.on_hand_after - m.on_hand_before
        for m in await core.movements("A", "W1")
        if m.kind != "count" and ms_of(m.id) > t[moment]
    )
    assert after.on_hand_after == 50 + moved == await on_hand(core, "A")
    await balanced(core)


async def test_a_millisecond_before_a_movement_leaves_it_after_the_count(core: ATP) -> None:
    t = await history(core, "A")
    res = await count1(core, "c1", row("A", 120, t["fulfil:shipped"] - 1))
    assert (res.on_hand_at_count, res.drift, res.on_hand_after) == (120, 0, 119)
    await balanced(core)


async def test_counts_taken_in_order_applied_late_count_no_drift_twice(core: ATP) -> None:
    """A count taken at t1 applied after t2, then a count taken at t2: the first one's
    correction is of a moment before t2, already inside the second count's figure; carried
    over again, it would be counted twice."""
    t = await history(core, "A")
    # at t_mid 110 were there (the book said 120): 10 lost before t_mid
    first = await count1(core, "c1", row("A", 110, t["mid"]))
    assert (first.drift, first.on_hand_after) == (-10, 109)
    # at t_after_ship the shelf agrees: 110 - 5 shipped = 105; nothing more is lost
    second = await count1(core, "c2", row("A", 105, t["after_ship"]))
    assert second.status == "applied", second
    assert (second.on_hand_at_count, second.drift, second.on_hand_after) == (105, 0, 109)
    # and a third, taken a millisecond later (still before the damage): 3 more found
    third = await count1(core, "c3", row("A", 108, t["after_ship"] + 1))
    assert (third.on_hand_at_count, third.drift, third.on_hand_after) == (105, 3, 112)
    assert await on_hand(core, "A") == 108 - 3 + 7
    await balanced(core)


async def test_more_late_counts_than_the_position_keeps_are_refused(core: ATP) -> None:
    """The position remembers its last 4 applied counts. Five counts taken before t and all
    applied after it: what the fifth-to-last corrected is no longer known, so a count at t
    is refused rather than guessed."""
    await core.set_position("A", "W1", 100, reason="init")
    times = [await quiet_moment(core) for _ in range(6)]
    await core.receive("A", "W1", 1, reference="PO")
    t = await quiet_moment(core)
    for i, ti in enumerate(times[:5]):
        assert (await count1(core, f"c{i}", row("A", 90 + i, ti))).status == "applied"
    before = await snapshot(core)
    res = await count1(core, "late", row("A", 100, t))
    assert (res.status, res.reason) == ("refused", "before_retention"), res
    assert await snapshot(core) == before
    # four applied after t are still known: on another position the arithmetic holds
    await core.set_position("B", "W1", 100, reason="init")
    times = [await quiet_moment(core) for _ in range(4)]
    await core.receive("B", "W1", 1, reference="PO")
    t = await quiet_moment(core)
    for i, ti in enumerate(times):
        await count1(core, f"c{i}", row("B", 90 + i, ti))
    res = await count1(core, "late", row("B", 100, t))
    assert (res.status, res.on_hand_at_count, res.on_hand_after) == ("applied", 94, 100)
    await balanced(core)


async def test_dry_run_reports_and_writes_nothing(core: ATP) -> None:
    t = await history(core, "A")
    before = await snapshot(core)
    dry = await count1(core, "c1", row("A", 110, t["mid"]), dry_run=True)
    assert dry.status == "dry"
    assert (dry.on_hand_at_count, dry.drift, dry.on_hand_before, dry.on_hand_after) == (
        120,
        -10,
        119,
        109,
    )
    assert await snapshot(core) == before
    # the same count id then applies for real, with the same figures
    real = await count1(core, "c1", row("A", 110, t["mid"]))
    assert real.status == "applied"
    assert (real.on_hand_at_count, real.drift, real.on_hand_after) == (120, -10, 109)
    await balanced(core)


async def test_dry_run_reports_units_at_risk_without_an_exception(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("r1", "web", [("A", "W1", 8)], hold_seconds=0)
    t = await quiet_moment(core)
    before = await snapshot(core)
    dry = await count1(core, "c1", row("A", 5, t), dry_run=True)
    assert (dry.status, dry.on_hand_after, dry.units_at_risk, dry.exception_id) == (
        "dry",
        5,
        3,
        None,
    )
    assert await snapshot(core) == before
    assert await core.exceptions() == []


# -- exactly once, and which count wins ------------------------------------------------------


async def test_same_count_id_again_is_already_with_original_figures(core: ATP) -> None:
    t = await history(core, "A")
    first = await count1(core, "c1", row("A", 110, t["mid"]))
    # the book moves on; a retry of the batch must not apply the row again
    await core.receive("A", "W1", 4, reference="PO-3")
    before = await snapshot(core)
    again = await count1(core, "c1", row("A", 110, t["mid"]))
    assert again.status == "already"
    assert (again.on_hand_before, again.on_hand_after, again.drift, again.on_hand_at_count) == (
        first.on_hand_before,
        first.on_hand_after,
        first.drift,
        first.on_hand_at_count,
    )
    assert await snapshot(core) == before
    assert await on_hand(core, "A") == 113
    assert [m.ref for m in await core.movements("A", "W1") if m.kind == "count"] == ["c1"]
    await balanced(core)


async def test_later_count_id_with_older_time_is_superseded(core: ATP) -> None:
    t = await history(core, "A")
    assert (await count1(core, "c1", row("A", 110, t["after_ship"]))).status == "applied"
    before = await snapshot(core)
    older = await count1(core, "c2", row("A", 120, t["mid"]))
    same = await count1(core, "c3", row("A", 120, t["after_ship"]))
    for res in (older, same):
        assert (res.status, res.reason) == ("refused", "superseded"), res
        assert "c1" in (res.detail or "")
        assert res.on_hand_after is None and res.drift is None
    assert await snapshot(core) == before
    await balanced(core)


async def test_set_position_after_the_count_supersedes_it(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    t = await quiet_moment(core)
    await core.set_position("A", "W1", 30, reason="recount")
    before = await snapshot(core)
    res = await count1(core, "c1", row("A", 12, t))
    assert (res.status, res.reason) == ("refused", "superseded"), res
    assert "set" in (res.detail or "")
    assert await snapshot(core) == before
    # a count after the set applies
    res = await count1(core, "c2", row("A", 29, await quiet_moment(core)))
    assert (res.status, res.drift, res.on_hand_after) == ("applied", -1, 29)
    await balanced(core)


# -- refusals: each changes nothing ----------------------------------------------------------


async def test_refusals_change_nothing_and_the_rest_applies(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    await core.set_position("B", "W1", 10, reason="init")
    t = await quiet_moment(core)
    await core.adjust("B", "W1", -8, reason="damaged")  # 2 left after t
    now = await quiet_moment(core)
    skew = core.settings.count_skew_seconds * 1000
    rows = [
        row("NOPE", 5, t, 1),  # unknown_position
        row("A", 5, now + skew + 60_000, 2),  # future
        row("B", 5, t, 3),  # negative: 2 + (5 - 10)
        CountRow("A", "W1", -1, ms_to_dt(t), 4),  # bad_count
        CountRow("A", "W1", core.settings.max_on_hand + 1, ms_to_dt(t), 5),  # bad_count
        CountRow("A", "W1", 5, ms_to_dt(t).replace(tzinfo=None), 6),  # bad_time (naive)
        CountRow("A", "W1", 5, "yesterday", 7),  # type: ignore[arg-type]  # bad_time
        CountRow("a b", "W1", 5, ms_to_dt(t), 8),  # bad_row
        CountRow("A", "W1", 5, ms_to_dt(t), -1),  # bad_row
        CountRow("A", "W1", 4.5, ms_to_dt(t), 10),  # type: ignore[arg-type]  # bad_count
    ]
    before = await snapshot(core)
    got = await core.apply_counts("c1", rows)
    assert [(r.row, r.status, r.reason) for r in got] == [
        (1, "refused", "unknown_position"),
        (2, "refused", "future"),
        (3, "refused", "negative"),
        (4, "refused", "bad_count"),
        (5, "refused", "bad_count"),
        (6, "refused", "bad_time"),
        (7, "refused", "bad_time"),
        (8, "refused", "bad_row"),
        (-1, "refused", "bad_row"),
        (10, "refused", "bad_count"),
    ]
    assert all(r.detail for r in got)
    assert await snapshot(core) == before
    # beside a good row, the bad ones still change nothing and the good one applies
    mixed = await core.apply_counts("c2", [*rows[:3], row("A", 7, t, 11)])
    assert [r.status for r in mixed] == ["refused", "refused", "refused", "applied"]
    assert await on_hand(core, "A") == 7 and await on_hand(core, "B") == 2
    await balanced(core)


async def test_on_hand_above_the_maximum_is_a_bad_count(core: ATP, settings: Any) -> None:
    small = ATP(core.redis, settings.model_copy(update={"max_on_hand": 100}))
    await small.set_position("A", "W1", 10, reason="init")
    t = await quiet_moment(small)
    await small.receive("A", "W1", 85, reference="PO")  # 95
    before = await snapshot(small)
    # 20 at t, plus the 85 received after: 105 > 100
    res = await count1(small, "c1", row("A", 20, t))
    assert (res.status, res.reason) == ("refused", "bad_count"), res
    assert await snapshot(small) == before
    assert (await count1(small, "c1", row("A", 15, t))).on_hand_after == 100
    await balanced(small)


async def test_duplicate_rows_of_one_count(core: ATP) -> None:
    await core.set_position("A", "W1", 10, reason="init")
    t = await quiet_moment(core)
    got = await core.apply_counts("c1", [row("A", 8, t, 1), row("A", 9, t, 2)])
    assert [(r.status, r.reason) for r in got] == [("applied", None), ("refused", "duplicate")]
    assert "row 1" in (got[1].detail or "")
    assert await on_hand(core, "A") == 8
    before = await snapshot(core)
    # a later batch of the same count naming the position on another row: still a duplicate
    again = await count1(core, "c1", row("A", 9, t, 7))
    assert (again.status, again.reason) == ("refused", "duplicate")
    # the original row again: already, whatever it now says
    assert (await count1(core, "c1", row("A", 9, t, 1))).status == "already"
    assert await snapshot(core) == before
    await balanced(core)


async def test_before_retention_when_the_log_was_trimmed(core: ATP, settings: Any) -> None:
    small = ATP(core.redis, settings.model_copy(update={"log_maxlen": 100}))
    await small.set_position("A", "W1", 1000, reason="init")
    t = await quiet_moment(small)
    entries = 260
    for i in range(entries):
        await small.receive("A", "W1", 1, reference=f"PO-{i}")
    await small.set_position("B", "W1", 1, reason="init")  # untouched by the refusal
    log = small.keys.position("A", "W1").log
    assert await small.redis.xlen(log) < entries  # the log was trimmed
    oldest = ms_of(_s((await small.redis.xrange(log, count=1))[0][0]))
    before = await snapshot(small)
    res = await count1(small, "c1", row("A", 1000, t))
    assert (res.status, res.reason) == ("refused", "before_retention"), res
    assert await snapshot(small) == before
    # a count at the oldest movement still in the log is answerable
    res = await count1(small, "c2", row("A", 1000, oldest))
    assert res.status == "applied", res
    moved = sum(
        m.on_hand_after - m.on_hand_before
        for m in await small.movements("A", "W1", count=1000)
        if m.kind != "count" and ms_of(m.id) > oldest
    )
    assert res.on_hand_after == 1000 + moved == await on_hand(small, "A")
    await balanced(small)


async def test_script_checks_rows_itself(core: ATP) -> None:
    """Rows sent straight to the script, past the Python checks: refused row by row."""
    await core.set_position("A", "W1", 10, reason="init")
    t = await quiet_moment(core)
    b = core.keys.bucket("A")
    res, _, events_key, stats, exc, rp = core.keys.bucket_keys(b).tuple()
    pk = core.keys.position("A", "W1")
    good = {"sku": "A", "loc": "W1", "q": 5, "t": t, "row": 1}
    bad = [
        ({**good, "row": -1}, "bad_row"),
        ({**good, "row": "1"}, "bad_row"),
        ({**good, "sku": ""}, "bad_row"),
        ({**good, "loc": 7}, "bad_row"),
        ({**good, "q": -1}, "bad_count"),
        ({**good, "q": 1.5}, "bad_count"),
        ({**good, "q": "5"}, "bad_count"),
        ({**good, "t": -5}, "bad_time"),
        ({**good, "t": "2026-01-01"}, "bad_time"),
        ({**good, "t": 1.5}, "bad_time"),
    ]
    keys = [events_key, res, stats, exc, rp] + [pk.pos, pk.log, pk.lx, pk.sch, pk.sku, pk.bq] * len(
        bad
    )
    cfg = json.dumps({**core._cfg_base, "actor": "", "source": "", "skew": 0, "risk_max": 10})
    req = {"cid": "c1", "dry": False, "groups": [{"b": b, "rows": [r for r, _ in bad]}]}
    before = await snapshot(core)
    out = await core._run("count", keys, cfg, req)
    assert [(o["st"], o["reason"]) for o in out["rows"]] == [("refused", why) for _, why in bad]
    assert await snapshot(core) == before
    # a malformed request as a whole is a bad request
    for broken, k in [
        ({**req, "cid": ""}, keys),
        ({**req, "groups": "x"}, keys),
        ({**req, "prio": "web"}, keys),
        ({**req, "groups": [{"rows": []}]}, keys),
        (req, keys[:-1]),
    ]:
        with pytest.raises(InvalidRequest):
            await core._run("count", k, cfg, broken)
    assert await snapshot(core) == before


# -- audit -----------------------------------------------------------------------------------


async def test_count_movement_and_event(core: ATP) -> None:
    t = await history(core, "A")
    res = await count1(core, "cc-7", row("A", 110, t["mid"], 42), source="wms", actor="ann")
    m = (await core.movements("A", "W1"))[0]
    assert (m.kind, m.reason, m.ref, m.actor, m.source, m.reservation_id, m.channel) == (
        "count",
        "cycle_count",
        "cc-7",
        "ann",
        "wms",
        "",
        "",
    )
    assert (m.on_hand_before, m.on_hand_after, m.committed_before, m.committed_after) == (
        119,
        109,
        0,
        0,
    )
    assert m.detail == {"counted": "110", "counted_at": str(t["mid"]), "drift": "-10", "row": "42"}
    [ev] = await events(core, "A", "counted")
    assert ev["data"] == {
        "sku": "A",
        "location": "W1",
        "count": "cc-7",
        "counted": 110,
        "counted_at": t["mid"],
        "drift": -10,
        "on_hand_before": 119,
        "on_hand_after": 109,
    }
    assert (ev["actor"], ev["rid"]) == ("ann", "")
    assert res.exception_id is None and await events(core, "A", "exception") == []
    await balanced(core)


async def test_a_count_that_agrees_is_audited_but_not_announced(core: ATP) -> None:
    t = await history(core, "A")
    res = await count1(core, "c1", row("A", 120, t["mid"]))
    assert (res.status, res.drift, res.on_hand_after) == ("applied", 0, 119)
    m = (await core.movements("A", "W1"))[0]
    assert (m.kind, m.on_hand_before, m.on_hand_after, m.detail["drift"]) == (
        "count",
        119,
        119,
        "0",
    )
    assert await events(core, "A", "counted") == []
    await balanced(core)


# -- oversell after a count, and its resolution ----------------------------------------------

RULES = {
    "channels": {"gold": {"priority": 10}, "silver": {"priority": 5}, "bronze": {"priority": 1}}
}
PRIO = {"zinc": 0, "bronze": 1, "silver": 5, "gold": 10}
# made in this order, each in a millisecond of its own; zinc is not in the rules (priority 0)
BOOK = [
    ("g-conf", "gold", 10, 0),
    ("b-old", "bronze", 3, 0),
    ("s-conf", "silver", 5, 0),
    ("b-held", "bronze", 2, 600),
    ("z-conf", "zinc", 1, 0),
    ("s-held", "silver", 4, 600),
    ("b-new", "bronze", 4, 0),
    ("g-held", "gold", 5, 600),
]


def shortage_order() -> list[str]:
    """The shortage rule: lowest priority first, holds before confirmed, newest first."""
    made = {rid: i for i, (rid, *_rest) in enumerate(BOOK)}
    return sorted(
        made,
        key=lambda rid: (
            PRIO[BOOK[made[rid]][1]],
            BOOK[made[rid]][1],
            BOOK[made[rid]][3] == 0,
            -made[rid],
        ),
    )


async def oversold(core: ATP) -> tuple[int, CountResult]:
    """34 committed on 40; a count finds 30 at a moment after: 4 over (plus safety 2)."""
    await core.apply_rules(RULES)
    await core.set_position("S", "W1", 40, safety_stock=2, reason="init")
    for rid, ch, qty, hold in BOOK:
        await tick(core)
        await core.reserve(rid, ch, [("S", "W1", qty)], hold_seconds=hold)
    made = [(await core.reservation(rid)).created_at for rid, *_ in BOOK]
    assert made == sorted(made) and len(set(made)) == len(made)
    t = await quiet_moment(core)
    res = await count1(core, "cyc-1", row("S", 30, t))
    return t, res


async def test_count_leaving_commitments_uncovered_raises_oversell(core: ATP) -> None:
    assert shortage_order() == ["z-conf", "b-held", "b-new", "b-old", "s-held", "s-conf",
                                "g-held", "g-conf"]  # fmt: skip
    _, res = await oversold(core)
    # 34 committed, 30 on hand, 2 safety: 6 short
    assert (res.status, res.on_hand_after, res.committed, res.units_at_risk) == (
        "applied",
        30,
        34,
        6,
    )
    b = core.keys.bucket("S")
    assert res.exception_id == f"{b}-1"
    ex = await core.exception(res.exception_id)
    assert (ex.kind, ex.status, ex.resolution) == ("oversell", "open", None)
    d = ex.data
    assert (d["cause"], d["count"], d["sku"], d["location"]) == ("cycle_count", "cyc-1", "S", "W1")
    assert (d["on_hand"], d["committed"], d["safety_stock"], d["shortfall"]) == (30, 34, 2, 6)
    # named in shortage order, and no more once the 6 are covered: 1 + 2 + 4
    named = [a["reservation_id"] for a in d["at_risk"]]
    assert named == shortage_order()[:3] == ["z-conf", "b-held", "b-new"]
    info = {rid: (ch, qty, "held" if hold else "confirmed") for rid, ch, qty, hold in BOOK}
    for a in d["at_risk"]:
        assert (a["channel"], a["qty"], a["status"], a["priority"]) == (
            *info[a["reservation_id"]],
            PRIO[a["channel"]],
        )
    assert (d["units_at_risk"], d["truncated"]) == (7, False)
    [ev] = await events(core, "S", "exception")
    assert ev["data"] == d and ev["rid"] == ""
    assert [e.id for e in await core.exceptions()] == [res.exception_id]
    await balanced(core, allow_uncovered=True)


async def test_deeper_shortage_reaches_further_down_the_order(core: ATP) -> None:
    await core.apply_rules(RULES)
    await core.set_position("S", "W1", 40, reason="init")
    for rid, ch, qty, hold in BOOK:
        await tick(core)
        await core.reserve(rid, ch, [("S", "W1", qty)], hold_seconds=hold)
    # 34 committed; counted 10: 24 short -> everything but gold's confirmed order
    # (1 + 2 + 4 + 3 + 4 + 5 = 19 < 24, then gold's hold: 24)
    res = await count1(core, "cyc-1", row("S", 10, await quiet_moment(core)))
    ex = await core.exception(res.exception_id or "")
    assert [a["reservation_id"] for a in ex.data["at_risk"]] == shortage_order()[:7]
    assert ex.data["units_at_risk"] == 24 == ex.data["shortfall"]
    await balanced(core, allow_uncovered=True)


async def test_resolve_release_releases_the_reservations_at_risk(core: ATP) -> None:
    _, res = await oversold(core)
    xid = res.exception_id or ""
    rec = await core.exception(xid)
    at_risk = [a["reservation_id"] for a in rec.data["at_risk"]]
    done = await core.resolve_exception(xid, "release", note="short on shelf", actor="ops")
    assert done.status == "resolved"
    assert done.resolution is not None
    assert (done.resolution["action"], done.resolution["note"], done.resolution["by"]) == (
        "release",
        "short on shelf",
        "ops",
    )
    assert done.resolution["released"] == at_risk
    for rid in at_risk:
        r = await core.reservation(rid)
        assert r.status == "released" and r.lines[0].open == 0
    rel = [m for m in await core.movements("S", "W1") if m.kind == "release"]
    assert sorted(m.reservation_id for m in rel) == sorted(at_risk)
    assert all(m.reason == f"exception {xid}" and m.actor == "ops" for m in rel)
    p = await core.position("S", "W1")
    assert p is not None and (p.on_hand, p.committed) == (30, 27)
    [ev] = await events(core, "S", "exception_resolved")
    assert ev["data"] == {
        "id": xid,
        "kind": "oversell",
        "action": "release",
        "note": "short on shelf",
        "released": at_risk,
    }
    assert (ev["actor"], ev["rid"]) == ("ops", "")
    # covered again: the book balances without excuses
    await balanced(core)
    assert await core.exceptions() == []
    assert [e.id for e in await core.exceptions(status="resolved")] == [xid]
    # resolving again the same way is the same answer and changes nothing
    before = await snapshot(core)
    again = await core.resolve_exception(xid, "release", note="again", actor="other")
    assert (again.status, again.resolution) == ("resolved", done.resolution)
    assert await snapshot(core) == before
    with pytest.raises(AlreadyResolved):
        await core.resolve_exception(xid, "keep")
    assert await snapshot(core) == before


async def test_resolve_keep_releases_nothing(core: ATP) -> None:
    _, res = await oversold(core)
    xid = res.exception_id or ""
    before_res = {rid: (await core.reservation(rid)).status for rid, *_ in BOOK}
    done = await core.resolve_exception(xid, "keep", note="stock on its way")
    assert done.resolution is not None
    assert (done.status, done.resolution["action"], done.resolution["released"]) == (
        "resolved",
        "keep",
        [],
    )
    assert {rid: (await core.reservation(rid)).status for rid, *_ in BOOK} == before_res
    [ev] = await events(core, "S", "exception_resolved")
    assert ev["data"]["action"] == "keep" and "released" not in ev["data"]
    before = await snapshot(core)
    assert (await core.resolve_exception(xid, "keep")).resolution == done.resolution
    with pytest.raises(AlreadyResolved):
        await core.resolve_exception(xid, "release")
    assert await snapshot(core) == before
    await balanced(core, allow_uncovered=True)


async def test_resolve_release_skips_reservations_no_longer_live(core: ATP) -> None:
    _, res = await oversold(core)
    xid = res.exception_id or ""
    # one at risk was released meanwhile, one shipped
    await core.release("b-held")
    await core.fulfil("z-conf", [FulfilLine("S", "W1", shipped=1)])
    done = await core.resolve_exception(xid, "release")
    assert done.resolution is not None and done.resolution["released"] == ["b-new"]
    assert (await core.reservation("b-new")).status == "released"
    assert (await core.reservation("z-conf")).status == "fulfilled"
    await balanced(core)


async def test_resolve_unknown_and_bad_input(core: ATP) -> None:
    b = core.keys.bucket("S")
    with pytest.raises(UnknownException):
        await core.resolve_exception(f"{b}-99", "keep")
    with pytest.raises(UnknownException):
        await core.exception(f"{b}-99")
    for bad in ("x", "1-", "-1", "1-a"):
        with pytest.raises(InvalidRequest):
            await core.exception(bad)
    _, res = await oversold(core)
    before = await snapshot(core)
    with pytest.raises(InvalidRequest):
        await core.resolve_exception(res.exception_id or "", "drop")
    assert await snapshot(core) == before


async def test_resolution_races_one_action_wins_before_anything_is_released(core: ATP) -> None:
    _, res = await oversold(core)
    xid = res.exception_id or ""
    outcomes = await asyncio.gather(
        core.resolve_exception(xid, "keep"),
        core.resolve_exception(xid, "release"),
        return_exceptions=True,
    )
    won = [o for o in outcomes if isinstance(o, ExceptionRecord)]
    lost = [o for o in outcomes if isinstance(o, AlreadyResolved)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    done = await core.exception(xid)
    assert done.status == "resolved" and done.resolution is not None
    statuses = {rid: (await core.reservation(rid)).status for rid, *_ in BOOK}
    if done.resolution["action"] == "keep":  # the loser released nothing
        assert "released" not in statuses.values()
        assert done.resolution["released"] == []
    else:
        assert done.resolution["released"] == [
            rid for rid, st in statuses.items() if st == "released"
        ]
    await balanced(core, allow_uncovered=True)


async def test_a_resolution_interrupted_after_claiming_is_finished_by_a_retry(core: ATP) -> None:
    _, res = await oversold(core)
    xid = res.exception_id or ""
    ex = await core.exception(xid)
    at_risk = [r["reservation_id"] for r in ex.data["at_risk"]]
    # the first attempt claimed the exception and released one reservation, then died
    b = core.keys.bucket("S")
    keys = (core.keys.bucket_keys(b).exc, core.keys.bucket_keys(b).events)
    req = {"id": xid, "phase": "claim", "action": "release", "note": "", "released": []}
    await core._run("resolve", keys, core._cfg("op", ""), req)
    await core.release(at_risk[0], reason=f"exception {xid}", actor="op")
    assert (await core.exception(xid)).status == "resolving"
    with pytest.raises(AlreadyResolved):  # decided: keep can no longer win
        await core.resolve_exception(xid, "keep")
    done = await core.resolve_exception(xid, "release", actor="op")
    assert done.status == "resolved" and done.resolution is not None
    assert done.resolution["released"] == at_risk  # the first attempt's release included
    await balanced(core, allow_uncovered=True)
