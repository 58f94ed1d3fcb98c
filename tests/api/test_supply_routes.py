"""Expected receipts, dated reservations and promise dates over HTTP (issue 7)."""

from __future__ import annotations

from datetime import date, timedelta

import httpx
from api_support import Headers, NewKey, Seed, assert_problem, snapshot

from atp import ATP
from atp.verify import verify


async def today(atp: ATP) -> date:
    t = await atp.redis.time()
    return date(1970, 1, 1) + timedelta(days=int(t[0]) // 86_400)


async def test_inbound_lifecycle(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, new_key: NewKey, atp: ATP
) -> None:
    d = await today(atp)
    await seed("SKU-1", "DC1", 3)
    url = "/v1/positions/SKU-1/DC1/inbound"
    body = {"reference": "PO-1/2", "qty": 10, "expected_at": (d + timedelta(days=4)).isoformat()}
    r = await client.post(url, json=body, headers=admin)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["replayed"] is False and out["exception_id"] is None
    assert out["position"]["in_transit"] == 10 and out["position"]["on_hand"] == 3
    assert out["inbound"]["expected_date"] == (d + timedelta(days=4)).isoformat()
    assert out["inbound"]["expected_at"].startswith((d + timedelta(days=4)).isoformat())
    # the same request again: 200, nothing changed; other figures: 409 naming the receipt
    r = await client.post(url, json=body, headers=admin)
    assert r.status_code == 200 and r.json()["replayed"] is True
    r = await client.post(url, json={**body, "qty": 11}, headers=admin)
    problem = assert_problem(r, 409, "inbound_exists")
    assert problem["inbound"]["qty"] == 10
    # a date-time with a zone is taken; without a zone it is refused
    r = await client.post(
        url,
        json={"reference": "ASN-9", "qty": 2, "expected_at": f"{d}T23:30:00+00:00"},
        headers=admin,
    )
    assert r.status_code == 201 and r.json()["inbound"]["expected_date"] == d.isoformat()
    r = await client.post(
        url, json={"reference": "ASN-8", "qty": 2, "expected_at": f"{d}T10:00:00"}, headers=admin
    )
    assert_problem(r, 422, "invalid_request")
    # reading needs read, writing needs admin
    reader = await new_key("read")
    r = await client.get(url, headers=reader)
    assert r.status_code == 200
    assert [i["reference"] for i in r.json()["items"]] == ["ASN-9", "PO-1/2"]
    assert_problem(await client.post(url, json=body, headers=reader), 403, "forbidden")
    # amend (the reference holds a slash: the path takes it), then receive part of it
    r = await client.patch(f"{url}/PO-1/2", json={"qty": 8}, headers=admin)
    assert r.status_code == 200, r.text
    assert (r.json()["inbound"]["qty"], r.json()["position"]["in_transit"]) == (8, 10)
    assert_problem(
        await client.patch(f"{url}/PO-1/2", json={}, headers=admin), 422, "invalid_request"
    )
    r = await client.post(
        "/v1/positions/SKU-1/DC1/receive",
        json={"qty": 5, "reference": "PO-1/2"},
        headers=admin,
    )
    assert r.status_code == 200 and (r.json()["on_hand"], r.json()["in_transit"]) == (8, 5)
    r = await client.post(
        "/v1/positions/SKU-1/DC1/receive",
        json={"qty": 1, "reference": "PO-1/2", "close": True},
        headers=admin,
    )
    assert r.status_code == 200 and (r.json()["on_hand"], r.json()["in_transit"]) == (9, 2)
    # cancel the other; a second cancel is 404
    r = await client.delete(f"{url}/ASN-9", headers=admin)
    assert r.status_code == 200 and r.json()["inbound"] is None
    assert r.json()["position"]["in_transit"] == 0
    assert_problem(await client.delete(f"{url}/ASN-9", headers=admin), 404, "unknown_inbound")
    assert (await client.get(url, headers=admin)).json() == {"items": []}
    assert (await verify(atp)).ok


async def test_bad_inbound_changes_nothing(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP
) -> None:
    await seed("SKU-1", "DC1", 3)
    url = "/v1/positions/SKU-1/DC1/inbound"
    before = await snapshot(atp)
    for body in (
        {"reference": "P", "qty": 0, "expected_at": "2026-12-01"},
        {"reference": "P", "qty": 1, "expected_at": "tomorrow"},
        {"reference": "P", "qty": 1, "expected_at": "1999-01-01"},
        {"reference": "", "qty": 1, "expected_at": "2026-12-01"},
        {"reference": "P", "qty": 1},
        {"reference": "P", "qty": 1, "expected_at": "2026-12-01", "extra": 1},
    ):
        r = await client.post(url, json=body, headers=admin)
        assert r.status_code == 422, (body, r.text)
    assert_problem(
        await client.patch(f"{url}/nope", json={"qty": 2}, headers=admin), 404, "unknown_inbound"
    )
    assert await snapshot(atp) == before


async def test_dated_reservation_and_promise(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP
) -> None:
    d = await today(atp)
    await seed("SKU-1", "DC1", 2)
    r = await client.post(
        "/v1/positions/SKU-1/DC1/inbound",
        json={"reference": "PO-1", "qty": 10, "expected_at": (d + timedelta(days=3)).isoformat()},
        headers=admin,
    )
    assert r.status_code == 201
    body = {
        "reservation_id": "r-1",
        "channel": "web",
        "lines": [{"sku": "SKU-1", "location": "DC1", "qty": 6}],
        "hold_seconds": 0,
    }
    # now: not enough on the shelf, and the problem says when
    problem = assert_problem(
        await client.post("/v1/reservations", json=body, headers=admin), 409, "insufficient_stock"
    )
    assert problem["lines"][0]["promise_date"] == (d + timedelta(days=3)).isoformat()
    r = await client.get(
        "/v1/availability/promise",
        params={"sku": "SKU-1", "location": "DC1", "channel": "web", "qty": 6},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "sku": "SKU-1",
        "location": "DC1",
        "channel": "web",
        "qty": 6,
        "promise_date": (d + timedelta(days=3)).isoformat(),
        "available_now": 2,
        "blocked_by": None,
    }
    r = await client.post(
        "/v1/reservations",
        json={**body, "requested_date": (d + timedelta(days=3)).isoformat()},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    assert r.json()["requested_date"] == (d + timedelta(days=3)).isoformat()
    r = await client.get("/v1/reservations/r-1", headers=admin)
    assert r.json()["requested_date"] == (d + timedelta(days=3)).isoformat()
    r = await client.get(
        "/v1/availability/explain",
        params={
            "sku": "SKU-1",
            "location": "DC1",
            "channel": "web",
            "requested_date": (d + timedelta(days=5)).isoformat(),
            "qty": 7,
        },
        headers=admin,
    )
    assert r.status_code == 200, r.text
    e = r.json()
    assert (e["atp"], e["in_transit"], e["committed_dated"], e["promise_date"]) == (6, 10, 6, None)
    assert e["schedule"] == [
        {"date": (d + timedelta(days=3)).isoformat(), "inbound": 10, "dated": 6, "atp": 6}
    ]
    r = await client.get(
        "/v1/availability/promise",
        params={"sku": "NOPE", "location": "DC1", "channel": "web", "qty": 1},
        headers=admin,
    )
    assert_problem(r, 404, "unknown_position")
    r = await client.post(
        "/v1/reservations",
        json={**body, "reservation_id": "r-2", "requested_date": "soon"},
        headers=admin,
    )
    assert r.status_code == 422
    assert (await verify(atp)).ok


async def test_backorder_over_http(client: httpx.AsyncClient, admin: Headers, seed: Seed) -> None:
    await seed("SKU-1", "DC1", 1)
    body = {
        "reservation_id": "bo-1",
        "channel": "web",
        "lines": [{"sku": "SKU-1", "location": "DC1", "qty": 3}],
        "on_short": "backorder",
    }
    r = await client.post("/v1/reservations", json=body, headers=admin)
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["backordered"], r.json()["filled_at"]) == (
        "backordered", True, None
    )  # fmt: skip
    assert (await client.get("/v1/positions/SKU-1/DC1", headers=admin)).json()["backordered"] == 3
    assert_problem(
        await client.post("/v1/reservations/bo-1/confirm", headers=admin), 409, "backordered"
    )
    r = await client.post(
        "/v1/reservations",
        json={**body, "reservation_id": "bo-2", "hold_seconds": 60},
        headers=admin,
    )
    assert_problem(r, 422, "invalid_request")
    r = await client.post(
        "/v1/positions/SKU-1/DC1/receive", json={"qty": 2, "reference": "PO-1"}, headers=admin
    )
    assert r.status_code == 200 and r.json()["committed"] == 3 and r.json()["backordered"] == 0
    got = (await client.get("/v1/reservations/bo-1", headers=admin)).json()
    assert got["status"] == "confirmed" and got["filled_at"]
    # a backorder still waiting is cancelled by releasing it
    r = await client.post(
        "/v1/reservations", json={**body, "reservation_id": "bo-3"}, headers=admin
    )
    assert r.json()["status"] == "backordered"
    r = await client.post(
        "/v1/reservations/bo-3/release", json={"reason": "cancelled"}, headers=admin
    )
    assert r.status_code == 200 and r.json()["status"] == "released"
    assert (await client.get("/v1/positions/SKU-1/DC1", headers=admin)).json()["backordered"] == 0
