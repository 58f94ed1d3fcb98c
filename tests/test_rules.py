"""The allocation rules document (atp.rules): validation, how a SKU's figures resolve from
the default, the SKU and the location, and versions applied through the core: history,
``expect_version``, and another process picking a new version up on its next reserve."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from atp import ATP, EmbeddedServer, InsufficientStock, InvalidRequest, Settings
from atp.errors import InvalidRules, RulesVersionConflict
from atp.rules import EMPTY_RULES, MAX_QTY, Rules, RulesDocument, parse_rules
from atp.verify import verify

# -- validation -------------------------------------------------------------------------------


def errors_of(doc: Any) -> list[tuple[list[Any], str]]:
    with pytest.raises(InvalidRules) as ei:
        parse_rules(doc)
    assert isinstance(ei.value, InvalidRequest)  # a 4xx, like any bad input
    assert ei.value.errors, ei.value.detail
    return [(e["loc"], e["msg"]) for e in ei.value.errors]


def locs_of(doc: Any) -> list[list[Any]]:
    return [loc for loc, _ in errors_of(doc)]


def ch(**rule: Any) -> dict[str, Any]:
    """A document with one channel ``web`` having ``rule``."""
    return {"channels": {"web": rule}}


def default(**rule: Any) -> dict[str, Any]:
    """A document with channels web and market and the default SKU rule ``rule``."""
    return {"channels": {"web": {}, "market": {}}, "default": rule}


GOOD: dict[str, Any] = {
    "priority-0": ch(priority=0),
    "priority-max": ch(priority=1_000_000),
    "locations-64": ch(locations=[f"L{i}" for i in range(64)]),
    "locations-empty": ch(locations=[]),
    "location-64-chars": ch(locations=["L" * 64]),
    "regions-256": ch(regions={f"R{i}": ["W1"] for i in range(256)}),
    "region-32-chars": ch(regions={"R" * 32: ["W1"]}),
    "allow-split": ch(allow_split=True),
    "channel-32-chars": {"channels": {"c" * 32: {}}},
    "protect-0": default(protect={"web": 0}),
    "protect-max": default(protect={"web": MAX_QTY}),
    "cap-0": default(cap={"market": 0}),
    "cap-max": default(cap={"market": MAX_QTY}),
    "buyer-limit-1": default(buyer_limit=1),
    "buyer-limit-max": default(buyer_limit=MAX_QTY),
    "buyer-limit-null": default(buyer_limit=None),
    "description-2000": {"description": "d" * 2000},
    "sku-64-chars": {"skus": {"S" * 64: {}}},
    "empty": {},
}

BAD: dict[str, tuple[Any, list[Any]]] = {
    # name: (document, the loc of the one error expected)
    "priority-negative": (ch(priority=-1), ["channels", "web", "priority"]),
    "priority-over": (ch(priority=1_000_001), ["channels", "web", "priority"]),
    "priority-str": (ch(priority="5"), ["channels", "web", "priority"]),
    "priority-float": (ch(priority=1.5), ["channels", "web", "priority"]),
    "priority-bool": (ch(priority=True), ["channels", "web", "priority"]),
    "locations-65": (ch(locations=[f"L{i}" for i in range(65)]), ["channels", "web", "locations"]),
    "locations-str": (ch(locations="W1"), ["channels", "web", "locations"]),
    "location-bad": (ch(locations=["W|1"]), ["channels", "web", "locations", 0]),
    "location-65-chars": (ch(locations=["L" * 65]), ["channels", "web", "locations", 0]),
    "regions-257": (
        ch(regions={f"R{i}": ["W1"] for i in range(257)}),
        ["channels", "web", "regions"],
    ),
    "region-name-bad": (
        ch(regions={"E U": ["W1"]}),
        ["channels", "web", "regions", "E U", "[key]"],
    ),
    "region-name-33": (
        ch(regions={"R" * 33: ["W1"]}),
        ["channels", "web", "regions", "R" * 33, "[key]"],
    ),
    "region-location-bad": (ch(regions={"EU": ["{W}"]}), ["channels", "web", "regions", "EU", 0]),
    "allow-split-int": (ch(allow_split=1), ["channels", "web", "allow_split"]),
    "allow-split-str": (ch(allow_split="true"), ["channels", "web", "allow_split"]),
    "channel-upper": ({"channels": {"Web": {}}}, ["channels", "Web", "[key]"]),
    "channel-33": ({"channels": {"c" * 33: {}}}, ["channels", "c" * 33, "[key]"]),
    "channels-257": ({"channels": {f"c{i}": {} for i in range(257)}}, ["channels"]),
    "protect-negative": (default(protect={"web": -1}), ["default", "protect", "web"]),
    "protect-over": (default(protect={"web": MAX_QTY + 1}), ["default", "protect", "web"]),
    "protect-float": (default(protect={"web": 1.0}), ["default", "protect", "web"]),
    "cap-negative": (default(cap={"market": -1}), ["default", "cap", "market"]),
    "cap-over": (default(cap={"market": MAX_QTY + 1}), ["default", "cap", "market"]),
    "cap-str": (default(cap={"market": "3"}), ["default", "cap", "market"]),
    "buyer-limit-0": (default(buyer_limit=0), ["default", "buyer_limit"]),
    "buyer-limit-over": (default(buyer_limit=MAX_QTY + 1), ["default", "buyer_limit"]),
    "buyer-limit-float": (default(buyer_limit=2.5), ["default", "buyer_limit"]),
    "description-2001": ({"description": "d" * 2001}, ["description"]),
    "description-int": ({"description": 5}, ["description"]),
    "sku-bad": ({"skus": {"a|b": {}}}, ["skus", "a|b", "[key]"]),
    "sku-location-bad": (
        {"skus": {"A": {"locations": {"W{1}": {}}}}},
        ["skus", "A", "locations", "W{1}", "[key]"],
    ),
    "sku-cap-negative": (
        {"channels": {"web": {}}, "skus": {"A": {"cap": {"web": -2}}}},
        ["skus", "A", "cap", "web"],
    ),
    "location-protect-over": (
        {"channels": {"web": {}}, "skus": {"A": {"locations": {"W1": {"protect": {"web": -1}}}}}},
        ["skus", "A", "locations", "W1", "protect", "web"],
    ),
    "not-a-mapping": ([1, 2], []),
    # extra fields, at every level
    "extra-top": ({"version": 3}, ["version"]),
    "extra-channel": (ch(prio=1), ["channels", "web", "prio"]),
    "extra-default": (default(limit=1), ["default", "limit"]),
    "extra-sku": ({"skus": {"A": {"protected": {}}}}, ["skus", "A", "protected"]),
    "extra-location": (
        {"skus": {"A": {"locations": {"W1": {"cap": {}}}}}},
        ["skus", "A", "locations", "W1", "cap"],
    ),
}


@pytest.mark.parametrize("doc", GOOD.values(), ids=GOOD.keys())
def test_documents_at_the_bounds_are_valid(doc: Any) -> None:
    parsed = parse_rules(doc)
    assert isinstance(parsed, RulesDocument)
    assert parse_rules(json.dumps(doc)) == parsed  # JSON text gives the same document
    assert parse_rules(json.dumps(doc).encode()) == parsed
    assert parse_rules(parsed) is parsed


@pytest.mark.parametrize("doc, loc", BAD.values(), ids=BAD.keys())
def test_documents_out_of_bounds_are_refused_with_where(doc: Any, loc: list[Any]) -> None:
    [(got, msg)] = errors_of(doc)
    assert got == loc, msg
    assert msg
    # the same problem in JSON text is found at the same place
    assert [e for e, _ in errors_of(json.dumps(doc))] == [loc]


def test_every_problem_is_reported_at_once() -> None:
    doc = {"channels": {"web": {"priority": -1, "locations": ["W|1"]}}, "default": {"cap": 1}}
    assert sorted(map(str, locs_of(doc))) == sorted(
        map(
            str,
            [
                ["channels", "web", "priority"],
                ["channels", "web", "locations", 0],
                ["default", "cap"],
            ],
        )
    )


def test_unknown_channels_are_named_with_their_path() -> None:
    doc = {
        "channels": {"web": {}},
        "default": {"protect": {"web": 1, "stores": 2}, "cap": {"market": 3}},
        "skus": {
            "A": {
                "protect": {"app": 1},
                "cap": {"web": 1, "kiosk": 1},
                "locations": {"W1": {"protect": {"pos": 1}}},
            },
        },
    }
    errs = errors_of(doc)
    assert [loc for loc, _ in errs] == [
        ["default", "protect", "stores"],
        ["default", "cap", "market"],
        ["skus", "A", "protect", "app"],
        ["skus", "A", "cap", "kiosk"],
        ["skus", "A", "locations", "W1", "protect", "pos"],
    ]
    assert all("not declared" in msg for _, msg in errs)
    # the default's own location overrides are checked too
    loc_doc = {"channels": {"web": {}}, "default": {"locations": {"W1": {"protect": {"x": 1}}}}}
    assert locs_of(loc_doc) == [["default", "locations", "W1", "protect", "x"]]


def test_a_location_listed_twice_is_refused() -> None:
    doc = {
        "channels": {
            "web": {"locations": ["W1", "W2", "W1"], "regions": {"EU": ["W2", "W2"], "US": ["W1"]}},
            "app": {"regions": {"APAC": ["W3", "W4", "W3"]}},
        }
    }
    errs = errors_of(doc)
    assert [loc for loc, _ in errs] == [
        ["channels", "web", "locations"],
        ["channels", "web", "regions", "EU"],
        ["channels", "app", "regions", "APAC"],
    ]
    assert all("twice" in msg for _, msg in errs)


def test_bad_json_text_is_invalid_rules() -> None:
    assert errors_of("{not json")
    assert errors_of(b"[")


# -- resolution -------------------------------------------------------------------------------

DOC: dict[str, Any] = {
    "channels": {
        "web": {"priority": 100, "locations": ["DC1", "DC2"], "regions": {"EU": ["DC2", "DC1"]}},
        "stores": {"priority": 50, "locations": ["DC2"], "allow_split": True},
        "market": {"priority": 10},
    },
    "default": {
        "protect": {"web": 5, "stores": 1},
        "cap": {"market": 100},
        "buyer_limit": 4,
        "locations": {"DC2": {"protect": {"stores": 3}}},
    },
    "skus": {
        "FLASH-1": {
            "protect": {"web": 50, "stores": 2},
            "cap": {"market": 20, "web": 30},
            "buyer_limit": 1,
            "locations": {"DC2": {"protect": {"stores": 10, "web": 0}}},
        },
        "OPEN": {"buyer_limit": None, "protect": {"web": 0}},
        "PLAIN": {"cap": {"web": 7}},
        "MID": {"protect": {"stores": 2}},
    },
}


def test_protections_layer_default_location_sku_and_sku_location() -> None:
    r = Rules(1, parse_rules(DOC))
    # an SKU the rules do not name: the default, and the default's location override
    assert r.protections("OTHER", "DC1") == (("stores", 1), ("web", 5))
    assert r.protections("OTHER", "DC2") == (("stores", 3), ("web", 5))
    # the SKU's own protect wins over the default's, channel by channel
    assert r.protections("FLASH-1", "DC1") == (("stores", 2), ("web", 50))
    # and the SKU's location wins over everything; 0 removes a channel's protection
    assert r.protections("FLASH-1", "DC2") == (("stores", 10),)
    assert r.protections("FLASH-1", "DC9") == (("stores", 2), ("web", 50))
    # the SKU's protect (stores unset: the default's location for stores) wins over the
    # default's location only for the channels it names
    assert r.protections("OPEN", "DC2") == (("stores", 3),)
    assert r.protections("OPEN", "DC1") == (("stores", 1),)
    assert r.protections("PLAIN", "DC2") == (("stores", 3), ("web", 5))
    # the SKU's own figure is more specific than the default's location override
    assert r.protections("MID", "DC2") == (("stores", 2), ("web", 5))
    assert r.protections("MID", "DC1") == (("stores", 2), ("web", 5))
    # cached per version: the same answer again
    assert r.protections("FLASH-1", "DC2") == (("stores", 10),)


def test_caps_resolve_per_sku_then_default() -> None:
    r = Rules(1, parse_rules(DOC))
    assert r.cap("FLASH-1", "market") == 20
    assert r.cap("FLASH-1", "web") == 30
    assert r.cap("FLASH-1", "stores") is None
    assert r.cap("PLAIN", "market") == 100  # the SKU names web only: market from the default
    assert r.cap("PLAIN", "web") == 7
    assert r.cap("OTHER", "market") == 100
    assert r.cap("OTHER", "web") is None


def test_buyer_limit_null_is_no_limit_absent_is_the_default() -> None:
    r = Rules(1, parse_rules(DOC))
    assert r.buyer_limit("FLASH-1") == 1
    assert r.buyer_limit("OPEN") is None  # null: no limit for this SKU
    assert r.buyer_limit("PLAIN") == 4  # absent: the default's
    assert r.buyer_limit("OTHER") == 4
    assert Rules(1, parse_rules({"skus": {"A": {}}})).buyer_limit("A") is None
    # and it survives the document's round trip through storage
    stored = r.to_dict()["rules"]
    assert stored["skus"]["OPEN"] == {"buyer_limit": None, "protect": {"web": 0}}
    assert "buyer_limit" not in stored["skus"]["PLAIN"]
    again = Rules(2, parse_rules(stored))
    assert (again.buyer_limit("OPEN"), again.buyer_limit("PLAIN")) == (None, 4)


def test_routing_priorities_and_split() -> None:
    r = Rules(1, parse_rules(DOC))
    assert r.route("web") == ("DC1", "DC2")
    assert r.route("web", "EU") == ("DC2", "DC1")
    assert r.route("web", "US") == ("DC1", "DC2")  # a region the channel does not list
    assert r.route("stores", "EU") == ("DC2",)
    assert r.route("market") == ()
    assert r.route("unknown") == ()
    assert (r.allow_split("web"), r.allow_split("stores"), r.allow_split("unknown")) == (
        False,
        True,
        False,
    )
    assert r.priorities() == {"web": 100, "stores": 50, "market": 10}
    assert (r.priority("web"), r.priority("unknown")) == (100, 0)
    assert not r.empty and EMPTY_RULES.empty
    assert EMPTY_RULES.route("web") == () and EMPTY_RULES.cap("A", "web") is None
    assert EMPTY_RULES.protections("A", "W") == () and EMPTY_RULES.buyer_limit("A") is None


# -- versions through the core ----------------------------------------------------------------


def doc_v(n: int) -> dict[str, Any]:
    return {"description": f"version {n}", "channels": {"web": {"priority": n}}}


async def test_no_rules_is_version_zero(atp: ATP) -> None:
    rules = await atp.rules(max_age=0)
    assert rules.version == 0 and rules.empty
    assert rules.to_dict() == {"version": 0, "applied_at": None, "applied_by": "", "rules": {}}
    await atp.set_position("A", "W1", 5)
    r = await atp.reserve("r1", "web", [("A", "W1", 1)], hold_seconds=0)
    assert r.rules_version == 0


async def test_apply_versions_history_and_expect_version(atp: ATP) -> None:
    r1 = await atp.apply_rules(doc_v(1), actor="ann")
    r2 = await atp.apply_rules(json.dumps(doc_v(2)), actor="bob", expect_version=1)
    r3 = await atp.apply_rules(parse_rules(doc_v(3)))
    assert [r1.version, r2.version, r3.version] == [1, 2, 3]
    assert r1.applied_at is not None and r2.applied_at is not None
    assert r1.applied_at <= r2.applied_at
    assert (r1.applied_by, r2.applied_by, r3.applied_by) == ("ann", "bob", "")
    now = await atp.rules(max_age=0)
    assert now.version == 3 and now.document.description == "version 3"
    assert now.to_dict()["rules"] == doc_v(3)
    # every bucket enforces the version now (one server: in the same script)
    for b in range(atp.keys.buckets):
        assert int(await atp.redis.hget(atp.keys.bucket_keys(b).stats, "rv") or 0) == 3
    # history: each version as it was applied
    for v, who in [(1, "ann"), (2, "bob"), (3, "")]:
        old = await atp.rules_version(v)
        assert old is not None
        assert old.version == v and old.applied_by == who
        assert old.document == parse_rules(doc_v(v))
    assert await atp.rules_version(4) is None
    with pytest.raises(InvalidRequest):
        await atp.rules_version(0)

    # expect_version: an editor that read version 2 may not overwrite version 3
    doc_before = await atp.redis.hgetall(atp.keys.rules_doc())
    with pytest.raises(RulesVersionConflict) as ei:
        await atp.apply_rules(doc_v(4), expect_version=2)
    assert ei.value.extra["version"] == 3
    assert await atp.redis.hgetall(atp.keys.rules_doc()) == doc_before
    assert await atp.rules_version(4) is None
    assert (await atp.apply_rules(doc_v(4), expect_version=3)).version == 4
    with pytest.raises(InvalidRequest):
        await atp.apply_rules(doc_v(5), expect_version=-1)


async def test_expect_version_zero_on_a_fresh_store(atp: ATP) -> None:
    assert (await atp.apply_rules(doc_v(1), expect_version=0)).version == 1
    with pytest.raises(RulesVersionConflict):
        await atp.apply_rules(doc_v(1), expect_version=0)


async def test_an_invalid_document_writes_nothing(atp: ATP) -> None:
    await atp.apply_rules(doc_v(1))
    before = await atp.redis.hgetall(atp.keys.rules_doc())
    history = await atp.redis.hgetall(atp.keys.rules_history())
    with pytest.raises(InvalidRules):
        await atp.apply_rules({"default": {"cap": {"nobody": 1}}})
    with pytest.raises(InvalidRequest):
        await atp.apply_rules(doc_v(2), actor="a" * 129)
    assert await atp.redis.hgetall(atp.keys.rules_doc()) == before
    assert await atp.redis.hgetall(atp.keys.rules_history()) == history
    assert (await atp.rules(max_age=0)).version == 1


@pytest.fixture
async def second(server: EmbeddedServer, settings: Settings) -> AsyncIterator[ATP]:
    """Another process's core on the same server (its own connection pool and cache)."""
    core = ATP(aioredis.Redis.from_url(server.url), settings)
    try:
        yield core
    finally:
        await core.aclose()


async def test_another_instance_enforces_a_new_version_on_its_next_reserve(
    atp: ATP, second: ATP
) -> None:
    await atp.set_position("A", "W1", 10)
    await atp.apply_rules({"channels": {"web": {}, "market": {}}})
    await second.start()
    assert (await second.rules()).version == 1
    r = await second.reserve("m1", "market", [("A", "W1", 2)], hold_seconds=0)
    assert r.rules_version == 1

    # version 2 protects 6 units for web; `second` still has version 1 cached (its cache
    # is fresh, so nothing re-reads the rules before the script refuses the stale version)
    v2 = {"channels": {"web": {}, "market": {}}, "default": {"protect": {"web": 6}}}
    await atp.apply_rules(v2, actor="ops")
    assert second._rules.version == 1
    with pytest.raises(InsufficientStock) as ei:
        await second.reserve("m2", "market", [("A", "W1", 3)], hold_seconds=0)
    assert ei.value.lines == [
        {"sku": "A", "location": "W1", "requested": 3, "available": 2, "limited_by": "protection"}
    ]
    assert second._rules.version == 2  # reloaded on the refusal, then decided by version 2
    r = await second.reserve("m3", "market", [("A", "W1", 2)], hold_seconds=0)
    assert r.rules_version == 2
    assert (await atp.reservation("m3")).rules_version == 2
    assert (await atp.reservation("m1")).rules_version == 1

    # version 3 drops the protection: a reserve by `second` is decided by it at once
    await atp.apply_rules({"channels": {"web": {}, "market": {}}})
    r = await second.reserve("m4", "market", [("A", "W1", 6)], hold_seconds=0)
    assert r.rules_version == 3
    # and explain on a stale cache retries the same way
    await atp.apply_rules(v2)
    e = await second.explain("A", "W1", "market")
    assert e is not None and e.rules_version == 4
    rep = await verify(atp)
    assert rep.ok, rep.problems


async def test_concurrent_stale_readers_share_one_read(atp: ATP) -> None:
    await atp.apply_rules({"channels": {"web": {"priority": 3}}})
    other = ATP(atp.redis, atp.settings)  # a process that has not seen version 1
    reads = 0
    hget = other.redis.hget

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await hget(*args, **kwargs)

    other.redis.hget = counting  # type: ignore[method-assign]
    try:
        got = await asyncio.gather(*(other.rules(max_age=0) for _ in range(200)))
    finally:
        other.redis.hget = hget  # type: ignore[method-assign]
    assert {r.version for r in got} == {1}
    assert reads == 1
