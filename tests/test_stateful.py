"""Stateful property test: the Lua scripts on a real server, held against a pure-Python model.

Hypothesis drives every core operation (positions, reservations, confirmations, releases,
fulfilments, bad input, and bad input sent straight to the scripts past the Python
validation) and, after every step, compares the whole book on the server with the model:

* I1: ``committed <= on_hand - safety_stock`` on every position, unless the step that made
  it false was a count (``set_position``), a negative adjustment or a short pick; and then
  an ``oversell`` exception event is emitted by that very step (and by no other);
* I2: positions (per channel too) and every reservation equal the model, and
  ``verify(core, allow_uncovered=True)`` passes (it also checks the movement-log chain, I5);
* I3: a replay changes nothing on the server, and a reserve replay returns the original
  outcome (confirm, release and fulfil replays return the current state);
* I7: every refusal and every bad request changes nothing on the server (a byte-level
  snapshot of every key before and after).

Hypothesis' stateful runner is synchronous, so the machine owns an event loop and drives
the async core with ``run_until_complete``; each machine run gets a fresh client and
starts from FLUSHDB. Holds are long (an hour), so nothing expires by wall-clock time here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from atp import (
    ATP,
    AlreadyFulfilled,
    AlreadyReleased,
    ATPError,
    EmbeddedServer,
    FulfilLine,
    IdempotencyConflict,
    InsufficientStock,
    InvalidRequest,
    NegativeOnHand,
    NotConfirmed,
    OverFulfil,
    Position,
    Reservation,
    Settings,
    UnknownLine,
    UnknownPosition,
    UnknownReservation,
)
from atp.verify import verify

Pos = tuple[str, str]

# A@W1 and A@W2 share a bucket, B@W1 sits in another (16 buckets): reservations span
# one part with two lines, or two parts.
POSITIONS: list[Pos] = [("A", "W1"), ("A", "W2"), ("B", "W1")]
CHANNELS = ["web", "store"]
RIDS = [f"r{i}" for i in range(10)]
FIDS: list[str | None] = [None, "f1", "f2"]
LONG_HOLD = 3600

# -- the model ---------------------------------------------------------------------------


@dataclass
class MPos:
    on_hand: int
    committed: int = 0
    safety_stock: int = 0
    ch: dict[str, int] = field(default_factory=dict)

    @property
    def available(self) -> int:
        return self.on_hand - self.committed - self.safety_stock

    @property
    def uncovered(self) -> bool:
        return self.committed > self.on_hand - self.safety_stock

    def commit(self, channel: str, qty: int) -> None:
        self.committed += qty
        self.ch[channel] = self.ch.get(channel, 0) + qty


@dataclass
class MLine:
    sku: str
    loc: str
    qty: int
    shipped: int = 0
    short: int = 0
    released: int = 0

    @property
    def pos(self) -> Pos:
        return (self.sku, self.loc)

    @property
    def open(self) -> int:
        return self.qty - self.shipped - self.released

    def row(self) -> tuple[str, str, int, int, int, int]:
        return (self.sku, self.loc, self.qty, self.shipped, self.short, self.released)


@dataclass
class MRes:
    channel: str
    hold: int
    status: str
    lines: list[MLine]
    # what the reserve call returned: a replay must return exactly this again (I3)
    original: Reservation | None = None
    # a hold keeps its expiry on the record until it is confirmed (release leaves it)
    expiry: bool = False
    # fulfilment id (or ("auto", fingerprint) when none was given) -> the lines it carried
    ful: dict[object, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def request(self) -> tuple[Any, ...]:
        return (
            self.channel,
            self.hold,
            tuple(sorted((ln.sku, ln.loc, ln.qty) for ln in self.lines)),
        )


def _nz(d: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in d.items() if v}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# -- the machine -------------------------------------------------------------------------


class ATPMachine(RuleBasedStateMachine):
    url: str
    cfg: Settings
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        super().__init__()
        self.client = aioredis.Redis.from_url(self.url)
        self.core = ATP(self.client, self.cfg)
        self.run(self.client.flushdb())
        self.run(self.core.start())
        self.pos: dict[Pos, MPos] = {}
        self.res: dict[str, MRes] = {}
        # positions a count, a negative adjustment or a short pick left uncovered (I1)
        self.excused: set[Pos] = set()
        self.max_qty = self.cfg.max_line_qty
        self.max_oh = self.cfg.max_on_hand
        self.max_hold = self.cfg.max_hold_seconds
        self.ev_keys = sorted({self.core._events(sku) for sku, _ in POSITIONS})
        # replenishment levels set per position (reorder point, order-up-to)
        self.levels: dict[Pos, tuple[int, int]] = {}

    def teardown(self) -> None:
        self.run(self.core.aclose())

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    # -- helpers ---------------------------------------------------------------------------

    async def _snapshot(self) -> dict[str, Any]:
        """Every key of the database with its full content (streams: length and last entry)."""
        r = self.client
        keys = sorted({k async for k in r.scan_iter(count=1000)})
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.type(k)
        types = [_s(t) for t in await pipe.execute()]
        pipe = r.pipeline(transaction=False)
        for k, t in zip(keys, types, strict=True):
            if t == "hash":
                pipe.hgetall(k)
                pipe.hlen(k)
            elif t == "zset":
                pipe.zrange(k, 0, -1, withscores=True)
                pipe.zcard(k)
            elif t == "stream":
                pipe.xrevrange(k, count=1)  # an append changes the last entry and the length
                pipe.xlen(k)
            else:
                pipe.dump(k)
                pipe.exists(k)
        vals = await pipe.execute()
        return {
            _s(k): (t, vals[2 * i], vals[2 * i + 1])
            for i, (k, t) in enumerate(zip(keys, types, strict=True))
        }

    def expect(
        self, coro: Coroutine[Any, Any, Any], error: type[ATPError] | None, *, changes: bool
    ) -> tuple[Any, ATPError | None, dict[str, Any]]:
        """Run one call; check it failed with exactly ``error`` (or succeeded) and, unless it
        is expected to change the book, that the server is byte-for-byte unchanged."""
        before = self.run(self._snapshot())
        result: Any = None
        exc: ATPError | None = None
        try:
            result = self.run(coro)
        except ATPError as e:
            exc = e
        if error is None:
            assert exc is None, f"expected success, got {exc!r} {getattr(exc, 'extra', '')}"
        else:
            assert type(exc) is error, f"expected {error.__name__}, got {exc!r} (result {result!r})"
        if not changes:
            after = self.run(self._snapshot())
            changed = sorted(
                k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
            )
            assert not changed, f"a call that should change nothing changed {changed} (I3/I7)"
        return result, exc, before

    async def _new_events(self, before: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for key in self.ev_keys:
            prev = before.get(key)
            start = f"({_s(prev[1][0][0])}" if prev and prev[1] else "-"
            for _mid, fields in await self.client.xrange(key, start, "+"):
                f = {_s(k): _s(v) for k, v in fields.items()}
                f["data"] = json.loads(f.get("data", "{}"))
                out.append(f)
        return out

    def after_change(
        self,
        before: dict[str, Any],
        cover_checked: Collection[Pos] = (),
        shorts: Collection[Pos] = (),
    ) -> None:
        """After an accepted change: the exception events it emitted are exactly those due,
        and the positions it left uncovered (on purpose) are remembered for I1."""
        events = self.run(self._new_events(before))
        exc = [e["data"] for e in events if e["type"] == "exception"]
        oversold = {(d["sku"], d["location"]) for d in exc if d["kind"] == "oversell"}
        short_picks = {(d["sku"], d["location"]) for d in exc if d["kind"] == "short_pick"}
        due = {p for p in cover_checked if self.pos[p].uncovered}
        assert oversold == due, f"oversell exceptions {oversold}, expected {due} (I1)"
        assert short_picks == set(shorts), f"short-pick exceptions {short_picks}, expected {shorts}"
        self.excused |= due
        self.excused = {p for p in self.excused if self.pos[p].uncovered}

    def check_position(self, got: Position, p: Pos) -> None:
        m = self.pos[p]
        assert (got.sku, got.location) == p
        assert (got.on_hand, got.committed, got.safety_stock) == (
            m.on_hand,
            m.committed,
            m.safety_stock,
        ), f"{p}: server {got}, model {m}"
        assert _nz(got.committed_by_channel) == _nz(m.ch), f"{p}: server {got}, model {m} (I2)"

    def check_reservation(self, got: Reservation, rid: str) -> None:
        m = self.res[rid]
        assert got.id == rid
        assert got.channel == m.channel
        assert got.status == m.status, f"{rid}: server {got.status}, model {m.status}"
        assert sorted(
            (ln.sku, ln.location, ln.qty, ln.shipped, ln.short, ln.released) for ln in got.lines
        ) == sorted(ln.row() for ln in m.lines), f"{rid}: server {got.lines}, model {m.lines}"
        assert (got.expires_at is not None) == m.expiry

    @staticmethod
    def check_original(got: Reservation, m: MRes) -> None:
        """A reserve replay returns the original outcome, whatever happened since."""
        o = m.original
        assert o is not None

        def key(r: Reservation) -> tuple[Any, ...]:
            lines = sorted(
                (ln.sku, ln.location, ln.qty, ln.shipped, ln.short, ln.released) for ln in r.lines
            )
            return (r.id, r.channel, r.status, r.created_at, r.expires_at, r.updated_at, lines)

        assert key(got) == key(o), f"replay returned {got}, the original outcome was {o} (I3)"

    def check_last_movement(self, p: Pos, kind: str, reason: str, ohb: int) -> None:
        mv = self.run(self.core.movements(*p, count=1))[0]
        m = self.pos[p]
        assert (mv.kind, mv.reason, mv.actor, mv.source) == (kind, reason, "tester", "stateful")
        assert (mv.on_hand_before, mv.on_hand_after) == (ohb, m.on_hand)
        assert mv.committed_before == mv.committed_after == m.committed

    # -- positions -------------------------------------------------------------------------

    @initialize(
        stock=st.lists(st.integers(-2, 20), min_size=len(POSITIONS), max_size=len(POSITIONS))
    )
    def initial_stock(self, stock: list[int]) -> None:
        for p, qty in zip(POSITIONS, stock, strict=True):
            if qty >= 0:  # else the position does not exist (yet)
                self._set_position(p, qty, None)

    @rule(
        data=st.data(),
        p=st.sampled_from(POSITIONS),
        kind=st.sampled_from(["set", "adjust", "receive"]),
    )
    def change_position(self, data: st.DataObject, p: Pos, kind: str) -> None:
        """A count (set_position), an adjustment or a receipt."""
        if kind == "set":
            self._set_position(
                p, data.draw(st.integers(0, 20)), data.draw(st.none() | st.integers(0, 3))
            )
        elif kind == "adjust":
            delta = data.draw(st.integers(-6, 6).filter(bool))
            self._adjust(p, delta, data.draw(st.sampled_from(["damaged", "found"])))
        else:
            self._receive(p, data.draw(st.integers(1, 10)), "PO-7")

    @rule(p=st.sampled_from(POSITIONS), rop=st.integers(0, 20), extra=st.integers(0, 10))
    def set_replenishment(self, p: Pos, rop: int, extra: int) -> None:
        """Replenishment levels; the signal is re-evaluated at once (checked after every
        step: open exactly when on_hand - committed is at or below the reorder point)."""
        if p not in self.pos:
            self.expect(
                self.core.set_replenishment(*p, rop, rop + extra), UnknownPosition, changes=False
            )
            return
        self.expect(self.core.set_replenishment(*p, rop, rop + extra), None, changes=True)
        self.levels[p] = (rop, rop + extra)

    POSITION_CASES = (
        "set -1",
        "set ss -1",
        "adjust 0",
        "adjust huge",
        "adjust blank",
        "receive 0",
        "receive -3",
        "receive no ref",
    )

    def invalid_position_call(self, p: Pos, case: str) -> None:
        """Bad figures for a position: refused before anything is sent (I7)."""
        huge = self.max_oh + 1
        calls: dict[str, Callable[[], None]] = {
            "set -1": lambda: self._set_position(p, -1, None),
            "set ss -1": lambda: self._set_position(p, 5, -1),
            "adjust 0": lambda: self._adjust(p, 0, "found"),
            "adjust huge": lambda: self._adjust(p, -huge, "damaged"),
            "adjust blank": lambda: self._adjust(p, 1, "  "),
            "receive 0": lambda: self._receive(p, 0, "PO-7"),
            "receive -3": lambda: self._receive(p, -3, "PO-7"),
            "receive no ref": lambda: self._receive(p, 1, ""),
        }
        calls[case]()

    def _set_position(self, p: Pos, on_hand: int, ss: int | None) -> None:
        coro = self.core.set_position(
            *p, on_hand, ss, reason="count", actor="tester", source="stateful"
        )
        if on_hand < 0 or (ss is not None and ss < 0):
            self.expect(coro, InvalidRequest, changes=False)
            return
        got, _, before = self.expect(coro, None, changes=True)
        m = self.pos.setdefault(p, MPos(0))
        ohb = m.on_hand
        m.on_hand = on_hand
        if ss is not None:
            m.safety_stock = ss
        self.check_position(got, p)
        self.check_last_movement(p, "set", "count", ohb)
        self.after_change(before, cover_checked={p})

    def _adjust(self, p: Pos, delta: int, reason: str) -> None:
        coro = self.core.adjust(
            *p, delta, reason=reason, reference="cc-1", actor="tester", source="stateful"
        )
        m = self.pos.get(p)
        if delta == 0 or abs(delta) > self.max_oh or not reason.strip():
            self.expect(coro, InvalidRequest, changes=False)
        elif m is None:
            self.expect(coro, UnknownPosition, changes=False)
        elif m.on_hand + delta < 0:
            _, e, _ = self.expect(coro, NegativeOnHand, changes=False)
            assert e is not None and e.extra["on_hand"] == m.on_hand
        else:
            got, _, before = self.expect(coro, None, changes=True)
            ohb = m.on_hand
            m.on_hand += delta
            self.check_position(got, p)
            self.check_last_movement(p, "adjust", reason, ohb)
            self.after_change(before, cover_checked={p} if delta < 0 else set())

    def _receive(self, p: Pos, qty: int, ref: str) -> None:
        coro = self.core.receive(*p, qty, reference=ref, actor="tester", source="stateful")
        if qty < 1 or not ref:
            self.expect(coro, InvalidRequest, changes=False)
            return
        got, _, before = self.expect(coro, None, changes=True)
        m = self.pos.setdefault(p, MPos(0))
        ohb = m.on_hand
        m.on_hand += qty
        self.check_position(got, p)
        self.check_last_movement(p, "receive", "receipt", ohb)
        self.after_change(before)

    # -- reservations ----------------------------------------------------------------------

    def pick_rid(self, data: st.DataObject, *, fresh: bool, prefer: str = "") -> str:
        """Mostly a fresh id (``fresh``) or a known one (``prefer``: in that status if
        there is one); sometimes any id of the pool."""
        pool = [r for r in RIDS if (r not in self.res) == fresh]
        if prefer and any(self.res[r].status == prefer for r in pool):
            pool = [r for r in pool if self.res[r].status == prefer]
        if pool and data.draw(st.integers(0, 3), label="usual id") > 0:
            return pool[0] if fresh else data.draw(st.sampled_from(pool), label="rid")
        return data.draw(st.sampled_from(RIDS), label="rid")

    def _reserve(
        self, rid: str, channel: str, lines: list[tuple[str, str, int]], hold: int
    ) -> None:
        coro = self.core.reserve(rid, channel, lines, hold_seconds=hold)
        where = [(s, loc) for s, loc, _ in lines]
        if (
            not 0 <= hold <= self.max_hold
            or not lines
            or len(set(where)) != len(where)
            or any(not 1 <= q <= self.max_qty for *_, q in lines)
        ):
            self.expect(coro, InvalidRequest, changes=False)
            return
        prior = self.res.get(rid)
        if prior is not None:
            if prior.request != (channel, hold, tuple(sorted(lines))):
                self.expect(coro, IdempotencyConflict, changes=False)
                return
            got, _, _ = self.expect(coro, None, changes=False)
            assert got.replayed, "a replayed reserve must say so (I3)"
            self.check_original(got, prior)
            return
        missing = [p for p in where if p not in self.pos]
        if missing:
            _, e, _ = self.expect(coro, UnknownPosition, changes=False)
            assert e is not None
            assert sorted((d["sku"], d["location"]) for d in e.extra["lines"]) == sorted(missing)
            return
        short = [
            (s, loc, q, max(0, self.pos[(s, loc)].available))
            for s, loc, q in lines
            if q > self.pos[(s, loc)].available
        ]
        if short:
            _, e, _ = self.expect(coro, InsufficientStock, changes=False)
            assert isinstance(e, InsufficientStock)
            got_short = sorted(
                (d["sku"], d["location"], d["requested"], d["available"]) for d in e.lines
            )
            assert got_short == sorted(short)
            return
        got, _, before = self.expect(coro, None, changes=True)
        for s, loc, q in lines:
            self.pos[(s, loc)].commit(channel, q)
        self.res[rid] = MRes(
            channel,
            hold,
            "held" if hold else "confirmed",
            [MLine(s, loc, q) for s, loc, q in lines],
            expiry=hold > 0,
            original=got,
        )
        assert not got.replayed
        self.check_reservation(got, rid)
        assert got.status == ("held" if hold else "confirmed")
        for p in where:
            assert not self.pos[p].uncovered, f"an accepted reservation left {p} uncovered (I1)"
        self.after_change(before)

    @rule(
        data=st.data(),
        channel=st.sampled_from(CHANNELS),
        lines=st.lists(
            st.tuples(
                st.sampled_from(POSITIONS), st.integers(1, 7).map(lambda q: 10**6 if q == 7 else q)
            ),
            min_size=1,
            max_size=2,
            unique_by=lambda t: t[0],
        ),
        held=st.booleans(),
    )
    def reserve(
        self, data: st.DataObject, channel: str, lines: list[tuple[Pos, int]], held: bool
    ) -> None:
        rid = self.pick_rid(data, fresh=True)
        self._reserve(
            rid, channel, [(s, loc, q) for (s, loc), q in lines], LONG_HOLD if held else 0
        )

    @rule(
        data=st.data(),
        channel=st.sampled_from(CHANNELS),
        lines=st.lists(
            st.tuples(st.sampled_from(POSITIONS), st.integers(1, 4)),
            min_size=2,
            max_size=2,
            unique_by=lambda t: t[0],
        ),
        held=st.booleans(),
    )
    def reserve_two_lines(
        self, data: st.DataObject, channel: str, lines: list[tuple[Pos, int]], held: bool
    ) -> None:
        """Two lines, all or nothing (I4), over one part or two."""
        rid = self.pick_rid(data, fresh=True)
        self._reserve(
            rid, channel, [(s, loc, q) for (s, loc), q in lines], LONG_HOLD if held else 0
        )

    RESERVE_CASES = (
        "qty 0",
        "qty -1",
        "qty too big",
        "no lines",
        "same position twice",
        "hold -1",
        "hold too long",
    )

    def invalid_reserve(self, rid: str, case: str) -> None:
        """Bad reserve requests, for new and existing ids alike: InvalidRequest, no change."""
        lines = [("A", "W1", 1), ("B", "W1", 2)]
        hold = 0
        if case.startswith("qty"):
            lines[1] = ("B", "W1", {"qty 0": 0, "qty -1": -1}.get(case, self.max_qty + 1))
        elif case == "no lines":
            lines = []
        elif case == "same position twice":
            lines[1] = ("A", "W1", 2)
        else:
            hold = -1 if case == "hold -1" else self.max_hold + 1
        self._reserve(rid, "web", lines, hold)

    @precondition(lambda self: bool(self.res))
    @rule(data=st.data(), what=st.sampled_from(["same", "same", "channel", "hold", "qty", "line"]))
    def retry_reserve(self, data: st.DataObject, what: str) -> None:
        """A retry after a timeout (the same request again, lines in any order): the
        original outcome, nothing changes; or the same id used for a different request:
        IdempotencyConflict, nothing changes."""
        rid = data.draw(st.sampled_from(sorted(self.res)))
        m = self.res[rid]
        channel, hold = m.channel, m.hold
        lines = [(ln.sku, ln.loc, ln.qty) for ln in m.lines]
        if what == "same":
            lines = list(data.draw(st.permutations(lines)))
        elif what == "channel":
            channel = next(c for c in CHANNELS if c != channel)
        elif what == "hold":
            hold = LONG_HOLD if hold == 0 else 0
        elif what == "qty":
            s, loc, q = lines[0]
            lines[0] = (s, loc, q + 1)
        else:
            extra = [p for p in POSITIONS if p not in {(s, loc) for s, loc, _ in lines}]
            lines = [*lines, (*extra[0], 1)] if extra else lines[:-1]
        self._reserve(rid, channel, lines, hold)

    @precondition(lambda self: bool(self.res))
    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        rid = self.pick_rid(data, fresh=False, prefer="held")
        coro = self.core.confirm(rid)
        m = self.res.get(rid)
        if m is None:
            self.expect(coro, UnknownReservation, changes=False)
        elif m.status == "confirmed":
            got, _, _ = self.expect(coro, None, changes=False)
            assert got.replayed
            self.check_reservation(got, rid)
        elif m.status == "released":
            self.expect(coro, AlreadyReleased, changes=False)
        elif m.status == "fulfilled":
            self.expect(coro, AlreadyFulfilled, changes=False)
        else:
            assert m.status == "held"
            got, _, before = self.expect(coro, None, changes=True)
            m.status = "confirmed"
            m.expiry = False
            assert not got.replayed
            self.check_reservation(got, rid)
            self.after_change(before)

    @precondition(lambda self: bool(self.res))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = self.pick_rid(data, fresh=False)
        coro = self.core.release(rid, reason="cancelled")
        m = self.res.get(rid)
        if m is None:
            self.expect(coro, UnknownReservation, changes=False)
        elif m.status == "released":
            got, _, _ = self.expect(coro, None, changes=False)
            assert got.replayed
            self.check_reservation(got, rid)
        elif m.status == "fulfilled":
            self.expect(coro, AlreadyFulfilled, changes=False)
        else:
            got, _, before = self.expect(coro, None, changes=True)
            for ln in m.lines:
                self.pos[ln.pos].commit(m.channel, -ln.open)
                ln.released += ln.open
            m.status = "released"
            assert not got.replayed
            self.check_reservation(got, rid)
            self.after_change(before)

    @precondition(lambda self: bool(self.res))
    @rule(data=st.data(), fid=st.sampled_from(FIDS))
    def fulfil(self, data: st.DataObject, fid: str | None) -> None:
        """Ship, report short picks, release remainders; sometimes more than is open
        (OverFulfil), a line the reservation does not have, or a malformed line."""
        rid = self.pick_rid(data, fresh=False, prefer="confirmed")
        m = self.res.get(rid)
        own = [ln.pos for ln in m.lines] if m else []
        how = data.draw(
            st.sampled_from(["fits", "fits", "fits", "too much", "foreign", "malformed"])
        )
        foreign = [p for p in POSITIONS if p not in own]
        flines: list[tuple[str, str, int, int, bool]] = []
        if how == "malformed":
            flines = data.draw(
                st.sampled_from(
                    [
                        [],
                        [(*POSITIONS[0], -1, 0, True)],
                        [(*POSITIONS[0], 0, 0, False)],
                        [(*POSITIONS[0], 1, 0, False), (*POSITIONS[0], 0, 1, True)],
                    ]
                )
            )
        elif how == "foreign" or not own:
            flines = [(*data.draw(st.sampled_from(foreign or POSITIONS)), 1, 0, False)]
        else:
            assert m is not None
            for p in data.draw(st.lists(st.sampled_from(own), min_size=1, max_size=2, unique=True)):
                open_ = next(ln for ln in m.lines if ln.pos == p).open
                if how == "too much":
                    shipped, short = data.draw(
                        st.sampled_from([(open_ + 1, 0), (open_, 1), (0, open_ + 1)])
                    )
                else:
                    shipped = data.draw(st.integers(0, open_))
                    short = data.draw(
                        st.sampled_from([0, 0, 1, 2]).map(lambda n, r=open_ - shipped: min(n, r))
                    )
                rr = data.draw(st.booleans()) or shipped + short == 0
                flines.append((*p, shipped, short, rr))
        coro = self.core.fulfil(
            rid,
            [FulfilLine(s, loc, sh, so, rr) for s, loc, sh, so, rr in flines],
            fulfilment_id=fid,
        )
        where_ = [(s, loc) for s, loc, *_ in flines]
        if (
            not flines
            or len(set(where_)) != len(where_)
            or any(sh < 0 or so < 0 or (sh + so == 0 and not rr) for _, _, sh, so, rr in flines)
        ):
            self.expect(coro, InvalidRequest, changes=False)
            return
        if m is None:
            self.expect(coro, UnknownReservation, changes=False)
            return
        ffp = tuple(sorted(flines))
        key: object = fid if fid is not None else ("auto", ffp)
        if key in m.ful:
            if m.ful[key] != ffp:
                self.expect(coro, IdempotencyConflict, changes=False)
            else:
                got, _, _ = self.expect(coro, None, changes=False)
                assert got.replayed
                self.check_reservation(got, rid)
            return
        refusal = {"held": NotConfirmed, "released": AlreadyReleased, "fulfilled": AlreadyFulfilled}
        if m.status in refusal:
            self.expect(coro, refusal[m.status], changes=False)
            return
        assert m.status == "confirmed"
        for s, loc, sh, so, _ in flines:
            line = next((ln for ln in m.lines if ln.pos == (s, loc)), None)
            if line is None:
                self.expect(coro, UnknownLine, changes=False)
                return
            if sh + so > line.open:
                _, e, _ = self.expect(coro, OverFulfil, changes=False)
                assert e is not None and e.extra["open"] == line.open
                return
            if self.pos[(s, loc)].on_hand - sh - so < 0:
                self.expect(coro, NegativeOnHand, changes=False)
                return
        got, _, before = self.expect(coro, None, changes=True)
        for s, loc, sh, so, rr in flines:
            line = next(ln for ln in m.lines if ln.pos == (s, loc))
            pm = self.pos[(s, loc)]
            pm.on_hand -= sh + so
            pm.commit(m.channel, -sh)
            line.shipped += sh
            line.short += so
            if rr and line.open > 0:
                pm.commit(m.channel, -line.open)
                line.released += line.open
        if sum(ln.open for ln in m.lines) == 0:
            # fulfilled when anything was picked (shipped or found short), else released
            m.status = "fulfilled" if sum(ln.shipped + ln.short for ln in m.lines) else "released"
        m.ful[key] = ffp
        assert not got.replayed
        self.check_reservation(got, rid)
        shorts = {(s, loc) for s, loc, _, so, _ in flines if so > 0}
        self.after_change(before, cover_checked=shorts, shorts=shorts)

    # -- bad input -------------------------------------------------------------------------

    BAD_CALLS: tuple[tuple[str, Callable[[ATP], Coroutine[Any, Any, Any]]], ...] = (
        ("reserve: id with a space", lambda c: c.reserve("r 0", "web", [("A", "W1", 1)])),
        ("reserve: empty id", lambda c: c.reserve("", "web", [("A", "W1", 1)])),
        ("reserve: channel case", lambda c: c.reserve("r0", "Web", [("A", "W1", 1)])),
        ("reserve: sku with tag", lambda c: c.reserve("r0", "web", [("{A}", "W1", 1)])),
        ("reserve: sku with sep", lambda c: c.reserve("r0", "web", [("A|W1", "W1", 1)])),
        ("reserve: bool qty", lambda c: c.reserve("r0", "web", [("A", "W1", True)])),
        ("reserve: str qty", lambda c: c.reserve("r0", "web", [("A", "W1", "1")])),  # type: ignore[list-item]
        ("reserve: float qty", lambda c: c.reserve("r0", "web", [("A", "W1", 1.0)])),  # type: ignore[list-item]
        (
            "reserve: 101 lines",
            lambda c: c.reserve("r0", "web", [(f"S{i}", "W1", 1) for i in range(101)]),
        ),
        (
            "reserve: float hold",
            lambda c: c.reserve("r0", "web", [("A", "W1", 1)], hold_seconds=1.5),  # type: ignore[arg-type]
        ),
        ("set_position: empty reason", lambda c: c.set_position("A", "W1", 5, reason="")),
        ("set_position: too much", lambda c: c.set_position("A", "W1", 10**12 + 1)),
        ("set_position: bad location", lambda c: c.set_position("A", "-W", 5)),
        ("adjust: bool delta", lambda c: c.adjust("A", "W1", True, reason="x")),
        ("adjust: empty location", lambda c: c.adjust("A", "", 1, reason="x")),
        (
            "adjust: long reference",
            lambda c: c.adjust("A", "W1", 1, reason="x", reference="x" * 201),
        ),
        ("receive: long reference", lambda c: c.receive("A", "W1", 1, reference="x" * 201)),
        ("confirm: bad id", lambda c: c.confirm("r 0")),
        ("release: bad id", lambda c: c.release("{r0}")),
        ("release: blank reason", lambda c: c.release("r0", reason="   ")),
        ("fulfil: no lines", lambda c: c.fulfil("r0", [])),
        ("fulfil: nothing to do", lambda c: c.fulfil("r0", [FulfilLine("A", "W1")])),
        ("fulfil: negative short", lambda c: c.fulfil("r0", [FulfilLine("A", "W1", 1, -1)])),
        (
            "fulfil: bad fid",
            lambda c: c.fulfil("r0", [FulfilLine("A", "W1", 1)], fulfilment_id="f 1"),
        ),
        (
            "fulfil: two lines one position",
            lambda c: c.fulfil("r0", [FulfilLine("A", "W1", 1), FulfilLine("A", "W1", 0, 1)]),
        ),
        ("availability: bad channel", lambda c: c.availability([("A", "W1")], "WEB")),
        ("availability: bad sku", lambda c: c.availability([("A B", "W1")], "web")),
        ("movements: count 0", lambda c: c.movements("A", "W1", count=0)),
        ("movements: bad before", lambda c: c.movements("A", "W1", before="x-1")),
        ("reservation: empty id", lambda c: c.reservation("")),
        ("expire_holds: limit 0", lambda c: c.expire_holds(limit=0)),
    )

    @rule(
        data=st.data(), kind=st.sampled_from(["client", "client", "script", "position", "reserve"])
    )
    def bad_request(self, data: st.DataObject, kind: str) -> None:
        """Bad input of every kind: InvalidRequest, and nothing changes (I7)."""
        if kind == "client":
            _, call = data.draw(st.sampled_from(self.BAD_CALLS))
            self.expect(call(self.core), InvalidRequest, changes=False)
        elif kind == "script":
            self.raw_script_bad_input(
                data.draw(st.sampled_from(self.RAW_CASES)), data.draw(st.sampled_from(POSITIONS))
            )
        elif kind == "position":
            self.invalid_position_call(
                data.draw(st.sampled_from(POSITIONS)),
                data.draw(st.sampled_from(self.POSITION_CASES)),
            )
        else:
            self.invalid_reserve(
                data.draw(st.sampled_from(RIDS)), data.draw(st.sampled_from(self.RESERVE_CASES))
            )

    def _raw_reserve(
        self, p: Pos, line: dict[str, Any], **over: Any
    ) -> tuple[str, list[str], dict[str, Any]]:
        ks = self.core.keys
        b = ks.bucket(p[0])
        bk, pk = ks.bucket_keys(b), ks.position(*p)
        n = over.pop("n", 1)
        lines = over.pop("lines", [line])
        # KEYS as part_keys (lua/_lib.lua) walks them: index, the bucket's keys, then the
        # line's SKU totals and position keys; a well-formed request but for the one fault
        keys = [ks.index("r0"), *bk.tuple(), *pk.line(), *over.pop("extra_keys", [])]
        req = {
            "id": "r0",
            "ch": "web",
            "hold": 0,
            "fp": "x",
            "idx": True,
            "home": ks.bucket("r0"),
            "rv": 0,
            "parts": [{"b": b, "n": n, "lines": lines}],
        }
        req.update(over)
        return "reserve", keys, req

    def _raw_position(self, name: str, p: Pos, **req: Any) -> tuple[str, list[str], dict[str, Any]]:
        ks = self.core.keys
        b = ks.bucket(p[0])
        if name == "receive":
            keys = list(self.core._supply_keys(*p))
        else:  # set_position and adjust
            keys = list(self.core._cover_keys(*p))
        return name, keys, {"sku": p[0], "loc": p[1], "b": b, **req}

    def _raw_reservation(
        self, name: str, p: Pos, **req: Any
    ) -> tuple[str, list[str], dict[str, Any]]:
        ks = self.core.keys
        b = ks.bucket(p[0])
        bk, pk = ks.bucket_keys(b), ks.position(*p)
        keys = [ks.index("r0"), *bk.tuple(), *pk.line()]
        return name, keys, {"id": "r0", "idx": True, "parts": [{"b": b, "n": 1}], **req}

    RAW_CASES = (
        "reserve qty 0",
        "reserve qty -1",
        "reserve qty 1.5",
        "reserve qty str",
        "reserve qty null",
        "reserve qty huge",
        "reserve hold -1",
        "reserve hold 1.5",
        "reserve no fp",
        "reserve n mismatch",
        "reserve dup line",
        "reserve extra key",
        "reserve no channel",
        "adjust delta 0",
        "adjust delta 0.5",
        "adjust delta str",
        "set on_hand -1",
        "set on_hand 2.5",
        "set ss -1",
        "receive qty 0",
        "receive qty 1.5",
        "receive no ref",
        "fulfil shipped -1",
        "fulfil short 0.5",
        "fulfil nothing",
        "fulfil no fid",
        "confirm no parts",
        "release reason number",
        "expire ids str",
        "expire n 0",
    )

    def raw_script_bad_input(self, case: str, p: Pos) -> None:
        """Bad requests sent straight to the scripts, past the Python checks: each script
        validates before its first write (I7), so nothing changes."""
        ln = {"sku": p[0], "loc": p[1], "qty": 1}
        fl = {"sku": p[0], "loc": p[1], "shipped": 1, "short": 0, "rr": False}
        ful = {"fid": "f9", "ffp": "x"}
        pk = self.core.keys.position(*p)
        cases: dict[str, tuple[str, list[str], dict[str, Any]]] = {
            "reserve qty 0": self._raw_reserve(p, {**ln, "qty": 0}),
            "reserve qty -1": self._raw_reserve(p, {**ln, "qty": -1}),
            "reserve qty 1.5": self._raw_reserve(p, {**ln, "qty": 1.5}),
            "reserve qty str": self._raw_reserve(p, {**ln, "qty": "1"}),
            "reserve qty null": self._raw_reserve(p, {**ln, "qty": None}),
            "reserve qty huge": self._raw_reserve(p, {**ln, "qty": self.max_qty + 1}),
            "reserve hold -1": self._raw_reserve(p, ln, hold=-1),
            "reserve hold 1.5": self._raw_reserve(p, ln, hold=1.5),
            "reserve no fp": self._raw_reserve(p, ln, fp=None),
            "reserve n mismatch": self._raw_reserve(p, ln, n=2),
            "reserve dup line": self._raw_reserve(
                p, ln, n=2, lines=[ln, ln], extra_keys=list(pk.line())
            ),
            "reserve extra key": self._raw_reserve(p, ln, extra_keys=["{t:0}:x"]),
            "reserve no channel": self._raw_reserve(p, ln, ch=""),
            "adjust delta 0": self._raw_position("adjust", p, delta=0, reason="x"),
            "adjust delta 0.5": self._raw_position("adjust", p, delta=0.5, reason="x"),
            "adjust delta str": self._raw_position("adjust", p, delta="1", reason="x"),
            "set on_hand -1": self._raw_position("set_position", p, on_hand=-1, reason="x"),
            "set on_hand 2.5": self._raw_position("set_position", p, on_hand=2.5, reason="x"),
            "set ss -1": self._raw_position(
                "set_position", p, on_hand=5, safety_stock=-1, reason="x"
            ),
            "receive qty 0": self._raw_position("receive", p, qty=0, ref="PO"),
            "receive qty 1.5": self._raw_position("receive", p, qty=1.5, ref="PO"),
            "receive no ref": self._raw_position("receive", p, qty=1),
            "fulfil shipped -1": self._raw_reservation(
                "fulfil", p, lines=[{**fl, "shipped": -1}], **ful
            ),
            "fulfil short 0.5": self._raw_reservation(
                "fulfil", p, lines=[{**fl, "short": 0.5}], **ful
            ),
            "fulfil nothing": self._raw_reservation(
                "fulfil", p, lines=[{**fl, "shipped": 0}], **ful
            ),
            "fulfil no fid": self._raw_reservation("fulfil", p, lines=[fl], ffp="x"),
            "confirm no parts": (
                "confirm",
                [self.core.keys.index("r0")],
                {"id": "r0", "idx": True, "parts": []},
            ),
            "release reason number": self._raw_reservation("release", p, reason=5),
            "expire ids str": (
                "expire_holds",
                list(self._raw_reserve(p, ln)[1][1:6]),
                {"ids": "r0"},
            ),
            "expire n 0": (
                "expire_holds",
                list(self._raw_reserve(p, ln)[1][1:6]),
                {"ids": [{"id": "r0", "n": 0}]},
            ),
        }
        name, keys, req = cases[case]
        _, exc, _ = self.expect(
            self.core._run(name, keys, self.core._cfg("", ""), req), InvalidRequest, changes=False
        )
        # refused for the fault the case plants, not for some other shape problem
        assert exc is not None and self.RAW_WHY[case] in exc.detail, (case, exc.detail)

    RAW_WHY: ClassVar[dict[str, str]] = {
        **dict.fromkeys(
            ["reserve qty 0", "reserve qty -1", "reserve qty 1.5", "reserve qty str"],
            "qty must be a whole number",
        ),
        "reserve qty null": "qty must be a whole number",
        "reserve qty huge": "qty must be a whole number",
        "reserve hold -1": "hold must be",
        "reserve hold 1.5": "hold must be",
        "reserve no fp": "missing request fingerprint",
        "reserve n mismatch": "part line count mismatch",
        "reserve dup line": "duplicate line",
        "reserve extra key": "KEYS do not match",
        "reserve no channel": "channel must be",
        "adjust delta 0": "delta must be",
        "adjust delta 0.5": "delta must be",
        "adjust delta str": "delta must be",
        "set on_hand -1": "on_hand must be",
        "set on_hand 2.5": "on_hand must be",
        "set ss -1": "safety_stock must be",
        "receive qty 0": "qty must be a whole number",
        "receive qty 1.5": "qty must be a whole number",
        "receive no ref": "reference must be",
        "fulfil shipped -1": "shipped and short must be",
        "fulfil short 0.5": "shipped and short must be",
        "fulfil nothing": "ships nothing",
        "fulfil no fid": "fulfilment id must be",
        "confirm no parts": "parts must be a non-empty list",
        "release reason number": "reason must be",
        "expire ids str": "ids must be a list",
        "expire n 0": "bad candidate",
    }

    # -- after every step --------------------------------------------------------------------

    @invariant()
    def book_matches_model(self) -> None:
        self.run(self._check_book())

    async def _check_book(self) -> None:
        core = self.core
        for p in POSITIONS:
            got = await core.position(*p)
            if p not in self.pos:
                assert got is None, f"{p} exists on the server only"
                continue
            assert got is not None, f"{p} missing on the server"
            self.check_position(got, p)
            m = self.pos[p]
            # I2 from the model's side too: committed is the open units of live lines
            live = [
                (r.channel, ln.open)
                for r in self.res.values()
                if r.status in ("held", "confirmed")
                for ln in r.lines
                if ln.pos == p
            ]
            assert m.committed == sum(o for _, o in live)
            for c in CHANNELS:
                assert m.ch.get(c, 0) == sum(o for ch, o in live if ch == c)
            # I1
            if m.uncovered:
                assert p in self.excused, f"{p} uncovered ({m}) without a count or short pick (I1)"
        for rid in self.res:
            self.check_reservation(await core.reservation(rid), rid)
        pipe = self.client.pipeline(transaction=False)
        for rid in RIDS:
            pipe.hexists(core.keys.index(rid), rid)
        indexed = {rid for rid, there in zip(RIDS, await pipe.execute(), strict=True) if there}
        assert indexed == self.res.keys(), f"server has {sorted(indexed)}, model {sorted(self.res)}"
        # holds: the position and bucket hold indexes list exactly the held reservations
        held = {rid for rid, r in self.res.items() if r.status == "held"}
        for p in POSITIONS:
            on_p = {rid for rid in held if any(ln.pos == p for ln in self.res[rid].lines)}
            got_hx = {_s(x) for x in await self.client.zrange(core.keys.position(*p).hx, 0, -1)}
            assert got_hx == on_p, f"{p} hold index {got_hx}, model {on_p}"
        for b in {core.keys.bucket(s) for s, _ in POSITIONS}:
            in_b = {
                rid
                for rid in held
                if any(core.keys.bucket(ln.sku) == b for ln in self.res[rid].lines)
            }
            got_h = {_s(x) for x in await self.client.zrange(core.keys.bucket_keys(b).holds, 0, -1)}
            assert got_h == in_b, f"bucket {b} holds {got_h}, model {in_b}"
        # what a storefront sees
        for c in CHANNELS:
            for a in await core.availability(POSITIONS, c):
                m = self.pos.get((a.sku, a.location))
                assert a.exists == (m is not None)
                assert a.atp == (max(0, m.available) if m else 0)
        # replenishment: every script that moved a position re-evaluated its signal
        for p, (rop, _) in self.levels.items():
            oh, cm, rs = await self.client.hmget(
                core.keys.position(*p).pos, "on_hand", "committed", "rs"
            )
            ip = int(oh) - int(cm)
            assert (rs == b"1") == (ip <= rop), (
                f"{p}: inventory position {ip}, reorder point {rop}, signal {rs!r}"
            )
        rep = await verify(core, allow_uncovered=True)  # also: signal flags match the lists
        assert rep.ok, rep.problems
        assert sorted(rep.uncovered) == sorted(
            f"{s}@{loc}" for (s, loc), m in self.pos.items() if m.uncovered
        )
        assert rep.positions == len(self.pos)
        assert rep.reservations == sum(
            len({core.keys.bucket(ln.sku) for ln in r.lines}) for r in self.res.values()
        )


async def _drain() -> None:
    """Let anything still on the loop (an auto-pipeline send finishing) run out."""
    pending = asyncio.all_tasks() - {asyncio.current_task()}
    await asyncio.gather(*pending, return_exceptions=True)


# A pass takes about 15 s. A failure is shrunk by replaying many runs (Hypothesis gives
# that up to 5 minutes): let it finish and report the minimal example rather than cut it off.
@pytest.mark.timeout(600)
def test_state_machine_against_model(server: EmbeddedServer, settings: Settings) -> None:
    loop = asyncio.new_event_loop()

    class Machine(ATPMachine):
        pass

    Machine.url = server.url
    Machine.cfg = settings
    Machine.loop = loop
    try:
        run_state_machine_as_test(
            Machine,
            settings=hsettings(
                max_examples=60,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        loop.run_until_complete(_drain())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def test_every_raw_script_case_is_refused_for_its_fault(
    server: EmbeddedServer, settings: Settings
) -> None:
    """Each bad request sent straight to a script, once, on an empty book and on one with
    the position: refused for the fault it plants (so the KEYS and request around it stay
    well formed as the scripts change), and nothing changes."""
    assert set(ATPMachine.RAW_WHY) == set(ATPMachine.RAW_CASES)
    loop = asyncio.new_event_loop()

    class Machine(ATPMachine):
        pass

    Machine.url = server.url
    Machine.cfg = settings
    Machine.loop = loop
    m = Machine()
    try:
        p = POSITIONS[0]
        for case in ATPMachine.RAW_CASES:
            m.raw_script_bad_input(case, p)
        m.run(m.core.set_position(*p, 20, reason="init"))
        m.run(m.core.reserve("r0", "web", [(p[0], p[1], 2)], hold_seconds=0))
        for case in ATPMachine.RAW_CASES:
            m.raw_script_bad_input(case, p)
    finally:
        m.teardown()
        loop.run_until_complete(_drain())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
