"""reserve_many: the auto-pipeline's batched reserve (lua/reserve_many.lua).

* Equivalence (real server and fakeredis): one batch mixing accepted, refused (insufficient),
  bad-request, unknown-position, replayed, conflicting and broken (a runtime error)
  reservations, with another script call among them, gives each caller what reserve.lua
  gives that call alone, in the same order, on a fresh copy of the same state; and the
  books end the same.
* A race (real server): many concurrent reserves on one hot SKU, sent in batches, never
  oversell, and the book balances (``atp.verify``).
* NOSCRIPT: a script cache flushed under a batch is reloaded and the batch still answers.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from support import Call, captured
from test_scripts import distinct_bucket_skus

from atp import ATP, InsufficientStock
from atp.errors import BackendError
from atp.scripts import AutoPipeline
from atp.verify import verify


def spy_wire(pipe: AutoPipeline) -> list[list[str]]:
    """Record the script names of every round trip the auto-pipeline makes."""
    trips: list[list[str]] = []
    real = pipe._round_trip

    async def spy(calls: list[Call]) -> list[Any]:
        trips.append([c[0] for c in calls])
        return await real(calls)

    pipe._round_trip = spy  # type: ignore[method-assign]
    return trips


def _norm(v: Any) -> Any:
    """A reply with its clock readings (cr, ex, up) blanked: two runs differ only there."""
    if isinstance(v, dict):
        return {k: ("<t>" if k in ("cr", "ex", "up") and v[k] else _norm(x)) for k, x in v.items()}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def _outcome(r: Any) -> Any:
    if isinstance(r, BaseException):
        return ("error", type(r).__name__)
    if not isinstance(r, (bytes, str)):
        return ("raw", r)
    return ("reply", _norm(json.loads(r)))


async def _book(core: ATP) -> dict[str, Any]:
    """Every hash in the keyspace (positions, reservations, totals), clock readings blanked."""
    out: dict[str, Any] = {}
    async for k in core.redis.scan_iter(match=f"{core.settings.key_prefix}*"):
        if await core.redis.type(k) in (b"hash", "hash"):
            h = await core.redis.hgetall(k)
            flat = {}
            for f, v in h.items():
                try:
                    flat[f] = _norm(json.loads(v))
                except ValueError:
                    flat[f] = v
            out[k] = flat
    return out


async def _state(core: ATP) -> None:
    await core.redis.flushdb()
    await core.set_position("HOT", "W1", 5, reason="init")
    await core.set_position("COLD", "W1", 10, reason="init")
    await core.reserve("dup", "web", [("COLD", "W1", 2)], hold_seconds=0)
    await core.redis.set(core.keys.position("BRK", "W1").pos, "not a hash")


async def test_batch_answers_each_call_as_reserve_alone(core: ATP) -> None:
    assert core._pipe is not None
    await _state(core)
    a = await captured(core, "a", "web", [("HOT", "W1", 3)], hold_seconds=60)
    b = await captured(core, "b", "web", [("HOT", "W1", 3)], hold_seconds=0)
    h = await captured(core, "h", "app", [("HOT", "W1", 2), ("COLD", "W1", 1)], hold_seconds=0)
    dup = await captured(core, "dup", "web", [("COLD", "W1", 2)], hold_seconds=0)
    conflict = await captured(core, "dup", "web", [("COLD", "W1", 3)], hold_seconds=0)
    unknown = await captured(core, "u", "web", [("NOPE", "W1", 1)], hold_seconds=0)
    areq = json.loads(a[2][1])
    bad_hold = ("reserve", a[1], (a[2][0], json.dumps({**areq, "id": "bad", "hold": -1})))
    bad_keys = ("reserve", b[1][:-1], b[2])  # KEYS do not match the parts
    # a runtime error: BRK's position key holds a string, so reading it fails (WRONGTYPE)
    broken = await captured(core, "x", "web", [("BRK", "W1", 1)], hold_seconds=0)
    noop: Call = ("noop", [b[1][1]], ())
    calls: list[Call] = [a, b, bad_hold, noop, dup, conflict, broken, a, unknown, bad_keys, h]
    assert len(calls) <= core._pipe.max_batch

    # alone: each call as its own reserve.lua, one after another, on the state above
    alone = []
    for name, keys, argv in calls:
        try:
            alone.append(await core.scripts.call(core.redis, name, keys, argv))
        except BackendError as e:
            alone.append(e)
    book_alone = await _book(core)

    # batched: the same calls made at once, so the auto-pipeline sends them together
    await _state(core)
    trips = spy_wire(core._pipe)
    batched = await asyncio.gather(
        *(core._pipe.call(n, k, v) for n, k, v in calls), return_exceptions=True
    )
    assert trips == [["reserve_many", "noop"]]
    assert [_outcome(r) for r in batched] == [_outcome(r) for r in alone]
    assert await _book(core) == book_alone
    # the answers themselves: what each was
    kinds = [o[1].get("err", "ok") if o[0] == "reply" else o[0] for o in map(_outcome, alone)]
    assert kinds == [
        "ok", "insufficient", "bad_request", "raw", "ok", "conflict", "error", "ok",
        "unknown_position", "bad_request", "ok",
    ]  # fmt: skip
    assert _outcome(batched[4])[1]["replay"] == 1 and _outcome(batched[7])[1]["replay"] == 1
    await core.redis.delete(core.keys.position("BRK", "W1").pos)
    rep = await verify(core)
    assert rep.ok, rep.problems


async def test_batches_of_one_settings_each(core: ATP) -> None:
    """Reserve calls with different settings arguments (actor) go as one reserve_many per
    settings; a lone one as a plain reserve."""
    assert core._pipe is not None
    await _state(core)
    trips = spy_wire(core._pipe)
    outs = await asyncio.gather(
        core.reserve("p", "web", [("COLD", "W1", 1)], hold_seconds=0, actor="x"),
        core.reserve("q", "web", [("COLD", "W1", 1)], hold_seconds=0, actor="x"),
        core.reserve("r", "web", [("COLD", "W1", 1)], hold_seconds=0, actor="y"),
    )
    assert trips == [["reserve_many", "reserve"]]
    assert [o.status for o in outs] == ["confirmed"] * 3
    assert (await core.position("COLD", "W1")).committed == 5


async def test_race_on_one_hot_sku_through_batches(atp: ATP) -> None:
    assert atp._pipe is not None
    supply = 300
    await atp.set_position("HOT", "W1", supply, reason="init")
    trips = spy_wire(atp._pipe)
    rng = random.Random(7)
    accepted: dict[str, int] = {}
    refused = 0

    async def client(c: int) -> None:
        nonlocal refused
        for i in range(12):
            rid = f"c{c}-{i}"
            qty = rng.randint(1, 3)
            hold = rng.choice((0, 0, 60))
            for attempt in range(1 + (i % 4 == 0)):  # some ids sent twice: a retry
                try:
                    r = await atp.reserve(rid, "web", [("HOT", "W1", qty)], hold_seconds=hold)
                except InsufficientStock:
                    refused += 1
                    break
                assert accepted.setdefault(rid, r.lines[0].qty) == qty
                assert r.replayed == (attempt > 0)

    await asyncio.gather(*(client(c) for c in range(64)))
    assert sum(accepted.values()) <= supply
    assert refused > 0  # demand (~1,500 units) above supply: it sold out
    pos = await atp.position("HOT", "W1")
    assert pos.committed == sum(accepted.values())
    assert supply - pos.committed < 3  # sold out, less than one line's worth left
    assert any(t.count("reserve_many") for t in trips)
    rep = await verify(atp)
    assert rep.ok, rep.problems


async def test_reserve_many_survives_a_script_flush(atp: ATP) -> None:
    assert atp._pipe is not None
    await atp.set_position("HOT", "W1", 100, reason="init")
    await atp.redis.script_flush()
    trips = spy_wire(atp._pipe)
    outs = await asyncio.gather(
        *(atp.reserve(f"f{i}", "web", [("HOT", "W1", 1)], hold_seconds=0) for i in range(8))
    )
    assert all(not o.replayed for o in outs)
    assert trips[0] == ["reserve_many"]
    assert (await atp.position("HOT", "W1")).committed == 8


async def test_streams_stay_bounded_under_batched_reserves(atp: ATP, settings: Any) -> None:
    """Reserves sent as reserve_many batches keep the movement log and the outbox near their
    lengths (approximate trimming: whole stream nodes)."""
    small = ATP(atp.redis, settings.model_copy(update={"log_maxlen": 100, "events_maxlen": 100}))
    await small.start()
    await small.set_position("TRIM", "W1", 10_000, reason="init")
    assert small._pipe is not None
    trips = spy_wire(small._pipe)
    for wave in range(6):
        await asyncio.gather(
            *(
                small.reserve(f"t{wave}-{i}", "web", [("TRIM", "W1", 1)], hold_seconds=0)
                for i in range(64)
            )
        )
    assert any("reserve_many" in t for t in trips)  # the batched path ran
    log = await atp.redis.xlen(small.keys.position("TRIM", "W1").log)
    events = await atp.redis.xlen(small.keys.bucket_keys(small.keys.bucket("TRIM")).events)
    # 385 entries were written to each; '~' keeps whole nodes of 100, plus one batch
    assert 100 <= log <= 100 + 100 + 64, log
    assert 100 <= events <= 100 + 100 + 64, events


async def test_bucket_totals_kept_when_a_lone_reserve_fails_midway(core: ATP) -> None:
    """A runtime error in a lone reserve.lua (a damaged key) leaves what it wrote before it,
    as any script does; the bucket totals of what it wrote are written too (they are
    deferred to the end of the call), so they still match the positions."""
    await core.redis.flushdb()
    a, b = distinct_bucket_skus(core, 2)
    await core.set_position(a, "W1", 10, reason="init")
    await core.set_position(b, "W1", 10, reason="init")
    qty = {a: 2, b: 3}
    lines = [(sku, "W1", n) for sku, n in qty.items()]
    name, keys, argv = await captured(core, "m", "web", lines, hold_seconds=0)
    first, second = [p["lines"][0]["sku"] for p in json.loads(argv[1])["parts"]]
    # the second part's live index is damaged: its ZADD fails after the first part is written
    await core.redis.set(core.keys.position(second, "W1").lx, "damaged")
    with pytest.raises(BackendError, match="WRONGTYPE"):
        await core.scripts.call(core.redis, name, keys, argv)
    pos = await core.position(first, "W1")
    assert pos is not None and pos.committed == qty[first]
    bucket = core.keys.bucket_keys(core.keys.bucket(first))
    assert int(await core.redis.hget(bucket.stats, "committed")) == qty[first]
