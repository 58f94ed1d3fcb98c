"""The allocation rules over HTTP: ``PUT``/``GET /v1/rules`` (versions, ETag and If-Match,
invalid documents), reservations under the rules (routing, buyer limits, protection, caps,
their problem answers), ``GET /v1/availability/explain`` and its figures, availability
for a customer. Every refusal is shown to change nothing."""

from __future__ import annotations

import json
import random
from datetime import datetime
from typing import Any

import httpx
import pytest
from api_support import ADMIN_KEY, Headers, NewKey, Seed, assert_problem, bearer, snapshot

from atp import ATP
from atp.errors import RulesStale
from atp.verify import verify

RULES_FIELDS = {"version", "applied_at", "applied_by", "rules"}
EXPLAIN = "/v1/availability/explain"

DOC: dict[str, Any] = {
    "description": "flash sale",
    "channels": {
        "web": {"priority": 100, "locations": ["DC1", "DC2"], "regions": {"EU": ["DC2", "DC1"]}},
        "stores": {"priority": 50, "locations": ["DC2"], "allow_split": True},
        "market": {"priority": 10},
    },
    "default": {"protect": {"web": 3}, "cap": {"market": 20}},
    "skus": {"FLASH-1": {"buyer_limit": 2, "cap": {"market": 5}}},
}


async def put_rules(
    client: httpx.AsyncClient, doc: Any, headers: Headers, **extra: str
) -> httpx.Response:
    return await client.put("/v1/rules", json=doc, headers={**headers, **extra})


async def applied(client: httpx.AsyncClient, admin: Headers, doc: Any = DOC) -> int:
    r = await put_rules(client, doc, admin)
    assert r.status_code == 200, r.text
    version: int = r.json()["version"]
    return version


async def reserve(
    client: httpx.AsyncClient,
    headers: Headers,
    rid: str,
    *lines: tuple[str, str | None, int],
    channel: str = "web",
    **extra: Any,
) -> httpx.Response:
    body: dict[str, Any] = {
        "reservation_id": rid,
        "channel": channel,
        "lines": [
            {"sku": s, "qty": q} if loc is None else {"sku": s, "location": loc, "qty": q}
            for s, loc, q in lines
        ],
        **extra,
    }
    return await client.post("/v1/reservations", json=body, headers=headers)


async def explain(client: httpx.AsyncClient, headers: Headers, **params: Any) -> httpx.Response:
    return await client.get(EXPLAIN, params=params, headers=headers)


# -- PUT and GET /v1/rules ---------------------------------------------------------------


async def test_no_rules_is_version_0(client: httpx.AsyncClient, admin: Headers) -> None:
    r = await client.get("/v1/rules", headers=admin)
    assert r.status_code == 200
    assert r.headers["etag"] == '"0"'
    assert r.json() == {"version": 0, "applied_at": None, "applied_by": "", "rules": {}}


async def test_put_then_get_rules(client: httpx.AsyncClient, admin: Headers) -> None:
    made = await client.post("/v1/keys", json={"name": "ops", "scopes": ["admin"]}, headers=admin)
    key_id, secret = made.json()["id"], made.json()["key"]
    r = await put_rules(client, DOC, bearer(secret))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["etag"] == '"1"'
    out = r.json()
    assert set(out) == RULES_FIELDS
    assert out["version"] == 1
    # the caller's key id, never its secret
    assert out["applied_by"] == key_id and secret not in r.text
    assert datetime.fromisoformat(out["applied_at"]).tzinfo is not None
    assert out["rules"] == DOC  # as applied: what was set, nothing added

    r = await client.get("/v1/rules", headers=admin)
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    assert r.json() == out

    second = {"channels": {"web": {"priority": 1}}}
    r = await put_rules(client, second, admin)
    assert r.status_code == 200 and r.json()["version"] == 2
    assert r.json()["applied_by"] == "bootstrap"
    assert (await client.get("/v1/rules", headers=admin)).json()["rules"] == second
    # an earlier version, as it was applied
    r = await client.get("/v1/rules", params={"version": 1}, headers=admin)
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    assert r.json() == out
    r = await client.get("/v1/rules", params={"version": 3}, headers=admin)
    assert_problem(r, 404, "not_found")
    r = await client.get("/v1/rules", params={"version": 0}, headers=admin)
    body = assert_problem(r, 422, "validation_error")
    assert body["errors"][0]["field"] == "query.version"


async def test_a_new_version_is_in_force_at_once(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP
) -> None:
    """The answer to PUT means the rules hold, in this process and every other."""
    await seed("SKU-1", "DC1", 10)
    await applied(client, admin, {"channels": {"web": {}, "market": {}}})
    r = await reserve(client, admin, "m-1", ("SKU-1", "DC1", 8), channel="market")
    assert r.status_code == 201 and r.json()["rules_version"] == 1
    v = await applied(
        client, admin, {"channels": {"web": {}, "market": {}}, "default": {"protect": {"web": 5}}}
    )
    r = await reserve(client, admin, "m-2", ("SKU-1", "DC1", 1), channel="market")
    problem = assert_problem(r, 409, "insufficient_stock")
    assert problem["lines"][0]["limited_by"] == "protection"
    r = await reserve(client, admin, "w-1", ("SKU-1", "DC1", 2))
    assert r.status_code == 201 and r.json()["rules_version"] == v


async def test_if_match(client: httpx.AsyncClient, admin: Headers) -> None:
    doc = {"channels": {"web": {"priority": 1}}}
    r = await put_rules(client, doc, admin, **{"If-Match": '"0"'})
    assert r.status_code == 200 and r.json()["version"] == 1
    r = await put_rules(client, doc, admin, **{"If-Match": '"1"'})
    assert r.status_code == 200 and r.json()["version"] == 2
    # based on a version no longer in force: 412, the current version in the body and ETag
    before = (await client.get("/v1/rules", headers=admin)).json()
    for stale in ('"1"', '"7"', 'W/"2"', "2", '"x"', '"1", "3"'):
        r = await put_rules(client, {"channels": {}}, admin, **{"If-Match": stale})
        body = assert_problem(r, 412, "rules_version_conflict")
        assert body["version"] == 2 and r.headers["etag"] == '"2"', stale
        assert "2" in body["detail"]
    assert (await client.get("/v1/rules", headers=admin)).json() == before
    # any of a list, and "*"
    r = await put_rules(client, doc, admin, **{"If-Match": '"1", "2"'})
    assert r.status_code == 200 and r.json()["version"] == 3
    r = await put_rules(client, doc, admin, **{"If-Match": "*"})
    assert r.status_code == 200 and r.json()["version"] == 4
    assert r.headers["etag"] == '"4"'


INVALID: list[tuple[str, Any, list[Any]]] = [
    (
        "undeclared channel",
        {"channels": {"web": {}}, "default": {"protect": {"market": 5}}},
        ["default", "protect", "market"],
    ),
    (
        "undeclared channel in a location",
        {"channels": {"web": {}}, "skus": {"A": {"locations": {"DC1": {"protect": {"x": 1}}}}}},
        ["skus", "A", "locations", "DC1", "protect", "x"],
    ),
    ("wrong type", {"channels": {"web": {"priority": "high"}}}, ["channels", "web", "priority"]),
    ("fraction", {"channels": {"web": {"priority": 1.5}}}, ["channels", "web", "priority"]),
    ("negative protection", {"channels": {"web": {}}, "default": {"protect": {"web": -1}}},
     ["default", "protect", "web"]),
    ("buyer limit 0", {"default": {"buyer_limit": 0}}, ["default", "buyer_limit"]),
    ("unknown field", {"channel": {}}, ["channel"]),
    ("bad channel name", {"channels": {"Web!": {}}}, ["channels", "Web!", "[key]"]),
    ("location twice", {"channels": {"web": {"locations": ["DC1", "DC1"]}}},
     ["channels", "web", "locations"]),
    ("not an object", [1, 2], []),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "loc"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
async def test_invalid_document_is_422_and_changes_nothing(
    client: httpx.AsyncClient, admin: Headers, atp: ATP, doc: Any, loc: list[Any]
) -> None:
    await applied(client, admin, {"channels": {"web": {}}})
    before = await snapshot(atp)
    r = await put_rules(client, doc, admin)
    body = assert_problem(r, 422, "invalid_rules")
    assert body["title"] == "Invalid rules document"
    assert body["errors"], body
    for e in body["errors"]:
        assert set(e) == {"loc", "msg"} and isinstance(e["loc"], list) and e["msg"]
    assert loc in [e["loc"] for e in body["errors"]], body["errors"]
    assert await snapshot(atp) == before
    assert (await client.get("/v1/rules", headers=admin)).json()["version"] == 1


async def test_every_problem_of_a_document_is_listed(
    client: httpx.AsyncClient, admin: Headers
) -> None:
    doc = {"channels": {"web": {"priority": -1, "locations": "DC1"}}, "extra": 1}
    body = assert_problem(await put_rules(client, doc, admin), 422, "invalid_rules")
    locs = sorted(tuple(e["loc"]) for e in body["errors"])
    assert locs == [("channels", "web", "locations"), ("channels", "web", "priority"), ("extra",)]


async def test_not_json_and_bad_headers_are_validation_errors(
    client: httpx.AsyncClient, admin: Headers, atp: ATP
) -> None:
    before = await snapshot(atp)
    r = await client.put(
        "/v1/rules", content=b'{"channels": ', headers={**admin, "content-type": "application/json"}
    )
    assert_problem(r, 422, "validation_error")
    r = await client.put("/v1/rules", headers=admin)  # no document at all
    assert_problem(r, 422, "invalid_rules")
    r = await put_rules(client, {}, admin, **{"If-Match": '"' + "1" * 1000 + '"'})
    body = assert_problem(r, 422, "validation_error")
    assert body["errors"][0]["field"] == "header.If-Match"
    assert await snapshot(atp) == before


async def test_whole_number_floats_are_integers(client: httpx.AsyncClient, admin: Headers) -> None:
    doc = {"channels": {"web": {"priority": 100.0}}, "default": {"buyer_limit": 2e0}}
    r = await put_rules(client, doc, admin)
    assert r.status_code == 200, r.text
    assert r.json()["rules"] == {
        "channels": {"web": {"priority": 100}},
        "default": {"buyer_limit": 2},
    }


async def test_rules_document_is_published(app: Any) -> None:
    doc = app.openapi()
    put = doc["paths"]["/v1/rules"]["put"]
    schema = put["requestBody"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/RulesDocument")
    assert {"200", "401", "403", "412", "422"} <= set(put["responses"])
    assert "ETag" in put["responses"]["200"]["headers"]
    parts = doc["components"]["schemas"]
    assert {"RulesDocument", "ChannelRule", "SkuRule", "LocationRule", "RulesOut"} <= set(parts)
    # a map's names are checked, and the schema says so
    assert parts["RulesDocument"]["properties"]["channels"]["additionalProperties"] is False


# -- reservations under the rules --------------------------------------------------------


async def test_routed_line_takes_the_first_location_that_holds_it(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP
) -> None:
    await seed("SKU-1", "DC1", 4)
    await seed("SKU-1", "DC2", 20)
    web = {"locations": ["DC1", "DC2"], "regions": {"EU": ["DC2", "DC1"]}}
    v = await applied(client, admin, {"channels": {"web": web}})
    r = await reserve(client, admin, "r-1", ("SKU-1", None, 3), customer_id="c-1")
    assert r.status_code == 201, r.text
    out = r.json()
    assert (out["customer_id"], out["rules_version"]) == ("c-1", v)
    assert [(ln["sku"], ln["location"], ln["qty"]) for ln in out["lines"]] == [("SKU-1", "DC1", 3)]
    # DC1 has 1 left: the next goes to DC2
    r = await reserve(client, admin, "r-2", ("SKU-1", None, 2))
    assert [(ln["location"], ln["qty"]) for ln in r.json()["lines"]] == [("DC2", 2)]
    # the region's list comes first
    r = await reserve(client, admin, "r-3", ("SKU-1", None, 1), region="EU")
    assert [(ln["location"], ln["qty"]) for ln in r.json()["lines"]] == [("DC2", 1)]
    # null is the same as leaving the location out; the answer reads back the same
    line = {"sku": "SKU-1", "location": None, "qty": 1}
    body = {"reservation_id": "r-4", "channel": "web", "lines": [line]}
    r = await client.post("/v1/reservations", json=body, headers=admin)
    assert r.status_code == 201 and r.json()["lines"][0]["location"] == "DC1"
    got = await client.get("/v1/reservations/r-1", headers=admin)
    assert got.json() == out
    report = await verify(atp)
    assert report.ok, report.problems


async def test_split_only_when_allowed(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP
) -> None:
    await seed("SKU-1", "DC1", 4)
    await seed("SKU-1", "DC2", 5)
    await applied(client, admin, {"channels": {"web": {"locations": ["DC1", "DC2"]}}})
    before = await snapshot(atp)
    r = await reserve(client, admin, "big", ("SKU-1", None, 7))
    problem = assert_problem(r, 409, "insufficient_stock")
    assert problem["lines"] == [
        {"sku": "SKU-1", "location": None, "requested": 7, "available": 5, "limited_by": "stock"}
    ]
    assert await snapshot(atp) == before
    r = await reserve(client, admin, "big", ("SKU-1", None, 7), allow_split=True)
    assert r.status_code == 201, r.text
    assert sorted((ln["location"], ln["qty"]) for ln in r.json()["lines"]) == [
        ("DC1", 4),
        ("DC2", 3),
    ]
    # a replay answers the same split
    again = await reserve(client, admin, "big", ("SKU-1", None, 7), allow_split=True)
    assert again.status_code == 201 and again.json()["lines"] == r.json()["lines"]


async def test_no_route_is_422_and_changes_nothing(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP
) -> None:
    await seed("SKU-1", "DC1", 4)
    before = await snapshot(atp)
    # no rules at all, then a channel without locations
    for _ in range(2):
        r = await reserve(client, admin, "r-1", ("SKU-1", None, 1))
        body = assert_problem(r, 422, "no_route")
        assert body["title"] == "No route"
        assert body["errors"] == [{"field": "location", "message": body["detail"]}]
        assert await snapshot(atp) == before
        await applied(client, admin, {"channels": {"web": {}}})
        before = await snapshot(atp)


async def test_buyer_limit(client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP) -> None:
    await seed("FLASH-1", "DC1", 100)
    await seed("FLASH-1", "DC2", 100)
    await applied(client, admin)
    before = await snapshot(atp)
    r = await reserve(client, admin, "r-0", ("FLASH-1", "DC1", 1))
    body = assert_problem(r, 422, "customer_required")
    assert body["sku"] == "FLASH-1"
    assert body["errors"] == [{"field": "customer_id", "message": body["detail"]}]
    assert await snapshot(atp) == before

    r = await reserve(
        client, admin, "r-1", ("FLASH-1", "DC1", 1), customer_id="c-1", hold_seconds=600
    )
    assert r.status_code == 201, r.text
    # over all locations, and held units count
    before = await snapshot(atp)
    r = await reserve(client, admin, "r-2", ("FLASH-1", "DC2", 2), customer_id="c-1")
    body = assert_problem(r, 409, "buyer_limit_exceeded")
    assert body["title"] == "Buyer limit exceeded"
    assert {k: body[k] for k in ("sku", "limit", "held", "requested")} == {
        "sku": "FLASH-1", "limit": 2, "held": 1, "requested": 2,
    }  # fmt: skip
    assert await snapshot(atp) == before
    # another buyer is not limited by this one; a released reservation no longer counts
    r = await reserve(client, admin, "r-3", ("FLASH-1", "DC2", 2), customer_id="c-2")
    assert r.status_code == 201
    assert (await client.post("/v1/reservations/r-1/release", headers=admin)).status_code == 200
    r = await reserve(client, admin, "r-4", ("FLASH-1", "DC2", 2), customer_id="c-1")
    assert r.status_code == 201
    text = (await client.get("/metrics")).text
    assert 'outcome="buyer_limit_exceeded"' in text
    assert 'outcome="customer_required"' in text


async def test_cap_and_protection_say_what_limited(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("FLASH-1", "DC1", 10)
    # market: cap 5 on FLASH-1; web protected 3 everywhere
    await applied(client, admin, {**DOC, "skus": {"FLASH-1": {"cap": {"market": 5}}}})
    r = await reserve(
        client, admin, "m-1", ("FLASH-1", "DC1", 6), channel="market", customer_id="m"
    )
    problem = assert_problem(r, 409, "insufficient_stock")
    assert problem["lines"][0]["limited_by"] == "cap" and problem["lines"][0]["available"] == 5
    r = await reserve(
        client, admin, "m-1", ("FLASH-1", "DC1", 5), channel="market", customer_id="m"
    )
    assert r.status_code == 201
    await seed("OTHER", "DC1", 5)
    r = await reserve(client, admin, "m-2", ("OTHER", "DC1", 3), channel="market")
    problem = assert_problem(r, 409, "insufficient_stock")
    assert problem["lines"][0]["limited_by"] == "protection"
    assert problem["lines"][0]["available"] == 2


@pytest.mark.parametrize("fast_lane", [True, False])
async def test_rules_stale_is_503_with_retry_after(
    settings: Any, atp: ATP, admin: Headers, monkeypatch: pytest.MonkeyPatch, fast_lane: bool
) -> None:
    from api.app import create_app

    async def stale(*_: Any, **__: Any) -> Any:
        raise RulesStale("the allocation rules kept changing; try again")

    monkeypatch.setattr(atp, "reserve", stale)
    app = create_app(settings, core=atp, fast_lane=fast_lane)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await reserve(c, admin, "r-1", ("SKU-1", "DC1", 1))
    assert_problem(r, 503, "rules_stale")
    assert r.headers["retry-after"] == "1"


# -- explain and availability ------------------------------------------------------------


def adds_up(e: dict[str, Any]) -> None:
    """The explanation's own arithmetic (models.Explanation)."""
    assert e["position_atp"] == (
        e["on_hand"] - e["committed"] - e["safety_stock"] - e["protected_for_others_total"]
    ), e
    assert e["protected_for_others_total"] == sum(e["protected_for_others"].values()), e
    assert e["committed"] == sum(e["committed_by_channel"].values()), e
    terms = [e["position_atp"]] + [t for t in (e["cap_left"], e["buyer_left"]) if t is not None]
    assert e["atp"] == max(0, min(terms)), e
    if e["cap"] is not None:
        assert e["cap_left"] == e["cap"] - e["cap_used"], e
    if e["buyer_limit"] is not None and e["customer_id"] is not None:
        assert e["buyer_left"] == e["buyer_limit"] - e["buyer_used"], e


async def test_explain_answers_the_breakdown(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("FLASH-1", "DC1", 20, safety_stock=1)
    await seed("FLASH-1", "DC2", 20)
    v = await applied(client, admin, {
        **DOC, "skus": {"FLASH-1": {"buyer_limit": 6, "cap": {"web": 9},
                                    "locations": {"DC1": {"protect": {"stores": 2}}}}},
    })  # fmt: skip
    assert (await reserve(client, admin, "s-1", ("FLASH-1", "DC1", 1), channel="stores",
                          customer_id="s")).status_code == 201  # fmt: skip
    r = await reserve(client, admin, "w-1", ("FLASH-1", "DC2", 3), customer_id="c-1",
                      hold_seconds=60)  # fmt: skip
    assert r.status_code == 201
    r = await reserve(client, admin, "w-2", ("FLASH-1", "DC1", 2), customer_id="c-1",
                      hold_seconds=120)  # fmt: skip
    assert r.status_code == 201

    r = await explain(
        client, admin, sku="FLASH-1", location="DC1", channel="web", customer_id="c-1"
    )
    assert r.status_code == 200, r.text
    e = r.json()
    adds_up(e)
    assert {k: e[k] for k in ("sku", "location", "channel", "customer_id", "rules_version")} == {
        "sku": "FLASH-1", "location": "DC1", "channel": "web", "customer_id": "c-1",
        "rules_version": v,
    }  # fmt: skip
    assert (e["on_hand"], e["committed"], e["safety_stock"]) == (20, 3, 1)
    assert e["committed_by_channel"] == {"stores": 1, "web": 2}
    assert e["protected_for_others"] == {"stores": 1}  # 2 protected, 1 used
    assert (e["cap"], e["cap_used"], e["cap_left"]) == (9, 5, 4)  # web over both locations
    assert (e["buyer_limit"], e["buyer_used"], e["buyer_left"]) == (6, 5, 1)  # both locations
    assert e["position_atp"] == 20 - 3 - 1 - 1
    assert e["atp"] == 1 and e["limited_by"] == "buyer_limit"
    assert e["holds_expiring_count"] == 1 and e["holds_expiring_window_seconds"] == 300
    (hold,) = e["holds_expiring"]
    assert (hold["reservation_id"], hold["channel"], hold["qty"]) == ("w-2", "web", 2)
    assert datetime.fromisoformat(hold["expires_at"]) > datetime.fromisoformat(e["at"])
    # without the customer, and a shorter window
    r = await explain(client, admin, sku="FLASH-1", location="DC1", channel="web", soon_seconds=60)
    e = r.json()
    adds_up(e)
    assert e["customer_id"] is None and e["buyer_left"] is None
    assert e["atp"] == 4 and e["limited_by"] == "cap"
    assert e["holds_expiring_count"] == 0 and e["holds_expiring"] == []


async def test_explain_unknown_position_and_bad_parameters(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    r = await explain(client, admin, sku="NOPE", location="DC1", channel="web")
    assert_problem(r, 404, "unknown_position")
    await seed("SKU-1", "DC1", 1)
    for params, field in (
        ({"location": "DC1", "channel": "web"}, "query.sku"),
        ({"sku": "SKU-1", "location": "DC1", "channel": "Web"}, "query.channel"),
        ({"sku": "SKU-1", "location": "DC1", "channel": "web", "soon_seconds": 0},
         "query.soon_seconds"),
        ({"sku": "SKU-1", "location": "DC1", "channel": "web", "customer_id": "a b"},
         "query.customer_id"),
    ):  # fmt: skip
        body = assert_problem(await explain(client, admin, **params), 422, "validation_error")
        assert body["errors"][0]["field"] == field


async def test_explain_is_what_reserve_enforces(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP
) -> None:
    """Over random positions and rules: the explanation adds up, reserve refuses one unit
    more than its ATP and takes exactly its ATP, after which the ATP is 0."""
    rnd = random.Random(4)
    for i in range(25):
        sku = f"S-{i}"
        on_hand = rnd.randint(0, 30)
        await seed(sku, "DC1", on_hand, safety_stock=rnd.randint(0, min(3, on_hand)))
        await seed(sku, "DC2", rnd.randint(0, 20))
        rule: dict[str, Any] = {"protect": {"market": rnd.randint(0, 8)}}
        if rnd.random() < 0.5:
            rule["locations"] = {"DC1": {"protect": {"stores": rnd.randint(0, 6)}}}
        if rnd.random() < 0.6:
            rule["cap"] = {"web": rnd.randint(0, 25)}
        if rnd.random() < 0.5:
            rule["buyer_limit"] = rnd.randint(1, 12)
        doc = {
            "channels": {"web": {"priority": 100}, "market": {"priority": 50},
                         "stores": {"priority": 10}},
            "default": {"protect": {"web": rnd.randint(0, 4)}},
            "skus": {sku: rule},
        }  # fmt: skip
        await applied(client, admin, doc)
        for j, (ch, loc) in enumerate(
            [("market", "DC1"), ("stores", "DC1"), ("web", "DC2"), ("web", "DC1")]
        ):
            r = await reserve(client, admin, f"{sku}-p{j}", (sku, loc, rnd.randint(1, 6)),
                              channel=ch, customer_id="c-1")  # fmt: skip
            assert r.status_code in (201, 409), r.text
        r = await explain(client, admin, sku=sku, location="DC1", channel="web", customer_id="c-1")
        e = r.json()
        adds_up(e)
        av = await client.get(
            "/v1/availability",
            params={"sku": sku, "location": "DC1", "channel": "web", "customer_id": "c-1"},
            headers=admin,
        )
        assert av.json()["items"][0]["atp"] == e["atp"], (e, av.json())
        n = e["atp"]
        before = await snapshot(atp)
        r = await reserve(client, admin, f"{sku}-over", (sku, "DC1", n + 1), customer_id="c-1")
        assert r.status_code == 409, (e, r.text)
        assert await snapshot(atp) == before
        if n:
            r = await reserve(client, admin, f"{sku}-all", (sku, "DC1", n), customer_id="c-1")
            assert r.status_code == 201, (e, r.text)
            r = await explain(client, admin, sku=sku, location="DC1", channel="web",
                              customer_id="c-1")  # fmt: skip
            assert r.json()["atp"] == 0, r.json()
    report = await verify(atp)
    assert report.ok, report.problems


async def test_availability_for_a_customer(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, new_key: NewKey
) -> None:
    await seed("FLASH-1", "DC1", 50)
    await applied(client, admin)  # buyer limit 2 on FLASH-1
    r = await reserve(client, admin, "r-1", ("FLASH-1", "DC1", 1), customer_id="c-1")
    assert r.status_code == 201
    web = await new_key("reserve:web")
    params = {"sku": "FLASH-1", "location": "DC1", "channel": "web"}
    r = await client.get("/v1/availability", params={**params, "customer_id": "c-1"}, headers=web)
    assert r.status_code == 200 and r.json()["items"][0]["atp"] == 1
    r = await client.get("/v1/availability", params={**params, "customer_id": "c-2"}, headers=web)
    assert r.json()["items"][0]["atp"] == 2
    r = await client.get("/v1/availability", params=params, headers=web)
    assert r.json()["items"][0]["atp"] == 49
    r = await client.get(
        "/v1/availability", params={**params, "customer_id": "no spaces"}, headers=web
    )
    body = assert_problem(r, 422, "validation_error")
    assert body["errors"][0]["field"] == "query.customer_id"


async def test_explain_keeps_to_the_callers_channels(
    client: httpx.AsyncClient, seed: Seed, new_key: NewKey
) -> None:
    await seed("SKU-1", "DC1", 5)
    web = await new_key("reserve:web")
    r = await explain(client, web, sku="SKU-1", location="DC1", channel="web")
    assert r.status_code == 200
    r = await explain(client, web, sku="SKU-1", location="DC1", channel="market")
    assert_problem(r, 403, "forbidden")
    assert_problem(await explain(client, {}, sku="SKU-1", location="DC1", channel="web"), 401,
                   "unauthorized")  # fmt: skip
    r = await explain(client, bearer(ADMIN_KEY + "x"), sku="SKU-1", location="DC1", channel="web")
    assert_problem(r, 401, "unauthorized")


def test_problem_bodies_are_json(app: Any) -> None:
    """The new problem types are listed where their routes document them."""
    doc = app.openapi()["paths"]
    assert "412" in doc["/v1/rules"]["put"]["responses"]
    assert "404" in doc[EXPLAIN]["get"]["responses"]
    assert "404" in doc["/v1/rules"]["get"]["responses"]
    line = app.openapi()["components"]["schemas"]["LineIn"]
    assert line["required"] == ["sku", "qty"]
    json.dumps(doc)
