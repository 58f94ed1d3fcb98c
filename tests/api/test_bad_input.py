"""Bad input: each gets a precise 4xx problem, and nothing in Redis changes (every key's
DUMP is the same before and after)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from api_support import ADMIN_KEY, Headers, Seed, assert_problem, snapshot

from atp import ATP

JSON = {"Authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
SKU65 = "S" * 65
SKU64 = "S" * 64


@pytest.fixture
async def book(client: httpx.AsyncClient, admin: Headers, seed: Seed) -> None:
    await seed("SKU-1", "DC1", 50)
    await seed("SKU-2", "DC1", 50)
    for rid, hold in (("r-held", 600), ("r-conf", 0)):
        body = {
            "reservation_id": rid,
            "channel": "web",
            "lines": [{"sku": "SKU-1", "location": "DC1", "qty": 2}],
            "hold_seconds": hold,
        }
        assert (await client.post("/v1/reservations", json=body, headers=admin)).status_code == 201


def reserve(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "reservation_id": "bad-1",
        "channel": "web",
        "lines": [{"sku": "SKU-1", "location": "DC1", "qty": 1}],
    }
    body.update(over)
    return body


def line(**over: Any) -> dict[str, Any]:
    return reserve(lines=[{"sku": "SKU-1", "location": "DC1", "qty": 1, **over}])


def case(
    id: str,
    method: str,
    path: str,
    status: int,
    code: str,
    field: str | None = None,
    *,
    body: Any = None,
    content: bytes | None = None,
    params: Any = None,
) -> Any:
    return pytest.param(method, path, body, content, params, status, code, field, id=id)


RES = "/v1/reservations"
POS = "/v1/positions/SKU-1/DC1"
VALID = "validation_error"
CORE = "invalid_request"

CASES = [
    # malformed JSON
    case("json-truncated", "POST", RES, 422, VALID, "body", content=b'{"reservation_id": "x", '),
    case(
        "json-trailing-comma",
        "PUT",
        POS,
        422,
        VALID,
        "body",
        content=b'{"on_hand": 1, "reason": "x",}',
    ),
    case(
        "json-single-quotes", "POST", POS + "/adjust", 422, VALID, "body", content=b"{'delta': 1}"
    ),
    case(
        "json-garbage",
        "POST",
        "/v1/reservations/r-conf/fulfil",
        422,
        VALID,
        "body",
        content=b"lines=1",
    ),
    case(
        "json-release",
        "POST",
        "/v1/reservations/r-held/release",
        422,
        VALID,
        "body",
        content=b"{bad",
    ),
    case("json-not-object", "POST", RES, 422, VALID, "body", content=b"[1, 2]"),
    case("json-null", "PUT", POS, 422, VALID, "body", content=b"null"),
    case("json-empty-body", "POST", RES, 422, VALID, "body", content=b""),
    case("json-bad-utf8", "POST", RES, 400, "bad_request", content=b'{"reservation_id": "\xff"}'),
    case(
        "json-4301-digit-int",
        "POST",
        RES,
        400,
        "bad_request",
        content=b'{"reservation_id":"a","channel":"web","lines":[{"sku":"SKU-1","location":"DC1","qty":'
        + b"9" * 4301
        + b"}]}",
    ),
    case(
        "json-deep-nesting",
        "POST",
        RES,
        400,
        "bad_request",
        content=b"[" * 100_000 + b"]" * 100_000,
    ),
    # wrong types
    case("qty-string", "POST", RES, 422, VALID, "lines.0.qty", body=line(qty="2")),
    case("qty-true", "POST", RES, 422, VALID, "lines.0.qty", body=line(qty=True)),
    case("qty-float", "POST", RES, 422, VALID, "lines.0.qty", body=line(qty=1.5)),
    case("qty-null", "POST", RES, 422, VALID, "lines.0.qty", body=line(qty=None)),
    case(
        "qty-1e400",
        "POST",
        RES,
        422,
        VALID,
        "lines.0.qty",
        content=json.dumps(line(qty=1)).replace('"qty": 1', '"qty": 1e400').encode(),
    ),
    case(
        "qty-NaN",
        "POST",
        RES,
        422,
        VALID,
        "lines.0.qty",
        content=json.dumps(line(qty=1)).replace('"qty": 1', '"qty": NaN').encode(),
    ),
    case("sku-number", "POST", RES, 422, VALID, "lines.0.sku", body=line(sku=123)),
    case("lines-object", "POST", RES, 422, VALID, "lines", body=reserve(lines={"sku": "SKU-1"})),
    case("id-number", "POST", RES, 422, VALID, "reservation_id", body=reserve(reservation_id=7)),
    case("hold-string", "POST", RES, 422, VALID, "hold_seconds", body=reserve(hold_seconds="600")),
    case(
        "on-hand-string", "PUT", POS, 422, VALID, "on_hand", body={"on_hand": "100", "reason": "x"}
    ),
    case(
        "delta-bool",
        "POST",
        POS + "/adjust",
        422,
        VALID,
        "delta",
        body={"delta": False, "reason": "x"},
    ),
    case(
        "receive-float",
        "POST",
        POS + "/receive",
        422,
        VALID,
        "qty",
        body={"qty": 1.5, "reference": "PO"},
    ),
    case(
        "fulfil-shipped-string",
        "POST",
        "/v1/reservations/r-conf/fulfil",
        422,
        VALID,
        "lines.0.shipped",
        body={"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": "1"}]},
    ),
    case(
        "release-reason-number",
        "POST",
        "/v1/reservations/r-held/release",
        422,
        VALID,
        "reason",
        body={"reason": 5},
    ),
    case(
        "key-scopes-string",
        "POST",
        "/v1/keys",
        422,
        VALID,
        "scopes",
        body={"name": "k", "scopes": "admin"},
    ),
    # missing fields
    case(
        "missing-id",
        "POST",
        RES,
        422,
        VALID,
        "reservation_id",
        body={"channel": "web", "lines": reserve()["lines"]},
    ),
    case(
        "missing-channel",
        "POST",
        RES,
        422,
        VALID,
        "channel",
        body={"reservation_id": "a", "lines": reserve()["lines"]},
    ),
    case(
        "missing-lines",
        "POST",
        RES,
        422,
        VALID,
        "lines",
        body={"reservation_id": "a", "channel": "web"},
    ),
    case(
        "missing-qty",
        "POST",
        RES,
        422,
        VALID,
        "lines.0.qty",
        body=reserve(lines=[{"sku": "SKU-1", "location": "DC1"}]),
    ),
    case("missing-reason", "PUT", POS, 422, VALID, "reason", body={"on_hand": 5}),
    case("missing-delta", "POST", POS + "/adjust", 422, VALID, "delta", body={"reason": "x"}),
    case("missing-reference", "POST", POS + "/receive", 422, VALID, "reference", body={"qty": 5}),
    case(
        "missing-fulfil-lines",
        "POST",
        "/v1/reservations/r-conf/fulfil",
        422,
        VALID,
        "lines",
        body={},
    ),
    case("missing-key-name", "POST", "/v1/keys", 422, VALID, "name", body={"scopes": ["read"]}),
    # unknown fields
    case("unknown-field", "POST", RES, 422, VALID, "priority", body=reserve(priority=1)),
    case("unknown-line-field", "POST", RES, 422, VALID, "lines.0.price", body=line(price=10)),
    case(
        "unknown-position-field",
        "PUT",
        POS,
        422,
        VALID,
        "committed",
        body={"on_hand": 5, "reason": "x", "committed": 0},
    ),
    case(
        "unknown-key-field",
        "POST",
        "/v1/keys",
        422,
        VALID,
        "secret",
        body={"name": "k", "scopes": ["read"], "secret": "x"},
    ),
    # zero, negative and huge quantities
    case("qty-zero", "POST", RES, 422, VALID, "lines.0.qty", body=line(qty=0)),
    case("qty-negative", "POST", RES, 422, VALID, "lines.0.qty", body=line(qty=-1)),
    case("qty-huge", "POST", RES, 422, VALID, "lines.0.qty", body=line(qty=10**30)),
    case("qty-over-core-limit", "POST", RES, 422, CORE, "qty", body=line(qty=1_000_001)),
    case(
        "on-hand-negative", "PUT", POS, 422, VALID, "on_hand", body={"on_hand": -1, "reason": "x"}
    ),
    case(
        "on-hand-huge", "PUT", POS, 422, VALID, "on_hand", body={"on_hand": 10**20, "reason": "x"}
    ),
    case(
        "on-hand-over-core-limit",
        "PUT",
        POS,
        422,
        CORE,
        "on_hand",
        body={"on_hand": 10**13, "reason": "x"},
    ),
    case(
        "safety-negative",
        "PUT",
        POS,
        422,
        VALID,
        "safety_stock",
        body={"on_hand": 5, "safety_stock": -1, "reason": "x"},
    ),
    case(
        "delta-zero", "POST", POS + "/adjust", 422, CORE, "delta", body={"delta": 0, "reason": "x"}
    ),
    case(
        "delta-huge",
        "POST",
        POS + "/adjust",
        422,
        VALID,
        "delta",
        body={"delta": -(10**20), "reason": "x"},
    ),
    case(
        "receive-zero",
        "POST",
        POS + "/receive",
        422,
        VALID,
        "qty",
        body={"qty": 0, "reference": "PO"},
    ),
    case(
        "receive-negative",
        "POST",
        POS + "/receive",
        422,
        VALID,
        "qty",
        body={"qty": -5, "reference": "PO"},
    ),
    case("hold-negative", "POST", RES, 422, VALID, "hold_seconds", body=reserve(hold_seconds=-1)),
    case(
        "hold-over-core-limit",
        "POST",
        RES,
        422,
        CORE,
        "hold_seconds",
        body=reserve(hold_seconds=8 * 86400),
    ),
    case(
        "fulfil-negative",
        "POST",
        "/v1/reservations/r-conf/fulfil",
        422,
        VALID,
        "lines.0.short",
        body={"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": 1, "short": -1}]},
    ),
    case(
        "fulfil-nothing",
        "POST",
        "/v1/reservations/r-conf/fulfil",
        422,
        CORE,
        "lines",
        body={"lines": [{"sku": "SKU-1", "location": "DC1"}]},
    ),
    # blank texts
    case("reason-blank", "PUT", POS, 422, VALID, "reason", body={"on_hand": 5, "reason": "   "}),
    case(
        "reason-long",
        "POST",
        POS + "/adjust",
        422,
        VALID,
        "reason",
        body={"delta": 1, "reason": "x" * 201},
    ),
    # lines
    case("lines-empty", "POST", RES, 422, VALID, "lines", body=reserve(lines=[])),
    case(
        "lines-duplicate",
        "POST",
        RES,
        422,
        CORE,
        "lines",
        body=reserve(lines=[{"sku": "SKU-1", "location": "DC1", "qty": 1}] * 2),
    ),
    case(
        "lines-over-core-limit",
        "POST",
        RES,
        422,
        CORE,
        "lines",
        body=reserve(lines=[{"sku": f"S{i}", "location": "DC1", "qty": 1} for i in range(101)]),
    ),
    case(
        "fulfil-lines-empty",
        "POST",
        "/v1/reservations/r-conf/fulfil",
        422,
        VALID,
        "lines",
        body={"lines": []},
    ),
    case(
        "fulfil-lines-duplicate",
        "POST",
        "/v1/reservations/r-conf/fulfil",
        422,
        CORE,
        "lines",
        body={"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": 1}] * 2},
    ),
    # SKUs, locations and channels: non-ASCII, overlong, forbidden characters
    case("sku-non-ascii-path", "GET", "/v1/positions/SKÜ-1/DC1", 422, VALID, "path.sku"),
    case(
        "sku-non-ascii-put",
        "PUT",
        "/v1/positions/SKÜ-1/DC1",
        422,
        VALID,
        "path.sku",
        body={"on_hand": 1, "reason": "x"},
    ),
    case(
        "sku-emoji-path",
        "POST",
        "/v1/positions/%F0%9F%93%A6/DC1/receive",
        422,
        VALID,
        "path.sku",
        body={"qty": 1, "reference": "PO"},
    ),
    case(
        "sku-65-path",
        "PUT",
        f"/v1/positions/{SKU65}/DC1",
        422,
        VALID,
        "path.sku",
        body={"on_hand": 1, "reason": "x"},
    ),
    case("location-65-path", "GET", f"/v1/positions/SKU-1/{SKU65}", 422, VALID, "path.location"),
    case(
        "sku-brace-path",
        "PUT",
        "/v1/positions/%7Bt%3A1%7D/DC1",
        422,
        VALID,
        "path.sku",
        body={"on_hand": 1, "reason": "x"},
    ),
    case("sku-pipe-path", "GET", "/v1/positions/A%7CB/DC1", 422, VALID, "path.sku"),
    case("sku-non-ascii-body", "POST", RES, 422, VALID, "lines.0.sku", body=line(sku="SKÜ-1")),
    case("sku-65-body", "POST", RES, 422, VALID, "lines.0.sku", body=line(sku=SKU65)),
    case("sku-empty-body", "POST", RES, 422, VALID, "lines.0.sku", body=line(sku="")),
    case(
        "location-non-ascii-body",
        "POST",
        RES,
        422,
        VALID,
        "lines.0.location",
        body=line(location="Köln"),
    ),
    case("sku-pipe-body", "POST", RES, 422, VALID, "lines.0.sku", body=line(sku="A|B")),
    case(
        "fulfil-sku-65",
        "POST",
        "/v1/reservations/r-conf/fulfil",
        422,
        VALID,
        "lines.0.sku",
        body={"lines": [{"sku": SKU65, "location": "DC1", "shipped": 1}]},
    ),
    case("channel-upper", "POST", RES, 422, VALID, "channel", body=reserve(channel="Web")),
    case("channel-long", "POST", RES, 422, VALID, "channel", body=reserve(channel="c" * 33)),
    case("channel-non-ascii", "POST", RES, 422, VALID, "channel", body=reserve(channel="wéb")),
    # availability
    case(
        "availability-501-skus",
        "GET",
        "/v1/availability",
        422,
        VALID,
        "query.sku",
        params=[("sku", f"S{i}") for i in range(501)] + [("location", "DC1"), ("channel", "web")],
    ),
    case(
        "availability-no-sku",
        "GET",
        "/v1/availability",
        422,
        VALID,
        "query.sku",
        params={"location": "DC1", "channel": "web"},
    ),
    case(
        "availability-no-channel",
        "GET",
        "/v1/availability",
        422,
        VALID,
        "query.channel",
        params={"sku": "SKU-1", "location": "DC1"},
    ),
    case(
        "availability-sku-non-ascii",
        "GET",
        "/v1/availability",
        422,
        VALID,
        "query.sku.1",
        params=[("sku", "SKU-1"), ("sku", "SKÜ"), ("location", "DC1"), ("channel", "web")],
    ),
    case(
        "availability-sku-65",
        "GET",
        "/v1/availability",
        422,
        VALID,
        "query.sku.0",
        params={"sku": SKU65, "location": "DC1", "channel": "web"},
    ),
    case(
        "availability-bad-channel",
        "GET",
        "/v1/availability",
        422,
        VALID,
        "query.channel",
        params={"sku": "SKU-1", "location": "DC1", "channel": "Web!"},
    ),
    # movements paging
    case(
        "movements-limit-zero",
        "GET",
        POS + "/movements",
        422,
        VALID,
        "query.limit",
        params={"limit": 0},
    ),
    case(
        "movements-limit-huge",
        "GET",
        POS + "/movements",
        422,
        VALID,
        "query.limit",
        params={"limit": 1001},
    ),
    case(
        "movements-limit-text",
        "GET",
        POS + "/movements",
        422,
        VALID,
        "query.limit",
        params={"limit": "ten"},
    ),
    case(
        "movements-before-text",
        "GET",
        POS + "/movements",
        422,
        VALID,
        "query.before",
        params={"before": "yesterday"},
    ),
    case(
        "movements-before-overflow",
        "GET",
        POS + "/movements",
        422,
        CORE,
        "before",
        params={"before": "99999999999999999999-1"},
    ),
    # reservation ids
    case(
        "id-with-space-path", "GET", "/v1/reservations/bad%20id", 422, VALID, "path.reservation_id"
    ),
    case(
        "id-129-path",
        "POST",
        "/v1/reservations/" + "r" * 129 + "/confirm",
        422,
        VALID,
        "path.reservation_id",
    ),
    case(
        "id-leading-dash-path",
        "POST",
        "/v1/reservations/-x/release",
        422,
        VALID,
        "path.reservation_id",
    ),
    case(
        "id-non-ascii-path", "GET", "/v1/reservations/r%C3%A9s", 422, VALID, "path.reservation_id"
    ),
    case("id-nul-path", "GET", "/v1/reservations/%00", 422, VALID, "path.reservation_id"),
    case(
        "id-empty-body", "POST", RES, 422, VALID, "reservation_id", body=reserve(reservation_id="")
    ),
    case(
        "id-129-body",
        "POST",
        RES,
        422,
        VALID,
        "reservation_id",
        body=reserve(reservation_id="r" * 129),
    ),
    case(
        "id-brace-body",
        "POST",
        RES,
        422,
        VALID,
        "reservation_id",
        body=reserve(reservation_id="{x}"),
    ),
    case(
        "fulfilment-id-bad",
        "POST",
        "/v1/reservations/r-conf/fulfil",
        422,
        VALID,
        "fulfilment_id",
        body={"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": 1}], "fulfilment_id": "a b"},
    ),
    # keys
    case("key-id-not-hex", "DELETE", "/v1/keys/not-a-key", 422, VALID, "path.key_id"),
    case(
        "key-no-scopes", "POST", "/v1/keys", 422, VALID, "scopes", body={"name": "k", "scopes": []}
    ),
    case(
        "key-bad-scope",
        "POST",
        "/v1/keys",
        422,
        CORE,
        "scopes",
        body={"name": "k", "scopes": ["reserve:Web!"]},
    ),
    case(
        "key-empty-name",
        "POST",
        "/v1/keys",
        422,
        VALID,
        "name",
        body={"name": "", "scopes": ["read"]},
    ),
    # routing
    case("unknown-path", "GET", "/v1/nothing", 404, "not_found"),
    case("sku-with-slash", "GET", "/v1/positions/A%2FB/DC1", 404, "not_found"),
    case("wrong-method", "DELETE", POS, 405, "method_not_allowed"),
    case("wrong-method-reservations", "PUT", RES, 405, "method_not_allowed", body=reserve()),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "content", "params", "status", "code", "field"), CASES
)
async def test_bad_input(
    client: httpx.AsyncClient,
    book: None,
    atp: ATP,
    method: str,
    path: str,
    body: Any,
    content: bytes | None,
    params: Any,
    status: int,
    code: str,
    field: str | None,
) -> None:
    before = await snapshot(atp)
    if content is not None:
        r = await client.request(method, path, content=content, params=params, headers=JSON)
    else:
        r = await client.request(method, path, json=body, params=params, headers=JSON)
    problem = assert_problem(r, status, code)
    if field is not None:
        fields = [e["field"] for e in problem["errors"]]
        assert field in fields, problem
        assert all(e["message"] for e in problem["errors"])
    assert await snapshot(atp) == before


async def test_validation_names_every_bad_field(
    client: httpx.AsyncClient, book: None, atp: ATP
) -> None:
    before = await snapshot(atp)
    body = {
        "reservation_id": "",
        "channel": "WEB",
        "lines": [{"sku": "SKÜ", "location": "DC1", "qty": 0, "x": 1}],
        "hold_seconds": -5,
    }
    problem = assert_problem(await client.post(RES, json=body, headers=JSON), 422, VALID)
    fields = {e["field"] for e in problem["errors"]}
    assert {
        "reservation_id",
        "channel",
        "lines.0.sku",
        "lines.0.qty",
        "lines.0.x",
        "hold_seconds",
    } <= fields
    assert "reservation_id" in problem["detail"]
    assert await snapshot(atp) == before


# -- bodies over the limit ---------------------------------------------------------------


async def test_one_megabyte_body_is_413(client: httpx.AsyncClient, book: None, atp: ATP) -> None:
    before = await snapshot(atp)
    big = reserve(reservation_id="big", note="x" * 1_000_000)
    for method, path in (("POST", RES), ("PUT", POS), ("POST", POS + "/adjust")):
        r = await client.request(method, path, content=json.dumps(big).encode(), headers=JSON)
        problem = assert_problem(r, 413, "body_too_large")
        assert "bytes" in problem["detail"]
    assert await snapshot(atp) == before


async def test_one_megabyte_chunked_body_is_413(
    client: httpx.AsyncClient, book: None, atp: ATP
) -> None:
    """Without a Content-Length the limit is enforced while the body streams in."""
    before = await snapshot(atp)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"reservation_id": "big", "channel": "web", "note": "'
        for _ in range(16):
            yield b"x" * 65536
        yield b'"}'

    r = await client.post(RES, content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "body_too_large")
    assert await snapshot(atp) == before


async def test_body_just_under_the_limit_is_read(
    client: httpx.AsyncClient, book: None, atp: ATP
) -> None:
    """A large but allowed body reaches validation (and is refused there for its content)."""
    before = await snapshot(atp)
    body = json.dumps(reserve(note="x" * 200_000)).encode()
    problem = assert_problem(await client.post(RES, content=body, headers=JSON), 422, VALID)
    assert [e["field"] for e in problem["errors"]] == ["note"]
    assert await snapshot(atp) == before


async def test_lengths_at_the_limits_are_accepted(
    client: httpx.AsyncClient, admin: Headers, atp: ATP
) -> None:
    """The boundaries next to the refusals above: 64-character SKUs and locations, 500 SKUs."""
    r = await client.put(
        f"/v1/positions/{SKU64}/{SKU64}", json={"on_hand": 3, "reason": "x"}, headers=admin
    )
    assert r.status_code == 200 and r.json()["sku"] == SKU64
    rid = "r" * 128
    body = {
        "reservation_id": rid,
        "channel": "c" * 32,
        "lines": [{"sku": SKU64, "location": SKU64, "qty": 3}],
    }
    r = await client.post(RES, json=body, headers=admin)
    assert r.status_code == 201, r.text
    assert (await client.get(f"/v1/reservations/{rid}", headers=admin)).status_code == 200
    params = [("sku", f"S{i}") for i in range(499)] + [
        ("sku", SKU64),
        ("location", SKU64),
        ("channel", "web"),
    ]
    r = await client.get("/v1/availability", params=params, headers=admin)
    assert r.status_code == 200
    assert r.json()["items"][-1] == {
        "sku": SKU64,
        "location": SKU64,
        "channel": "web",
        "atp": 0,
        "exists": True,
    }


async def test_method_not_allowed_says_what_is(
    client: httpx.AsyncClient, book: None, atp: ATP
) -> None:
    """A 405 carries its Allow header through the problem handler (RFC 9110)."""
    before = await snapshot(atp)
    r = await client.delete("/v1/availability", headers=JSON)
    assert_problem(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET"
    r = await client.patch(RES, json=reserve(), headers=JSON)
    assert_problem(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    assert await snapshot(atp) == before


async def test_malformed_json_names_the_body(client: httpx.AsyncClient, book: None) -> None:
    r = await client.post(RES, content=b'{"reservation_id": "x",, }', headers=JSON)
    problem = assert_problem(r, 422, VALID)
    assert problem["errors"] == [
        {
            "field": "body",
            "message": "malformed JSON at character 23: "
            "Expecting property name enclosed in double quotes",
            "type": "json_invalid",
        }
    ]
