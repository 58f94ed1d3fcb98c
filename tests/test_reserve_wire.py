"""``ATP.reserve`` writes its JSON argument and fingerprint by hand (the hot path); they
must be byte-for-byte what ``json`` gives for the same request, so scripts, stored
fingerprints and replays (I3) see no difference."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atp import ATP, Line
from atp.models import CHANNEL_RE, IDENT_RE, RESERVATION_ID_RE
from atp.store import _dumps, _reserve_fp_json, _reserve_req_json

idents = st.from_regex(IDENT_RE, fullmatch=True)
channels = st.from_regex(CHANNEL_RE, fullmatch=True)
rids = st.from_regex(RESERVATION_ID_RE, fullmatch=True)
qtys = st.integers(1, 10**9)
line_lists = st.lists(
    st.tuples(idents, idents, qtys), min_size=1, max_size=8, unique_by=lambda t: t[:2]
)


def _reference(
    rid: str, channel: str, hold: int, home: int, parts: dict[int, list[tuple[str, str, int]]]
) -> tuple[str, str]:
    """The request and fingerprint as json writes them (the code before the fast path)."""
    fp = hashlib.sha1(
        _dumps([channel, hold, sorted(ln for p in parts.values() for ln in p)]).encode()
    ).hexdigest()
    req = {
        "id": rid,
        "ch": channel,
        "hold": hold * 1000,
        "fp": fp,
        "idx": True,
        "home": home,
        "parts": [
            {"b": b, "n": len(p), "lines": [{"sku": s, "loc": loc, "qty": q} for s, loc, q in p]}
            for b, p in parts.items()
        ],
    }
    return _dumps(req), fp


@settings(max_examples=300, deadline=None)
@given(rid=rids, channel=channels, hold=st.integers(0, 7 * 86400), lines=line_lists,
       buckets=st.integers(1, 5))  # fmt: skip
def test_hand_written_json_matches_json(
    rid: str, channel: str, hold: int, lines: list[tuple[str, str, int]], buckets: int
) -> None:
    parts: dict[int, list[tuple[str, str, int]]] = {}
    for ln in lines:
        parts.setdefault(len(ln[0]) % buckets, []).append(ln)
    want_req, want_fp = _reference(rid, channel, hold, 3, parts)
    fp_text = _reserve_fp_json(channel, hold, sorted(ln for p in parts.values() for ln in p))
    assert fp_text == _dumps([channel, hold, sorted(ln for p in parts.values() for ln in p)])
    fp = hashlib.sha1(fp_text.encode()).hexdigest()
    assert fp == want_fp
    got = _reserve_req_json(rid, channel, hold * 1000, fp, 3, parts)
    assert got == want_req
    json.loads(got)  # and it is JSON


def test_int_subclass_is_written_by_value() -> None:
    class Qty(int):
        def __str__(self) -> str:
            return "not a number"

        __repr__ = __str__

    parts = {0: [("A", "B", Qty(5))]}
    assert _reserve_req_json("r", "web", Qty(0), "f", 0, parts) == _dumps(
        {"id": "r", "ch": "web", "hold": 0, "fp": "f", "idx": True, "home": 0,
         "parts": [{"b": 0, "n": 1, "lines": [{"sku": "A", "loc": "B", "qty": 5}]}]}
    )  # fmt: skip
    assert _reserve_fp_json("web", Qty(3), [("A", "B", Qty(5))]) == '["web",3,[["A","B",5]]]'


@pytest.mark.parametrize("hold", [0, 30])
async def test_reserve_sends_what_json_would(fake_atp: ATP, hold: int) -> None:
    core = fake_atp
    skus = [f"SKU-{i}" for i in range(6)]
    for s in skus:
        await core.set_position(s, "DC-1.a_b", 100)
    sent: list[tuple[str, list[str], tuple[Any, ...]]] = []
    call = core.scripts.call

    async def spy(client: Any, name: str, keys: Any, args: Any) -> Any:
        sent.append((name, list(keys), tuple(args)))
        return await call(client, name, keys, args)

    core.scripts.call = spy  # type: ignore[method-assign]
    lines = [Line(s, "DC-1.a_b", i + 1) for i, s in enumerate(reversed(skus))]
    first = await core.reserve("ord-1.a:b", "web-eu", lines, hold_seconds=hold, actor="me")
    again = await core.reserve("ord-1.a:b", "web-eu", lines, hold_seconds=hold, actor="me")
    assert again.replayed and again.lines == first.lines

    parts: dict[int, list[tuple[str, str, int]]] = {}
    for ln in lines:
        parts.setdefault(core.keys.bucket(ln.sku), []).append((ln.sku, ln.location, ln.qty))
    want_req, _ = _reference("ord-1.a:b", "web-eu", hold, core.keys.bucket("ord-1.a:b"), parts)
    want_keys = [core.keys.index("ord-1.a:b")]
    for b, p in parts.items():
        bk = core.keys.bucket_keys(b)
        want_keys += [bk.res, bk.holds, bk.events, bk.stats]
        for s, loc, _q in p:
            pk = core.keys.position(s, loc)
            want_keys += [pk.pos, pk.hx, pk.log]
    for name, keys, args in sent:
        assert name == "reserve"
        assert keys == want_keys
        assert args == (core._cfg("me", ""), want_req)
