"""Keys and scopes: every protected route refused without a valid key (401), and every
scope allowed and refused (403) route by route, with channels kept apart."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from api_support import ADMIN_KEY, Headers, NewKey, Seed, assert_problem, bearer
from fastapi import FastAPI

from api.app import create_app
from atp import ATP, Settings

ROLES: dict[str, tuple[str, ...]] = {
    "admin": ("admin",),
    "read": ("read",),
    "fulfil": ("fulfil",),
    "web": ("reserve:web",),
    "mkt": ("reserve:marketplace",),
}

OK, FORBIDDEN, WRONG = "ok", (403, "forbidden"), (403, "wrong_channel")


@dataclass(frozen=True)
class Op:
    name: str
    method: str
    path: str
    json: Any = None
    params: Any = None
    ok: int = 200


SHIP = {"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": 1}]}
RULES = {
    "channels": {"web": {"priority": 100, "locations": ["DC1"]}, "marketplace": {"priority": 10}},
    "default": {"protect": {"web": 5}, "cap": {"marketplace": 50}},
}
OPS = [
    Op("put_position", "PUT", "/v1/positions/SKU-1/DC1", {"on_hand": 100, "reason": "count"}),
    Op("adjust", "POST", "/v1/positions/SKU-1/DC1/adjust", {"delta": 1, "reason": "found"}),
    Op("receive", "POST", "/v1/positions/SKU-1/DC1/receive", {"qty": 5, "reference": "PO-1"}),
    Op("get_position", "GET", "/v1/positions/SKU-1/DC1"),
    Op("movements", "GET", "/v1/positions/SKU-1/DC1/movements"),
    Op(
        "availability_web",
        "GET",
        "/v1/availability",
        params={"sku": ["SKU-1", "SKU-2"], "location": "DC1", "channel": "web"},
    ),
    Op(
        "reserve_web",
        "POST",
        "/v1/reservations",
        {
            "reservation_id": "new-web",
            "channel": "web",
            "lines": [{"sku": "SKU-1", "location": "DC1", "qty": 1}],
        },
        ok=201,
    ),
    Op(
        "reserve_mkt",
        "POST",
        "/v1/reservations",
        {
            "reservation_id": "new-mkt",
            "channel": "marketplace",
            "lines": [{"sku": "SKU-1", "location": "DC1", "qty": 1}],
        },
        ok=201,
    ),
    Op("get_web", "GET", "/v1/reservations/web-held"),
    Op("get_mkt", "GET", "/v1/reservations/mkt-held"),
    Op("confirm_web", "POST", "/v1/reservations/web-held/confirm"),
    Op("confirm_mkt", "POST", "/v1/reservations/mkt-held/confirm"),
    Op("release_web", "POST", "/v1/reservations/web-held/release"),
    Op("release_mkt", "POST", "/v1/reservations/mkt-held/release"),
    Op("fulfil_web", "POST", "/v1/reservations/web-conf/fulfil", SHIP),
    Op("fulfil_mkt", "POST", "/v1/reservations/mkt-conf/fulfil", SHIP),
    Op("create_key", "POST", "/v1/keys", {"name": "k", "scopes": ["read"]}, ok=201),
    Op("list_keys", "GET", "/v1/keys"),
    Op("put_rules", "PUT", "/v1/rules", RULES),
    Op("get_rules", "GET", "/v1/rules"),
    Op(
        "explain_web",
        "GET",
        "/v1/availability/explain",
        params={"sku": "SKU-1", "location": "DC1", "channel": "web"},
    ),
    Op("verify", "GET", "/v1/verify"),
    Op(
        "expect_inbound",
        "POST",
        "/v1/positions/SKU-1/DC1/inbound",
        {"reference": "PO-2", "qty": 3, "expected_at": "2030-01-02"},
        ok=201,
    ),
    Op("list_inbound", "GET", "/v1/positions/SKU-1/DC1/inbound"),
    Op("amend_inbound", "PATCH", "/v1/positions/SKU-1/DC1/inbound/PO-9", {"qty": 4}),
    Op("cancel_inbound", "DELETE", "/v1/positions/SKU-1/DC1/inbound/PO-9"),
    Op(
        "promise_web",
        "GET",
        "/v1/availability/promise",
        params={"sku": "SKU-1", "location": "DC1", "channel": "web", "qty": 1},
    ),
    Op(
        "put_replen",
        "PUT",
        "/v1/positions/SKU-1/DC1/replenishment",
        {"reorder_point": 10, "order_up_to": 50},
    ),
    Op("get_replen", "GET", "/v1/positions/SKU-1/DC1/replenishment"),
    Op("delete_replen", "DELETE", "/v1/positions/SKU-1/DC1/replenishment"),
    Op("list_replen", "GET", "/v1/replenishment"),
    Op(
        "put_replen_settings",
        "PUT",
        "/v1/replenishment/settings/SKU-1",
        {"service_level": 0.95, "lead_time_days": 3},
    ),
    Op("plan_replen", "POST", "/v1/replenishment/plan", {"dry_run": True}),
]

# what each role gets on each operation: OK (the operation's success status) or (status, type)
EXPECT: dict[str, dict[str, Any]] = {
    "put_position": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "adjust": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "receive": {"admin": OK, "fulfil": OK, "read": FORBIDDEN, "web": FORBIDDEN},
    "get_position": {"admin": OK, "read": OK, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "movements": {"admin": OK, "read": OK, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "availability_web": {"admin": OK, "read": OK, "web": OK, "mkt": FORBIDDEN, "fulfil": FORBIDDEN},
    "reserve_web": {
        "admin": OK,
        "web": OK,
        "mkt": FORBIDDEN,
        "read": FORBIDDEN,
        "fulfil": FORBIDDEN,
    },
    "reserve_mkt": {
        "admin": OK,
        "mkt": OK,
        "web": FORBIDDEN,
        "read": FORBIDDEN,
        "fulfil": FORBIDDEN,
    },
    "get_web": {"admin": OK, "read": OK, "web": OK, "mkt": WRONG, "fulfil": FORBIDDEN},
    "get_mkt": {"admin": OK, "read": OK, "mkt": OK, "web": WRONG, "fulfil": FORBIDDEN},
    "confirm_web": {"admin": OK, "web": OK, "mkt": WRONG, "read": FORBIDDEN, "fulfil": FORBIDDEN},
    "confirm_mkt": {"admin": OK, "mkt": OK, "web": WRONG, "read": FORBIDDEN, "fulfil": FORBIDDEN},
    "release_web": {"admin": OK, "web": OK, "mkt": WRONG, "read": FORBIDDEN, "fulfil": FORBIDDEN},
    "release_mkt": {"admin": OK, "mkt": OK, "web": WRONG, "read": FORBIDDEN, "fulfil": FORBIDDEN},
    "fulfil_web": {"admin": OK, "fulfil": OK, "web": FORBIDDEN, "read": FORBIDDEN},
    "fulfil_mkt": {
        "admin": OK,
        "fulfil": OK,
        "web": FORBIDDEN,
        "mkt": FORBIDDEN,
        "read": FORBIDDEN,
    },
    "create_key": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "list_keys": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "put_rules": {
        "admin": OK,
        "read": FORBIDDEN,
        "fulfil": FORBIDDEN,
        "web": FORBIDDEN,
        "mkt": FORBIDDEN,
    },
    "get_rules": {"admin": OK, "read": OK, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    # as availability: the read scope, or the channel's own reserve scope
    "explain_web": {"admin": OK, "read": OK, "web": OK, "mkt": FORBIDDEN, "fulfil": FORBIDDEN},
    "promise_web": {"admin": OK, "read": OK, "web": OK, "mkt": FORBIDDEN, "fulfil": FORBIDDEN},
    "expect_inbound": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "list_inbound": {"admin": OK, "read": OK, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "amend_inbound": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "cancel_inbound": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "verify": {
        "admin": OK,
        "read": FORBIDDEN,
        "fulfil": FORBIDDEN,
        "web": FORBIDDEN,
        "mkt": FORBIDDEN,
    },
    # replenishment: set and plan with admin, read with the read scope (as positions)
    "put_replen": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "get_replen": {"admin": OK, "read": OK, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "delete_replen": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "list_replen": {"admin": OK, "read": OK, "fulfil": FORBIDDEN, "web": FORBIDDEN},
    "put_replen_settings": {"admin": OK, "read": FORBIDDEN, "web": FORBIDDEN},
    "plan_replen": {"admin": OK, "read": FORBIDDEN, "fulfil": FORBIDDEN, "web": FORBIDDEN},
}
CASES = [(op, role) for op in OPS for role in EXPECT[op.name]]


async def call(client: httpx.AsyncClient, op: Op, headers: Headers) -> httpx.Response:
    return await client.request(op.method, op.path, json=op.json, params=op.params, headers=headers)


@pytest.fixture
async def book(client: httpx.AsyncClient, admin: Headers, seed: Seed) -> None:
    """One position, and held and confirmed reservations of both channels."""
    await seed("SKU-1", "DC1", 100)
    for rid, channel, hold in (
        ("web-held", "web", 600),
        ("web-conf", "web", 0),
        ("mkt-held", "marketplace", 600),
        ("mkt-conf", "marketplace", 0),
    ):
        body = {
            "reservation_id": rid,
            "channel": channel,
            "lines": [{"sku": "SKU-1", "location": "DC1", "qty": 2}],
            "hold_seconds": hold,
        }
        r = await client.post("/v1/reservations", json=body, headers=admin)
        assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/positions/SKU-1/DC1/inbound",
        json={"reference": "PO-9", "qty": 5, "expected_at": "2030-01-01"},
        headers=admin,
    )
    assert r.status_code == 201, r.text


def test_the_matrix_covers_every_route(app: FastAPI) -> None:
    doc = app.openapi()["paths"]
    protected = {(m.upper(), p) for p, ops in doc.items() for m in ops if p.startswith("/v1/")}
    templated = {
        ("PUT", "/v1/positions/{sku}/{location}"),
        ("POST", "/v1/positions/{sku}/{location}/adjust"),
        ("POST", "/v1/positions/{sku}/{location}/receive"),
        ("GET", "/v1/positions/{sku}/{location}"),
        ("GET", "/v1/positions/{sku}/{location}/movements"),
        ("GET", "/v1/availability"),
        ("GET", "/v1/availability/explain"),
        ("POST", "/v1/reservations"),
        ("GET", "/v1/reservations/{reservation_id}"),
        ("POST", "/v1/reservations/{reservation_id}/confirm"),
        ("POST", "/v1/reservations/{reservation_id}/release"),
        ("POST", "/v1/reservations/{reservation_id}/fulfil"),
        ("POST", "/v1/keys"),
        ("GET", "/v1/keys"),
        ("DELETE", "/v1/keys/{key_id}"),  # tested on its own below
        ("PUT", "/v1/rules"),
        ("GET", "/v1/rules"),
        # scopes of these in tests/api/test_exceptions.py (they need a raised exception)
        ("GET", "/v1/exceptions"),
        ("GET", "/v1/exceptions/{exception_id}"),
        ("POST", "/v1/exceptions/{exception_id}/resolve"),
        # scopes of these in tests/api/test_counts.py (reading one needs a queued batch)
        ("POST", "/v1/counts"),
        ("GET", "/v1/counts/{batch_id}"),
        ("GET", "/v1/verify"),
        ("POST", "/v1/positions/{sku}/{location}/inbound"),
        ("GET", "/v1/positions/{sku}/{location}/inbound"),
        ("PATCH", "/v1/positions/{sku}/{location}/inbound/{reference}"),
        ("DELETE", "/v1/positions/{sku}/{location}/inbound/{reference}"),
        ("GET", "/v1/availability/promise"),
        ("PUT", "/v1/positions/{sku}/{location}/replenishment"),
        ("GET", "/v1/positions/{sku}/{location}/replenishment"),
        ("DELETE", "/v1/positions/{sku}/{location}/replenishment"),
        ("GET", "/v1/replenishment"),
        ("PUT", "/v1/replenishment/settings/{sku}"),
        ("POST", "/v1/replenishment/plan"),
        # scopes of this in tests/api/test_replenishment.py (it needs settings stored)
        ("GET", "/v1/replenishment/settings/{sku}"),
    }
    assert protected == templated


@pytest.mark.parametrize(("op", "role"), CASES, ids=[f"{op.name}-{role}" for op, role in CASES])
async def test_scope(
    client: httpx.AsyncClient, book: None, new_key: NewKey, op: Op, role: str, atp: ATP
) -> None:
    headers = await new_key(*ROLES[role], name=role)
    before = await atp.position("SKU-1", "DC1")
    rules_before = (await atp.rules(max_age=0)).version
    r = await call(client, op, headers)
    expected = EXPECT[op.name][role]
    if expected == OK:
        assert r.status_code == op.ok, r.text
        assert r.headers["content-type"].startswith("application/json")
    else:
        status, code = expected
        assert_problem(r, status, code)
        # a refusal changes nothing
        assert await atp.position("SKU-1", "DC1") == before
        assert (await atp.rules(max_age=0)).version == rules_before


BAD_AUTH = [
    None,
    "Bearer ",
    "Bearer nonsense",
    "Bearer atp_0123456789abcdef_" + "A" * 43,  # well formed, unknown id
    f"Basic {ADMIN_KEY}",
    f"Bearer {ADMIN_KEY}x",
    f"Bearer {ADMIN_KEY[:-1]}",
    ADMIN_KEY,  # no scheme
]


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
async def test_no_valid_key_is_401(client: httpx.AsyncClient, book: None, op: Op, atp: ATP) -> None:
    before = await atp.position("SKU-1", "DC1")
    for auth in BAD_AUTH:
        headers = {} if auth is None else {"Authorization": auth}
        r = await call(client, op, headers)
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer", auth
    assert await atp.position("SKU-1", "DC1") == before
    assert (await atp.rules(max_age=0)).version == 0


async def test_key_with_wrong_secret_is_401(client: httpx.AsyncClient, new_key: NewKey) -> None:
    good = (await new_key("admin"))["Authorization"]
    assert (await client.get("/v1/keys", headers={"Authorization": good})).status_code == 200
    bad = good[:-1] + ("A" if good[-1] != "A" else "B")
    assert_problem(
        await client.get("/v1/keys", headers={"Authorization": bad}), 401, "unauthorized"
    )


async def test_revoke_key_needs_admin(
    client: httpx.AsyncClient, admin: Headers, new_key: NewKey
) -> None:
    r = await client.post("/v1/keys", json={"name": "victim", "scopes": ["read"]}, headers=admin)
    key_id = r.json()["id"]
    for role in ("read", "fulfil", "web"):
        r = await client.delete(f"/v1/keys/{key_id}", headers=await new_key(*ROLES[role]))
        assert_problem(r, 403, "forbidden")
    assert_problem(await client.delete(f"/v1/keys/{key_id}"), 401, "unauthorized")
    r = await client.delete(f"/v1/keys/{key_id}", headers=await new_key("admin"))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None


async def test_revoked_key_is_refused_in_every_process(
    client: httpx.AsyncClient, admin: Headers, settings: Settings, atp: ATP
) -> None:
    r = await client.post(
        "/v1/keys", json={"name": "short-lived", "scopes": ["read"]}, headers=admin
    )
    created = r.json()
    key = bearer(created["key"])
    # a second API process over the same Redis, which has already seen the key as valid
    other = create_app(settings, core=atp)
    async with (
        other.router.lifespan_context(other),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://other") as c2,
    ):
        assert (await client.get("/v1/keys", headers=admin)).status_code == 200
        assert (await client.get("/v1/positions/X/DC1", headers=key)).status_code == 404
        assert (await c2.get("/v1/positions/X/DC1", headers=key)).status_code == 404

        assert (await client.delete(f"/v1/keys/{created['id']}", headers=admin)).status_code == 200
        # the process that revoked it refuses it at once
        assert_problem(await client.get("/v1/positions/X/DC1", headers=key), 401, "unauthorized")
        # the other one within key_refresh_seconds
        await asyncio.sleep(settings.key_refresh_seconds * 2)
        assert_problem(await c2.get("/v1/positions/X/DC1", headers=key), 401, "unauthorized")


async def test_new_key_is_accepted_by_every_process(
    client: httpx.AsyncClient, admin: Headers, settings: Settings, atp: ATP
) -> None:
    other = create_app(settings, core=atp)
    async with (
        other.router.lifespan_context(other),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://other") as c2,
    ):
        # warm the other process's cache before the key exists
        assert (await c2.get("/v1/keys", headers=admin)).status_code == 200
        r = await client.post("/v1/keys", json={"name": "fresh", "scopes": ["read"]}, headers=admin)
        key = bearer(r.json()["key"])
        await asyncio.sleep(settings.key_refresh_seconds * 2)
        assert (await c2.get("/v1/positions/X/DC1", headers=key)).status_code == 404


async def test_health_needs_no_key(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        r = await client.get(path)
        assert r.status_code == 200, path


async def test_web_key_keeps_to_its_channel(
    client: httpx.AsyncClient, book: None, new_key: NewKey, atp: ATP
) -> None:
    web = await new_key("reserve:web", "read")
    # read scope lets it see any reservation, but not act on another channel's
    assert (await client.get("/v1/reservations/mkt-held", headers=web)).status_code == 200
    assert_problem(
        await client.post("/v1/reservations/mkt-held/confirm", headers=web), 403, "wrong_channel"
    )
    assert_problem(
        await client.post("/v1/reservations/mkt-held/release", headers=web), 403, "wrong_channel"
    )
    body = {
        "reservation_id": "sneaky",
        "channel": "marketplace",
        "lines": [{"sku": "SKU-1", "location": "DC1", "qty": 1}],
    }
    assert_problem(await client.post("/v1/reservations", json=body, headers=web), 403, "forbidden")
    assert_problem(
        await client.get("/v1/reservations/sneaky", headers=web), 404, "unknown_reservation"
    )
    r = await client.get(
        "/v1/availability",
        params={"sku": "SKU-1", "location": "DC1", "channel": "marketplace"},
        headers=web,
    )
    assert r.status_code == 200  # read scope
    p = await atp.position("SKU-1", "DC1")
    assert p is not None and p.committed_by_channel == {"web": 4, "marketplace": 4}
