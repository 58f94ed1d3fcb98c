"""Units committed and held over the whole deployment (the /metrics gauges), kept per
bucket by the scripts through every transition."""

from __future__ import annotations

import asyncio

from atp import ATP, FulfilLine
from atp.verify import verify


async def test_totals_follow_every_transition(atp: ATP) -> None:
    skus = [f"T{i}" for i in range(6)]
    for sku in skus:
        await atp.set_position(sku, "W", 100, reason="init")
    assert await atp.totals() == (0, 0)
    await atp.reserve("h1", "web", [(skus[0], "W", 3), (skus[1], "W", 2)], hold_seconds=60)
    await atp.reserve("c1", "web", [(skus[2], "W", 4)], hold_seconds=0)
    assert await atp.totals() == (9, 5)
    await atp.confirm("h1")
    assert await atp.totals() == (9, 0)
    await atp.fulfil("h1", [FulfilLine(skus[0], "W", shipped=1, short=1)])
    assert await atp.totals() == (8, 0)  # short units stay committed until released
    await atp.fulfil("h1", [FulfilLine(skus[0], "W", release_remainder=True)])
    assert await atp.totals() == (6, 0)
    await atp.release("c1")
    assert await atp.totals() == (2, 0)
    await atp.reserve("h2", "app", [(skus[3], "W", 5), (skus[4], "W", 1)], hold_seconds=1)
    await atp.reserve("h3", "app", [(skus[5], "W", 7)], hold_seconds=60)
    assert await atp.totals() == (15, 13)
    await atp.release("h3")
    assert await atp.totals() == (8, 6)
    await asyncio.sleep(1.1)
    # a reserve on one of h2's positions reclaims that line; the reaper takes the rest
    await atp.reserve("c2", "web", [(skus[3], "W", 1)], hold_seconds=0)
    assert await atp.totals() == (4, 1)
    await atp.expire_holds()
    assert await atp.totals() == (3, 0)
    assert (await verify(atp, allow_uncovered=True)).ok


async def test_a_second_reaper_does_not_report_a_hold_again(atp: ATP) -> None:
    """Two reapers that read the same candidates before either reclaimed them: the second
    finds nothing left to do and reports nothing (units, ids and the metric stay right)."""
    await atp.set_position("R", "W", 30, reason="init")
    for i in range(5):
        await atp.reserve(f"h{i}", "web", [("R", "W", 1)], hold_seconds=1)
    await asyncio.sleep(1.1)
    b = atp.keys.bucket("R")
    bk = atp.keys.bucket_keys(b)
    ids = [i.decode() for i in await atp.redis.zrangebyscore(bk.holds, "-inf", "+inf")]
    pk = atp.keys.position("R", "W")
    keys = [*bk.tuple()] + [k for _ in ids for k in pk.line()]
    req = {"ids": [{"id": i, "n": 1} for i in ids]}
    first = await atp._run("expire_holds", keys, atp._cfg("reaper-1", ""), req)
    second = await atp._run("expire_holds", keys, atp._cfg("reaper-2", ""), req)
    assert sorted(first["expired"]) == sorted(ids) and first["units"] == 5
    assert not second["expired"] and second["units"] == 0
    assert await atp.totals() == (0, 0)
    assert (await verify(atp)).ok
