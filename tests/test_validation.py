"""I7: bad input or a refusal changes nothing, and raises the precise typed error.

Each case runs against a small book on the real server; every key is snapshotted with
DUMP (and its TTL) before and after the call, and the two snapshots must be equal.

The second half bypasses the Python validation and sends malformed requests straight to
the Lua scripts (``ScriptRunner.call``): each script must refuse with ``bad_request``
before its first write.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from atp import (
    ATP,
    AlreadyFulfilled,
    AlreadyReleased,
    ATPError,
    BackendError,
    FulfilLine,
    IdempotencyConflict,
    InsufficientStock,
    InvalidRequest,
    NegativeOnHand,
    NotConfirmed,
    OverFulfil,
    UnknownLine,
    UnknownPosition,
    UnknownReservation,
)
from atp.errors import NoRoute
from atp.scripts import decode

Call = Callable[[ATP], Awaitable[Any]]


async def dump_all(core: ATP) -> dict[bytes, tuple[bytes | None, int]]:
    r = core.redis
    out = {}
    async for key in r.scan_iter(count=1000):
        out[key] = (await r.dump(key), await r.pttl(key))
    return out


@pytest.fixture
async def book(atp: ATP) -> ATP:
    """A book with positions and reservations in every state (all in bucket-distinct SKUs
    as the test settings happen to place them)."""
    await atp.set_position("A", "W1", 10, 1, reason="init")
    await atp.set_position("B", "W1", 5, reason="init")
    await atp.reserve("held1", "web", [("A", "W1", 2)], hold_seconds=600)
    await atp.reserve("conf1", "web", [("A", "W1", 1), ("B", "W1", 1)], hold_seconds=0)
    await atp.reserve("rel1", "store", [("B", "W1", 1)], hold_seconds=0)
    await atp.release("rel1")
    await atp.reserve("ful1", "web", [("B", "W1", 1)], hold_seconds=0)
    await atp.fulfil("ful1", [FulfilLine("B", "W1", shipped=1)])
    return atp


# -- the Python API ---------------------------------------------------------------------------


def _reserve(rid: Any = "new1", channel: Any = "web", lines: Any = None, hold: Any = 60) -> Call:
    ln = [("A", "W1", 1)] if lines is None else lines
    return lambda c: c.reserve(rid, channel, ln, hold_seconds=hold)


def _qty(q: Any) -> Call:
    return _reserve(lines=[("A", "W1", q)])


def _line(sku: Any = "A", loc: Any = "W1") -> Call:
    return _reserve(lines=[(sku, loc, 1)])


def _fulfil(*lines: Any, rid: str = "conf1", fid: Any = None) -> Call:
    return lambda c: c.fulfil(rid, list(lines), fulfilment_id=fid)


def _op(name: str, *args: Any, **kwargs: Any) -> Call:
    """A call of the core method ``name`` with these arguments."""
    return lambda c: getattr(c, name)(*args, **kwargs)


def _case(name: str, call: Call, exc: type[ATPError], field: str | None = None) -> Any:
    return pytest.param(call, exc, field, id=name)


BAD_IDENTS = {
    "non-ascii": "Sé",
    "brace-open": "a{b",
    "brace-close": "a}b",
    "pipe": "a|b",
    "65-chars": "A" * 65,
    "empty": "",
    "space": "A B",
    "leading-dash": "-A",
    "newline": "A\n",
    "none": None,
    "int": 5,
}
BAD_RIDS = {
    "empty": "",
    "129-chars": "r" * 129,
    "non-ascii": "rés1",
    "space": "r 1",
    "leading-colon": ":r1",
    "newline": "r1\n",
    "brace": "r{1}",
    "int": 123,
    "none": None,
}
BAD_CHANNELS = {
    "empty": "",
    "upper": "Web",
    "33-chars": "w" * 33,
    "space": "we b",
    "non-ascii": "wéb",
    "leading-dash": "-web",
    "none": None,
}
BAD_QTY = {
    "zero": 0,
    "negative": -1,
    "float": 1.5,
    "float-whole": 2.0,
    "str": "1",
    "bool": True,
    "none": None,
    "oversized": 1_000_001,  # settings.max_line_qty + 1 (default settings)
}

CASES = [
    # reserve: quantities
    *(_case(f"reserve-qty-{k}", _qty(v), InvalidRequest, "qty") for k, v in BAD_QTY.items()),
    # reserve: lines
    _case("reserve-no-lines", _reserve(lines=[]), InvalidRequest, "lines"),
    _case(
        "reserve-duplicate-lines",
        _reserve(lines=[("A", "W1", 1), ("A", "W1", 2)]),
        InvalidRequest,
        "lines",
    ),
    _case(
        "reserve-too-many-lines",
        _reserve(lines=[(f"S{i}", "W1", 1) for i in range(101)]),
        InvalidRequest,
        "lines",
    ),
    _case("reserve-line-too-short", _reserve(lines=[("A", "W1")]), InvalidRequest, "lines"),
    _case("reserve-line-not-a-tuple", _reserve(lines=["A"]), InvalidRequest, "lines"),
    _case("reserve-line-none", _reserve(lines=[None]), InvalidRequest, "lines"),
    # reserve: identifiers
    *(
        _case(f"reserve-id-{k}", _reserve(rid=v), InvalidRequest, "reservation_id")
        for k, v in BAD_RIDS.items()
    ),
    *(
        _case(f"reserve-sku-{k}", _line(sku=v), InvalidRequest, "sku")
        for k, v in BAD_IDENTS.items()
    ),
    *(
        _case(f"reserve-loc-{k}", _line(loc=v), InvalidRequest, "location")
        for k, v in BAD_IDENTS.items()
        if v is not None  # a line without a location is routed by the rules
    ),
    # reserve: routing (no rules are applied to this book)
    _case("reserve-routed-without-rules", _line(loc=None), NoRoute, "location"),
    _case(
        "reserve-routed-and-located-same-sku",
        _reserve(lines=[("A", None, 1), ("A", "W1", 1)]),
        InvalidRequest,
        "lines",
    ),
    _case(
        "reserve-routed-twice-same-sku",
        _reserve(lines=[("A", None, 1), ("A", None, 2)]),
        InvalidRequest,
        "lines",
    ),
    _case(
        "reserve-allow-split-not-bool",
        lambda c: c.reserve("new1", "web", [("A", None, 1)], allow_split="yes"),
        InvalidRequest,
        "allow_split",
    ),
    *(
        _case(f"reserve-channel-{k}", _reserve(channel=v), InvalidRequest, "channel")
        for k, v in BAD_CHANNELS.items()
    ),
    # reserve: hold
    _case("reserve-hold-negative", _reserve(hold=-1), InvalidRequest, "hold_seconds"),
    _case("reserve-hold-above-max", _reserve(hold=7 * 86400 + 1), InvalidRequest, "hold_seconds"),
    _case("reserve-hold-float", _reserve(hold=1.5), InvalidRequest, "hold_seconds"),
    _case("reserve-hold-bool", _reserve(hold=True), InvalidRequest, "hold_seconds"),
    _case("reserve-hold-str", _reserve(hold="60"), InvalidRequest, "hold_seconds"),
    # reserve: refusals
    _case("reserve-insufficient", _qty(8), InsufficientStock),
    _case("reserve-unknown-position", _line(sku="NOPE"), UnknownPosition),
    _case("reserve-unknown-location", _line(loc="W9"), UnknownPosition),
    _case("reserve-id-reused", _reserve(rid="held1"), IdempotencyConflict),
    _case("reserve-id-reused-released", _reserve(rid="rel1"), IdempotencyConflict),
    # confirm / release / fulfil / reservation: unknown and bad ids
    _case("confirm-unknown", lambda c: c.confirm("nope"), UnknownReservation),
    _case("release-unknown", lambda c: c.release("nope"), UnknownReservation),
    _case(
        "fulfil-unknown", _fulfil(FulfilLine("A", "W1", shipped=1), rid="nope"), UnknownReservation
    ),
    _case("reservation-unknown", lambda c: c.reservation("nope"), UnknownReservation),
    *(
        _case(
            f"{op}-id-{k}",
            _op(op, v),
            InvalidRequest,
            "reservation_id",
        )
        for op in ("confirm", "release", "reservation")
        for k, v in BAD_RIDS.items()
    ),
    *(
        _case(
            f"fulfil-id-{k}",
            _fulfil(FulfilLine("A", "W1", shipped=1), rid=v),
            InvalidRequest,
            "reservation_id",
        )
        for k, v in BAD_RIDS.items()
    ),
    # confirm / release: refusals
    _case("confirm-released", lambda c: c.confirm("rel1"), AlreadyReleased),
    _case("confirm-fulfilled", lambda c: c.confirm("ful1"), AlreadyFulfilled),
    _case("release-fulfilled", lambda c: c.release("ful1"), AlreadyFulfilled),
    _case(
        "release-reason-empty", lambda c: c.release("conf1", reason=""), InvalidRequest, "reason"
    ),
    _case(
        "release-reason-blank", lambda c: c.release("conf1", reason="  "), InvalidRequest, "reason"
    ),
    _case(
        "release-reason-long",
        lambda c: c.release("conf1", reason="x" * 201),
        InvalidRequest,
        "reason",
    ),
    _case(
        "release-reason-none", lambda c: c.release("conf1", reason=None), InvalidRequest, "reason"
    ),
    # fulfil: bad lines
    _case("fulfil-no-lines", _fulfil(), InvalidRequest, "lines"),
    _case(
        "fulfil-shipped-negative",
        _fulfil(FulfilLine("A", "W1", shipped=-1)),
        InvalidRequest,
        "shipped",
    ),
    _case(
        "fulfil-shipped-float",
        _fulfil(FulfilLine("A", "W1", shipped=0.5)),
        InvalidRequest,
        "shipped",
    ),
    _case(
        "fulfil-shipped-bool",
        _fulfil(FulfilLine("A", "W1", shipped=True)),
        InvalidRequest,
        "shipped",
    ),
    _case(
        "fulfil-shipped-str", _fulfil(FulfilLine("A", "W1", shipped="1")), InvalidRequest, "shipped"
    ),
    _case(
        "fulfil-shipped-oversized",
        _fulfil(FulfilLine("A", "W1", shipped=1_000_001)),
        InvalidRequest,
        "shipped",
    ),
    _case(
        "fulfil-short-negative", _fulfil(FulfilLine("A", "W1", short=-1)), InvalidRequest, "short"
    ),
    _case("fulfil-short-float", _fulfil(FulfilLine("A", "W1", short=1.5)), InvalidRequest, "short"),
    _case("fulfil-does-nothing", _fulfil(FulfilLine("A", "W1")), InvalidRequest, "lines"),
    _case(
        "fulfil-duplicate-lines",
        _fulfil(FulfilLine("A", "W1", shipped=1), FulfilLine("A", "W1", short=1)),
        InvalidRequest,
        "lines",
    ),
    _case("fulfil-bad-sku", _fulfil(FulfilLine("a|b", "W1", shipped=1)), InvalidRequest, "sku"),
    _case(
        "fulfil-bad-location",
        _fulfil(FulfilLine("A", "W{1}", shipped=1)),
        InvalidRequest,
        "location",
    ),
    _case("fulfil-line-tuple", _fulfil(("A", "W1", 1, 0)), InvalidRequest, "lines"),
    _case("fulfil-line-none", _fulfil(None), InvalidRequest, "lines"),
    _case(
        "fulfil-fid-empty",
        _fulfil(FulfilLine("A", "W1", shipped=1), fid=""),
        InvalidRequest,
        "fulfilment_id",
    ),
    _case(
        "fulfil-fid-non-ascii",
        _fulfil(FulfilLine("A", "W1", shipped=1), fid="fé"),
        InvalidRequest,
        "fulfilment_id",
    ),
    _case(
        "fulfil-fid-long",
        _fulfil(FulfilLine("A", "W1", shipped=1), fid="f" * 129),
        InvalidRequest,
        "fulfilment_id",
    ),
    # fulfil: refusals
    _case("fulfil-held", _fulfil(FulfilLine("A", "W1", shipped=1), rid="held1"), NotConfirmed),
    _case(
        "fulfil-released", _fulfil(FulfilLine("B", "W1", shipped=1), rid="rel1"), AlreadyReleased
    ),
    _case(
        "fulfil-fulfilled",
        _fulfil(FulfilLine("B", "W1", shipped=1), rid="ful1", fid="f2"),
        AlreadyFulfilled,
    ),
    _case("fulfil-unknown-line", _fulfil(FulfilLine("A", "W2", shipped=1)), UnknownLine),
    _case("fulfil-over", _fulfil(FulfilLine("A", "W1", shipped=1, short=1)), OverFulfil),
    # adjust
    _case("adjust-zero", lambda c: c.adjust("A", "W1", 0, reason="x"), InvalidRequest, "delta"),
    _case("adjust-float", lambda c: c.adjust("A", "W1", 1.5, reason="x"), InvalidRequest, "delta"),
    _case("adjust-bool", lambda c: c.adjust("A", "W1", True, reason="x"), InvalidRequest, "delta"),
    _case("adjust-str", lambda c: c.adjust("A", "W1", "1", reason="x"), InvalidRequest, "delta"),
    _case(
        "adjust-oversized",
        lambda c: c.adjust("A", "W1", -(10**12) - 1, reason="x"),
        InvalidRequest,
        "delta",
    ),
    _case("adjust-below-zero", lambda c: c.adjust("A", "W1", -11, reason="x"), NegativeOnHand),
    _case(
        "adjust-unknown-position", lambda c: c.adjust("NOPE", "W1", 1, reason="x"), UnknownPosition
    ),
    _case(
        "adjust-reason-empty", lambda c: c.adjust("A", "W1", 1, reason=""), InvalidRequest, "reason"
    ),
    _case(
        "adjust-reason-long",
        lambda c: c.adjust("A", "W1", 1, reason="x" * 201),
        InvalidRequest,
        "reason",
    ),
    _case(
        "adjust-reference-long",
        lambda c: c.adjust("A", "W1", 1, reason="x", reference="r" * 201),
        InvalidRequest,
        "reference",
    ),
    _case("adjust-bad-sku", lambda c: c.adjust("A{x}", "W1", 1, reason="x"), InvalidRequest, "sku"),
    _case("adjust-beyond-max", lambda c: c.adjust("A", "W1", 10**12, reason="x"), InvalidRequest),
    # receive
    *(
        _case(
            f"receive-qty-{k}",
            _op("receive", "A", "W1", v, reference="PO"),
            InvalidRequest,
            "qty",
        )
        for k, v in {
            "zero": 0,
            "negative": -1,
            "float": 1.5,
            "bool": True,
            "oversized": 10**12 + 1,
        }.items()
    ),
    *(
        _case(
            f"receive-ref-{k}",
            _op("receive", "A", "W1", 1, reference=v),
            InvalidRequest,
            "reference",
        )
        for k, v in {"empty": "", "blank": "   ", "none": None, "long": "r" * 201}.items()
    ),
    _case(
        "receive-bad-location",
        lambda c: c.receive("A", "", 1, reference="PO"),
        InvalidRequest,
        "location",
    ),
    _case(
        "receive-beyond-max", lambda c: c.receive("A", "W1", 10**12, reference="PO"), InvalidRequest
    ),
    # set_position
    *(
        _case(
            f"set-on-hand-{k}",
            _op("set_position", "A", "W1", v, reason="x"),
            InvalidRequest,
            "on_hand",
        )
        for k, v in {
            "negative": -1,
            "float": 1.5,
            "bool": True,
            "str": "5",
            "oversized": 10**12 + 1,
        }.items()
    ),
    *(
        _case(
            f"set-safety-stock-{k}",
            _op("set_position", "A", "W1", 5, v, reason="x"),
            InvalidRequest,
            "safety_stock",
        )
        for k, v in {"negative": -1, "float": 0.5, "bool": False}.items()
    ),
    _case(
        "set-reason-empty",
        lambda c: c.set_position("A", "W1", 5, reason=""),
        InvalidRequest,
        "reason",
    ),
    _case("set-bad-sku", lambda c: c.set_position("Ä", "W1", 5, reason="x"), InvalidRequest, "sku"),
    _case(
        "set-bad-location",
        lambda c: c.set_position("A", "W|1", 5, reason="x"),
        InvalidRequest,
        "location",
    ),
    # reads
    _case(
        "movements-count-zero", lambda c: c.movements("A", "W1", count=0), InvalidRequest, "count"
    ),
    _case(
        "movements-count-big", lambda c: c.movements("A", "W1", count=1001), InvalidRequest, "count"
    ),
    *(
        _case(
            f"movements-before-{k}",
            _op("movements", "A", "W1", before=v),
            InvalidRequest,
            "before",
        )
        for k, v in {
            "word": "abc",
            "dash-end": "1-",
            "dash-start": "-1",
            "three": "1-2-3",
            "empty": "",
            "superscript": "²",
            "arabic-digits": "١٢٣",
            "plus": "+",
            "too-big": "18446744073709551616-0",
            "int": 5,
        }.items()
    ),
    _case(
        "availability-bad-channel",
        lambda c: c.availability([("A", "W1")], "Web"),
        InvalidRequest,
        "channel",
    ),
    _case(
        "availability-bad-sku",
        lambda c: c.availability([("A|B", "W1")], "web"),
        InvalidRequest,
        "sku",
    ),
    _case("position-bad-sku", lambda c: c.position("", "W1"), InvalidRequest, "sku"),
    _case("expire-limit-zero", lambda c: c.expire_holds(limit=0), InvalidRequest, "limit"),
    _case("expire-limit-big", lambda c: c.expire_holds(limit=10_001), InvalidRequest, "limit"),
]


@pytest.mark.parametrize("call, exc, field", CASES)
async def test_bad_input_raises_typed_error_and_changes_nothing(
    book: ATP, call: Call, exc: type[ATPError], field: str | None
) -> None:
    before = await dump_all(book)
    with pytest.raises(ATPError) as ei:
        await call(book)
    assert type(ei.value) is exc, ei.value
    assert ei.value.detail
    if field is not None:
        assert isinstance(ei.value, InvalidRequest)
        assert ei.value.field == field, ei.value.detail
    assert await dump_all(book) == before


async def test_boundary_values_are_accepted(book: ATP) -> None:
    """The edges of every range are valid (so the refusals above are the edges)."""
    s = book.settings
    rid = "r" * 128
    await book.set_position("S" * 64, "L" * 64, s.max_line_qty, reason="x" * 200)
    r = await book.reserve(
        rid, "c" * 32, [("S" * 64, "L" * 64, s.max_line_qty)], hold_seconds=s.max_hold_seconds
    )
    assert r.status == "held" and r.lines[0].qty == s.max_line_qty
    await book.confirm(rid)
    await book.fulfil(rid, [FulfilLine("S" * 64, "L" * 64, shipped=1)], fulfilment_id="f" * 128)
    await book.release(rid, reason="y" * 200)
    await book.receive("A", "W1", 1, reference="r" * 200)
    await book.set_position("A", "W1", s.max_on_hand, reason="max")
    lines = [(f"S{i}", "W1", 1) for i in range(s.max_lines)]
    for sku, loc, _ in lines:
        await book.set_position(sku, loc, 1, reason="init")
    assert len((await book.reserve("many", "web", lines, hold_seconds=0)).lines) == s.max_lines


async def test_multibyte_text_over_the_lua_byte_limit_is_refused_cleanly(book: ATP) -> None:
    """Python counts characters, the scripts count bytes: 150 'é' pass the first check and
    fail the second, which must still be a typed refusal with nothing written."""
    before = await dump_all(book)
    with pytest.raises(InvalidRequest):
        await book.set_position("A", "W1", 5, reason="é" * 150)
    with pytest.raises(InvalidRequest):
        await book.receive("A", "W1", 1, reference="é" * 150)
    assert await dump_all(book) == before


# -- the Lua scripts, bypassing Python validation ---------------------------------------------


class _Captured(Exception):
    pass


async def captured(core: ATP, call: Call) -> tuple[str, list[str], str, dict[str, Any]]:
    """The (script, KEYS, cfg, request) a valid core call would send, without sending it."""
    seen: list[tuple[str, list[str], list[Any]]] = []

    async def fake(client: Any, name: str, keys: Any, args: Any) -> Any:
        seen.append((name, list(keys), list(args)))
        raise _Captured

    core.scripts.call = fake  # type: ignore[method-assign]
    try:
        with pytest.raises(_Captured):
            await call(core)
    finally:
        del core.scripts.call
    [(name, keys, (cfg, req))] = seen
    return name, keys, cfg, json.loads(req)


async def raw_call(core: ATP, name: str, keys: list[str], cfg: str, req: Any) -> dict[str, Any]:
    body = req if isinstance(req, str) else json.dumps(req)
    reply = await core.scripts.call(core.redis, name, keys, (cfg, body))
    out: dict[str, Any] = json.loads(reply)
    return out


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation: set req[path...] = value (a value of ``_DEL`` deletes the field)."""

    def apply(req: dict[str, Any]) -> None:
        obj: Any = req
        for p in path[:-1]:
            obj = obj[p]
        if value is _DEL:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value

    return apply


_DEL = object()
LINE0 = ("parts", 0, "lines", 0)

LUA_RESERVE = {
    "qty-zero": _set((*LINE0, "qty"), 0),
    "qty-negative": _set((*LINE0, "qty"), -2),
    "qty-float": _set((*LINE0, "qty"), 1.5),
    "qty-str": _set((*LINE0, "qty"), "1"),
    "qty-bool": _set((*LINE0, "qty"), True),
    "qty-null": _set((*LINE0, "qty"), None),
    "qty-missing": _set((*LINE0, "qty"), _DEL),
    "qty-oversized": _set((*LINE0, "qty"), 1_000_001),
    "sku-empty": _set((*LINE0, "sku"), ""),
    "sku-missing": _set((*LINE0, "sku"), _DEL),
    "loc-65-bytes": _set((*LINE0, "loc"), "L" * 65),
    "id-empty": _set(("id",), ""),
    "id-129": _set(("id",), "r" * 129),
    "id-number": _set(("id",), 12),
    "channel-missing": _set(("ch",), _DEL),
    "hold-negative": _set(("hold",), -1000),
    "hold-float": _set(("hold",), 1.5),
    "hold-above-max": _set(("hold",), 7 * 86400 * 1000 + 1),
    "fingerprint-missing": _set(("fp",), _DEL),
    "parts-empty": _set(("parts",), []),
    "parts-object": _set(("parts",), {"b": 1}),
    "parts-missing": _set(("parts",), _DEL),
    "part-n-zero": _set(("parts", 0, "n"), 0),
    "part-n-float": _set(("parts", 0, "n"), 1.5),
    "part-n-mismatch": _set(("parts", 0, "n"), 2),
    "part-lines-object": _set(("parts", 0, "lines"), {"sku": "A"}),
    "part-bucket-missing": _set(("parts", 0, "b"), _DEL),
    "part-bucket-float": _set(("parts", 0, "b"), 1.5),
    "part-bucket-negative": _set(("parts", 0, "b"), -1),
    "part-bucket-str": _set(("parts", 0, "b"), "3"),
    # the allocation rules' fields
    "rv-missing": _set(("rv",), _DEL),
    "rv-negative": _set(("rv",), -1),
    "rv-float": _set(("rv",), 0.5),
    "customer-empty": _set(("cu",), ""),
    "customer-129": _set(("cu",), "c" * 129),
    "customer-number": _set(("cu",), 7),
    "cap-negative": _set((*LINE0, "cap"), -1),
    "cap-float": _set((*LINE0, "cap"), 1.5),
    "buyer-limit-zero": _set((*LINE0, "bl"), 0),
    "buyer-limit-str": _set((*LINE0, "bl"), "2"),
    "split-str": _set((*LINE0, "split"), "yes"),
    "pr-not-a-list": _set((*LINE0, "pr"), "web"),
    "pr-two-candidates-for-one": _set((*LINE0, "pr"), [[], []]),
    "pr-entry-not-a-list": _set((*LINE0, "pr"), ["web"]),
    "pr-units-negative": _set((*LINE0, "pr"), [[["store", -1]]]),
    "pr-channel-empty": _set((*LINE0, "pr"), [[["", 1]]]),
    "locs-count-not-candidates": _set((*LINE0, "locs"), ["W1", "W2"]),
    "locs-empty": _set((*LINE0, "locs"), []),
    "candidates-for-a-located-line": _set(("parts", 0, "c"), [2]),
    "candidates-zero": _set(("parts", 0, "c"), [0]),
}


@pytest.mark.parametrize("mutate", LUA_RESERVE.values(), ids=LUA_RESERVE.keys())
async def test_lua_reserve_validates(book: ATP, mutate: Callable[[dict[str, Any]], None]) -> None:
    name, keys, cfg, req = await captured(book, _reserve(lines=[("A", "W1", 2)]))
    mutate(req)
    before = await dump_all(book)
    reply = await raw_call(book, name, keys, cfg, req)
    assert reply["err"] == "bad_request", reply
    assert reply["detail"]
    assert await dump_all(book) == before
    with pytest.raises(InvalidRequest):
        decode(json.dumps(reply))


async def test_lua_reserve_rejects_mismatched_keys_and_duplicates(book: ATP) -> None:
    name, keys, cfg, req = await captured(book, _reserve(lines=[("A", "W1", 1), ("B", "W1", 1)]))
    before = await dump_all(book)
    bad: list[tuple[list[str], dict[str, Any], str]] = []
    bad.append((keys[:-1], req, "one key short"))
    bad.append(([*keys, keys[-1]], req, "one key too many"))
    bad.append((keys[1:], req, "index key left out while idx is set"))
    # duplicate line: the same position twice in one part, with matching KEYS
    _, k1, _, one = await captured(book, _reserve(lines=[("A", "W1", 1)]))
    dup = json.loads(json.dumps(one))
    dup["parts"][0]["n"] = 2
    dup["parts"][0]["lines"] = [
        dict(one["parts"][0]["lines"][0]),
        {**one["parts"][0]["lines"][0], "qty": 2},
    ]
    bad.append(([*k1, *k1[-5:]], dup, "duplicate line"))
    # a routed line beside another line of its SKU (the script would count the SKU twice)
    routed = json.loads(json.dumps(one))
    routed["parts"][0]["n"] = 2
    routed["parts"][0]["c"] = [1, 1]
    routed["parts"][0]["lines"].append({"sku": "A", "locs": ["W2"], "split": False, "qty": 1})
    w2 = book.keys.position("A", "W2")
    bad.append(([*k1, w2.sku, *w2.candidate()], routed, "routed line beside its SKU"))
    # the same position split across two parts
    split = json.loads(json.dumps(one))
    split["parts"].append(json.loads(json.dumps(one["parts"][0])))
    bad.append(([*k1, *k1[1:]], split, "duplicate line across parts"))
    # two parts naming one bucket (their records would overwrite each other: I2)
    _, k2, _, two = await captured(book, _reserve(lines=[("A", "W1", 1), ("B", "W1", 1)]))
    assert len(two["parts"]) == 2  # A and B are in different buckets with the test settings
    same = json.loads(json.dumps(two))
    same["parts"][1]["b"] = same["parts"][0]["b"]
    bad.append((k2, same, "two parts, one bucket"))
    # more lines than cfg.max_lines
    small = json.loads(cfg)
    small["max_lines"] = 1
    for ks, rq, why in bad:
        reply = await raw_call(book, name, ks, cfg, rq)
        assert reply["err"] == "bad_request", (why, reply)
    reply = await raw_call(book, name, keys, json.dumps(small), req)
    assert reply["err"] == "bad_request", reply
    assert await dump_all(book) == before


async def test_lua_reserve_garbage_is_a_backend_error_without_writes(book: ATP) -> None:
    name, keys, cfg, _ = await captured(book, _reserve())
    before = await dump_all(book)
    with pytest.raises(BackendError):
        await raw_call(book, name, keys, cfg, "{not json")
    assert await dump_all(book) == before


def _drop_key(keys: list[str]) -> list[str]:
    return keys[:-1]


LUA_OTHER: dict[str, tuple[Call, Callable[[dict[str, Any]], None] | None, bool]] = {
    # name: (valid call, request mutation, drop a key)
    "set-on-hand-negative": (
        lambda c: c.set_position("A", "W1", 5, reason="x"),
        _set(("on_hand",), -1),
        False,
    ),
    "set-on-hand-float": (
        lambda c: c.set_position("A", "W1", 5, reason="x"),
        _set(("on_hand",), 1.5),
        False,
    ),
    "set-on-hand-str": (
        lambda c: c.set_position("A", "W1", 5, reason="x"),
        _set(("on_hand",), "5"),
        False,
    ),
    "set-safety-negative": (
        lambda c: c.set_position("A", "W1", 5, 1, reason="x"),
        _set(("safety_stock",), -1),
        False,
    ),
    "set-reason-missing": (
        lambda c: c.set_position("A", "W1", 5, reason="x"),
        _set(("reason",), _DEL),
        False,
    ),
    "set-sku-missing": (
        lambda c: c.set_position("A", "W1", 5, reason="x"),
        _set(("sku",), _DEL),
        False,
    ),
    "set-keys": (lambda c: c.set_position("A", "W1", 5, reason="x"), None, True),
    "adjust-zero": (lambda c: c.adjust("A", "W1", 1, reason="x"), _set(("delta",), 0), False),
    "adjust-float": (lambda c: c.adjust("A", "W1", 1, reason="x"), _set(("delta",), -0.5), False),
    "adjust-reason-empty": (
        lambda c: c.adjust("A", "W1", 1, reason="x"),
        _set(("reason",), ""),
        False,
    ),
    "adjust-ref-long": (
        lambda c: c.adjust("A", "W1", 1, reason="x"),
        _set(("ref",), "r" * 201),
        False,
    ),
    "adjust-keys": (lambda c: c.adjust("A", "W1", 1, reason="x"), None, True),
    "receive-zero": (lambda c: c.receive("A", "W1", 1, reference="PO"), _set(("qty",), 0), False),
    "receive-float": (
        lambda c: c.receive("A", "W1", 1, reference="PO"),
        _set(("qty",), 2.5),
        False,
    ),
    "receive-ref-missing": (
        lambda c: c.receive("A", "W1", 1, reference="PO"),
        _set(("ref",), _DEL),
        False,
    ),
    "receive-keys": (lambda c: c.receive("A", "W1", 1, reference="PO"), None, True),
    "confirm-id-empty": (lambda c: c.confirm("held1"), _set(("id",), ""), False),
    "confirm-parts-empty": (lambda c: c.confirm("held1"), _set(("parts",), []), False),
    "confirm-part-n-zero": (lambda c: c.confirm("held1"), _set(("parts", 0, "n"), 0), False),
    "confirm-keys": (lambda c: c.confirm("held1"), None, True),
    "release-reason-long": (lambda c: c.release("conf1"), _set(("reason",), "r" * 201), False),
    "release-part-n-float": (lambda c: c.release("conf1"), _set(("parts", 0, "n"), 0.5), False),
    "release-keys": (lambda c: c.release("conf1"), None, True),
    "fulfil-lines-empty": (_fulfil(FulfilLine("A", "W1", shipped=1)), _set(("lines",), []), False),
    "fulfil-shipped-negative": (
        _fulfil(FulfilLine("A", "W1", shipped=1)),
        _set(("lines", 0, "shipped"), -1),
        False,
    ),
    "fulfil-shipped-float": (
        _fulfil(FulfilLine("A", "W1", shipped=1)),
        _set(("lines", 0, "shipped"), 0.5),
        False,
    ),
    "fulfil-short-str": (
        _fulfil(FulfilLine("A", "W1", shipped=1)),
        _set(("lines", 0, "short"), "1"),
        False,
    ),
    "fulfil-nothing": (
        _fulfil(FulfilLine("A", "W1", shipped=1)),
        _set(("lines", 0, "shipped"), 0),
        False,
    ),
    "fulfil-fid-missing": (_fulfil(FulfilLine("A", "W1", shipped=1)), _set(("fid",), _DEL), False),
    "fulfil-ffp-empty": (_fulfil(FulfilLine("A", "W1", shipped=1)), _set(("ffp",), ""), False),
    "fulfil-sku-missing": (
        _fulfil(FulfilLine("A", "W1", shipped=1)),
        _set(("lines", 0, "sku"), _DEL),
        False,
    ),
    "fulfil-keys": (_fulfil(FulfilLine("A", "W1", shipped=1)), None, True),
}


@pytest.mark.parametrize("call, mutate, drop", LUA_OTHER.values(), ids=LUA_OTHER.keys())
async def test_lua_scripts_validate(
    book: ATP, call: Call, mutate: Callable[[dict[str, Any]], None] | None, drop: bool
) -> None:
    name, keys, cfg, req = await captured(book, call)
    if mutate is not None:
        mutate(req)
    if drop:
        keys = keys[:-1]
    before = await dump_all(book)
    reply = await raw_call(book, name, keys, cfg, req)
    assert reply["err"] == "bad_request", reply
    assert await dump_all(book) == before


async def test_lua_fulfil_rejects_duplicate_lines(book: ATP) -> None:
    name, keys, cfg, req = await captured(book, _fulfil(FulfilLine("A", "W1", shipped=1)))
    req["lines"].append(dict(req["lines"][0]))
    before = await dump_all(book)
    assert (await raw_call(book, name, keys, cfg, req))["err"] == "bad_request"
    assert await dump_all(book) == before


async def test_lua_expire_holds_validates(book: ATP) -> None:
    bk = book.keys.bucket_keys(book.keys.bucket("A"))
    pk = book.keys.position("A", "W1")
    cfg = book._cfg("worker", "test")
    before = await dump_all(book)
    for keys, req in [
        ([bk.res, bk.holds, bk.events, bk.stats, bk.exc, bk.rp], {"ids": "held1"}),
        ([bk.res, bk.holds, bk.events, bk.stats, bk.exc, bk.rp], {}),
        (
            [bk.res, bk.holds, bk.events, bk.stats, bk.exc, bk.rp],
            {"ids": [{"id": "held1", "n": 1}]},
        ),  # keys short
        (
            [bk.res, bk.holds, bk.events, bk.stats, bk.exc, bk.rp, *pk.line()],
            {"ids": [{"id": "held1", "n": 0}]},
        ),
        (
            [bk.res, bk.holds, bk.events, bk.stats, bk.exc, bk.rp, *pk.line()],
            {"ids": [{"id": "", "n": 1}]},
        ),
        (
            [bk.res, bk.holds, bk.events, bk.stats, bk.exc, bk.rp, *pk.line()],
            {"ids": [{"id": "held1", "n": 1.5}]},
        ),
    ]:
        reply = await raw_call(book, "expire_holds", keys, cfg, req)
        assert reply["err"] == "bad_request", (keys, req, reply)
    assert await dump_all(book) == before
