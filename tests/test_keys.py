"""Key layout (atp.keys): everything one position's change touches is in one cluster slot."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from atp import ATP, FulfilLine, KeySpace, Settings

SKUS = ["A", "SKU-1", "sku.2", "a/b/c", "X_9-y.z", "0", "Z" * 64, *(f"S{i}" for i in range(200))]
LOCS = ["W1", "store-17", "dc/east.2", "L" * 64]


def slot(key: str) -> int:
    return key_slot(key.encode())


def slots(keys: Sequence[str]) -> set[int]:
    return {slot(k) for k in keys}


@pytest.mark.parametrize("prefix, buckets", [("atp:", 128), ("t:", 16), ("", 1), ("x.y-z_", 16384)])
def test_single_position_keys_share_one_slot(prefix: str, buckets: int) -> None:
    ks = KeySpace(prefix, buckets)
    for sku in SKUS:
        b = ks.bucket(sku)
        bk = ks.bucket_keys(b)
        for loc in LOCS:
            pk = ks.position(sku, loc)
            keys = [pk.pos, pk.hx, pk.log, bk.res, bk.holds, bk.events, bk.stats, ks.events(b)]
            assert len(slots(keys)) == 1, keys
            assert slot(pk.pos) == slot(ks.tag(b))
            assert ks.events(b) == bk.events
            assert ks.tag(b) in pk.pos
        # the index of a reservation homed in this bucket is in the same slot
        assert slot(f"{ks.tag(b)}:rix") == slot(bk.res)


def test_index_key_is_in_the_home_bucket_of_the_reservation_id() -> None:
    ks = KeySpace("atp:", 128)
    for rid in ["r1", "order-1:line", "x" * 128, *(f"res-{i}" for i in range(100))]:
        h = ks.bucket(rid)
        assert ks.index(rid) == f"{ks.tag(h)}:rix"
        assert slot(ks.index(rid)) == slot(ks.bucket_keys(h).res)


def test_different_skus_can_be_in_different_slots() -> None:
    ks = KeySpace("atp:", 128)
    pos_slots = {slot(ks.position(s, "W1").pos) for s in SKUS}
    assert len(pos_slots) > 10
    assert len({ks.bucket(s) for s in SKUS}) > 10
    # and the same SKU at two locations is one slot
    assert slot(ks.position("A", "W1").pos) == slot(ks.position("A", "W2").pos)


def test_bucket_is_stable() -> None:
    a, b = KeySpace("atp:", 128), KeySpace("other:", 128)
    for sku in SKUS:
        expected = zlib.crc32(sku.encode()) % 128
        assert a.bucket(sku) == b.bucket(sku) == expected
        assert a.bucket(sku) == a.bucket(sku)
    # pinned values (crc32 mod buckets): a change here re-homes every key of every deployment
    assert [a.bucket(s) for s in ("A", "SKU-1", "r1")] == [11, 52, 49]
    assert KeySpace("atp:", 16).bucket("SKU-1") == 3993447348 % 16
    assert a.bucket("A") == 11
    assert a.tag(11) == "{atp:11}"
    assert a.position("A", "W1").pos == "{atp:11}:pos:A|W1"
    assert a.position("A", "W1").hx == "{atp:11}:hx:A|W1"
    assert a.position("A", "W1").log == "{atp:11}:log:A|W1"
    assert a.bucket_keys(11).res == "{atp:11}:res"
    assert a.bucket_keys(11).holds == "{atp:11}:holds"
    assert a.bucket_keys(11).events == "{atp:11}:events"


@pytest.mark.parametrize("prefix", ["{", "}", "a{b", "atp}:", "{atp}"])
def test_prefix_with_brace_rejected(prefix: str) -> None:
    with pytest.raises(ValueError):
        KeySpace(prefix, 128)
    with pytest.raises(ValidationError):
        Settings(key_prefix=prefix)


@pytest.mark.parametrize("buckets", [0, -1, 16385])
def test_bucket_count_bounded(buckets: int) -> None:
    with pytest.raises(ValueError):
        KeySpace("atp:", buckets)


def test_keys_pattern_and_tags() -> None:
    ks = KeySpace("t:", 16)
    assert ks.keys_pattern() == "{t:*}:*"
    assert len(ks.all_events()) == len(ks.all_holds()) == 16
    assert len(set(ks.all_events())) == 16
    # glob characters in the prefix are escaped in the SCAN pattern
    assert KeySpace("a*b?", 4).keys_pattern() == "{a\\*b\\?*}:*"


# -- the keys the core actually sends -----------------------------------------------------------


def record(core: ATP) -> list[tuple[str, list[str]]]:
    """Record (script, KEYS) of every script call the core makes from now on."""
    calls: list[tuple[str, list[str]]] = []
    inner = core.scripts.call

    async def call(client: Any, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        calls.append((name, list(keys)))
        return await inner(client, name, keys, args)

    core.scripts.call = call  # type: ignore[method-assign]
    return calls


def _rid_in_bucket(ks: KeySpace, bucket: int, other: bool = False) -> str:
    for i in range(10_000):
        rid = f"r{i}"
        if (ks.bucket(rid) == bucket) != other:
            return rid
    raise AssertionError("no id found")  # pragma: no cover


async def test_core_calls_touch_one_slot_per_position(atp: ATP) -> None:
    ks = atp.keys
    calls = record(atp)
    await atp.set_position("A", "W1", 10, reason="init")
    await atp.adjust("A", "W1", 1, reason="found")
    await atp.receive("A", "W1", 1, reference="PO")
    home = _rid_in_bucket(ks, ks.bucket("A"))
    away = _rid_in_bucket(ks, ks.bucket("A"), other=True)
    for rid in (home, away):
        await atp.reserve(rid, "web", [("A", "W1", 1)], hold_seconds=60)
        await atp.confirm(rid)
        await atp.fulfil(rid, [FulfilLine("A", "W1", shipped=1)])
    await atp.reserve("rel", "web", [("A", "W1", 1)], hold_seconds=60)
    await atp.release("rel")
    names = {n for n, _ in calls}
    assert names == {"set_position", "adjust", "receive", "reserve", "confirm", "fulfil", "release"}
    a_slot = slot(ks.position("A", "W1").pos)
    for name, keys in calls:
        if name in ("set_position", "adjust", "receive"):
            assert slots(keys) == {a_slot}, (name, keys)
        else:
            idx, rest = keys[0], keys[1:]
            assert idx.endswith(":rix")
            assert slots(rest) == {a_slot}, (name, keys)
    # with an id homed in the SKU's bucket the whole reservation call is one slot
    for name, keys in calls:
        if name in ("reserve", "confirm", "fulfil") and keys[0] == ks.index(home):
            assert slots(keys) == {a_slot}


async def test_multi_part_reservation_keys_one_slot_per_part(atp: ATP) -> None:
    ks = atp.keys
    skus: dict[int, list[str]] = {}
    for i in range(200):
        skus.setdefault(ks.bucket(f"S{i}"), []).append(f"S{i}")
    lines = [(s, "W1", 1) for group in list(skus.values())[:3] for s in group[:2]]
    for sku, loc, _ in lines:
        await atp.set_position(sku, loc, 5, reason="init")
    calls = record(atp)
    await atp.reserve("multi", "web", lines, hold_seconds=60)
    [(name, keys)] = calls
    assert name == "reserve"
    rest = keys[1:]
    # parts: 3 bucket keys then 3 keys per line, each part in its own single slot
    part_slots = []
    i = 0
    while i < len(rest):
        res = rest[i]
        assert res.endswith(":res")
        n = 3
        while i + n < len(rest) and not rest[i + n].endswith(":res"):
            n += 1
        part = rest[i : i + n]
        assert len(slots(part)) == 1, part
        part_slots.append(slot(res))
        i += n
    assert len(part_slots) == 3 == len(set(part_slots))


async def test_every_stored_key_carries_a_deployment_tag(atp: ATP) -> None:
    ks = atp.keys
    await atp.set_position("A", "W1", 10, reason="init")
    await atp.set_position("SKU-1", "W2", 10, reason="init")
    await atp.reserve("r1", "web", [("A", "W1", 1), ("SKU-1", "W2", 2)], hold_seconds=60)
    await atp.reserve("r2", "web", [("A", "W1", 1)], hold_seconds=0)
    tags = {ks.tag(b) for b in range(ks.buckets)}
    stored = [k.decode() async for k in atp.redis.scan_iter(count=1000)]
    assert stored
    matched = {k.decode() async for k in atp.redis.scan_iter(match=ks.keys_pattern(), count=1000)}
    assert matched == set(stored)
    for key in stored:
        tag = key[: key.index("}") + 1]
        assert tag in tags, key
