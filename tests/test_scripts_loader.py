"""The script loader: SCRIPT FLUSH in the middle of a session breaks nothing.

``ScriptRunner.call`` reloads a script on NOSCRIPT and retries once; ``call_many`` (one
pipeline) reloads the missing scripts and resends exactly the calls that failed with
NOSCRIPT, so no call runs twice.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from atp import ATP, BackendError, FulfilLine
from atp.scripts import NAMES, ScriptRunner, decode, load_source
from atp.verify import verify


async def flush(core: ATP) -> None:
    await core.redis.script_flush()
    assert not any(await core.redis.script_exists(*core.scripts.shas.values()))


async def is_loaded(core: ATP, name: str) -> bool:
    [flag] = await core.redis.script_exists(core.scripts.shas[name])
    return bool(flag)


async def test_every_operation_survives_a_script_flush(atp: ATP) -> None:
    core = atp
    await core.set_position("A", "W1", 10, reason="init")
    await core.reserve("h1", "web", [("A", "W1", 1)], hold_seconds=1)  # expires during the test
    started = asyncio.get_running_loop().time()

    await flush(core)
    p = await core.set_position("B", "W1", 10, reason="init")
    assert p.on_hand == 10 and await is_loaded(core, "set_position")

    await flush(core)
    assert (await core.adjust("B", "W1", -1, reason="damaged")).on_hand == 9
    await flush(core)
    assert (await core.receive("B", "W1", 3, reference="PO")).on_hand == 12

    await flush(core)
    r = await core.reserve("r1", "web", [("B", "W1", 5)], hold_seconds=60)
    assert r.status == "held" and await is_loaded(core, "reserve")
    await flush(core)
    assert (await core.reserve("r1", "web", [("B", "W1", 5)], hold_seconds=60)).replayed

    await flush(core)
    assert (await core.confirm("r1")).status == "confirmed"
    assert await is_loaded(core, "confirm")

    await flush(core)
    r = await core.fulfil("r1", [FulfilLine("B", "W1", shipped=2)], fulfilment_id="f1")
    assert r.lines[0].shipped == 2 and await is_loaded(core, "fulfil")

    await flush(core)
    r = await core.release("r1")
    assert r.status == "released" and await is_loaded(core, "release")

    await asyncio.sleep(max(0.0, 1.1 - (asyncio.get_running_loop().time() - started)))
    await flush(core)
    res = await core.expire_holds()
    assert res.expired == ("h1",) and res.units == 1
    assert await is_loaded(core, "expire_holds")

    a = await core.position("A", "W1")
    b = await core.position("B", "W1")
    assert a is not None and (a.on_hand, a.committed) == (10, 0)
    assert b is not None and (b.on_hand, b.committed) == (10, 0)
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_call_reloads_after_flush(atp: ATP) -> None:
    await flush(atp)
    assert not await atp.scripts.loaded(atp.redis)
    assert await atp.scripts.call(atp.redis, "noop", ["k"], []) == 1
    assert await is_loaded(atp, "noop")
    await atp.start()
    assert await atp.scripts.loaded(atp.redis)


def _set_call(core: ATP, sku: str, on_hand: int) -> tuple[str, list[str], list[str]]:
    k = core.keys.position(sku, "W1")
    b = core.keys.bucket(sku)
    bk = core.keys.bucket_keys(b)
    req = {"sku": sku, "loc": "W1", "b": b, "on_hand": on_hand, "reason": "bulk"}
    keys = [k.pos, k.log, bk.events, k.lx, bk.res, bk.stats, bk.exc, bk.rp]
    return "set_position", keys, [core._cfg("", ""), json.dumps(req)]


def _receive_call(core: ATP, sku: str, qty: int) -> tuple[str, list[str], list[str]]:
    k = core.keys.position(sku, "W1")
    bk = core.keys.bucket_keys(core.keys.bucket(sku))
    req = {"sku": sku, "loc": "W1", "qty": qty, "ref": "PO"}
    return "receive", [k.pos, k.log, bk.events, bk.rp], [core._cfg("", ""), json.dumps(req)]


async def _on_hand(core: ATP, sku: str) -> int:
    p = await core.position(sku, "W1")
    assert p is not None
    return p.on_hand


async def test_call_many_recovers_after_flush(atp: ATP) -> None:
    calls: list[Any] = [_set_call(atp, "A", 5), _set_call(atp, "B", 7), _receive_call(atp, "A", 2)]
    await flush(atp)
    out = [decode(r) for r in await atp.scripts.call_many(atp.redis, calls)]
    assert [o["position"]["on_hand"] for o in out] == [5, 7, 7]
    assert await _on_hand(atp, "A") == 7 and await _on_hand(atp, "B") == 7
    assert await is_loaded(atp, "set_position") and await is_loaded(atp, "receive")
    # and again, with everything loaded: one round trip, no reload needed
    out = [decode(r) for r in await atp.scripts.call_many(atp.redis, [_receive_call(atp, "B", 1)])]
    assert out[0]["position"]["on_hand"] == 8
    rep = await verify(atp)
    assert rep.ok, rep.problems


async def test_call_many_resends_only_the_calls_that_did_not_run(atp: ATP) -> None:
    """receive is loaded, set_position is not: the receives ran in the first pipeline and
    must not run a second time when the set_position calls are resent."""
    await flush(atp)
    await atp.redis.script_load(load_source("receive"))
    calls: list[Any] = [
        _receive_call(atp, "A", 1),
        _set_call(atp, "B", 4),
        _receive_call(atp, "A", 2),
        _set_call(atp, "C", 6),
    ]
    out = [decode(r) for r in await atp.scripts.call_many(atp.redis, calls)]
    assert [o["position"]["on_hand"] for o in out] == [1, 4, 3, 6]
    assert (await _on_hand(atp, "A"), await _on_hand(atp, "B"), await _on_hand(atp, "C")) == (
        3,
        4,
        6,
    )
    assert len(await atp.movements("A", "W1")) == 2
    assert len(await atp.movements("B", "W1")) == 1
    rep = await verify(atp)
    assert rep.ok, rep.problems


async def test_call_many_script_error_is_a_backend_error(atp: ATP) -> None:
    name, keys, args = _set_call(atp, "A", 5)
    await flush(atp)
    with pytest.raises(BackendError):
        await atp.scripts.call_many(atp.redis, [(name, keys, [args[0], "{not json"])])
    with pytest.raises(BackendError):
        await atp.scripts.call(atp.redis, name, keys, [args[0], "{not json"])
    assert await atp.redis.exists(keys[0]) == 0


async def test_call_many_empty(atp: ATP) -> None:
    assert await atp.scripts.call_many(atp.redis, []) == []


def test_runner_inlines_the_library_and_hashes_each_script() -> None:
    runner = ScriptRunner()
    assert set(runner.sources) == set(NAMES)
    for name, src in runner.sources.items():
        assert not re.search(r'^--- @include "', src, re.MULTILINE), name
    assert "local function refuse" in runner.sources["reserve"]
    assert len(set(runner.shas.values())) == len(NAMES)
