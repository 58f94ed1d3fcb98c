"""Replenishment over HTTP: levels per position, the open-signal list, planning settings
and the plan; precise 4xx on bad input that change nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from api_support import Headers, NewKey, Seed, assert_problem, snapshot

from atp import ATP


async def outbox(atp: ATP, sku: str, etype: str) -> list[dict[str, Any]]:
    rows = await atp.redis.xrange(atp._events(sku), "-", "+")
    return [json.loads(f[b"data"]) for _, f in rows if f[b"type"] == etype.encode()]


async def test_large_order_signal_in_outbox_and_list(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP, new_key: NewKey
) -> None:
    """The blind-replenishment pattern: a large order accepted shows at once."""
    await seed("SKU-1", "DC1", 100)
    r = await client.put(
        "/v1/positions/SKU-1/DC1/replenishment",
        json={"reorder_point": 30, "order_up_to": 120},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "sku": "SKU-1", "location": "DC1", "reorder_point": 30, "order_up_to": 120,
        "signal_open": False, "signal": None,
    }  # fmt: skip
    reader = await new_key("read")
    assert (await client.get("/v1/replenishment", headers=reader)).json()["items"] == []

    body = {
        "reservation_id": "big-order",
        "channel": "b2b",
        "lines": [{"sku": "SKU-1", "location": "DC1", "qty": 80}],
        "hold_seconds": 0,
    }
    assert (await client.post("/v1/reservations", json=body, headers=admin)).status_code == 201

    [ev] = await outbox(atp, "SKU-1", "replenishment")
    assert (ev["inventory_position"], ev["suggested_qty"]) == (20, 100)
    page = (await client.get("/v1/replenishment", headers=reader)).json()
    assert page["next_after"] is None
    [item] = page["items"]
    assert {k: item[k] for k in ("sku", "location", "on_hand", "committed", "inbound")} == {
        "sku": "SKU-1", "location": "DC1", "on_hand": 100, "committed": 80, "inbound": 0,
    }  # fmt: skip
    assert (item["inventory_position"], item["reorder_point"], item["suggested_qty"]) == (
        20,
        30,
        100,
    )
    got = await client.get("/v1/positions/SKU-1/DC1/replenishment", headers=reader)
    assert got.json()["signal_open"] is True

    # released: the position recovers, the signal clears
    await client.post("/v1/reservations/big-order/release", headers=admin)
    assert (await client.get("/v1/replenishment", headers=reader)).json()["items"] == []
    assert len(await outbox(atp, "SKU-1", "replenishment_cleared")) == 1


async def test_list_pages_in_sku_order(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    for sku in ("A-3", "A-1", "A-2"):
        await seed(sku, "DC1", 5)
        r = await client.put(
            f"/v1/positions/{sku}/DC1/replenishment",
            json={"reorder_point": 10, "order_up_to": 20},
            headers=admin,
        )
        assert r.json()["signal"] == "raised"  # already below: raised when set
    first = (await client.get("/v1/replenishment", params={"limit": 2}, headers=admin)).json()
    assert [i["sku"] for i in first["items"]] == ["A-1", "A-2"]
    assert first["next_after"] == "A-2|DC1"
    rest = await client.get(
        "/v1/replenishment", params={"limit": 2, "after": first["next_after"]}, headers=admin
    )
    assert [i["sku"] for i in rest.json()["items"]] == ["A-3"]
    assert rest.json()["next_after"] is None
    one = await client.get("/v1/replenishment", params={"sku": "A-2"}, headers=admin)
    assert [i["suggested_qty"] for i in one.json()["items"]] == [15]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"reorder_point": 10, "order_up_to": 5}, "invalid_request", "order_up_to"),
        ({"reorder_point": -1, "order_up_to": 5}, "validation_error", "reorder_point"),
        ({"reorder_point": 1.5, "order_up_to": 5}, "validation_error", "reorder_point"),
        ({"reorder_point": "3", "order_up_to": 5}, "validation_error", "reorder_point"),
        ({"reorder_point": 3}, "validation_error", "order_up_to"),
        ({"reorder_point": 3, "order_up_to": 5, "extra": 1}, "validation_error", "extra"),
    ],
)
async def test_bad_levels_refused_and_nothing_changes(
    client: httpx.AsyncClient,
    admin: Headers,
    seed: Seed,
    atp: ATP,
    body: Any,
    code: str,
    field: str,
) -> None:
    await seed("SKU-1", "DC1", 10)
    before = await snapshot(atp)
    r = await client.put("/v1/positions/SKU-1/DC1/replenishment", json=body, headers=admin)
    problem = assert_problem(r, 422, code)
    assert field in [e["field"] for e in problem["errors"]], problem
    assert await snapshot(atp) == before


async def test_levels_of_unknown_position(client: httpx.AsyncClient, admin: Headers) -> None:
    body = {"reorder_point": 1, "order_up_to": 2}
    r = await client.put("/v1/positions/NOPE/DC1/replenishment", json=body, headers=admin)
    assert_problem(r, 404, "unknown_position")
    assert_problem(
        await client.get("/v1/positions/NOPE/DC1/replenishment", headers=admin),
        404,
        "unknown_position",
    )


async def test_settings_and_plan(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP, new_key: NewKey
) -> None:
    await seed("SKU-9", "DC1", 500)
    reader = await new_key("read")
    assert_problem(
        await client.get("/v1/replenishment/settings/SKU-9", headers=reader), 404, "not_found"
    )
    bad = await client.put(
        "/v1/replenishment/settings/SKU-9",
        json={"service_level": 1.0, "lead_time_days": 3},
        headers=admin,
    )
    assert_problem(bad, 422, "validation_error")
    ok = await client.put(
        "/v1/replenishment/settings/SKU-9",
        json={"service_level": 0.95, "lead_time_days": 4, "review_days": 0, "window_days": 7},
        headers=admin,
    )
    assert ok.status_code == 200, ok.text
    got = await client.get("/v1/replenishment/settings/SKU-9", headers=reader)
    assert got.json() == {"sku": "SKU-9", "service_level": 0.95, "lead_time_days": 4.0,
                          "review_days": 0.0, "window_days": 7}  # fmt: skip
    assert_problem(
        await client.get("/v1/replenishment/settings/SKU-9", headers=await new_key("reserve:web")),
        403,
        "forbidden",
    )
    dry = await client.post("/v1/replenishment/plan", json={"dry_run": True}, headers=admin)
    [row] = dry.json()["items"]
    assert (row["sku"], row["location"], row["applied"], row["days"]) == ("SKU-9", "DC1", False, 7)
    assert row["z"] == pytest.approx(1.645, abs=5e-4)
    lv = await client.get("/v1/positions/SKU-9/DC1/replenishment", headers=reader)
    assert lv.json()["reorder_point"] is None
    done = await client.post("/v1/replenishment/plan", json={"skus": ["SKU-9"]}, headers=admin)
    assert done.json()["items"][0]["applied"] is True
    lv = await client.get("/v1/positions/SKU-9/DC1/replenishment", headers=reader)
    assert lv.json()["reorder_point"] == 0  # no demand before today
    unknown = await client.post("/v1/replenishment/plan", json={"skus": ["OTHER"]}, headers=admin)
    assert_problem(unknown, 422, "invalid_request")
