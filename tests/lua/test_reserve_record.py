"""The reservation record reserve.lua stores, written as JSON text by hand (not cjson.encode,
for speed: lua/_reserve.lua), decodes to exactly the record the readers expect, also when
the texts in it need JSON escaping (a direct script caller is not held to the API's
character sets), with every optional field present or absent. Real server and fakeredis.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support import captured, snapshot
from test_scripts import distinct_bucket_skus

from atp import ATP
from atp.models import day_of

ODD = 'a"b\\c\nd\te\x01f/é✓'  # a quote, a backslash, control characters, '/', UTF-8


async def _raw_reserve(core: ATP, req_edit: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    name, keys, argv = await captured(core, *args, **kwargs)
    req = {**json.loads(argv[1]), **req_edit}
    out = json.loads(await core.scripts.call(core.redis, name, keys, (argv[0], json.dumps(req))))
    return out, keys, req


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("odd", [False, True])
async def test_stored_record_decodes_to_the_expected_fields(
    core: ATP, held: bool, odd: bool
) -> None:
    await core.redis.flushdb()
    await core.set_position("S1", "W1", 50, reason="init")
    rid = "r" + (ODD if odd else "1")
    edit: dict[str, Any] = {"id": rid}
    if odd:
        edit["cu"] = "c" + ODD
        edit["fp"] = "f" + ODD
    out, keys, req = await _raw_reserve(
        core, edit, "r1", "web", [("S1", "W1", 3)], hold_seconds=60 if held else 0,
        customer_id="c1",
    )  # fmt: skip
    assert out["ok"] == 1, out
    raw = await core.redis.hget(core.keys.bucket_keys(core.keys.bucket("S1")).res, rid)
    rec = json.loads(raw)
    cr = out["cr"]
    assert rec == {
        "id": rid,
        "ch": "web",
        "st": "held" if held else "confirmed",
        "cr": cr,
        "ex": cr + 60_000 if held else 0,
        "up": cr,
        "fp": req["fp"],
        "home": req["home"],
        "parts": [core.keys.bucket("S1")],
        "rv": req["rv"],
        "cu": req["cu"],
        "lines": [{"sku": "S1", "loc": "W1", "qty": 3, "shipped": 0, "short": 0, "released": 0}],
        "ful": {},
    }
    # the index entry (keys[0]) finds it, and the event carries the record as stored
    index = json.loads(await core.redis.hget(keys[0], rid))
    assert index == {
        "fp": req["fp"],
        "ch": "web",
        "cr": cr,
        "cu": req["cu"],
        "parts": [{"b": core.keys.bucket("S1"), "lines": [["S1", "W1"]]}],
    }
    ev = await core.redis.xrevrange(core.keys.bucket_keys(core.keys.bucket("S1")).events, count=1)
    data = {k.decode(): v for k, v in ev[0][1].items()}
    assert data["type"] == b"reserved" and json.loads(data["data"]) == rec
    # the same request again replays: the fingerprint read back from the index entry
    again, _, _ = await _raw_reserve(
        core, edit, "r1", "web", [("S1", "W1", 3)], hold_seconds=60 if held else 0,
        customer_id="c1",
    )  # fmt: skip
    # (a replay re-encodes the record: fakeredis's cjson writes the empty `ful` as [])
    [part] = again["parts"]
    assert again["replay"] == 1 and not part.pop("ful")
    assert part == {k: v for k, v in rec.items() if k != "ful"}


async def test_dated_multi_part_record(core: ATP) -> None:
    await core.redis.flushdb()
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 10, reason="init")
    await core.set_position(b, "W1", 10, reason="init")
    when = datetime.now(UTC).date() + timedelta(days=3)
    res = await core.reserve(
        "m1", "web", [(a, "W1", 2), (b, "W1", 1)], hold_seconds=0, requested_date=when
    )
    assert res.status == "confirmed"
    for sku, qty in ((a, 2), (b, 1)):
        raw = await core.redis.hget(core.keys.bucket_keys(core.keys.bucket(sku)).res, "m1")
        rec = json.loads(raw)
        assert rec["parts"] == [core.keys.bucket(a), core.keys.bucket(b)]
        assert rec["rd"] == day_of(when) and "cu" not in rec and rec["ful"] == {}
        assert rec["lines"] == [
            {"sku": sku, "loc": "W1", "qty": qty, "shipped": 0, "short": 0, "released": 0}
        ]


@pytest.mark.parametrize("home", ["1", -1, 16384, 1.5, {"b": 1}])
async def test_a_bad_home_bucket_is_refused_before_any_write(core: ATP, home: Any) -> None:
    await core.redis.flushdb()
    await core.set_position("S1", "W1", 50, reason="init")
    before = await snapshot(core)
    out, _, _ = await _raw_reserve(core, {"home": home}, "h1", "web", [("S1", "W1", 3)])
    assert out["err"] == "bad_request" and "home" in out["detail"]
    assert await snapshot(core) == before
