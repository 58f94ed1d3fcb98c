"""The async core: positions and reservations, changed only through the Lua scripts.

``ATP`` validates input (raising :class:`~atp.errors.InvalidRequest` before anything is
sent), routes each call to its keys (``atp.keys``), runs one script and turns the reply
into typed results (``atp.models``). It knows nothing of HTTP.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal, cast

from redis.asyncio import Redis

from ._base import _RULES_TRIES
from ._cluster import ClusterMixin
from ._reconciliation import ReconcileMixin
from ._supply import SupplyMixin
from ._wire import (
    _check_fulfilment_id,
    _check_stream_id,
    _fingerprint,
    _fingerprint_text,
    _fresh,
    _hash_to_pos,
    _movement,
    _original,
    _position,
    _reservation,
    _reserve_fp_json,
    _reserve_req_around,
    _s,
    _Spec,
)
from .errors import (
    IdempotencyConflict,
    InvalidRequest,
    NoRoute,
    RulesStale,
)
from .models import (
    Availability,
    ExpireResult,
    FulfilLine,
    Line,
    Movement,
    Position,
    Reservation,
    ReservationLine,
    check_channel,
    check_customer,
    check_date,
    check_ident,
    check_int,
    check_region,
    check_reservation_id,
    check_text,
    day_of,
)
from .replenishment import ReplenishmentMixin
from .rules import Rules
from .scripts import decode
from .settings import Settings

__all__ = ["ATP"]

_PREPARED_MAX = 4096  # distinct reserve requests remembered (the map starts over when full)


@dataclass(slots=True)
class _Prepared:
    """One reserve request (all of it but the reservation id), worked out once: what it
    resolves to under ``rules`` is filled in by ``ATP._resolve`` and redone when the
    rules in force are another ``Rules`` object."""

    fp: str
    parts: dict[int, list[tuple[str, str | None, int]]]
    rd: int | None
    backorder: bool
    lines: tuple[ReservationLine, ...]
    rules: Rules | None = None
    specs: dict[int, list[_Spec]] = field(default_factory=dict)
    keys: tuple[str, ...] = ()
    req_mid: str = ""
    req_tail: str = ""


class ATP(ClusterMixin, ReconcileMixin, SupplyMixin, ReplenishmentMixin):
    """The ATP core over one Redis connection pool.

    :param client: a ``redis.asyncio.Redis`` (``decode_responses`` may be on or off).
    :param settings: limits, key prefix and bucket count; defaults from the environment.

    Positions and reservations are here; the shared plumbing is in ``atp._base``, the
    allocation rules and explain in ``atp._allocation``, cluster routing in
    ``atp._cluster``, counts and exceptions in ``atp._reconciliation``, expected receipts
    and receipts in ``atp._supply``, replenishment levels, signals and planning in
    ``atp.replenishment``.
    """

    def __init__(self, client: Redis, settings: Settings | None = None) -> None:
        super().__init__(client, settings)
        # reserve requests already worked out, by everything in them but the id (reserve)
        self._prepared: dict[tuple[object, ...], _Prepared] = {}
        # the last fresh reserve reply and its decoding, which reserve never changes
        self._last_reply: tuple[bytes, dict[str, Any]] = (b"", {})

    # -- positions -------------------------------------------------------------------------

    async def set_position(
        self,
        sku: str,
        location: str,
        on_hand: int,
        safety_stock: int | None = None,
        *,
        reason: str = "set",
        actor: str = "",
        source: str = "",
    ) -> Position:
        """Set on_hand (and optionally safety stock) absolutely; creates the position.

        :param on_hand: the new physical count, 0..``max_on_hand``.
        :param safety_stock: units never promised; ``None`` keeps the current figure.
        :param reason: why (written to the movement log with ``actor`` and ``source``).
        """
        check_ident(sku, "sku")
        check_ident(location, "location")
        m = self.settings.max_on_hand
        check_int(on_hand, "on_hand", 0, m)
        if safety_stock is not None:
            check_int(safety_stock, "safety_stock", 0, m)
        check_text(reason, "reason")
        req: dict[str, Any] = {
            "sku": sku, "loc": location, "b": self.keys.bucket(sku), "on_hand": on_hand,
            "reason": reason,
        }  # fmt: skip
        if safety_stock is not None:
            req["safety_stock"] = safety_stock
        await self._with_priorities(req)
        out = await self._run(
            "set_position", self._cover_keys(sku, location), self._cfg(actor, source), req
        )
        return _position(sku, location, out["position"])

    async def adjust(
        self,
        sku: str,
        location: str,
        delta: int,
        *,
        reason: str,
        reference: str = "",
        actor: str = "",
        source: str = "",
    ) -> Position:
        """Change on_hand of an existing position by ``delta`` (non-zero) with a reason
        (damaged, found, correction…). On_hand never drops below zero."""
        check_ident(sku, "sku")
        check_ident(location, "location")
        m = self.settings.max_on_hand
        check_int(delta, "delta", -m, m)
        if delta == 0:
            raise InvalidRequest("delta must not be zero", field="delta")
        check_text(reason, "reason")
        check_text(reference, "reference", required=False)
        req = {
            "sku": sku, "loc": location, "b": self.keys.bucket(sku), "delta": delta,
            "reason": reason, "ref": reference,
        }  # fmt: skip
        if delta < 0:
            await self._with_priorities(req)
        out = await self._run(
            "adjust", self._cover_keys(sku, location), self._cfg(actor, source), req
        )
        return _position(sku, location, out["position"])

    async def position(self, sku: str, location: str) -> Position | None:
        """The position, or ``None`` when it does not exist."""
        check_ident(sku, "sku")
        check_ident(location, "location")
        flat = await self.redis.hgetall(self.keys.position(sku, location).pos)
        if not flat:
            return None
        return _position(sku, location, _hash_to_pos(flat))

    async def availability(
        self, items: Iterable[tuple[str, str]], channel: str, *, customer_id: str | None = None
    ) -> list[Availability]:
        """ATP for ``channel`` at many positions in one round trip (for listing pages), as
        reserve would decide it: protections, the channel's cap and, with ``customer_id``,
        the buyer limit (lua/explain.lua). A position that does not exist has ATP 0 and
        ``exists=False``."""
        check_channel(channel)
        if customer_id is not None:
            check_customer(customer_id)
        pairs = list(items)
        for sku, loc in pairs:
            check_ident(sku, "sku")
            check_ident(loc, "location")
        rows = await self._explain(pairs, channel, customer_id, brief=True) if pairs else []
        return [
            Availability(sku, loc, channel, int(r["atp"])) if r["exists"]
            else Availability(sku, loc, channel, 0, exists=False)
            for (sku, loc), r in zip(pairs, rows, strict=True)
        ]  # fmt: skip

    async def movements(
        self, sku: str, location: str, *, count: int = 100, before: str | None = None
    ) -> list[Movement]:
        """The position's movement log, newest first.

        :param count: at most this many entries (1..1000).
        :param before: a movement id; only entries older than it (for paging).
        """
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_int(count, "count", 1, 1000)
        top = "+" if before is None else f"({_check_stream_id(before)}"
        if top != "+" and not any(int(p) for p in top[1:].split("-")):
            return []  # nothing is older than 0-0, and Redis refuses the range "(0-0"
        rows = await self.redis.xrevrange(
            self.keys.position(sku, location).log, top, "-", count=count
        )
        return [_movement(mid, fields or {}) for mid, fields in rows or []]

    # -- reservations ----------------------------------------------------------------------

    async def reserve(
        self,
        reservation_id: str,
        channel: str,
        lines: Sequence[Line | tuple[str, str | None, int]],
        *,
        hold_seconds: int | None = None,
        customer_id: str | None = None,
        region: str | None = None,
        allow_split: bool | None = None,
        requested_date: date | None = None,
        on_short: Literal["refuse", "backorder"] = "refuse",
        actor: str = "",
        source: str = "",
    ) -> Reservation:
        """Reserve every line for ``channel``, all or nothing (I1, I4), idempotently (I3),
        under the allocation rules in force (I6, atp.rules).

        :param reservation_id: caller-chosen id; a retry with the same request returns the
            original outcome (``replayed=True``); a different request raises
            :class:`~atp.errors.IdempotencyConflict`.
        :param lines: (sku, location, qty) per line; one line per position. A location of
            ``None`` routes the line over the channel's locations (then it must be the only
            line of its SKU); the result names the location(s) that took it.
        :param hold_seconds: a hold that expires by itself (``held``); 0 confirms at once;
            ``None`` takes ``settings.default_hold_seconds``.
        :param customer_id: the buyer, for buyer limits (required on a SKU that has one).
        :param region: picks the channel's location list for that region, when it has one.
        :param allow_split: may a routed line be split over locations when none holds it
            whole; ``None`` takes the channel's rule.
        :param requested_date: the day the units are wanted (UTC). Time-phased: accepted
            when, on that day and every later day of the position's schedule, on hand +
            inbound due by then - everything promised by then - safety stock - other
            channels' protections stays >= 0, so a dated promise may count on inbound and
            never starves an earlier one. A date before today is taken as today. ``None``:
            wanted now, from the shelf (as before dated supply existed).
        :param on_short: ``backorder``: when stock is short, wait in the position's queue
            instead of being refused (``status`` ``backordered``; one line at a location,
            confirmed at once, undated). Supply arriving (a receipt, a positive adjustment
            or count, units released or reclaimed) fills the queue in order (channel
            priority, then arrival), each filled backorder becoming a confirmed reservation
            with a ``backorder_filled`` event; ``release`` cancels one. A new reservation
            never takes units a backorder of its channel's priority or above waits for
            (``limited_by``: ``backorders``). A line its channel's cap limits is refused.
        :raises InsufficientStock: with ``lines`` saying requested, available and what
            limited it (``stock``, ``protection`` or ``cap``), and ``promise_date`` when
            a later date can be had from the inbound schedule.
        :raises BuyerLimitExceeded: the customer would hold more than the SKU's limit.
        :raises CustomerRequired: a line's SKU has a buyer limit and no customer was given.
        :raises NoRoute: a line without a location, and the channel has no locations.
        """
        s = self.settings
        check_reservation_id(reservation_id)
        check_channel(channel)
        if on_short not in ("refuse", "backorder"):
            raise InvalidRequest("on_short must be refuse or backorder", field="on_short")
        backorder = on_short == "backorder"
        if backorder:
            if hold_seconds:
                raise InvalidRequest(
                    "a backorder is confirmed when filled: send it without hold_seconds",
                    field="hold_seconds",
                )
            if requested_date is not None:
                raise InvalidRequest(
                    "a backorder waits for supply now: it takes no requested_date",
                    field="requested_date",
                )
            if len(lines) != 1:
                raise InvalidRequest("a backorder has exactly one line", field="lines")
            hold_seconds = 0
        hold = s.default_hold_seconds if hold_seconds is None else hold_seconds
        check_int(hold, "hold_seconds", 0, s.max_hold_seconds)
        if customer_id is not None:
            check_customer(customer_id)
        if region is not None:
            check_region(region)
        if allow_split is not None and not isinstance(allow_split, bool):
            raise InvalidRequest("allow_split must be true or false", field="allow_split")
        rd = (
            None if requested_date is None else day_of(check_date(requested_date, "requested_date"))
        )
        if not lines:
            raise InvalidRequest("a reservation needs at least one line", field="lines")
        if len(lines) > s.max_lines:
            raise InvalidRequest(f"at most {s.max_lines} lines", field="lines")
        checked: list[tuple[str, str | None, int]] = []
        seen: set[tuple[str, str | None]] = set()
        routed: set[str] = set()
        for raw in lines:
            try:
                sku, loc, qty = (raw.sku, raw.location, raw.qty) if isinstance(raw, Line) else raw
            except (TypeError, ValueError):
                raise InvalidRequest(
                    f"each line is (sku, location, qty), got {raw!r:.80}", field="lines"
                ) from None
            check_ident(sku, "sku")
            if loc is not None:
                check_ident(loc, "location")
            check_int(qty, "qty", 1, s.max_line_qty)
            if (sku, loc) in seen:
                where = f"at {loc}" if loc else "without a location"
                raise InvalidRequest(f"two lines for {sku} {where}; use one line", field="lines")
            if loc is None:
                if backorder:
                    raise InvalidRequest("a backorder's line needs a location", field="lines")
                routed.add(sku)
            seen.add((sku, loc))
            checked.append((sku, loc, qty))
        for sku in sorted(routed):
            if sum(1 for k, _ in seen if k == sku) > 1:
                raise InvalidRequest(
                    f"a line without a location must be the only line for its SKU ({sku})",
                    field="lines",
                )
        # Everything but the id is the same for every call with the same (checked) request,
        # so it is worked out once and reused (a flash sale reserves one SKU over and over).
        request = (channel, hold, customer_id, region, allow_split, rd, backorder, *checked)
        prep = self._prepared.get(request)
        if prep is None:
            prep = self._prepare(
                channel, hold, checked, customer_id, region, allow_split, rd, backorder
            )
            if len(self._prepared) >= _PREPARED_MAX:
                self._prepared.clear()
            self._prepared[request] = prep
        fp = prep.fp
        cfg = self._cfg(actor, source)
        for _ in range(_RULES_TRIES):
            rules = self._rules
            try:
                if prep.rules is not rules:
                    self._resolve(prep, rules, channel, hold, customer_id, region, allow_split)
                specs = prep.specs
                if self.cluster:
                    return await self._reserve_cluster(
                        reservation_id,
                        channel,
                        hold,
                        fp,
                        specs,
                        customer_id,
                        rules.version,
                        cfg,
                        rd,
                        rules.priority(channel) if rules.version else 0,
                        backorder,
                    )
                index_key, home = self.keys.index_and_home(reservation_id)
                req = f'{{"id":"{reservation_id}",{prep.req_mid}{home:d}{prep.req_tail}'
                raw = await self._call("reserve", [index_key, *prep.keys], (cfg, req))
                # the calls of a batch are mostly answered alike (same second, status,
                # rules version), and decoding is a pure function of the reply
                if raw.__class__ is bytes and raw == self._last_reply[0]:
                    out = self._last_reply[1]
                else:
                    out = decode(raw)
                    if raw.__class__ is bytes and not out["replay"]:
                        self._last_reply = (raw, out)
            except RulesStale:
                await self._rules_caught_up(prep.parts)
                continue
            except NoRoute:
                # the rules no longer route a line of it: a retry of a reservation made
                # before still returns its original outcome (I3)
                prior = await self._prior(reservation_id, fp, hold)
                if prior is None:
                    raise
                return prior
            if out["replay"]:
                return _original(_reservation(out), hold)
            return _fresh(reservation_id, channel, specs, out, customer_id, prep.lines)
        raise RulesStale("the allocation rules kept changing; try again")

    def _prepare(
        self,
        channel: str,
        hold: int,
        lines: list[tuple[str, str | None, int]],
        customer_id: str | None,
        region: str | None,
        allow_split: bool | None,
        rd: int | None,
        backorder: bool,
    ) -> _Prepared:
        """The rules-independent part of a checked reserve request: its lines by bucket,
        its fingerprint and the lines a fresh reservation of it has (unless routed)."""
        parts: dict[int, list[tuple[str, str | None, int]]] = {}
        for sku, loc, qty in lines:
            parts.setdefault(self.keys.bucket(sku), []).append((sku, loc, qty))
        # The hot path: the JSON argument and the fingerprint are written directly, not
        # through json. That is exact because every string in them has passed the checks
        # in reserve (IDENT_RE, CHANNEL_RE, RESERVATION_ID_RE, CUSTOMER_RE, REGION_RE: ASCII,
        # no quote, backslash or control character, so nothing JSON escapes) and every
        # number is a checked int; the text is byte-for-byte what _dumps gives
        # (tests/test_reserve_wire.py).
        all_lines = sorted(
            (sku, loc or "", qty) for plines in parts.values() for sku, loc, qty in plines
        )
        fp = _fingerprint_text(
            _reserve_fp_json(
                channel, hold, all_lines, customer_id, region, allow_split, rd, backorder
            )
        )
        taken = tuple(
            [ReservationLine(sku, loc, qty) for pl in parts.values() for sku, loc, qty in pl]  # type: ignore[arg-type]
        )
        return _Prepared(fp, parts, rd, backorder, taken)

    def _resolve(
        self,
        prep: _Prepared,
        rules: Rules,
        channel: str,
        hold: int,
        customer_id: str | None,
        region: str | None,
        allow_split: bool | None,
    ) -> None:
        """Resolve a prepared request under ``rules``: each line's spec (candidates,
        protections, cap, buyer limit), the script's KEYS after the index key, and its
        JSON argument around the id and home bucket. Raises NoRoute as _line_spec does
        (and then keeps nothing)."""
        specs = {
            b: [self._line_spec(rules, channel, region, allow_split, ln) for ln in pl]
            for b, pl in prep.parts.items()
        }
        keys = tuple(self._spec_keys(None, specs))
        mid, tail = _reserve_req_around(
            channel,
            hold * 1000,
            prep.fp,
            rules.version,
            customer_id,
            specs,
            rd=prep.rd,
            pp=rules.priority(channel) if rules.version else 0,
            backorder=prep.backorder,
        )
        prep.specs, prep.keys, prep.req_mid, prep.req_tail = specs, keys, mid, tail
        prep.rules = rules

    async def _prior(self, rid: str, fp: str, hold: int) -> Reservation | None:
        """The original outcome of a reserve request already taken with this id, or None
        when there is none (or a cluster reserve of it is still under way)."""
        raw = await self.redis.hget(self.keys.index(rid), rid)
        if raw is None:
            return None
        index = json.loads(raw)
        if index["fp"] != fp:
            raise IdempotencyConflict(f"reservation {rid} exists with a different request")
        if index.get("state") == "pending":
            return None
        return _original(await self.reservation(rid), hold)

    async def confirm(
        self,
        reservation_id: str,
        *,
        channels: Collection[str] | None = None,
        actor: str = "",
        source: str = "",
    ) -> Reservation:
        """Held → confirmed (the expiry is dropped). Confirming again is a no-op.

        :param channels: when given, the reservation must belong to one of them, else
            :class:`~atp.errors.WrongChannel` (the same holds for release, fulfil, reservation).
        """
        keys, parts = await self._reservation_keys(reservation_id, channels)
        req = {"id": reservation_id, "idx": True, "parts": parts}
        return _reservation(await self._apply("confirm", keys, self._cfg(actor, source), req))

    async def release(
        self,
        reservation_id: str,
        *,
        reason: str = "released",
        channels: Collection[str] | None = None,
        actor: str = "",
        source: str = "",
    ) -> Reservation:
        """Held or confirmed → released; open units return. Releasing again, or releasing
        an expired hold, is a no-op that returns the current state."""
        check_text(reason, "reason")
        keys, parts = await self._reservation_keys(reservation_id, channels)
        req = {"id": reservation_id, "idx": True, "parts": parts, "reason": reason}
        return _reservation(await self._apply("release", keys, self._cfg(actor, source), req))

    async def fulfil(
        self,
        reservation_id: str,
        lines: Sequence[FulfilLine],
        *,
        fulfilment_id: str | None = None,
        channels: Collection[str] | None = None,
        actor: str = "",
        source: str = "",
    ) -> Reservation:
        """Ship units of a confirmed reservation, per line: ``shipped`` units leave on_hand
        and committed; ``short`` units (bin found empty) leave on_hand and raise a short-pick
        exception; ``release_remainder`` releases what is left open on the line.

        :param fulfilment_id: makes the call idempotent; omitted, it is derived from the
            lines, so an identical retry is a no-op. Give distinct ids to ship the same
            quantities twice in two partial fulfilments.
        """
        s = self.settings
        if not lines:
            raise InvalidRequest("a fulfilment needs at least one line", field="lines")
        flines = []
        seen: set[tuple[str, str]] = set()
        for ln in lines:
            if not isinstance(ln, FulfilLine):
                raise InvalidRequest(f"each line is a FulfilLine, got {ln!r:.80}", field="lines")
            check_ident(ln.sku, "sku")
            check_ident(ln.location, "location")
            check_int(ln.shipped, "shipped", 0, s.max_line_qty)
            check_int(ln.short, "short", 0, s.max_line_qty)
            if ln.shipped + ln.short == 0 and not ln.release_remainder:
                raise InvalidRequest(
                    f"line {ln.sku} at {ln.location} ships nothing, reports no short pick and "
                    "releases nothing",
                    field="lines",
                )
            if (ln.sku, ln.location) in seen:
                raise InvalidRequest(f"two lines for {ln.sku} at {ln.location}", field="lines")
            seen.add((ln.sku, ln.location))
            flines.append(
                {
                    "sku": ln.sku,
                    "loc": ln.location,
                    "shipped": ln.shipped,
                    "short": ln.short,
                    "rr": bool(ln.release_remainder),
                }
            )
        ffp = _fingerprint(
            sorted((f["sku"], f["loc"], f["shipped"], f["short"], f["rr"]) for f in flines)
        )
        fid = ffp if fulfilment_id is None else _check_fulfilment_id(fulfilment_id)
        keys, parts = await self._reservation_keys(reservation_id, channels)
        req = {
            "id": reservation_id,
            "idx": True,
            "parts": parts,
            "fid": fid,
            "ffp": ffp,
            "lines": flines,
        }
        if any(f["short"] for f in flines):
            await self._with_priorities(req)
        return _reservation(await self._apply("fulfil", keys, self._cfg(actor, source), req))

    async def reservation(
        self, reservation_id: str, *, channels: Collection[str] | None = None
    ) -> Reservation:
        """The reservation as it stands now.

        :raises UnknownReservation: no reservation has that id.
        """
        parts, now = await self._parts(reservation_id, await self._index(reservation_id, channels))
        return _reservation({"parts": parts, "replay": 0}, now_ms=now)

    async def reservations(
        self, *, statuses: Collection[str] | None = ("held", "confirmed"), batch: int = 500
    ) -> AsyncIterator[Reservation]:
        """Every reservation of the deployment with one of ``statuses`` (by default the
        live ones: held or confirmed; ``None`` for all), in no particular order.

        Walks each bucket's reservation index with HSCAN, ``batch`` entries at a time, and
        reads each batch's parts in one round trip: memory stays bounded by ``batch``
        however large the book, and the server is never blocked. Not a snapshot: a
        reservation made or changed during the walk may or may not be seen, and HSCAN may
        return an entry twice (while the hash grows), so callers that count dedupe by id.
        A reservation still being taken on a cluster, or one whose parts are missing (what
        ``atp verify`` reports), is skipped.

        :param batch: index entries per round trip (1..10,000).
        """
        check_int(batch, "batch", 1, 10_000)
        wanted = None if statuses is None else frozenset(statuses)
        for b in range(self.keys.buckets):
            key = self.keys.index_of_bucket(b)
            cursor: int = 0
            while True:
                cursor, entries = await self.redis.hscan(key, cursor, count=batch)
                todo: list[tuple[str, list[int]]] = []
                for rid_raw, raw in cast(dict[Any, Any], entries).items():
                    index = json.loads(raw)
                    if index.get("state") != "pending":
                        todo.append((_s(rid_raw), [p["b"] for p in index["parts"]]))
                if todo:
                    pipe = self.redis.pipeline(transaction=False)
                    for rid, buckets in todo:
                        for pb in buckets:
                            pipe.hget(self._bucket_keys(pb)[0], rid)
                    raws = list(await pipe.execute())
                    now = await self._now_ms()
                    i = 0
                    for _, buckets in todo:
                        got = raws[i : i + len(buckets)]
                        i += len(buckets)
                        if any(r is None for r in got):
                            continue
                        res = _reservation(
                            {"parts": [json.loads(r) for r in got], "replay": 0}, now_ms=now
                        )
                        if wanted is None or res.status in wanted:
                            yield res
                if int(cursor) == 0:
                    break

    async def totals(self) -> tuple[int, int]:
        """Units committed, and units on hold, over the whole deployment (one round trip;
        the scripts keep a total per bucket)."""
        pipe = self.redis.pipeline(transaction=False)
        for b in range(self.keys.buckets):
            pipe.hmget(self.keys.bucket_keys(b).stats, "committed", "held")
        committed = held = 0
        for c, h in await pipe.execute():
            committed += int(c or 0)
            held += int(h or 0)
        return committed, held

    async def expire_holds(self, limit: int | None = None) -> ExpireResult:
        """Reclaim expired holds in every bucket, at most ``limit`` per bucket per call (the
        worker calls this in a loop). Returns the reservation ids expired and units returned."""
        limit = (
            self.settings.expire_batch if limit is None else check_int(limit, "limit", 1, 10_000)
        )
        now = await self._now_ms()
        holds = self.keys.all_holds()
        pipe = self.redis.pipeline(transaction=False)
        for key in holds:
            pipe.zrangebyscore(key, "-inf", now, start=0, num=limit)
        due = await pipe.execute()
        expired: list[str] = []
        units = 0
        for b, ids in enumerate(due):
            if not ids:
                continue
            ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
            bk = self.keys.bucket_keys(b)
            raws = await self.redis.hmget(bk.res, ids)
            keys = list(bk.tuple())
            cands = []
            for rid, raw in zip(ids, raws, strict=True):
                if raw is None:
                    cands.append({"id": rid, "n": 0})
                    continue
                rec = json.loads(raw)
                for ln in rec["lines"]:
                    keys += self._line_keys(ln["sku"], ln["loc"])
                cands.append({"id": rid, "n": len(rec["lines"])})
            # a part that vanished cannot be reclaimed; drop its stale queue entry directly
            stale = [c["id"] for c in cands if c["n"] == 0]
            cands = [c for c in cands if c["n"] > 0]
            if stale:
                await self.redis.zrem(bk.holds, *stale)
            if not cands:
                continue
            out = await self._run(
                "expire_holds", keys, self._cfg("worker", "expire_holds"), {"ids": cands}
            )
            expired += out["expired"] if isinstance(out["expired"], list) else []
            units += int(out["units"])
        return ExpireResult(tuple(expired), units)
