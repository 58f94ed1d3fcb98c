"""The async core: positions and reservations, changed only through the Lua scripts.

``ATP`` validates input (raising :class:`~atp.errors.InvalidRequest` before anything is
sent), routes each call to its keys (``atp.keys``), runs one script and turns the reply
into typed results (``atp.models``). It knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Sequence
from datetime import timedelta
from functools import lru_cache
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster

from .errors import (
    ATPError,
    HoldExpired,
    IdempotencyConflict,
    InvalidRequest,
    OverFulfil,
    UnknownLine,
    UnknownReservation,
    WrongChannel,
)
from .keys import KeySpace
from .models import (
    Availability,
    ExpireResult,
    FulfilLine,
    Line,
    Movement,
    Position,
    Reservation,
    ReservationLine,
    Status,
    check_channel,
    check_ident,
    check_int,
    check_reservation_id,
    check_text,
    ms_to_dt,
)
from .scripts import AutoPipeline, ScriptRunner, decode
from .settings import Settings

__all__ = ["ATP"]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class ATP:
    """The ATP core over one Redis connection pool.

    :param client: a ``redis.asyncio.Redis`` (``decode_responses`` may be on or off).
    :param settings: limits, key prefix and bucket count; defaults from the environment.
    """

    def __init__(self, client: Redis, settings: Settings | None = None) -> None:
        self.redis = client
        # on a cluster a reservation's parts are taken slot by slot (see _reserve_cluster)
        self.cluster = isinstance(client, RedisCluster)
        self.settings = settings or Settings()
        s = self.settings
        self.keys = KeySpace(s.key_prefix, s.buckets)
        self.scripts = ScriptRunner()
        self._pipe = (
            AutoPipeline(client, self.scripts, s.autopipeline_max_batch)
            if self.settings.autopipeline and not self.cluster
            else None
        )
        self._cfg_base: dict[str, Any] = {
            "max_qty": s.max_line_qty,
            "max_lines": s.max_lines,
            "max_hold": s.max_hold_seconds * 1000,
            "max_on_hand": s.max_on_hand,
            "reclaim": s.reclaim_batch,
            "log_max": s.log_maxlen,
            "ev_max": s.events_maxlen,
        }
        self._cfg_cached = lru_cache(maxsize=1024)(self._make_cfg)
        # key names for the reserve path, built by self.keys once and then reused
        self._bucket_keys = lru_cache(maxsize=None)(self._make_bucket_keys)  # <= buckets entries
        self._position_keys = lru_cache(maxsize=16384)(self._make_position_keys)

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None, **kwargs: Any) -> ATP:
        """Connect to ``url`` (redis://, rediss:// or unix://)."""
        return cls(Redis.from_url(url, **kwargs), settings)

    async def start(self) -> None:
        """Load the scripts into the server (they also load lazily on NOSCRIPT)."""
        await self.scripts.load(self.redis)

    async def ready(self) -> bool:
        """Redis answers and every script is loaded (loading any that are missing)."""
        await self.redis.ping()
        if not await self.scripts.loaded(self.redis):
            await self.scripts.load(self.redis)
        return True

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> ATP:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _cfg(self, actor: str, source: str) -> str:
        """The scripts' settings argument, with who is acting (written to the logs)."""
        try:
            return self._cfg_cached(actor, source)  # _make_cfg checks both
        except TypeError:  # unhashable, so not text: refused with the field named
            check_text(actor, "actor", 128, required=False)
            check_text(source, "source", 128, required=False)
            raise

    def _make_cfg(self, actor: str, source: str) -> str:
        check_text(actor, "actor", 128, required=False)
        check_text(source, "source", 128, required=False)
        return _dumps({**self._cfg_base, "actor": actor, "source": source})

    def _make_bucket_keys(self, bucket: int) -> tuple[str, str, str, str]:
        return self.keys.bucket_keys(bucket).tuple()

    def _keys(
        self, index_key: str | None, parts: Iterable[tuple[int, Iterable[Sequence[Any]]]]
    ) -> list[str]:
        """KEYS of a reservation call (``part_keys`` in lua/_lib.lua): the index key when
        given, then per part its bucket keys and three keys per line (sku, location, …)."""
        keys = [index_key] if index_key else []
        for b, lines in parts:
            keys += self._bucket_keys(b)
            for ln in lines:
                keys += self._position_keys(ln[0], ln[1])
        return keys

    def _make_position_keys(self, sku: str, location: str) -> tuple[str, str, str]:
        pk = self.keys.position(sku, location)
        return (pk.pos, pk.hx, pk.log)

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self._pipe is not None:
            return await self._pipe.call(name, keys, args)
        return await self.scripts.call(self.redis, name, keys, args)

    async def _run(
        self, name: str, keys: Sequence[str], cfg: str, req: dict[str, Any]
    ) -> dict[str, Any]:
        return decode(await self._call(name, keys, (cfg, _dumps(req))))

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
        k = self.keys.position(sku, location)
        req: dict[str, Any] = {"sku": sku, "loc": location, "on_hand": on_hand, "reason": reason}
        if safety_stock is not None:
            req["safety_stock"] = safety_stock
        out = await self._run(
            "set_position", (k.pos, k.log, self._events(sku)), self._cfg(actor, source), req
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
        k = self.keys.position(sku, location)
        req = {"sku": sku, "loc": location, "delta": delta, "reason": reason, "ref": reference}
        out = await self._run(
            "adjust", (k.pos, k.log, self._events(sku)), self._cfg(actor, source), req
        )
        return _position(sku, location, out["position"])

    async def receive(
        self,
        sku: str,
        location: str,
        qty: int,
        *,
        reference: str,
        actor: str = "",
        source: str = "",
    ) -> Position:
        """Inbound units arrive: on_hand goes up by ``qty`` against ``reference`` (PO, ASN)."""
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_int(qty, "qty", 1, self.settings.max_on_hand)
        check_text(reference, "reference")
        k = self.keys.position(sku, location)
        req = {"sku": sku, "loc": location, "qty": qty, "ref": reference}
        out = await self._run(
            "receive", (k.pos, k.log, self._events(sku)), self._cfg(actor, source), req
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
        self, items: Iterable[tuple[str, str]], channel: str
    ) -> list[Availability]:
        """ATP for ``channel`` at many positions in one round trip (for listing pages).
        A position that does not exist has ATP 0 and ``exists=False``."""
        check_channel(channel)
        pairs = list(items)
        pipe = self.redis.pipeline(transaction=False)
        for sku, loc in pairs:
            check_ident(sku, "sku")
            check_ident(loc, "location")
            pipe.hmget(self.keys.position(sku, loc).pos, "on_hand", "committed", "safety_stock")
        rows = await pipe.execute() if pairs else []
        out = []
        for (sku, loc), (oh, cm, ss) in zip(pairs, rows, strict=True):
            if oh is None:
                out.append(Availability(sku, loc, channel, 0, exists=False))
            else:
                atp = int(oh) - int(cm or 0) - int(ss or 0)
                out.append(Availability(sku, loc, channel, max(0, atp)))
        return out

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
        lines: Sequence[Line | tuple[str, str, int]],
        *,
        hold_seconds: int | None = None,
        actor: str = "",
        source: str = "",
    ) -> Reservation:
        """Reserve every line for ``channel``, all or nothing (I1, I4), idempotently (I3).

        :param reservation_id: caller-chosen id; a retry with the same request returns the
            original outcome (``replayed=True``); a different request raises
            :class:`~atp.errors.IdempotencyConflict`.
        :param lines: (sku, location, qty) per line; one line per position.
        :param hold_seconds: a hold that expires by itself (``held``); 0 confirms at once;
            ``None`` takes ``settings.default_hold_seconds``.
        :raises InsufficientStock: with ``lines`` saying requested and available.
        """
        s = self.settings
        check_reservation_id(reservation_id)
        check_channel(channel)
        hold = s.default_hold_seconds if hold_seconds is None else hold_seconds
        check_int(hold, "hold_seconds", 0, s.max_hold_seconds)
        if not lines:
            raise InvalidRequest("a reservation needs at least one line", field="lines")
        if len(lines) > s.max_lines:
            raise InvalidRequest(f"at most {s.max_lines} lines", field="lines")
        parts: dict[int, list[tuple[str, str, int]]] = {}
        seen: set[tuple[str, str]] = set()
        for raw in lines:
            try:
                sku, loc, qty = (raw.sku, raw.location, raw.qty) if isinstance(raw, Line) else raw
            except (TypeError, ValueError):
                raise InvalidRequest(
                    f"each line is (sku, location, qty), got {raw!r:.80}", field="lines"
                ) from None
            check_ident(sku, "sku")
            check_ident(loc, "location")
            check_int(qty, "qty", 1, s.max_line_qty)
            if (sku, loc) in seen:
                raise InvalidRequest(f"two lines for {sku} at {loc}; use one line", field="lines")
            seen.add((sku, loc))
            parts.setdefault(self.keys.bucket(sku), []).append((sku, loc, qty))
        # The hot path: the JSON argument and the fingerprint are written directly, not
        # through json. That is exact because every string in them has passed the checks
        # above (IDENT_RE, CHANNEL_RE, RESERVATION_ID_RE: ASCII, no quote, backslash or
        # control character, so nothing JSON escapes) and every number is a checked int;
        # the text is byte-for-byte what _dumps gives (tests/test_reserve_wire.py).
        all_lines = sorted(ln for plines in parts.values() for ln in plines)
        fp = _fingerprint_text(_reserve_fp_json(channel, hold, all_lines))
        if self.cluster:
            cfg = self._cfg(actor, source)
            return await self._reserve_cluster(reservation_id, channel, hold, fp, parts, cfg)
        keys = self._keys(self.keys.index(reservation_id), parts.items())
        home = self.keys.bucket(reservation_id)
        req = _reserve_req_json(reservation_id, channel, hold * 1000, fp, home, parts)
        cfg = self._cfg(actor, source)
        out = decode(await self._call("reserve", keys, (cfg, req)))
        if out["replay"]:
            return _original(_reservation(out), hold)
        return _fresh(reservation_id, channel, parts, out["st"], out["cr"], out["ex"])

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
        return _reservation(await self._apply("fulfil", keys, self._cfg(actor, source), req))

    async def reservation(
        self, reservation_id: str, *, channels: Collection[str] | None = None
    ) -> Reservation:
        """The reservation as it stands now.

        :raises UnknownReservation: no reservation has that id.
        """
        parts, now = await self._parts(reservation_id, await self._index(reservation_id, channels))
        return _reservation({"parts": parts, "replay": 0}, now_ms=now)

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
                    pk = self.keys.position(ln["sku"], ln["loc"])
                    keys += (pk.pos, pk.hx, pk.log)
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

    # -- cluster routing ---------------------------------------------------------------------
    #
    # On one server a reservation call is one script over every part (atomic, I4). On a
    # cluster the parts live in different slots, so the same scripts run once per part and
    # the index entry is written around them: a journal ("pending") before, "done" after.
    # A refused part rolls back the parts already taken before the call returns.

    async def _reserve_cluster(
        self,
        rid: str,
        channel: str,
        hold: int,
        fp: str,
        parts: dict[int, list[tuple[str, str, int]]],
        cfg: str,
    ) -> Reservation:
        idx_key = self.keys.index(rid)
        index = {
            "fp": fp,
            "ch": channel,
            "parts": [
                {"b": b, "lines": [[sku, loc] for sku, loc, _ in pl]} for b, pl in parts.items()
            ],
            "state": "pending",
        }
        if not await self.redis.hsetnx(idx_key, rid, _dumps(index)):
            raw = await self.redis.hget(idx_key, rid)
            prior = json.loads(raw) if raw is not None else None
            if prior is not None and prior["fp"] != fp:
                raise IdempotencyConflict(f"reservation {rid} exists with a different request")
            if prior is None:
                await self.redis.hset(idx_key, rid, _dumps(index))
            # "done": every part replays; "pending": an interrupted attempt, whose parts
            # replay and whose missing parts are taken now
        taken: list[tuple[int, int, list[str]]] = []
        outs: list[dict[str, Any]] = []
        for b, pl in parts.items():
            keys = self._keys(None, [(b, pl)])
            req = {
                "id": rid, "ch": channel, "hold": hold * 1000, "fp": fp, "idx": False,
                "home": self.keys.bucket(rid),
                "parts": [{
                    "b": b, "n": len(pl),
                    "lines": [{"sku": s, "loc": lo, "qty": q} for s, lo, q in pl],
                }],
            }  # fmt: skip
            try:
                outs.append(await self._run("reserve", keys, cfg, req))
            except ATPError:
                await self._rollback(rid, taken, cfg)
                await self.redis.hdel(idx_key, rid)
                raise
            taken.append((b, len(pl), keys))
        index["state"] = "done"
        # parts an interrupted attempt took replay; the reservation dates from its first part
        cr = min(o["parts"][0]["cr"] if o["replay"] else o["cr"] for o in outs)
        index["cr"] = cr
        await self.redis.hset(idx_key, rid, _dumps(index))
        if all(o["replay"] for o in outs):
            merged = {"parts": [p for o in outs for p in o["parts"]], "replay": 1}
            return _original(_reservation(merged), hold)
        return _fresh(
            rid,
            channel,
            parts,
            "held" if hold else "confirmed",
            cr,
            cr + hold * 1000 if hold else 0,
        )

    async def _rollback(self, rid: str, taken: list[tuple[int, int, list[str]]], cfg: str) -> None:
        for b, n, keys in taken:
            req = {"id": rid, "idx": False, "parts": [{"b": b, "n": n}], "rollback": True}
            await self._run("release", keys, cfg, req)

    async def _apply(
        self, name: str, keys: list[str], cfg: str, req: dict[str, Any]
    ) -> dict[str, Any]:
        """Run a reservation script: once over every part on one server, part by part on a
        cluster (fulfil lines go to the part that holds them)."""
        if not self.cluster:
            return await self._run(name, keys, cfg, req)
        rid = req["id"]
        calls: list[tuple[list[str], dict[str, Any]]] = []
        k = 1  # keys[0] is the index key, not sent on a cluster
        for p in req["parts"]:
            pkeys = keys[k : k + 4 + 3 * p["n"]]
            k += 4 + 3 * p["n"]
            preq = {**req, "idx": False, "parts": [p]}
            if name == "fulfil":
                mine = [ln for ln in req["lines"] if self.keys.bucket(ln["sku"]) == p["b"]]
                if not mine:
                    continue
                preq["lines"] = mine
            calls.append((pkeys, preq))
        if name in ("confirm", "release"):
            # parts already past this step (a part fully fulfilled, a part confirmed by an
            # interrupted call) are left alone, as one script would see the whole
            current, _ = await self._parts(rid)
            whole = _merged_status(current)
            if whole in ("held", "confirmed") or (name == "release" and whole == "expired"):
                calls = [
                    c for c, part in zip(calls, current, strict=True)
                    if part["st"] in ("held", "confirmed", "expired")
                    and not (name == "confirm" and part["st"] == "confirmed")
                ] or calls[:1]  # fmt: skip
        if name == "fulfil":
            # check every line against its part before any part is changed; the scripts
            # check again, atomically, per part
            current, _ = await self._parts(rid)
            lines = {(ln["sku"], ln["loc"]): ln for p in current for ln in p["lines"]}
            # a part closing its last line must know whether other parts picked anything
            for _, preq in calls:
                b = preq["parts"][0]["b"]
                others = [p for p in current if self.keys.bucket(p["lines"][0]["sku"]) != b]
                preq["picked"] = sum(
                    ln["shipped"] + ln["short"] for p in others for ln in p["lines"]
                )
            for f in req["lines"]:
                held = lines.get((f["sku"], f["loc"]))
                if held is None:
                    raise UnknownLine(f"reservation {rid} has no line for {f['sku']} at {f['loc']}")
                open_ = held["qty"] - held["shipped"] - held["released"]
                if f["shipped"] + f["short"] > open_:
                    raise OverFulfil(
                        f"{f['sku']} at {f['loc']}: shipped {f['shipped']} + short {f['short']} is "
                        f"more than the {open_} units open on the line",
                        sku=f["sku"], location=f["loc"], open=open_,
                    )  # fmt: skip
        replays = []
        done: list[tuple[list[str], dict[str, Any]]] = []
        for pkeys, preq in calls:
            try:
                out = await self._run(name, pkeys, cfg, preq)
            except HoldExpired:
                # a hold that lapsed between two parts: give back what the earlier parts took
                for dkeys, dreq in done:
                    rel = {
                        "id": rid,
                        "idx": False,
                        "parts": dreq["parts"],
                        "reason": "hold expired",
                    }
                    await self._run("release", dkeys, cfg, rel)
                raise
            replays.append(bool(out["replay"]))
            done.append((pkeys, preq))
        return {"parts": (await self._parts(rid))[0], "replay": all(replays)}

    async def _parts(
        self, rid: str, index: dict[str, Any] | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """Every part of a reservation and the server's time (ms), in one round trip."""
        index = index or await self._index(rid)
        pipe = self.redis.pipeline(transaction=False)
        for p in index["parts"]:
            pipe.hget(self.keys.bucket_keys(p["b"]).res, rid)
        if self.cluster:  # a cluster pipeline cannot route a keyless TIME
            raws = list(await pipe.execute())
            sec, usec = await self.redis.time()
        else:
            pipe.time()
            *raws, (sec, usec) = await pipe.execute()
        if any(r is None for r in raws):
            raise UnknownReservation(f"no reservation with id {rid}")
        return [json.loads(r) for r in raws], int(sec) * 1000 + int(usec) // 1000

    # -- internals -------------------------------------------------------------------------

    def _events(self, sku: str) -> str:
        return self.keys.events(self.keys.bucket(sku))

    async def _now_ms(self) -> int:
        sec, usec = await self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def _index(
        self, reservation_id: str, channels: Collection[str] | None = None
    ) -> dict[str, Any]:
        check_reservation_id(reservation_id)
        raw = await self.redis.hget(self.keys.index(reservation_id), reservation_id)
        if raw is None:
            raise UnknownReservation(f"no reservation with id {reservation_id}")
        index = cast(dict[str, Any], json.loads(raw))
        if index.get("state") == "pending":  # a cluster reserve still taking its parts
            raise UnknownReservation(f"reservation {reservation_id} is not complete")
        if channels is not None and index["ch"] not in channels:
            raise WrongChannel(f"reservation {reservation_id} belongs to another channel")
        return index

    async def _reservation_keys(
        self, reservation_id: str, channels: Collection[str] | None = None
    ) -> tuple[list[str], list[dict[str, int]]]:
        index = await self._index(reservation_id, channels)
        parts = index["parts"]
        keys = self._keys(self.keys.index(reservation_id), ((p["b"], p["lines"]) for p in parts))
        return keys, [{"b": p["b"], "n": len(p["lines"])} for p in parts]


def _fingerprint(obj: object) -> str:
    return hashlib.sha1(_dumps(obj).encode()).hexdigest()


def _fingerprint_text(text: str) -> str:
    """``_fingerprint`` of an object whose ``_dumps`` is ``text``."""
    return hashlib.sha1(text.encode()).hexdigest()


# reserve's JSON, written directly. Only for checked values: strings that passed
# check_ident / check_channel / check_reservation_id (nothing in them needs escaping) and
# ints that passed check_int (":d" writes an int subclass by its value, as json does).


def _reserve_fp_json(channel: str, hold: int, lines: list[tuple[str, str, int]]) -> str:
    """``_dumps([channel, hold, lines])``: what a reserve request's fingerprint hashes."""
    body = ",".join([f'["{sku}","{loc}",{qty:d}]' for sku, loc, qty in lines])
    return f'["{channel}",{hold:d},[{body}]]'


def _reserve_lines_json(lines: list[tuple[str, str, int]]) -> str:
    return ",".join([f'{{"sku":"{sku}","loc":"{loc}","qty":{qty:d}}}' for sku, loc, qty in lines])


def _reserve_req_json(
    rid: str, channel: str, hold_ms: int, fp: str, home: int,
    parts: dict[int, list[tuple[str, str, int]]],
) -> str:  # fmt: skip
    """``_dumps`` of reserve.lua's ``req``: {id, ch, hold, fp, idx, home, parts: [{b, n,
    lines: [{sku, loc, qty}]}]}, in that key order."""
    ps = ",".join(
        [
            f'{{"b":{b:d},"n":{len(plines):d},"lines":[{_reserve_lines_json(plines)}]}}'
            for b, plines in parts.items()
        ]
    )
    return (
        f'{{"id":"{rid}","ch":"{channel}","hold":{hold_ms:d},"fp":"{fp}","idx":true,'
        f'"home":{home:d},"parts":[{ps}]}}'
    )


def _check_fulfilment_id(value: object) -> str:
    try:
        return check_reservation_id(value)
    except InvalidRequest as e:  # same rule, but name the field the caller gave
        raise InvalidRequest(
            e.detail.replace("reservation_id", "fulfilment_id", 1), field="fulfilment_id"
        ) from None


def _check_stream_id(value: str) -> str:
    """A movement id ``ms-seq``; a bare ``ms`` means ``ms-0``, so that ``before=ms`` means
    strictly before that millisecond. ASCII digits only, each part below 2**64 (what Redis
    accepts), so a bad id is an InvalidRequest, never a server error."""
    a, sep, b = value.partition("-") if isinstance(value, str) else ("", "", "")
    parts = (a, b) if sep else (a,)
    if not all(p.isascii() and p.isdigit() and int(p) < 2**64 for p in parts):
        raise InvalidRequest(f"not a movement id: {value!r:.40}", field="before")
    return value if sep else f"{value}-0"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _hash_to_pos(flat: dict[Any, Any]) -> dict[str, Any]:
    p: dict[str, Any] = {"on_hand": 0, "committed": 0, "safety_stock": 0, "ch": {}}
    for f, v in flat.items():
        name = _s(f)
        if name.startswith("ch:"):
            p["ch"][name[3:]] = int(v)
        else:
            p[name] = int(v)
    return p


def _position(sku: str, location: str, p: dict[str, Any]) -> Position:
    ch = p.get("ch") or {}
    return Position(
        sku=sku,
        location=location,
        on_hand=int(p.get("on_hand", 0)),
        committed=int(p.get("committed", 0)),
        safety_stock=int(p.get("safety_stock", 0)),
        committed_by_channel={k: int(v) for k, v in ch.items()} if isinstance(ch, dict) else {},
    )


def _movement(mid: Any, fields: dict[Any, Any]) -> Movement:
    f = {_s(k): _s(v) for k, v in fields.items()}
    return Movement(
        id=_s(mid),
        at=ms_to_dt(int(f.get("at", "0"))),
        kind=f.get("kind", ""),
        reason=f.get("reason", ""),
        actor=f.get("actor", ""),
        source=f.get("source", ""),
        ref=f.get("ref", ""),
        reservation_id=f.get("rid", ""),
        channel=f.get("channel", ""),
        on_hand_before=int(f.get("on_hand_before", "0")),
        on_hand_after=int(f.get("on_hand_after", "0")),
        committed_before=int(f.get("committed_before", "0")),
        committed_after=int(f.get("committed_after", "0")),
    )


def _fresh(
    rid: str,
    channel: str,
    parts: dict[int, list[tuple[str, str, int]]],
    status: str,
    cr: int,
    ex: int,
) -> Reservation:
    """A reservation just taken: the script answers only its status and times, the lines
    are the request's (in the order of its parts)."""
    created = ms_to_dt(cr)
    return Reservation(
        id=rid,
        channel=channel,
        status=cast(Status, status),
        lines=tuple(
            [ReservationLine(sku, loc, qty) for pl in parts.values() for sku, loc, qty in pl]
        ),
        created_at=created,
        expires_at=ms_to_dt(ex) if ex else None,
        updated_at=created,
    )


def _original(current: Reservation, hold_seconds: int) -> Reservation:
    """The outcome a reserve call first returned, rebuilt for its replay (I3): the request
    is the same (the fingerprint matched), so its lines, status and expiry are known."""
    return Reservation(
        id=current.id,
        channel=current.channel,
        status="held" if hold_seconds else "confirmed",
        lines=tuple(ReservationLine(ln.sku, ln.location, ln.qty) for ln in current.lines),
        created_at=current.created_at,
        expires_at=current.created_at + timedelta(seconds=hold_seconds) if hold_seconds else None,
        updated_at=current.created_at,
        replayed=True,
    )


_STATUS_ORDER = ("expired", "held", "confirmed", "released", "fulfilled")


def _merged_status(parts: list[dict[str, Any]]) -> str:
    """One status for parts that a cluster moved one by one: an expired part expires the
    whole; a part still open (held, confirmed) keeps the whole open; once all are done, a
    released part means the reservation was released (a part fully shipped before the
    release stays fulfilled), else it was fulfilled. On one server every part has the same
    status, so this only matters on a cluster."""
    present = {p["st"] for p in parts}
    return next(st for st in _STATUS_ORDER if st in present)


def _reservation(out: dict[str, Any], now_ms: int | None = None) -> Reservation:
    """Merge a reservation's parts (one per bucket) into one Reservation."""
    parts = out["parts"]
    first = parts[0]
    status = first["st"] if len(parts) == 1 else _merged_status(parts)
    if status == "held" and now_ms is not None and 0 < first["ex"] <= now_ms:
        status = "expired"
    lines = tuple(
        [
            ReservationLine(
                ln["sku"], ln["loc"], ln["qty"], ln["shipped"], ln["short"], ln["released"]
            )
            for p in parts
            for ln in p["lines"]
        ]
    )
    cr = first["cr"]
    up = max([p["up"] for p in parts])
    created_at = ms_to_dt(cr)
    return Reservation(
        id=first["id"],
        channel=first["ch"],
        status=cast(Status, status),
        lines=lines,
        created_at=created_at,
        expires_at=ms_to_dt(first["ex"]) if first["ex"] else None,
        # a fresh reservation was last updated when it was made: one datetime, not two
        updated_at=created_at if up == cr else ms_to_dt(up),
        replayed=bool(out.get("replay")),
    )
