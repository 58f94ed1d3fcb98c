"""Cluster routing (I4 on a cluster): a real three-master cluster started by this test
module. Lines in different slots are reserved part by part; a refused part rolls back the
parts already taken before the call returns; the book balances afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from atp import (
    ATP,
    FulfilLine,
    IdempotencyConflict,
    InsufficientStock,
    OverFulfil,
    Settings,
    UnknownLine,
    UnknownReservation,
)
from atp.embedded import EmbeddedCluster
from atp.verify import verify


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(tmp_path_factory.mktemp("cluster"), masters=3, appendfsync="everysec")
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def core(cluster: EmbeddedCluster) -> AsyncIterator[ATP]:
    rc = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes], max_connections=512
    )
    await rc.initialize()
    await rc.flushall(target_nodes=RedisCluster.PRIMARIES)
    c = ATP(rc, Settings(key_prefix="c:", buckets=64, data_dir=Path("/nonexistent")))
    await c.start()
    try:
        yield c
    finally:
        await c.aclose()


def skus_on_distinct_nodes(core: ATP, n: int) -> list[str]:
    """SKUs whose buckets sit in slots owned by different masters (16384 / 3 per master)."""
    found: dict[int, str] = {}
    for i in range(10_000):
        sku = f"S{i}"
        slot = key_slot(core.keys.position(sku, "W").pos.encode())
        node = slot * 3 // 16384
        found.setdefault(node, sku)
        if len(found) == n:
            return list(found.values())
    raise AssertionError("not enough distinct nodes")


async def test_is_cluster(core: ATP) -> None:
    assert core.cluster


async def test_multi_slot_reservation_and_lifecycle(core: ATP) -> None:
    a, b, c = skus_on_distinct_nodes(core, 3)
    for sku in (a, b, c):
        await core.set_position(sku, "W", 10, reason="init")
    r = await core.reserve("o1", "web", [(a, "W", 2), (b, "W", 3), (c, "W", 1)], hold_seconds=60)
    assert r.status == "held" and {ln.sku for ln in r.lines} == {a, b, c}
    again = await core.reserve(
        "o1", "web", [(a, "W", 2), (b, "W", 3), (c, "W", 1)], hold_seconds=60
    )
    assert again.replayed and again.status == "held"
    with pytest.raises(IdempotencyConflict):
        await core.reserve("o1", "web", [(a, "W", 1)], hold_seconds=60)
    assert (await core.confirm("o1")).status == "confirmed"
    got = await core.reservation("o1")
    assert got.status == "confirmed" and len(got.lines) == 3
    r = await core.fulfil("o1", [FulfilLine(a, "W", shipped=2), FulfilLine(b, "W", shipped=1)])
    assert r.status == "confirmed"
    with pytest.raises(OverFulfil):
        await core.fulfil("o1", [FulfilLine(c, "W", shipped=1), FulfilLine(b, "W", shipped=5)])
    with pytest.raises(UnknownLine):
        await core.fulfil("o1", [FulfilLine(c, "W", shipped=1), FulfilLine(b, "X", shipped=1)])
    assert [(p.on_hand, p.committed) for p in [await core.position(s, "W") for s in (a, b, c)]] == [
        (8, 0), (9, 2), (10, 1),
    ]  # fmt: skip
    r = await core.release("o1")
    assert r.status == "released"
    rep = await verify(core)
    assert rep.ok, rep.problems
    assert rep.positions == 3


async def test_refused_part_rolls_back_the_others(core: ATP) -> None:
    a, b, c = skus_on_distinct_nodes(core, 3)
    await core.set_position(a, "W", 10, reason="init")
    await core.set_position(b, "W", 10, reason="init")
    await core.set_position(c, "W", 1, reason="init")  # the last part is short
    with pytest.raises(InsufficientStock) as e:
        await core.reserve("o2", "web", [(a, "W", 2), (b, "W", 3), (c, "W", 5)])
    assert e.value.lines == [
        {"sku": c, "location": "W", "requested": 5, "available": 1, "limited_by": "stock"}
    ]
    for sku in (a, b, c):
        p = await core.position(sku, "W")
        assert p is not None and p.committed == 0
    with pytest.raises(UnknownReservation):
        await core.reservation("o2")
    rep = await verify(core)
    assert rep.ok, rep.problems
    # the id was not burnt: once stock arrives the same request goes through
    await core.receive(c, "W", 10, reference="PO-1")
    r = await core.reserve("o2", "web", [(a, "W", 2), (b, "W", 3), (c, "W", 5)])
    assert r.status == "confirmed" and not r.replayed
    assert (await verify(core)).ok


async def test_expired_holds_reaped_on_cluster(core: ATP) -> None:
    a, b = skus_on_distinct_nodes(core, 2)
    await core.set_position(a, "W", 5, reason="init")
    await core.set_position(b, "W", 5, reason="init")
    await core.reserve("o3", "web", [(a, "W", 1), (b, "W", 1)], hold_seconds=1)
    await asyncio.sleep(1.1)
    res = await core.expire_holds()
    assert set(res.expired) == {"o3"} and res.units == 2
    assert (await core.reservation("o3")).status == "expired"
    assert (await verify(core)).ok


async def test_race_multi_slot_all_or_nothing(core: ATP) -> None:
    """Many buyers reserve a scarce SKU together with a plentiful one in another slot: a
    buyer ends up with both lines or with neither, and no unit is committed twice."""
    scarce, plenty = skus_on_distinct_nodes(core, 2)
    await core.set_position(scarce, "W", 30, reason="init")
    await core.set_position(plenty, "W", 1000, reason="init")
    won: list[str] = []
    lost = 0

    async def buyer(i: int) -> None:
        nonlocal lost
        try:
            await core.reserve(f"b{i}", "web", [(plenty, "W", 2), (scarce, "W", 1)])
            won.append(f"b{i}")
        except InsufficientStock:
            lost += 1

    await asyncio.gather(*(buyer(i) for i in range(120)))
    assert len(won) == 30 and lost == 90
    ps = await core.position(scarce, "W")
    pp = await core.position(plenty, "W")
    assert ps is not None and pp is not None
    assert ps.committed == 30 and pp.committed == 60
    rep = await verify(core)
    assert rep.ok, rep.problems
    assert rep.reservations == 60  # two parts for each of the 30 winners, none for losers


RULES = {
    "channels": {
        "web": {"priority": 10, "locations": ["W", "W2"], "allow_split": True},
        "market": {"priority": 1},
    },
    "default": {"protect": {"web": 3}, "cap": {"market": 4}, "buyer_limit": 10},
}


async def test_rules_on_a_cluster_protection_cap_routing(core: ATP) -> None:
    a, b = skus_on_distinct_nodes(core, 2)
    for sku in (a, b):
        await core.set_position(sku, "W", 4)
        await core.set_position(sku, "W2", 4)
    rules = await core.apply_rules(RULES)
    # every bucket moved to the new version, node by node
    for bk in range(core.keys.buckets):
        assert int(await core.redis.hget(core.keys.bucket_keys(bk).stats, "rv")) == rules.version
    # market may not take web's protected units (4 - 3 = 1 at W), nor go over its cap
    with pytest.raises(InsufficientStock) as e:
        await core.reserve("m1", "market", [(a, "W", 2), (b, "W", 1)], customer_id="c1")
    assert e.value.lines == [
        {"sku": a, "location": "W", "requested": 2, "available": 1, "limited_by": "protection"}
    ]
    # a refused part on one node rolled back the other node's part
    assert (await core.position(b, "W")).committed == 0  # type: ignore[union-attr]
    # web routes a line over W then W2, split over both when none holds it whole
    r = await core.reserve("w1", "web", [(a, None, 6), (b, "W", 2)], customer_id="c2")
    assert r.rules_version == rules.version
    assert sorted((ln.sku, ln.location, ln.qty) for ln in r.lines) == sorted(
        [(a, "W", 4), (a, "W2", 2), (b, "W", 2)]
    )
    again = await core.reserve("w1", "web", [(a, None, 6), (b, "W", 2)], customer_id="c2")
    assert again.replayed and set(again.lines) == set(r.lines)
    await core.release("w1")
    assert (await verify(core)).ok


async def test_an_interrupted_apply_on_a_cluster_is_finished_by_the_next_reserve(
    core: ATP,
) -> None:
    (a,) = skus_on_distinct_nodes(core, 1)
    await core.set_position(a, "W", 10)
    v1 = await core.apply_rules(RULES)
    # version 2 written to the document only, as if the applying process died before it
    # moved the buckets; this process still has version 1 cached
    doc = {**RULES, "default": {"protect": {"web": 9}}}
    from atp.rules import document_json, parse_rules

    out = await core._run(
        "rules_apply",
        [core.keys.rules_doc(), core.keys.rules_history()],
        '{"keep":100}',
        {"doc": document_json(parse_rules(doc)), "expect": v1.version, "actor": "crashed"},
    )
    assert out["version"] == v1.version + 1
    stats = core.keys.bucket_keys(core.keys.bucket(a)).stats
    assert int(await core.redis.hget(stats, "rv")) == v1.version
    # a reserve resolved with version 1 runs on a bucket at version 1: it is decided by
    # version 1, as the bucket still enforces it
    r1 = await core.reserve("m1", "market", [(a, "W", 1)], customer_id="c1")
    assert r1.rules_version == v1.version
    # a process that reads the rules (version 2) moves the bucket as it reserves
    other = ATP(core.redis, core.settings)
    await other.start()
    r2 = await other.reserve("w2", "web", [(a, "W", 1)], customer_id="c1")
    assert r2.rules_version == v1.version + 1
    assert int(await core.redis.hget(stats, "rv")) == v1.version + 1
    # now the first process is stale; its next reserve reloads and is decided by version 2,
    # under which web protects 9: market can have 10 - 2 - (9 - 1) = 0
    with pytest.raises(InsufficientStock):
        await core.reserve("m2", "market", [(a, "W", 1)], customer_id="c1")
    assert (await core.rules(max_age=3600)).version == v1.version + 1
    assert (await verify(core)).ok


async def test_replenishment_signals_on_a_cluster(core: ATP) -> None:
    """A multi-slot reservation raises each position's signal in its own slot; the list,
    the plan's position scan and the release that clears them work across masters."""
    from atp import ReplenishmentSettings

    a, b, c = skus_on_distinct_nodes(core, 3)
    for sku in (a, b, c):
        await core.set_position(sku, "W", 10, reason="init")
        await core.set_replenishment(sku, "W", 5, 20)
    await core.reserve("rp", "web", [(a, "W", 6), (b, "W", 2), (c, "W", 5)], hold_seconds=0)
    sigs = await core.replenishment()
    assert sorted((s.sku, s.suggested_qty) for s in sigs) == sorted([(a, 16), (c, 15)])
    await core.set_replenishment_settings(b, ReplenishmentSettings(0.95, 2, 0, 7))
    [row] = await core.plan_replenishment(dry_run=True)
    assert (row.sku, row.location) == (b, "W")
    rep = await verify(core)
    assert rep.ok, rep.problems
    await core.release("rp")
    assert await core.replenishment() == []
    rep = await verify(core)
    assert rep.ok, rep.problems
