"""The fast lane (api/lane.py) answers exactly as FastAPI does.

* Bodies: whatever ``model_validate_json`` accepts, FastAPI's way (``json.loads``, then the
  model's validation of Python data) accepts as the same value; property-tested.
* Answers: one sequence of requests (ordinary ones, replays, conflicts, refusals, bad input,
  odd headers) gets the same status, headers and body from the app with the lane and from
  the app without it, each on an empty database.
* The lane does serve the ordinary requests (else the comparison would prove nothing), and
  a body it read and handed back reaches FastAPI whole.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from api_support import ADMIN_KEY
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from api import lane
from api.app import create_app
from api.schemas import ReleaseBody, ReserveBody
from atp import ATP, Settings

# -- bodies -------------------------------------------------------------------------------

VALID = (
    b'{"reservation_id":"r-1","channel":"web",'
    b'"lines":[{"sku":"SKU-1","location":"DC1","qty":2}],"hold_seconds":600}'
)


def fastapi_way(model: type[BaseModel], body: bytes) -> BaseModel | None:
    """What FastAPI makes of a JSON body for a route taking ``model`` (None: refused)."""
    try:
        data = json.loads(body)
        return TypeAdapter(model).validate_python(data, from_attributes=True)
    except (ValueError, ValidationError):
        return None


def lane_way(model: type[BaseModel], body: bytes) -> BaseModel | None:
    try:
        return lane.parse(model, body)
    except lane.Fallback:
        return None


def agree(model: type[BaseModel], body: bytes) -> None:
    fast = lane_way(model, body)
    if fast is not None:
        slow = fastapi_way(model, body)
        assert slow is not None, body
        assert fast.model_dump() == slow.model_dump(), body


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["SKU-1", "DC1", "web", "r-1", "", " ", "\ud800", "é", "a\x00"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
line = st.fixed_dictionaries(
    {
        "sku": values | st.just("SKU-1"),
        "qty": values | st.just(1),
    },
    optional={"location": values | st.just("DC1"), "x": values},
)
reserve_doc = st.fixed_dictionaries(
    {
        "reservation_id": st.just("r-1") | values,
        "channel": st.just("web") | values,
        "lines": st.lists(line, max_size=3) | values,
    },
    optional={
        "hold_seconds": values,
        "extra": values,
        "customer_id": st.just("c-1@x.com") | values,
        "region": st.just("EU") | values,
        "allow_split": values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(doc=reserve_doc, ascii_only=st.booleans())
def test_reserve_bodies_agree(doc: dict[str, Any], ascii_only: bool) -> None:
    try:
        body = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except ValueError:
        return
    agree(ReserveBody, body)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    at=st.integers(min_value=0, max_value=len(VALID)),
    cut=st.integers(min_value=0, max_value=3),
    insert=st.binary(max_size=4),
)
def test_mangled_bodies_agree(at: int, cut: int, insert: bytes) -> None:
    agree(ReserveBody, VALID[:at] + insert + VALID[at + cut :])


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(reason=values, raw=st.binary(max_size=12))
def test_release_bodies_agree(reason: Any, raw: bytes) -> None:
    with contextlib.suppress(ValueError):  # not encodable: nothing to send
        body = json.dumps({"reason": reason}, ensure_ascii=False).encode("utf-8", "surrogatepass")
        agree(ReleaseBody, body)
    agree(ReleaseBody, b'{"reason":"' + raw + b'"}')


@pytest.mark.parametrize(
    "body",
    [
        VALID,
        b"\xef\xbb\xbf" + VALID,  # a BOM: json.loads takes it, pydantic does not
        VALID.replace(b"600", b"6e2"),
        VALID.replace(b"600", b"600.0"),
        VALID.replace(b"600", b"-0.0"),
        VALID.replace(b'"qty":2', b'"qty":2,"qty":3'),
        VALID.replace(b"SKU-1", b"SKU\\u002d1"),
        VALID.replace(b"SKU-1", b"SKU\\ud8001"),
        VALID + b" \n\t",
        b" " + VALID,
        VALID + b"\x00",
        VALID.replace(b"600", b"NaN"),
        VALID.replace(b"600", b"1" * 5000),
    ],
)
def test_edge_bodies_agree(body: bytes) -> None:
    agree(ReserveBody, body)


# -- answers ------------------------------------------------------------------------------


def key(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


ADMIN = key(ADMIN_KEY)
JSON_ADMIN = {**ADMIN, "content-type": "application/json"}
STAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00")


def body_of(
    rid: str,
    *lines: tuple[str, str | None, int],
    channel: str = "web",
    hold: int | None = None,
    **extra: Any,
) -> bytes:
    doc: dict[str, Any] = {
        "reservation_id": rid,
        "channel": channel,
        "lines": [
            {"sku": s, "qty": q} if loc is None else {"sku": s, "location": loc, "qty": q}
            for s, loc, q in lines
        ],
        **extra,
    }
    if hold is not None:
        doc["hold_seconds"] = hold
    return json.dumps(doc).encode()


async def conversation(client: httpx.AsyncClient) -> list[tuple[str, int, dict[str, str], bytes]]:
    """Requests against an empty database; returns what each got."""
    out: list[tuple[str, int, dict[str, str], bytes]] = []

    async def ask(
        label: str, method: str, path: str, headers: Any, content: bytes | None = None
    ) -> httpx.Response:
        r = await client.request(method, path, headers=headers, content=content)
        # the length is checked here, not compared: a time stamp whose milliseconds are 0
        # is written without them, so two runs' bodies may differ in length
        if method != "HEAD":  # HEAD says the length of the body it does not send
            assert int(r.headers["content-length"]) == len(r.content), label
        names = ("content-type", "www-authenticate", "allow")
        if method == "HEAD":
            names += ("content-length",)
        kept = {k: v for k, v in r.headers.items() if k in names}
        out.append((label, r.status_code, kept, STAMP.sub(b"<t>", r.content)))
        return r

    for sku in ("A", "B"):
        body = json.dumps({"on_hand": 10, "reason": "seed"}).encode()
        await ask(f"seed {sku}", "PUT", f"/v1/positions/{sku}/DC1", JSON_ADMIN, body)
    made = await client.post(
        "/v1/keys", json={"name": "w", "scopes": ["reserve:web"]}, headers=ADMIN
    )
    web = {**key(made.json()["key"]), "content-type": "application/json"}
    made = await client.post(
        "/v1/keys", json={"name": "m", "scopes": ["reserve:market"]}, headers=ADMIN
    )
    market = {**key(made.json()["key"]), "content-type": "application/json"}
    made = await client.post("/v1/keys", json={"name": "f", "scopes": ["fulfil"]}, headers=ADMIN)
    fulfil = {**key(made.json()["key"]), "content-type": "application/json"}

    res = "/v1/reservations"
    await ask("reserve", "POST", res, web, body_of("r-1", ("A", "DC1", 2), hold=600))
    await ask("replay", "POST", res, web, body_of("r-1", ("A", "DC1", 2), hold=600))
    await ask("conflict", "POST", res, web, body_of("r-1", ("A", "DC1", 3), hold=600))
    await ask("short", "POST", res, web, body_of("r-2", ("A", "DC1", 2), ("B", "DC1", 11)))
    await ask("other channel", "POST", res, web, body_of("r-3", ("A", "DC1", 1), channel="market"))
    await ask("unknown position", "POST", res, web, body_of("r-4", ("Z", "DC1", 1)))
    await ask(
        "two lines, one position",
        "POST",
        res,
        web,
        body_of("r-5", ("A", "DC1", 1), ("A", "DC1", 1)),
    )
    await ask("confirmed at once", "POST", res, JSON_ADMIN, body_of("r-6", ("B", "DC1", 1), hold=0))
    await ask(
        "charset",
        "POST",
        res,
        {**web, "content-type": "application/json; charset=utf-8"},
        body_of("r-7", ("B", "DC1", 1)),
    )
    await ask(
        "no key", "POST", res, {"content-type": "application/json"}, body_of("r-8", ("A", "DC1", 1))
    )
    await ask(
        "bad key",
        "POST",
        res,
        {**web, "authorization": "Bearer nope"},
        body_of("r-8", ("A", "DC1", 1)),
    )
    await ask(
        "basic",
        "POST",
        res,
        {**web, "authorization": "Basic eDp5"},
        body_of("r-8", ("A", "DC1", 1)),
    )
    await ask("fulfil key", "POST", res, fulfil, body_of("r-8", ("A", "DC1", 1)))
    twice = httpx.Headers([*httpx.Headers(web).multi_items(), ("authorization", "Bearer nope")])
    await ask("two keys, the first good", "POST", res, twice, body_of("r-13", ("A", "DC1", 1)))
    await ask("malformed", "POST", res, web, b'{"reservation_id": "r-8", ')
    await ask("malformed, no key", "POST", res, {"content-type": "application/json"}, b"{")
    await ask("invalid, no key", "POST", res, {"content-type": "application/json"}, b"{}")
    await ask("unknown field", "POST", res, web, body_of("r-8", ("A", "DC1", 1))[:-1] + b',"x":1}')
    await ask(
        "string qty",
        "POST",
        res,
        web,
        body_of("r-8", ("A", "DC1", 1)).replace(b'"qty": 1', b'"qty": "1"'),
    )
    await ask(
        "float qty",
        "POST",
        res,
        web,
        body_of("r-9", ("A", "DC1", 1)).replace(b'"qty": 1', b'"qty": 1.0'),
    )
    await ask("empty body", "POST", res, web, b"")
    await ask(
        "no content type",
        "POST",
        res,
        {"authorization": web["authorization"]},
        body_of("r-8", ("A", "DC1", 1)),
    )
    await ask(
        "text/plain",
        "POST",
        res,
        {**web, "content-type": "text/plain"},
        body_of("r-8", ("A", "DC1", 1)),
    )
    await ask(
        "+json",
        "POST",
        res,
        {**web, "content-type": "application/x+json"},
        body_of("r-10", ("A", "DC1", 1)),
    )
    await ask(
        "utf-16", "POST", res, web, body_of("r-11", ("A", "DC1", 1)).decode().encode("utf-16")
    )
    await ask("trailing slash", "POST", res + "/", web, body_of("r-8", ("A", "DC1", 1)))
    await ask("query string", "POST", res + "?x=1", web, body_of("r-12", ("A", "DC1", 1)))

    one = f"{res}/r-1"
    await ask("get", "GET", one, web)
    await ask("get as admin", "GET", one, ADMIN)
    await ask("get other channel", "GET", one, market)
    await ask("get without channel scope", "GET", one, fulfil)
    await ask("get unknown", "GET", f"{res}/nope", web)
    await ask("get bad id", "GET", f"{res}/{'x' * 129}", web)
    await ask("get no key", "GET", one, {})
    await ask("head", "HEAD", one, web)
    await ask("confirm other channel", "POST", f"{one}/confirm", market)
    await ask("confirm", "POST", f"{one}/confirm", web)
    await ask("confirm again", "POST", f"{one}/confirm", web)
    await ask("confirm unknown", "POST", f"{res}/nope/confirm", web)
    await ask("confirm with a body", "POST", f"{res}/r-7/confirm", web, b"not json")
    await ask("confirm released?", "POST", f"{res}/r-6/confirm", web)
    await ask("release with reason", "POST", f"{one}/release", web, b'{"reason": "changed mind"}')
    await ask("release again", "POST", f"{one}/release", web)
    await ask("release, empty object", "POST", f"{res}/r-7/release", web, b"{}")
    await ask("release, null", "POST", f"{res}/r-6/release", web, b"null")
    await ask("release, blank reason", "POST", f"{res}/r-9/release", web, b'{"reason": " "}')
    await ask(
        "release, text/plain",
        "POST",
        f"{res}/r-9/release",
        {**web, "content-type": "text/plain"},
        b"x",
    )
    await ask("release, no key", "POST", f"{res}/r-9/release", {})
    await ask("release as admin", "POST", f"{res}/r-9/release", ADMIN)
    await ask("confirm released", "POST", f"{res}/r-9/confirm", web)

    av = "/v1/availability"
    await ask("availability", "GET", f"{av}?sku=A&sku=B&sku=Z&location=DC1&channel=web", web)
    await ask("availability, read", "GET", f"{av}?sku=A&location=DC1&channel=market", ADMIN)
    await ask("availability, other channel", "GET", f"{av}?sku=A&location=DC1&channel=market", web)
    await ask("availability, encoded", "GET", f"{av}?sku=%41&location=DC%31&channel=web", web)
    await ask("availability, blank sku", "GET", f"{av}?sku=&location=DC1&channel=web", web)
    await ask(
        "availability, two locations",
        "GET",
        f"{av}?sku=A&location=DC1&location=DC2&channel=web",
        web,
    )
    await ask("availability, no channel", "GET", f"{av}?sku=A&location=DC1", web)
    await ask("availability, no sku", "GET", f"{av}?location=DC1&channel=web", web)
    await ask("availability, other param", "GET", f"{av}?sku=A&location=DC1&channel=web&x=1", web)
    await ask("availability, 500", "GET", f"{av}?{'sku=A&' * 500}location=DC1&channel=web", web)
    await ask("availability, 501", "GET", f"{av}?{'sku=A&' * 501}location=DC1&channel=web", web)
    await ask("availability, no key", "GET", f"{av}?sku=A&location=DC1&channel=web", {})

    # allocation rules: routed lines, buyers, regions, splits; explain (FastAPI's in both)
    await ask("routed, no rules", "POST", res, web, body_of("q-1", ("A", None, 1)))
    for sku, loc, qty in (("C", "DC1", 6), ("C", "DC2", 3), ("D", "DC1", 3)):
        body = json.dumps({"on_hand": qty, "reason": "seed"}).encode()
        await ask(f"seed {sku} {loc}", "PUT", f"/v1/positions/{sku}/{loc}", JSON_ADMIN, body)
    rules = {
        "channels": {
            "web": {"priority": 100, "locations": ["DC2", "DC1"], "regions": {"EU": ["DC1"]}},
            "market": {"priority": 1, "locations": ["DC1"]},
        },
        "default": {"protect": {"web": 1}},
        "skus": {"B": {"buyer_limit": 2}},
    }
    await ask("rules", "PUT", "/v1/rules", JSON_ADMIN, json.dumps(rules).encode())
    await ask("routed", "POST", res, web, body_of("q-2", ("C", None, 1)))
    await ask("routed, region", "POST", res, web, body_of("q-3", ("C", None, 1), region="EU"))
    await ask(
        "routed, null location",
        "POST",
        res,
        web,
        body_of("q-4", ("C", "DC1", 1)).replace(b'"DC1"', b"null"),
    )
    await ask("routed, split", "POST", res, web, body_of("q-5", ("C", None, 6), allow_split=True))
    await ask("routed, too many", "POST", res, web, body_of("q-6", ("C", None, 99)))
    await ask("protected", "POST", res, market, body_of("q-7", ("D", None, 3), channel="market"))
    await ask("no customer", "POST", res, web, body_of("q-8", ("B", "DC1", 1)))
    await ask(
        "customer", "POST", res, web, body_of("q-9", ("B", "DC1", 2), customer_id="c-1@x.com")
    )
    await ask(
        "replay, customer",
        "POST",
        res,
        web,
        body_of("q-9", ("B", "DC1", 2), customer_id="c-1@x.com"),
    )
    await ask(
        "buyer limit", "POST", res, web, body_of("q-10", ("B", "DC1", 1), customer_id="c-1@x.com")
    )
    await ask("bad customer", "POST", res, web, body_of("q-11", ("B", "DC1", 1), customer_id="a b"))
    await ask("bad region", "POST", res, web, body_of("q-11", ("A", None, 1), region="E U"))
    await ask("null split", "POST", res, web, body_of("q-12", ("A", None, 1), allow_split=None))
    await ask("string split", "POST", res, web, body_of("q-13", ("A", None, 1), allow_split="yes"))
    await ask("get routed", "GET", f"{res}/q-5", web)
    q = "sku=A&sku=B&location=DC1&channel=web"
    await ask("availability, customer", "GET", f"{av}?{q}&customer_id=c-1%40x.com", web)
    await ask("availability, other customer", "GET", f"{av}?{q}&customer_id=c-2", web)
    await ask("availability, two customers", "GET", f"{av}?{q}&customer_id=a&customer_id=b", web)
    await ask("availability, bad customer", "GET", f"{av}?{q}&customer_id=a%20b", web)
    ex = f"{av}/explain?sku=B&location=DC1&channel=web"
    await ask("explain", "GET", f"{ex}&customer_id=c-1%40x.com", web)
    await ask("explain, other channel", "GET", ex.replace("web", "market"), web)
    await ask("positions after", "GET", "/v1/positions/A/DC1", ADMIN)
    await ask("positions after", "GET", "/v1/positions/B/DC1", ADMIN)
    await ask("positions after", "GET", "/v1/positions/C/DC1", ADMIN)
    await ask("positions after", "GET", "/v1/positions/C/DC2", ADMIN)
    return out


@pytest.fixture
async def clients(settings: Settings, atp: ATP) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """The app with its fast lane and without, on the same core."""
    with_lane = create_app(settings, core=atp)
    without = create_app(settings, core=atp, fast_lane=False)
    lane_client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=with_lane), base_url="http://t"
    )
    plain_client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=without), base_url="http://t"
    )
    async with (
        with_lane.router.lifespan_context(with_lane),
        without.router.lifespan_context(without),
        lane_client,
        plain_client,
    ):
        yield {"lane": lane_client, "fastapi": plain_client}


async def test_lane_answers_as_fastapi(
    clients: dict[str, httpx.AsyncClient], atp: ATP, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[str] = []
    serve = lane.FastLane.serve

    async def spy(self: lane.FastLane, route: lane.LaneRoute, *args: Any) -> Any:
        read = await serve(self, route, *args)
        if read is None:
            served.append(f"{route.method} {route.path}")
        return read

    monkeypatch.setattr(lane.FastLane, "serve", spy)
    answers = {}
    for name in ("lane", "fastapi"):
        await atp.redis.flushdb()
        answers[name] = await conversation(clients[name])
    for got, want in zip(answers["lane"], answers["fastapi"], strict=True):
        assert got == want
    # the lane did serve the ordinary requests, and refusals it could answer itself
    assert set(served) == {
        "POST /v1/reservations",
        "GET /v1/reservations/{reservation_id}",
        "POST /v1/reservations/{reservation_id}/confirm",
        "POST /v1/reservations/{reservation_id}/release",
        "GET /v1/availability",
    }
    assert len(served) >= 25


async def test_a_body_read_by_the_lane_reaches_fastapi_whole(settings: Settings, atp: ATP) -> None:
    """Sent in pieces and refused by the model: the lane hands the pieces to FastAPI."""
    app: FastAPI = create_app(settings, core=atp)
    body = body_of("r-1", ("A", "DC1", 1)).replace(b'"qty": 1', b'"qty": 0')
    pieces = [body[:10], body[10:30], body[30:]]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/reservations",
        "raw_path": b"/v1/reservations",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {ADMIN_KEY}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
    }
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)
    assert sent[0]["status"] == 422
    problem = json.loads(sent[1]["body"])
    assert problem["errors"][0]["field"] == "lines.0.qty", problem
