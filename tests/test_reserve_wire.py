"""``ATP.reserve`` writes its JSON argument and fingerprint by hand (the hot path); they
must be byte-for-byte what ``json`` gives for the same request, so scripts, stored
fingerprints and replays (I3) see no difference: with fixed and routed lines,
protections, caps, buyer limits and a customer."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import captured

from atp import ATP, Line
from atp._wire import _dumps, _reserve_fp_json, _reserve_req_json, _Spec
from atp.models import CHANNEL_RE, CUSTOMER_RE, IDENT_RE, REGION_RE, RESERVATION_ID_RE

idents = st.from_regex(IDENT_RE, fullmatch=True)
channels = st.from_regex(CHANNEL_RE, fullmatch=True)
rids = st.from_regex(RESERVATION_ID_RE, fullmatch=True)
customers = st.from_regex(CUSTOMER_RE, fullmatch=True)
regions = st.from_regex(REGION_RE, fullmatch=True)
qtys = st.integers(1, 10**9)
units = st.integers(0, 10**12)
protections = st.lists(st.tuples(channels, units), max_size=4).map(tuple)
caps = st.none() | units
limits = st.none() | st.integers(1, 10**12)


@st.composite
def specs(draw: st.DrawFn) -> _Spec:
    """One reserve line as the script takes it: a fixed location or routed candidates,
    with or without protections, cap and buyer limit."""
    sku, qty = draw(idents), draw(qtys)
    if draw(st.booleans()):
        cands = tuple(draw(st.lists(idents, min_size=1, max_size=4, unique=True)))
        loc, split, n = None, draw(st.booleans()), len(cands)
    else:
        cands, loc, split, n = None, draw(idents), False, 1
    prs = draw(st.none() | st.lists(protections, min_size=n, max_size=n))
    return (sku, loc, qty, cands, split, prs, draw(caps), draw(limits))


def _line_obj(sp: _Spec) -> dict[str, Any]:
    sku, loc, qty, cands, split, prs, cap, bl = sp
    out: dict[str, Any] = {"sku": sku}
    if cands is None:
        out["loc"] = loc
    else:
        out["locs"] = list(cands)
        out["split"] = split
    out["qty"] = qty
    if prs is not None:
        out["pr"] = [[[g, q] for g, q in pr] for pr in prs]
    if cap is not None:
        out["cap"] = cap
    if bl is not None:
        out["bl"] = bl
    return out


def _req_obj(
    rid: str,
    channel: str,
    hold_ms: int,
    fp: str,
    home: int,
    rv: int,
    customer: str | None,
    parts: dict[int, list[_Spec]],
    idx: bool = True,
    rd: int | None = None,
    pp: int = 0,
    bo: bool = False,
) -> dict[str, Any]:
    """reserve.lua's ``req`` as an object (what the code built before the fast path)."""
    req: dict[str, Any] = {
        "id": rid,
        "ch": channel,
        "hold": hold_ms,
        "fp": fp,
        "idx": idx,
        "home": home,
        "rv": rv,
    }
    if customer is not None:
        req["cu"] = customer
    if rd is not None:
        req["rd"] = rd
    if pp:
        req["pp"] = pp
    if bo:
        req["bo"] = True
    req["parts"] = []
    for b, sl in parts.items():
        part: dict[str, Any] = {"b": b, "n": len(sl)}
        if any(sp[3] is not None for sp in sl):
            part["c"] = [1 if sp[3] is None else len(sp[3]) for sp in sl]
        part["lines"] = [_line_obj(sp) for sp in sl]
        req["parts"].append(part)
    return req


def _fp_obj(
    channel: str,
    hold: int,
    lines: list[tuple[str, str, int]],
    customer: str | None,
    region: str | None,
    split: bool | None,
    rd: int | None = None,
    bo: bool = False,
) -> list[Any]:
    obj: list[Any] = [channel, hold, [list(ln) for ln in lines]]
    if customer is not None or region is not None or split is not None or rd is not None or bo:
        extra: dict[str, Any] = {"cu": customer, "rg": region, "sp": split}
        if rd is not None:
            extra["rd"] = rd
        if bo:
            extra["bo"] = True
        obj.append(extra)
    return obj


def _fp_lines(parts: dict[int, list[_Spec]]) -> list[tuple[str, str, int]]:
    return sorted((sp[0], sp[1] or "", sp[2]) for sl in parts.values() for sp in sl)


@settings(max_examples=300, deadline=None)
@given(
    rid=rids,
    channel=channels,
    hold=st.integers(0, 7 * 86400),
    lines=st.lists(specs(), min_size=1, max_size=8),
    buckets=st.integers(1, 5),
    rv=st.integers(0, 10**6),
    customer=st.none() | customers,
    region=st.none() | regions,
    split=st.none() | st.booleans(),
    idx=st.booleans(),
    rd=st.none() | st.integers(0, 10**6),
    pp=st.integers(0, 10**6),
    bo=st.booleans(),
)
def test_hand_written_json_matches_json(
    rid: str,
    channel: str,
    hold: int,
    lines: list[_Spec],
    buckets: int,
    rv: int,
    customer: str | None,
    region: str | None,
    split: bool | None,
    idx: bool,
    rd: int | None,
    pp: int,
    bo: bool,
) -> None:
    parts: dict[int, list[_Spec]] = {}
    for sp in lines:
        parts.setdefault(len(sp[0]) % buckets, []).append(sp)
    fp_lines = _fp_lines(parts)
    fp_text = _reserve_fp_json(channel, hold, fp_lines, customer, region, split, rd, bo)
    assert fp_text == _dumps(_fp_obj(channel, hold, fp_lines, customer, region, split, rd, bo))
    fp = hashlib.sha1(fp_text.encode()).hexdigest()
    got = _reserve_req_json(
        rid, channel, hold * 1000, fp, 3, rv, customer, parts, idx=idx, rd=rd, pp=pp, backorder=bo
    )
    want = _req_obj(rid, channel, hold * 1000, fp, 3, rv, customer, parts, idx, rd, pp, bo)
    assert got == _dumps(want)
    json.loads(got)  # and it is JSON


def test_the_fingerprint_tells_routed_and_options_apart() -> None:
    base = _reserve_fp_json("web", 0, [("A", "W", 1)])
    assert base == '["web",0,[["A","W",1]]]'
    others = {
        _reserve_fp_json("web", 0, [("A", "", 1)]),
        _reserve_fp_json("web", 0, [("A", "W", 1)], customer="c1"),
        _reserve_fp_json("web", 0, [("A", "W", 1)], region="EU"),
        _reserve_fp_json("web", 0, [("A", "W", 1)], split=False),
        _reserve_fp_json("web", 0, [("A", "W", 1)], split=True),
    }
    assert len(others) == 5 and base not in others


def test_int_subclass_is_written_by_value() -> None:
    class Qty(int):
        def __str__(self) -> str:
            return "not a number"

        __repr__ = __str__

    plain: dict[int, list[_Spec]] = {0: [("A", "B", Qty(5), None, False, None, None, None)]}
    assert _reserve_req_json("r", "web", Qty(0), "f", Qty(0), Qty(0), None, plain) == _dumps(
        {"id": "r", "ch": "web", "hold": 0, "fp": "f", "idx": True, "home": 0, "rv": 0,
         "parts": [{"b": 0, "n": 1, "lines": [{"sku": "A", "loc": "B", "qty": 5}]}]}
    )  # fmt: skip
    routed: dict[int, list[_Spec]] = {
        Qty(2): [("A", None, Qty(5), ("W1", "W2"), True, [(("x", Qty(3)),), ()], Qty(7), Qty(1))]
    }
    assert _reserve_req_json("r", "web", 0, "f", 1, Qty(4), "c", routed) == _dumps(
        {"id": "r", "ch": "web", "hold": 0, "fp": "f", "idx": True, "home": 1, "rv": 4,
         "cu": "c", "parts": [{"b": 2, "n": 1, "c": [2], "lines": [
             {"sku": "A", "locs": ["W1", "W2"], "split": True, "qty": 5,
              "pr": [[["x", 3]], []], "cap": 7, "bl": 1}]}]}
    )  # fmt: skip
    assert _reserve_fp_json("web", Qty(3), [("A", "B", Qty(5))]) == '["web",3,[["A","B",5]]]'


RULES = {
    "channels": {
        "web-eu": {
            "priority": 10,
            "locations": ["DC-2", "DC-1.a_b"],
            "regions": {"EU": ["DC-1.a_b", "DC-2"]},
        },
        "store": {"priority": 5},
    },
    "default": {"protect": {"store": 3}, "cap": {"web-eu": 1000}, "buyer_limit": 50},
    "skus": {"SKU-0": {"protect": {"web-eu": 2}, "buyer_limit": None}},
}


@pytest.mark.parametrize("hold", [0, 30])
@pytest.mark.parametrize("with_rules", [False, True])
async def test_reserve_sends_what_json_would(fake_atp: ATP, hold: int, with_rules: bool) -> None:
    core = fake_atp
    skus = [f"SKU-{i}" for i in range(6)]
    for s in skus:
        await core.set_position(s, "DC-1.a_b", 100)
        await core.set_position(s, "DC-2", 100)
    rv = (await core.apply_rules(RULES)).version if with_rules else 0
    sent: list[tuple[str, list[str], tuple[Any, ...]]] = []
    call = core.scripts.call

    async def spy(client: Any, name: str, keys: Any, args: Any) -> Any:
        sent.append((name, list(keys), tuple(args)))
        return await call(client, name, keys, args)

    core.scripts.call = spy  # type: ignore[method-assign]
    # with rules, the last line is routed (region EU: DC-1.a_b first), split asked for
    lines: list[Line | tuple[str, str | None, int]] = [
        Line(s, "DC-1.a_b", i + 1) for i, s in enumerate(reversed(skus[1:]))
    ]
    opts: dict[str, Any] = {}
    if with_rules:
        lines.append(("SKU-0", None, 7))
        opts = {"customer_id": "cust-1@x", "region": "EU", "allow_split": True}
    else:
        lines.append(Line("SKU-0", "DC-1.a_b", 7))
    first = await core.reserve("ord-1.a:b", "web-eu", lines, hold_seconds=hold, actor="me", **opts)
    again = await core.reserve("ord-1.a:b", "web-eu", lines, hold_seconds=hold, actor="me", **opts)
    assert again.replayed and again.lines == first.lines
    assert first.rules_version == again.rules_version == rv
    assert [(ln.sku, ln.location, ln.qty) for ln in first.lines if ln.sku == "SKU-0"] == [
        ("SKU-0", "DC-1.a_b", 7)
    ]

    # what the script must have been sent, resolved by hand from RULES
    parts: dict[int, list[_Spec]] = {}
    for ln in lines:
        sku, loc, qty = (ln.sku, ln.location, ln.qty) if isinstance(ln, Line) else ln
        spec: _Spec
        if not with_rules:
            spec = (sku, loc, qty, None, False, None, None, None)
        elif loc is None:  # SKU-0: no buyer limit; web-eu's own protection is not sent
            pr = (("store", 3),)
            spec = (sku, None, qty, ("DC-1.a_b", "DC-2"), True, [pr, pr], 1000, None)
        else:
            spec = (sku, loc, qty, None, False, [(("store", 3),)], 1000, 50)
        parts.setdefault(core.keys.bucket(sku), []).append(spec)
    fp_obj = _fp_obj(
        "web-eu",
        hold,
        _fp_lines(parts),
        opts.get("customer_id"),
        opts.get("region"),
        opts.get("allow_split"),
    )
    fp = hashlib.sha1(_dumps(fp_obj).encode()).hexdigest()
    home = core.keys.bucket("ord-1.a:b")
    pp = RULES["channels"]["web-eu"]["priority"] if with_rules else 0
    req = _req_obj(
        "ord-1.a:b", "web-eu", hold * 1000, fp, home, rv, opts.get("customer_id"), parts, pp=pp
    )
    want_keys = [core.keys.index("ord-1.a:b")]
    for b, sl in parts.items():
        bk = core.keys.bucket_keys(b)
        want_keys += [bk.res, bk.holds, bk.events, bk.stats, bk.exc, bk.rp]
        for sku, loc, _q, cands, *_ in sl:
            if cands is None:
                want_keys += core.keys.position(sku, loc or "").line()
            else:
                want_keys.append(core.keys.sku(sku))
                for c in cands:
                    want_keys += core.keys.position(sku, c).candidate()
    assert len(sent) == 2
    for name, keys, args in sent:
        assert name == "reserve"
        assert keys == want_keys
        assert args == (core._cfg("me", ""), _dumps(req))


async def test_a_request_made_again_under_other_rules_is_resolved_again(fake_atp: ATP) -> None:
    """reserve works a request out once and reuses it (everything but the id); when the
    rules in force change (here, from another process) the same request is resolved under
    the new ones: what is sent is what a process that never saw the request sends."""
    core = fake_atp
    await core.set_position("SKU-0", "DC-1.a_b", 100)
    await core.set_position("SKU-0", "DC-2", 100)

    def fresh() -> ATP:  # nothing remembered, the rules core has now
        other = ATP(core.redis, core.settings)
        other._rules = core._rules
        return other

    request: Any = ("web-eu", [("SKU-0", "DC-1.a_b", 2)])
    before = await core.reserve("w-0", *request, hold_seconds=0)
    assert before.rules_version == 0
    versions = []
    for i, doc in enumerate([RULES, {**RULES, "default": {"cap": {"web-eu": 7}}}, RULES]):
        versions.append((await ATP(core.redis, core.settings).apply_rules(doc)).version)
        got = await core.reserve(f"w-{i + 1}", *request, hold_seconds=0)  # stale, then caught up
        assert got.rules_version == versions[-1]
        assert got.lines == before.lines and not got.replayed
        sent = await captured(core, f"x-{i}", *request, hold_seconds=0)
        assert sent == await captured(fresh(), f"x-{i}", *request, hold_seconds=0)
        assert f'"rv":{versions[-1]},' in sent[2][1]
    assert len(set(versions)) == 3
    # and the request without a location is routed under the rules in force
    routed: Any = ("web-eu", [("SKU-0", None, 2)])
    sent = await captured(core, "y-0", *routed, region="EU")
    assert sent == await captured(fresh(), "y-0", *routed, region="EU")


async def test_replies_alike_are_decoded_alike(fake_atp: ATP) -> None:
    """reserve reuses the decoding of a reply byte-for-byte like the last fresh one (the
    calls of a batch are mostly answered alike); any other reply is decoded afresh."""
    from atp import InsufficientStock

    confirmed = b'{"ok":1,"replay":0,"st":"confirmed","cr":1795757651826,"ex":0,"rv":0}'
    held = b'{"ok":1,"replay":0,"st":"held","cr":1795757651826,"ex":1795757711826,"rv":0}'
    short = b'{"err":"insufficient","detail":"short","lines":[]}'
    replies = [confirmed, confirmed, held, short, short, confirmed, held]

    async def answer(name: str, keys: Any, argv: Any) -> Any:
        return replies.pop(0)

    fake_atp._call = answer  # type: ignore[method-assign, assignment]
    got: list[Any] = []
    for i in range(7):
        try:
            r = await fake_atp.reserve(f"r{i}", "web", [("A", "W", 1)], hold_seconds=0)
            got.append((r.id, r.status, r.expires_at is not None))
        except InsufficientStock as e:
            got.append(("short", e.detail))
    assert got == [
        ("r0", "confirmed", False), ("r1", "confirmed", False), ("r2", "held", True),
        ("short", "short"), ("short", "short"), ("r5", "confirmed", False),
        ("r6", "held", True),
    ]  # fmt: skip
