"""GET /v1/exceptions, GET /v1/exceptions/{id}, POST /v1/exceptions/{id}/resolve: real
exceptions raised by a cycle count and by a short pick, listed, paged and resolved;
release really releases the reservations at risk (audited: movements and the outbox),
keep releases nothing; idempotency, conflicts, bad input and the scope matrix."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from api_support import Headers, NewKey, Seed, assert_problem, snapshot

from atp import ATP
from atp.models import CountRow


async def _reserve(
    client: httpx.AsyncClient, admin: Headers, rid: str, qty: int, hold: int = 0, ch: str = "web"
) -> None:
    body = {
        "reservation_id": rid,
        "channel": ch,
        "lines": [{"sku": "SKU-1", "location": "DC1", "qty": qty}],
        "hold_seconds": hold,
    }
    r = await client.post("/v1/reservations", json=body, headers=admin)
    assert r.status_code == 201, r.text


async def _count(atp: ATP, counted: int, count_id: str = "count-1") -> str:
    (res,) = await atp.apply_counts(
        count_id, [CountRow("SKU-1", "DC1", counted, datetime.now(UTC), 1)], source="test"
    )
    assert res.status == "applied", res
    assert res.exception_id is not None
    return res.exception_id


@pytest.fixture
async def oversold(client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP) -> str:
    """10 on hand, three reservations of 3 (old confirmed, newer held, newest confirmed),
    then a count of 5: shortfall 4, and the shortage rule puts at risk the held one (held
    before confirmed) and the newest confirmed one; the oldest stays safe (made in the same
    millisecond, the two confirmed ones sort by id, which puts r-new first too)."""
    await seed("SKU-1", "DC1", 10)
    await _reserve(client, admin, "r-old", 3)
    await _reserve(client, admin, "r-held", 3, hold=600)
    await _reserve(client, admin, "r-new", 3)
    return await _count(atp, 5)


async def _admin_key(client: httpx.AsyncClient, admin: Headers) -> tuple[str, Headers]:
    r = await client.post("/v1/keys", json={"name": "ops", "scopes": ["admin"]}, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()["id"], {"Authorization": f"Bearer {r.json()['key']}"}


async def _events(atp: ATP, exception_id: str) -> list[dict[str, Any]]:
    b = int(exception_id.split("-")[0])
    out = []
    for _, fields in await atp.redis.xrange(atp.keys.events(b)):
        f = {k.decode(): v.decode() for k, v in fields.items()}
        f["data"] = json.loads(f["data"])
        out.append(f)
    return out


async def test_count_raises_an_exception_listed_with_its_reservations_at_risk(
    client: httpx.AsyncClient, admin: Headers, oversold: str
) -> None:
    r = await client.get("/v1/exceptions", headers=admin)
    assert r.status_code == 200, r.text
    page = r.json()
    assert [e["id"] for e in page["items"]] == [oversold]
    assert page["next_before"] is None
    e = page["items"][0]
    assert e["kind"] == "oversell"
    assert e["cause"] == "cycle_count"
    assert e["count"] == "count-1"
    assert e["status"] == "open"
    assert e["resolution"] is None
    assert (e["sku"], e["location"], e["on_hand"], e["committed"], e["shortfall"]) == (
        "SKU-1",
        "DC1",
        5,
        9,
        4,
    )
    assert [(a["reservation_id"], a["status"], a["qty"]) for a in e["at_risk"]] == [
        ("r-held", "held", 3),
        ("r-new", "confirmed", 3),
    ]
    for a in e["at_risk"]:
        assert a["channel"] == "web"
        assert datetime.fromisoformat(a["created_at"]).tzinfo is not None
    datetime.fromisoformat(e["raised_at"])
    one = await client.get(f"/v1/exceptions/{oversold}", headers=admin)
    assert one.status_code == 200
    assert one.json() == e


async def test_release_releases_the_reservations_at_risk_and_is_audited(
    client: httpx.AsyncClient, admin: Headers, oversold: str, atp: ATP
) -> None:
    key_id, ops = await _admin_key(client, admin)
    r = await client.post(
        f"/v1/exceptions/{oversold}/resolve",
        json={"action": "release", "note": "customer service called"},
        headers=ops,
    )
    assert r.status_code == 200, r.text
    e = r.json()
    assert e["status"] == "resolved"
    res = e["resolution"]
    assert (res["action"], res["note"], res["by"]) == ("release", "customer service called", key_id)
    assert sorted(res["released"]) == ["r-held", "r-new"]
    datetime.fromisoformat(res["at"])
    # the reservations named are released, the safe one is not
    for rid, status in (("r-held", "released"), ("r-new", "released"), ("r-old", "confirmed")):
        got = await client.get(f"/v1/reservations/{rid}", headers=admin)
        assert got.json()["status"] == status, rid
    pos = await client.get("/v1/positions/SKU-1/DC1", headers=admin)
    assert (pos.json()["on_hand"], pos.json()["committed"]) == (5, 3)
    # audit: one release movement per reservation, by the operator, naming the exception
    moves = await client.get("/v1/positions/SKU-1/DC1/movements", headers=admin)
    releases = [m for m in moves.json()["items"] if m["kind"] == "release"]
    assert sorted(m["reservation_id"] for m in releases) == ["r-held", "r-new"]
    for m in releases:
        assert m["reason"] == f"exception {oversold}"
        assert m["actor"] == key_id
        assert m["source"] == "api"
    # and the resolution on the outbox
    resolved = [ev for ev in await _events(atp, oversold) if ev["type"] == "exception_resolved"]
    assert len(resolved) == 1
    assert resolved[0]["actor"] == key_id
    assert resolved[0]["data"]["id"] == oversold
    assert resolved[0]["data"]["action"] == "release"
    assert sorted(resolved[0]["data"]["released"]) == ["r-held", "r-new"]
    # no longer open
    assert (await client.get("/v1/exceptions", headers=admin)).json()["items"] == []
    listed = await client.get("/v1/exceptions", params={"status": "resolved"}, headers=admin)
    assert [x["id"] for x in listed.json()["items"]] == [oversold]


async def test_keep_releases_nothing(
    client: httpx.AsyncClient, admin: Headers, oversold: str, atp: ATP
) -> None:
    before = await atp.position("SKU-1", "DC1")
    r = await client.post(
        f"/v1/exceptions/{oversold}/resolve", json={"action": "keep"}, headers=admin
    )
    assert r.status_code == 200, r.text
    res = r.json()["resolution"]
    assert (res["action"], res["note"], res["released"], res["by"]) == (
        "keep",
        "",
        [],
        "bootstrap",
    )
    assert await atp.position("SKU-1", "DC1") == before
    for rid in ("r-old", "r-held", "r-new"):
        got = await client.get(f"/v1/reservations/{rid}", headers=admin)
        assert got.json()["status"] in ("held", "confirmed")
    resolved = [ev for ev in await _events(atp, oversold) if ev["type"] == "exception_resolved"]
    assert [ev["data"]["action"] for ev in resolved] == ["keep"]


@pytest.mark.parametrize(("first", "other"), [("release", "keep"), ("keep", "release")])
async def test_resolving_again_is_idempotent_and_another_way_is_409(
    client: httpx.AsyncClient, admin: Headers, oversold: str, atp: ATP, first: str, other: str
) -> None:
    url = f"/v1/exceptions/{oversold}/resolve"
    r1 = await client.post(url, json={"action": first, "note": "n"}, headers=admin)
    assert r1.status_code == 200, r1.text
    state = await snapshot(atp)
    r2 = await client.post(url, json={"action": first, "note": "n"}, headers=admin)
    assert r2.status_code == 200, r2.text
    assert r2.json() == r1.json()
    body = assert_problem(
        await client.post(url, json={"action": other}, headers=admin), 409, "already_resolved"
    )
    assert body["action"] == first
    # neither the replay nor the refusal changed anything (no second event either)
    assert await snapshot(atp) == state


async def test_unknown_and_malformed_ids(
    client: httpx.AsyncClient, admin: Headers, oversold: str
) -> None:
    b, n = oversold.split("-")
    for missing in (f"{b}-{int(n) + 1}", "15-999", "99999-1"):  # 16 buckets in the tests
        assert_problem(
            await client.get(f"/v1/exceptions/{missing}", headers=admin), 404, "unknown_exception"
        )
        assert_problem(
            await client.post(
                f"/v1/exceptions/{missing}/resolve", json={"action": "keep"}, headers=admin
            ),
            404,
            "unknown_exception",
        )
    for bad in ("abc", "1-", "-1", "1-2-3", "1_2", "x" * 30):
        assert_problem(
            await client.get(f"/v1/exceptions/{bad}", headers=admin), 422, "validation_error"
        )
        assert_problem(
            await client.post(
                f"/v1/exceptions/{bad}/resolve", json={"action": "keep"}, headers=admin
            ),
            422,
            "validation_error",
        )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"action": "maybe"},
        {"action": "release", "note": 5},
        {"action": "keep", "note": "x" * 1001},
        {"action": "keep", "extra": 1},
        {"action": ["keep"]},
    ],
)
async def test_bad_resolve_bodies_are_422_and_change_nothing(
    client: httpx.AsyncClient, admin: Headers, oversold: str, atp: ATP, body: Any
) -> None:
    state = await snapshot(atp)
    r = await client.post(f"/v1/exceptions/{oversold}/resolve", json=body, headers=admin)
    assert_problem(r, 422, "validation_error")
    assert await snapshot(atp) == state


@pytest.mark.parametrize(
    "params",
    [
        {"status": "closed"},
        {"kind": "fire"},
        {"limit": 0},
        {"limit": 1001},
        {"limit": "many"},
        {"before": "nope"},
    ],
)
async def test_bad_list_parameters_are_422(
    client: httpx.AsyncClient, admin: Headers, params: dict[str, Any]
) -> None:
    assert_problem(
        await client.get("/v1/exceptions", params=params, headers=admin), 422, "validation_error"
    )


async def test_short_pick_raises_exceptions_filtered_by_kind(
    client: httpx.AsyncClient, admin: Headers, seed: Seed
) -> None:
    await seed("SKU-1", "DC1", 6)
    await _reserve(client, admin, "first", 3)
    await _reserve(client, admin, "second", 3, hold=600)
    r = await client.post(
        "/v1/reservations/first/fulfil",
        json={"lines": [{"sku": "SKU-1", "location": "DC1", "shipped": 1, "short": 2}]},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    shorts = (await client.get("/v1/exceptions?kind=short_pick", headers=admin)).json()["items"]
    assert len(shorts) == 1
    sp = shorts[0]
    assert (sp["kind"], sp["reservation_id"], sp["short"], sp["sku"]) == (
        "short_pick",
        "first",
        2,
        "SKU-1",
    )
    # 3 left on hand, 5 still committed (the short units stay open): shortfall 2, and the
    # hold is the one put at risk (holds before confirmed; both may share a millisecond)
    assert sp["shortfall"] == 2
    assert [a["reservation_id"] for a in sp["at_risk"]] == ["second"]
    over = (await client.get("/v1/exceptions?kind=oversell", headers=admin)).json()["items"]
    assert [(o["kind"], o["cause"]) for o in over] == [("oversell", "short_pick")]
    both = (await client.get("/v1/exceptions?status=all", headers=admin)).json()["items"]
    assert {e["id"] for e in both} == {sp["id"], over[0]["id"]}
    # releasing from the short pick releases the reservation it names
    r = await client.post(
        f"/v1/exceptions/{sp['id']}/resolve", json={"action": "release"}, headers=admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["resolution"]["released"] == ["second"]
    assert (await client.get("/v1/reservations/second", headers=admin)).json()[
        "status"
    ] == "released"


async def test_release_skips_reservations_no_longer_live(
    client: httpx.AsyncClient, admin: Headers, oversold: str
) -> None:
    # one of the two at risk was released by its channel in the meantime
    assert (await client.post("/v1/reservations/r-new/release", headers=admin)).status_code == 200
    r = await client.post(
        f"/v1/exceptions/{oversold}/resolve", json={"action": "release"}, headers=admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["resolution"]["released"] == ["r-held"]


async def test_paging_newest_first(
    client: httpx.AsyncClient, admin: Headers, seed: Seed, atp: ATP
) -> None:
    await seed("SKU-1", "DC1", 90)
    await _reserve(client, admin, "big", 90)
    for _ in range(5):  # each damaged unit leaves the position uncovered again
        r = await client.post(
            "/v1/positions/SKU-1/DC1/adjust", json={"delta": -1, "reason": "damaged"}, headers=admin
        )
        assert r.status_code == 200, r.text
    everything = (await client.get("/v1/exceptions", headers=admin)).json()["items"]
    assert [e["cause"] for e in everything] == ["adjust"] * 5
    ids = [e["id"] for e in everything][::-1]
    # one bucket: raised in the order of their numbers
    assert [int(i.split("-")[1]) for i in ids] == sorted(int(i.split("-")[1]) for i in ids)
    seen: list[str] = []
    before = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2}
        if before:
            params["before"] = before
        page = (await client.get("/v1/exceptions", params=params, headers=admin)).json()
        seen += [e["id"] for e in page["items"]]
        before = page["next_before"]
        if before is None:
            break
    assert seen == ids[::-1]
    one = (await client.get("/v1/exceptions?limit=1", headers=admin)).json()
    assert [e["id"] for e in one["items"]] == [ids[-1]]
    assert one["next_before"] == ids[-1]
    # a cursor that names no exception
    assert_problem(
        await client.get("/v1/exceptions", params={"before": "3-999"}, headers=admin),
        404,
        "unknown_exception",
    )


ROLES: dict[str, tuple[str, ...]] = {
    "admin": ("admin",),
    "read": ("read",),
    "fulfil": ("fulfil",),
    "web": ("reserve:web",),
}


@pytest.mark.parametrize(
    ("role", "list_ok", "resolve_ok"),
    [("admin", True, True), ("read", True, False), ("fulfil", False, False), ("web", False, False)],
)
async def test_scopes(
    client: httpx.AsyncClient,
    new_key: NewKey,
    oversold: str,
    atp: ATP,
    role: str,
    list_ok: bool,
    resolve_ok: bool,
) -> None:
    headers = await new_key(*ROLES[role], name=role)
    for url in ("/v1/exceptions", f"/v1/exceptions/{oversold}"):
        r = await client.get(url, headers=headers)
        if list_ok:
            assert r.status_code == 200, r.text
        else:
            assert_problem(r, 403, "forbidden")
    state = await snapshot(atp)
    r = await client.post(
        f"/v1/exceptions/{oversold}/resolve", json={"action": "release"}, headers=headers
    )
    if resolve_ok:
        assert r.status_code == 200, r.text
    else:
        assert_problem(r, 403, "forbidden")
        assert await snapshot(atp) == state


async def test_no_key_is_401(client: httpx.AsyncClient, oversold: str) -> None:
    for method, url in (
        ("GET", "/v1/exceptions"),
        ("GET", f"/v1/exceptions/{oversold}"),
        ("POST", f"/v1/exceptions/{oversold}/resolve"),
    ):
        for headers in ({}, {"Authorization": "Bearer nonsense"}):
            r = await client.request(method, url, json={"action": "keep"}, headers=headers)
            assert_problem(r, 401, "unauthorized")
