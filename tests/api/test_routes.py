"""Every route of the v1 contract: the happy path, the answers' shapes, every problem type,
idempotent replays and conflicts, and concurrent reservations through the API."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import httpx
from api_support import Headers, NewKey, Seed, assert_problem

from atp import ATP
from atp.verify import verify

POSITION_FIELDS = {
    "sku",
    "location",
    "on_hand",
    "committed",
    "safety_stock",
    "available",
    "committed_by_channel",
    "in_transit",
    "committed_dated",
    "backordered",
}
RESERVATION_FIELDS = {
    "reservation_id",
    "channel",
    "status",
    "lines",
    "created_at",
    "expires_at",
    "updated_at",
    "customer_id",
    "rules_version",
    "requested_date",
    "backordered",
    "filled_at",
}
LINE_FIELDS = {"sku", "location", "qty", "shipped", "short", "released", "open"}


def reserve_body(
    rid: str, *lines: tuple[str, str, int], channel: str = "web", hold: int | None = None
):
    body: dict[str, object] = {
        "reservation_id": rid,
        "channel": channel,
        "lines": [{"sku": s, "location": loc, "qty": q} for s, loc, q in lines],
    }
    if hold is not None:
        body["hold_seconds"] = hold
    return body


async def get_pos(client: httpx.AsyncClient, admin: Headers, sku: str, loc: str = "DC1") -> dict:
    r = await client.get(f"/v1/positions/{sku}/{loc}", headers=admin)
    assert r.status_code == 200, r.text
    return r.json()


# -- positions ---------------------------------------------------------------------------


async def test_put_position_answers_the_position(client: httpx.AsyncClient, admin: Headers) -> None:
    r = await client.put(
        "/v1/positions/SKU-1/DC1",
        json={"on_hand": 100, "safety_stock": 5, "reason": "initial load"},
        headers=admin,
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {
        "sku": "SKU-1",
        "location": "DC1",
        "on_hand": 100,
        "committed": 0,
        "safety_stock": 5,
        "available": 95,
        "committed_by_channel": {},
        "in_transit": 0,
        "committed_dated": 0,
        "backordered": 0,
    }
    # safety stock omitted keeps the current figure
    r = await client.put(
        "/v1/positions/SKU-1/DC1", json={"on_hand": 80, "reason": "count"}, headers=admin
    )
    assert r.status_code == 200
    assert (r.json()["on_hand"], r.json()["safety_stock"], r.json()["available"]) == (80, 5, 75)


async def test_adjust_and_receive(client: httpx.AsyncClient, admin: Headers, seed: Seed) -> None:
    await seed("SKU-1", "DC1", 100)
    r = await client.post(
        "/v1/positions/SKU-1/DC1/adjust", json={"delta": -3, "reason": "damaged"}, headers=admin
    )
    assert r.status_code == 200
    assert set(r.json()) == POSITION_FIELDS
    assert r.json()["on_hand"] == 97
    r = await client.post(
        "/v1/positions/SKU-1/DC1/adjust",
        json={"delta": 4, "reason": "found", "reference": "CC-7"},
        headers=admin,
    )
    assert r.json()["on_hand"] == 101
    r = await client.post(
        "/v1/positions/SKU-1/DC1/receive", json={"qty": 50, "reference": "PO-1"}, headers=admin
    )
    assert r.status_code == 200
    assert r.json()["on_hand"] == 151
    assert r.json()["available"] == 151


async def test_get_position(client: httpx.AsyncClient, admin: Headers, seed: Seed) -> None:
    await seed("SKU-1", "DC1", 10, safety_stock=2)
    r = await client.post(
        "/v1/reservations",
        json=reserve_body("r1", ("SKU-1", "DC1", 3), channel="web"),
        headers=admin,
    )
    assert r.status_code == 201
    r = await client.post(
        "/v1/reservations",
        json=reserve_body("r2", ("SKU-1", "DC1", 1), channel="marketplace"),
        headers=admin,
    )
    assert r.status_code == 201
    r = await client.get("/v1/positions/SKU-1/DC1", headers=admin)
    assert r.status_code == 200
    assert r.json() == {
        "sku": "SKU-1",
        "location": "DC1",
        "on_hand": 10,
        "committed": 4,
        "safety_stock": 2,
        "available": 4,
        "committed_by_channel": {"web": 3, "marketplace": 1},
        "in_transit": 0,
        "committed_dated": 0,
        "backordered": 0,
    }


async def test_movements_newest_first_and_paged(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 100)
    for d in range(1, 6):
        r = await client.post(
            "/v1/positions/SKU-1/DC1/adjust",
            json={"delta": d, "reason": f"step {d}"},
            headers=admin,
        )
        assert r.status_code == 200
    r = await client.get("/v1/positions/SKU-1/DC1/movements", headers=admin)
    assert r.status_code == 200
    page = r.json()
    assert page["next_before"] is None
    items = page["items"]
    assert [m["reason"] for m in items] == [
        "step 5",
        "step 4",
        "step 3",
        "step 2",
        "step 1",
        "initial load",
    ]
    first = items[0]
    assert set(first) == {
        "id",
        "at",
        "kind",
        "reason",
        "actor",
        "source",
        "ref",
        "reservation_id",
        "channel",
        "on_hand_before",
        "on_hand_after",
        "committed_before",
        "committed_after",
    }
    assert (first["on_hand_before"], first["on_hand_after"]) == (110, 115)
    assert first["actor"] == "bootstrap" and first["source"] == "api"
    datetime.fromisoformat(first["at"])

    # paging: 2 at a time, following next_before, gives the same list
    seen: list[str] = []
    before: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if before is not None:
            params["before"] = before
        r = await client.get("/v1/positions/SKU-1/DC1/movements", params=params, headers=admin)
        assert r.status_code == 200
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [m["id"] for m in page["items"]]
        pages += 1
        before = page["next_before"]
        if before is None:
            break
        assert before == page["items"][-1]["id"]
    assert seen == [m["id"] for m in items]
    assert pages >= 3
    # nothing is older than the first possible id (found by schemathesis: it was a 500)
    for first_id in ("0", "0-0", "00-000"):
        r = await client.get(
            "/v1/positions/SKU-1/DC1/movements", params={"before": first_id}, headers=admin
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"items": [], "next_before": None}
    # before a movement: only the older ones
    r = await client.get(
        "/v1/positions/SKU-1/DC1/movements", params={"before": items[1]["id"]}, headers=admin
    )
    assert [m["id"] for m in r.json()["items"]] == [m["id"] for m in items[2:]]


async def test_movements_of_unknown_position_is_empty(
    client: httpx.AsyncClient, admin: Headers
) -> None:
    r = await client.get("/v1/positions/NOPE/DC1/movements", headers=admin)
    assert r.status_code == 200
    assert r.json() == {"items": [], "next_before": None}


async def test_unknown_position_is_404(client: httpx.AsyncClient, admin: Headers) -> None:
    assert_problem(
        await client.get("/v1/positions/NOPE/DC1", headers=admin), 404, "unknown_position"
    )
    r = await client.post(
        "/v1/positions/NOPE/DC1/adjust", json={"delta": 1, "reason": "found"}, headers=admin
    )
    assert_problem(r, 404, "unknown_position")
    # a reservation on a position that does not exist
    r = await client.post(
        "/v1/reservations", json=reserve_body("r1", ("NOPE", "DC1", 1)), headers=admin
    )
    problem = assert_problem(r, 404, "unknown_position")
    assert problem["lines"] == [{"sku": "NOPE", "location": "DC1"}]


async def test_adjust_below_zero_is_refused(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 2)
    r = await client.post(
        "/v1/positions/SKU-1/DC1/adjust", json={"delta": -3, "reason": "damaged"}, headers=admin
    )
    assert_problem(r, 409, "negative_on_hand")
    assert (await get_pos(client, admin, "SKU-1"))["on_hand"] == 2


# -- availability ------------------------------------------------------------------------


async def test_availability_for_several_skus(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("A", "DC1", 10, safety_stock=1)
    await seed("B", "DC1", 5)
    r = await client.post(
        "/v1/reservations", json=reserve_body("r1", ("B", "DC1", 2)), headers=admin
    )
    assert r.status_code == 201
    r = await client.get(
        "/v1/availability",
        params=[
            ("sku", "A"),
            ("sku", "B"),
            ("sku", "GHOST"),
            ("location", "DC1"),
            ("channel", "web"),
        ],
        headers=admin,
    )
    assert r.status_code == 200
    assert r.json() == {
        "items": [
            {"sku": "A", "location": "DC1", "channel": "web", "atp": 9, "exists": True},
            {"sku": "B", "location": "DC1", "channel": "web", "atp": 3, "exists": True},
            {"sku": "GHOST", "location": "DC1", "channel": "web", "atp": 0, "exists": False},
        ]
    }


async def test_availability_takes_500_skus(client: httpx.AsyncClient, admin: Headers) -> None:
    params = [("sku", f"S{i}") for i in range(500)] + [("location", "DC1"), ("channel", "web")]
    r = await client.get("/v1/availability", params=params, headers=admin)
    assert r.status_code == 200
    assert len(r.json()["items"]) == 500


# -- reservations ------------------------------------------------------------------------


async def test_reserve_held_then_confirm_release(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 10)
    await seed("SKU-2", "DC1", 10)
    body = reserve_body("order-1", ("SKU-1", "DC1", 2), ("SKU-2", "DC1", 3), hold=600)
    r = await client.post("/v1/reservations", json=body, headers=admin)
    assert r.status_code == 201
    res = r.json()
    assert set(res) == RESERVATION_FIELDS
    assert res["reservation_id"] == "order-1"
    assert res["status"] == "held"
    assert res["channel"] == "web"
    assert (res["customer_id"], res["rules_version"]) == (None, 0)  # no rules applied
    created = datetime.fromisoformat(res["created_at"])
    expires = datetime.fromisoformat(res["expires_at"])
    assert expires - created == timedelta(seconds=600)
    assert sorted((ln["sku"], ln["qty"], ln["open"]) for ln in res["lines"]) == [
        ("SKU-1", 2, 2),
        ("SKU-2", 3, 3),
    ]
    assert all(set(ln) == LINE_FIELDS for ln in res["lines"])
    assert (await get_pos(client, admin, "SKU-1"))["committed"] == 2

    r = await client.get("/v1/reservations/order-1", headers=admin)
    assert r.status_code == 200
    assert r.json()["status"] == "held"
    assert r.json()["expires_at"] == res["expires_at"]

    r = await client.post("/v1/reservations/order-1/confirm", headers=admin)
    assert r.status_code == 200
    assert r.json()["status"] == "confirmed"
    assert r.json()["expires_at"] is None
    # confirming again is a no-op answering the same state
    r = await client.post("/v1/reservations/order-1/confirm", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "confirmed"

    r = await client.post(
        "/v1/reservations/order-1/release", json={"reason": "cancelled"}, headers=admin
    )
    assert r.status_code == 200
    out = r.json()
    assert out["status"] == "released"
    assert all(ln["open"] == 0 and ln["released"] == ln["qty"] for ln in out["lines"])
    assert (await get_pos(client, admin, "SKU-1"))["committed"] == 0
    assert (await get_pos(client, admin, "SKU-2"))["committed"] == 0
    # releasing again is a no-op; without a body too
    r = await client.post("/v1/reservations/order-1/release", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "released"


async def test_reserve_without_hold_is_confirmed(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 10)
    r = await client.post(
        "/v1/reservations", json=reserve_body("o-2", ("SKU-1", "DC1", 4)), headers=admin
    )
    assert r.status_code == 201
    assert r.json()["status"] == "confirmed"
    assert r.json()["expires_at"] is None
    assert (await get_pos(client, admin, "SKU-1"))["committed_by_channel"] == {"web": 4}


async def test_whole_number_floats_are_integers(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    """JSON has one number type, and the published JSON Schema counts 2.0 as an integer
    (found by schemathesis: 2.0 was refused); 1.5, "2" and true stay refused (test_bad_input)."""
    r = await client.put(
        "/v1/positions/SKU-1/DC1",
        content=b'{"on_hand": 1e2, "safety_stock": 0.0, "reason": "count"}',
        headers={**admin, "content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert (r.json()["on_hand"], r.json()["safety_stock"]) == (100, 0)
    body = reserve_body("o-f", ("SKU-1", "DC1", 2))
    body["lines"][0]["qty"] = 2.0  # type: ignore[index]
    body["hold_seconds"] = 60.0
    r = await client.post("/v1/reservations", json=body, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json()["lines"][0]["qty"] == 2
    assert r.json()["status"] == "held"


async def test_fulfil_with_short_pick(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 10)
    await seed("SKU-2", "DC1", 10)
    body = reserve_body("o-3", ("SKU-1", "DC1", 3), ("SKU-2", "DC1", 2))
    assert (await client.post("/v1/reservations", json=body, headers=admin)).status_code == 201
    # partial: 2 of SKU-1 shipped, 1 found missing; the missing unit stays committed
    r = await client.post(
        "/v1/reservations/o-3/fulfil",
        json={"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": 2, "short": 1}]},
        headers=admin,
    )
    assert r.status_code == 200
    res = r.json()
    assert res["status"] == "confirmed"
    line = next(ln for ln in res["lines"] if ln["sku"] == "SKU-1")
    assert (line["shipped"], line["short"], line["open"]) == (2, 1, 1)
    p = await get_pos(client, admin, "SKU-1")
    assert (p["on_hand"], p["committed"]) == (7, 1)
    # the same fulfilment again is a replay, not a second shipment
    r = await client.post(
        "/v1/reservations/o-3/fulfil",
        json={"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": 2, "short": 1}]},
        headers=admin,
    )
    assert r.status_code == 200
    assert (await get_pos(client, admin, "SKU-1"))["on_hand"] == 7
    # the rest: SKU-2 shipped, SKU-1's remainder released
    r = await client.post(
        "/v1/reservations/o-3/fulfil",
        json={
            "lines": [
                {"sku": "SKU-2", "location": "DC1", "shipped": 2},
                {"sku": "SKU-1", "location": "DC1", "release_remainder": True},
            ]
        },
        headers=admin,
    )
    assert r.status_code == 200
    assert r.json()["status"] == "fulfilled"
    assert all(ln["open"] == 0 for ln in r.json()["lines"])
    p1, p2 = await get_pos(client, admin, "SKU-1"), await get_pos(client, admin, "SKU-2")
    assert (p1["on_hand"], p1["committed"]) == (7, 0)
    assert (p2["on_hand"], p2["committed"]) == (8, 0)


async def test_unknown_reservation_is_404(client: httpx.AsyncClient, admin: Headers) -> None:
    assert_problem(
        await client.get("/v1/reservations/nope", headers=admin), 404, "unknown_reservation"
    )
    for verb in ("confirm", "release"):
        r = await client.post(f"/v1/reservations/nope/{verb}", headers=admin)
        assert_problem(r, 404, "unknown_reservation")
    r = await client.post(
        "/v1/reservations/nope/fulfil",
        json={"lines": [{"sku": "A", "location": "DC1", "shipped": 1}]},
        headers=admin,
    )
    assert_problem(r, 404, "unknown_reservation")


async def test_insufficient_stock_lists_the_lines(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 10, safety_stock=2)
    await seed("SKU-2", "DC1", 10)
    body = reserve_body("big", ("SKU-1", "DC1", 9), ("SKU-2", "DC1", 1))
    r = await client.post("/v1/reservations", json=body, headers=admin)
    problem = assert_problem(r, 409, "insufficient_stock")
    assert problem["title"] == "Insufficient stock"
    short = [ln for ln in problem["lines"] if ln["sku"] == "SKU-1"]
    assert len(short) == 1
    assert {k: short[0][k] for k in ("sku", "location", "requested", "available")} == {
        "sku": "SKU-1",
        "location": "DC1",
        "requested": 9,
        "available": 8,
    }
    # all or nothing: SKU-2 was not taken either
    assert (await get_pos(client, admin, "SKU-2"))["committed"] == 0
    assert_problem(
        await client.get("/v1/reservations/big", headers=admin), 404, "unknown_reservation"
    )


async def test_replay_returns_the_original_answer(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 10)
    body = reserve_body("order-9", ("SKU-1", "DC1", 2), hold=600)
    first = await client.post("/v1/reservations", json=body, headers=admin)
    assert first.status_code == 201
    again = await client.post("/v1/reservations", json=body, headers=admin)
    assert again.status_code == 201
    assert again.json() == first.json()
    # even after the reservation moved on, the replay answers the original outcome
    assert (await client.post("/v1/reservations/order-9/confirm", headers=admin)).status_code == 200
    later = await client.post("/v1/reservations", json=body, headers=admin)
    assert later.status_code == 201
    assert later.json() == first.json()
    assert later.json()["status"] == "held"
    # and nothing was reserved twice
    assert (await get_pos(client, admin, "SKU-1"))["committed"] == 2


async def test_same_id_other_body_is_a_conflict(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 10)
    r = await client.post(
        "/v1/reservations", json=reserve_body("o-1", ("SKU-1", "DC1", 2)), headers=admin
    )
    assert r.status_code == 201
    for other in (
        reserve_body("o-1", ("SKU-1", "DC1", 3)),
        reserve_body("o-1", ("SKU-1", "DC1", 2), channel="marketplace"),
        reserve_body("o-1", ("SKU-1", "DC1", 2), hold=60),
    ):
        r = await client.post("/v1/reservations", json=other, headers=admin)
        problem = assert_problem(r, 409, "idempotency_conflict")
        assert "o-1" in problem["detail"]
    assert (await get_pos(client, admin, "SKU-1"))["committed"] == 2


async def test_transitions_refused_by_state(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 20)
    ship = {"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": 1}]}

    # not_confirmed: fulfilling a held reservation
    r = await client.post(
        "/v1/reservations", json=reserve_body("held", ("SKU-1", "DC1", 1), hold=600), headers=admin
    )
    assert r.status_code == 201
    assert_problem(
        await client.post("/v1/reservations/held/fulfil", json=ship, headers=admin),
        409,
        "not_confirmed",
    )

    # already_released: confirming or fulfilling a released reservation
    r = await client.post(
        "/v1/reservations", json=reserve_body("gone", ("SKU-1", "DC1", 1), hold=600), headers=admin
    )
    assert r.status_code == 201
    assert (await client.post("/v1/reservations/gone/release", headers=admin)).status_code == 200
    assert_problem(
        await client.post("/v1/reservations/gone/confirm", headers=admin), 409, "already_released"
    )
    assert_problem(
        await client.post("/v1/reservations/gone/fulfil", json=ship, headers=admin),
        409,
        "already_released",
    )

    # already_fulfilled: confirming, releasing or fulfilling again a fulfilled reservation
    r = await client.post(
        "/v1/reservations", json=reserve_body("done", ("SKU-1", "DC1", 1)), headers=admin
    )
    assert r.status_code == 201
    assert (await client.post("/v1/reservations/done/fulfil", json=ship, headers=admin)).json()[
        "status"
    ] == "fulfilled"
    for verb in ("confirm", "release"):
        r = await client.post(f"/v1/reservations/done/{verb}", headers=admin)
        assert_problem(r, 409, "already_fulfilled")
    other = {"lines": [{"sku": "SKU-1", "location": "DC1", "short": 1}]}
    assert_problem(
        await client.post("/v1/reservations/done/fulfil", json=other, headers=admin),
        409,
        "already_fulfilled",
    )

    # over_fulfil and unknown_line
    r = await client.post(
        "/v1/reservations", json=reserve_body("two", ("SKU-1", "DC1", 2)), headers=admin
    )
    assert r.status_code == 201
    too_many = {"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": 3}]}
    assert_problem(
        await client.post("/v1/reservations/two/fulfil", json=too_many, headers=admin),
        409,
        "over_fulfil",
    )
    elsewhere = {"lines": [{"sku": "SKU-1", "location": "DC2", "shipped": 1}]}
    assert_problem(
        await client.post("/v1/reservations/two/fulfil", json=elsewhere, headers=admin),
        422,
        "unknown_line",
    )
    p = await get_pos(client, admin, "SKU-1")
    assert (p["on_hand"], p["committed"]) == (19, 3)


async def test_hold_expired(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP
) -> None:
    await seed("SKU-1", "DC1", 5)
    r = await client.post(
        "/v1/reservations", json=reserve_body("cart", ("SKU-1", "DC1", 5), hold=1), headers=admin
    )
    assert r.status_code == 201
    expires = datetime.fromisoformat(r.json()["expires_at"])
    # the expiry is a wall-clock time set by the server's clock; wait until it has passed
    await asyncio.sleep(max(0.0, (expires - datetime.now(expires.tzinfo)).total_seconds()) + 0.2)
    assert_problem(
        await client.post("/v1/reservations/cart/confirm", headers=admin), 409, "hold_expired"
    )
    r = await client.get("/v1/reservations/cart", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "expired"
    # the units came back: a new reservation can take all 5
    r = await client.post(
        "/v1/reservations", json=reserve_body("next", ("SKU-1", "DC1", 5)), headers=admin
    )
    assert r.status_code == 201
    assert (await verify(atp)).ok


# -- keys --------------------------------------------------------------------------------


async def test_keys_create_list_revoke(client: httpx.AsyncClient, admin: Headers) -> None:
    r = await client.post(
        "/v1/keys", json={"name": "storefront", "scopes": ["reserve:web", "read"]}, headers=admin
    )
    assert r.status_code == 201
    created = r.json()
    assert set(created) == {"id", "name", "scopes", "created_at", "revoked_at", "key"}
    assert created["name"] == "storefront"
    assert sorted(created["scopes"]) == ["read", "reserve:web"]
    assert created["revoked_at"] is None
    assert created["key"].startswith(f"atp_{created['id']}_")

    r = await client.get("/v1/keys", headers=admin)
    assert r.status_code == 200
    items = r.json()["items"]
    assert [k["id"] for k in items] == [created["id"]]
    assert all("key" not in k and "hash" not in k for k in items)
    assert created["key"] not in r.text

    r = await client.delete(f"/v1/keys/{created['id']}", headers=admin)
    assert r.status_code == 200
    assert r.json()["id"] == created["id"]
    assert r.json()["revoked_at"] is not None
    r = await client.get("/v1/keys", headers=admin)
    assert r.json()["items"][0]["revoked_at"] is not None

    assert_problem(
        await client.delete("/v1/keys/0123456789abcdef", headers=admin), 404, "not_found"
    )
    r = await client.post("/v1/keys", json={"name": "x", "scopes": ["superuser"]}, headers=admin)
    problem = assert_problem(r, 422, "invalid_request")
    assert problem["errors"][0]["field"] == "scopes"


# -- health and metrics ------------------------------------------------------------------


async def test_health_ready_metrics(client: httpx.AsyncClient, admin: Headers, seed: Seed) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    await seed("SKU-1", "DC1", 1)
    assert (
        await client.post(
            "/v1/reservations", json=reserve_body("m1", ("SKU-1", "DC1", 1)), headers=admin
        )
    ).status_code == 201
    assert (
        await client.post(
            "/v1/reservations", json=reserve_body("m2", ("SKU-1", "DC1", 1)), headers=admin
        )
    ).status_code == 409
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "atp_http_request_duration_seconds_bucket" in text
    assert 'route="/v1/reservations"' in text
    assert "atp_reservations_total" in text
    assert 'outcome="accepted"' in text
    assert 'outcome="insufficient_stock"' in text


async def test_readyz_reloads_flushed_scripts(client: httpx.AsyncClient, atp: ATP) -> None:
    await atp.redis.script_flush()
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert await atp.scripts.loaded(atp.redis)


# -- concurrency -------------------------------------------------------------------------


async def test_concurrent_reservations_never_oversell(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, new_key: NewKey, atp: ATP
) -> None:
    await seed("HOT", "DC1", 40)
    web = await new_key("reserve:web")

    async def one(i: int) -> httpx.Response:
        return await client.post(
            "/v1/reservations", json=reserve_body(f"flash-{i}", ("HOT", "DC1", 1)), headers=web
        )

    answers = await asyncio.gather(*(one(i) for i in range(100)))
    codes = [r.status_code for r in answers]
    assert codes.count(201) == 40
    assert codes.count(409) == 60
    for r in answers:
        if r.status_code == 409:
            assert r.json()["type"].endswith("/insufficient_stock")
    p = await get_pos(client, admin, "HOT")
    assert (p["on_hand"], p["committed"], p["available"]) == (40, 40, 0)
    assert p["committed_by_channel"] == {"web": 40}
    report = await verify(atp)
    assert report.ok, report.problems


def test_document_lists_every_answer_of_a_body(app: object) -> None:
    """Routes that read a body can answer 400 (not JSON at all), 413 and 422, and say so."""
    doc = app.openapi()  # type: ignore[attr-defined]
    with_body = [
        (m, p, op)
        for p, ops in doc["paths"].items()
        for m, op in ops.items()
        if "requestBody" in op
    ]
    # positions (3), reservations (3), rules, keys, exception resolve, counts
    assert len(with_body) >= 10
    for method, path, op in with_body:
        assert {"400", "413", "422"} <= set(op["responses"]), (method, path)
        for status in ("400", "413", "422"):
            assert "application/problem+json" in op["responses"][status]["content"], (method, path)


async def test_metrics_units_committed_and_held(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 10)
    held = reserve_body("g1", ("SKU-1", "DC1", 2), hold=600)
    assert (await client.post("/v1/reservations", json=held, headers=admin)).status_code == 201
    confirmed = reserve_body("g2", ("SKU-1", "DC1", 3))
    assert (await client.post("/v1/reservations", json=confirmed, headers=admin)).status_code == 201
    text = (await client.get("/metrics")).text
    assert "atp_units_committed 5.0" in text
    assert "atp_units_held 2.0" in text
    assert (await client.post("/v1/reservations/g1/confirm", headers=admin)).status_code == 200
    text = (await client.get("/metrics")).text
    assert "atp_units_committed 5.0" in text and "atp_units_held 0.0" in text
