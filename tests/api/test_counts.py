"""``POST /v1/counts`` and ``GET /v1/counts/{batch_id}``: scopes, the 202 answer and its
Location, 404 and 422 problems, and a round trip through a worker run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from api_support import Headers, NewKey, Seed, assert_problem, bearer

from atp import ATP
from atp.worker import Worker


def _row(sku: str, qty: Any, at: str | None = None) -> dict[str, Any]:
    return {
        "sku": sku,
        "location": "DC1",
        "counted_qty": qty,
        "counted_at": at or datetime.now(UTC).isoformat(),
    }


async def _queue(client: httpx.AsyncClient, headers: Headers, body: Any) -> httpx.Response:
    return await client.post("/v1/counts", json=body, headers=headers)


async def test_queue_then_read_back_through_a_worker(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP, new_key: NewKey
) -> None:
    await seed("SKU-1", "DC1", 100)
    await seed("SKU-2", "DC1", 10)
    body = {
        "count_id": "cycle-2025-01",
        "source": "wms-east",
        "rows": [_row("SKU-1", 96), _row("SKU-2", -3), _row("SKU-3", 4), _row("SKU-2", 12)],
    }
    r = await _queue(client, admin, body)
    assert r.status_code == 202, r.text
    out = r.json()
    bid = out["batch_id"]
    assert out == {"batch_id": bid, "count_id": "cycle-2025-01", "status": "queued", "rows": 4}
    assert r.headers["location"] == f"/v1/counts/{bid}"
    reader = await new_key("read")
    r = await client.get(r.headers["location"], headers=reader)
    assert r.status_code == 200, r.text
    queued = r.json()
    assert (queued["status"], queued["rows"], queued["done"], queued["report"]) == (
        "queued", 4, 0, None,
    )  # fmt: skip
    assert queued["queued_at"] and queued["started_at"] is None

    assert (await Worker(atp, reaper_interval=0).run_once()).batches == 1

    r = await client.get(f"/v1/counts/{bid}", headers=reader)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "done" and done["done"] == 4 and done["source"] == "wms-east"
    rep = done["report"]
    assert (rep["rows"], rep["applied"], rep["refused"]) == (4, 2, 2)
    assert rep["refused_by_reason"] == {"bad_count": 1, "unknown_position": 1}
    assert rep["total_abs_drift"] == 4 + 2
    assert {r["row"] for r in rep["refused_rows"]} == {2, 3}
    pos = (await client.get("/v1/positions/SKU-1/DC1", headers=admin)).json()
    assert pos["on_hand"] == 96
    moves = (await client.get("/v1/positions/SKU-1/DC1/movements", headers=admin)).json()
    count = [m for m in moves["items"] if m["kind"] == "count"]
    assert len(count) == 1 and count[0]["ref"] == "cycle-2025-01"
    assert (
        count[0]["source"] == "wms-east" and count[0]["actor"] == "bootstrap"
    )  # the admin key's id


async def test_the_batch_id_names_the_count_when_none_is_given(
    client: httpx.AsyncClient, admin: Headers
) -> None:
    r = await _queue(client, admin, {"rows": [_row("SKU-1", 1)]})
    assert r.status_code == 202, r.text
    assert r.json()["count_id"] == r.json()["batch_id"]
    got = (await client.get(r.headers["location"], headers=admin)).json()
    assert got["count_id"] == got["batch_id"] and got["source"] == "api"


async def test_scopes(client: httpx.AsyncClient, admin: Headers, new_key: NewKey) -> None:
    body = {"rows": [_row("SKU-1", 1)]}
    bid = (await _queue(client, admin, body)).json()["batch_id"]
    for headers in ({}, bearer("atp_nope_nope"), {"Authorization": "Basic x"}):
        assert_problem(await _queue(client, headers, body), 401, "unauthorized")
        r = await client.get(f"/v1/counts/{bid}", headers=headers)
        assert_problem(r, 401, "unauthorized")
    for scopes in (("read",), ("fulfil",), ("reserve:web",)):
        key = await new_key(*scopes)
        assert_problem(await _queue(client, key, body), 403, "forbidden")
    for scopes in (("fulfil",), ("reserve:web",)):
        key = await new_key(*scopes)
        assert_problem(await client.get(f"/v1/counts/{bid}", headers=key), 403, "forbidden")
    for scopes in (("read",), ("admin",)):
        key = await new_key(*scopes)
        assert (await client.get(f"/v1/counts/{bid}", headers=key)).status_code == 200


@pytest.mark.parametrize("bid", ["cnt-1700000000000-00000000", "nope", "cnt-1-zz"])
async def test_unknown_batch_is_404(client: httpx.AsyncClient, admin: Headers, bid: str) -> None:
    body = assert_problem(await client.get(f"/v1/counts/{bid}", headers=admin), 404, "not_found")
    assert bid in body["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "rows"),
        ({"rows": []}, "rows"),
        ({"rows": "SKU-1,DC1,3"}, "rows"),
        ({"rows": [[1, 2, 3, 4]]}, "rows.0"),
        ({"rows": [{"sku": "SKU-1", "location": "DC1", "counted_qty": 1}]}, "rows.0.counted_at"),
        ({"rows": [_row("SKU-1", "12")]}, "rows.0.counted_qty"),
        ({"rows": [_row("SKU-1", 1.5)]}, "rows.0.counted_qty"),
        ({"rows": [{**_row("SKU-1", 1), "bin": "A1"}]}, "rows.0.bin"),
        ({"rows": [_row("SKU-1", 1)], "count_id": "has spaces"}, "count_id"),
        ({"rows": [_row("SKU-1", 1)], "assume_utc": "yes"}, "assume_utc"),
        ({"rows": [_row("SKU-1", 1)], "extra": 1}, "extra"),
    ],
)
async def test_a_body_that_is_not_a_count_is_422(
    client: httpx.AsyncClient, admin: Headers, atp: ATP, body: Any, field: str
) -> None:
    r = await _queue(client, admin, body)
    problem = assert_problem(r, 422, "validation_error")
    assert field in {e["field"] for e in problem["errors"]}, problem
    assert await atp.redis.exists(atp.keys.counts_queue()) == 0  # nothing queued


async def test_malformed_json_and_too_large_bodies(
    client: httpx.AsyncClient, admin: Headers, atp: ATP
) -> None:
    r = await client.post(
        "/v1/counts", content=b'{"rows": [', headers={**admin, "Content-Type": "application/json"}
    )
    assert_problem(r, 422, "validation_error")
    rows = [_row(f"SKU-{i}", i) for i in range(atp.settings.max_body_bytes // 40)]
    assert_problem(await _queue(client, admin, {"rows": rows}), 413, "body_too_large")
    assert await atp.redis.exists(atp.keys.counts_queue()) == 0


async def test_the_row_limit_is_the_cores(
    client: httpx.AsyncClient, admin: Headers, atp: ATP
) -> None:
    atp.settings.counts_max_rows = 3
    try:
        r = await _queue(client, admin, {"rows": [_row("SKU-1", 1)] * 4})
    finally:
        atp.settings.counts_max_rows = 100_000
    problem = assert_problem(r, 422, "invalid_request")
    assert problem["errors"][0]["field"] == "rows"
