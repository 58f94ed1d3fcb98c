"""The async core: positions and reservations, changed only through the Lua scripts.

``ATP`` validates input (raising :class:`~atp.errors.InvalidRequest` before anything is
sent), routes each call to its keys (``atp.keys``), runs one script and turns the reply
into typed results (``atp.models``). It knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster

from . import counts
from .errors import (
    AlreadyFulfilled,
    ATPError,
    HoldExpired,
    IdempotencyConflict,
    InvalidRequest,
    NoRoute,
    OverFulfil,
    RulesStale,
    UnknownException,
    UnknownLine,
    UnknownReservation,
    WrongChannel,
)
from .keys import KeySpace
from .models import (
    IDENT_RE,
    Availability,
    CountResult,
    CountRow,
    ExceptionRecord,
    ExpireResult,
    Explanation,
    FulfilLine,
    HoldSoon,
    Line,
    Movement,
    Position,
    Reservation,
    ReservationLine,
    Status,
    check_channel,
    check_customer,
    check_ident,
    check_int,
    check_region,
    check_reservation_id,
    check_text,
    ms_to_dt,
)
from .rules import EMPTY_RULES, Rules, RulesDocument, document_json, parse_rules, rules_from_stored
from .scripts import AutoPipeline, ScriptRunner, decode
from .settings import Settings

__all__ = ["ATP"]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# a call refused as `rules_stale` reloads the rules and tries again, this many times in all
_RULES_TRIES = 5
_RULES_KEEP = 100  # earlier rules versions kept in {prefix rules}:history


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
        self._line_keys = lru_cache(maxsize=16384)(self._make_line_keys)
        # the allocation rules this process resolves requests with; the scripts refuse a
        # request resolved with another version than their bucket's (atp.rules)
        self._rules: Rules = EMPTY_RULES
        self._rules_checked = 0.0

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None, **kwargs: Any) -> ATP:
        """Connect to ``url`` (redis://, rediss:// or unix://)."""
        return cls(Redis.from_url(url, **kwargs), settings)

    async def start(self) -> None:
        """Load the scripts into the server (they also load lazily on NOSCRIPT) and read
        the allocation rules in force."""
        await self.scripts.load(self.redis)
        await self.rules(max_age=0)

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

    def _make_bucket_keys(self, bucket: int) -> tuple[str, str, str, str, str]:
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
                keys += self._line_keys(ln[0], ln[1])
        return keys

    def _make_line_keys(self, sku: str, location: str) -> tuple[str, str, str, str, str]:
        return self.keys.position(sku, location).line()

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

    async def explain(
        self,
        sku: str,
        location: str,
        channel: str,
        *,
        customer_id: str | None = None,
        soon_seconds: int = 300,
    ) -> Explanation | None:
        """Why ATP is what it is for ``channel`` at one position: the breakdown the
        reserving script decides with (see :class:`~atp.models.Explanation`). ``None``
        when the position does not exist.

        :param customer_id: also show the buyer limit left for this customer.
        :param soon_seconds: list holds that expire within this many seconds (1..86400).
        """
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_channel(channel)
        if customer_id is not None:
            check_customer(customer_id)
        check_int(soon_seconds, "soon_seconds", 1, 86_400)
        (r,) = await self._explain(
            [(sku, location)], channel, customer_id, soon_ms=soon_seconds * 1000
        )
        if not r["exists"]:
            return None
        rv = r.pop("rv")
        return Explanation(
            sku=sku,
            location=location,
            channel=channel,
            customer_id=customer_id,
            rules_version=rv,
            atp=r["atp"],
            limited_by=r.get("limited_by"),
            position_atp=r["position_atp"],
            on_hand=r["on_hand"],
            committed=r["committed"],
            committed_by_channel=_int_map(r["committed_by_channel"]),
            safety_stock=r["safety_stock"],
            expired_holds_reclaimable=r["expired_holds_reclaimable"],
            protected_for_others=_int_map(r["protected_for_others"]),
            protected_for_others_total=r["protected_for_others_total"],
            cap=r.get("cap"),
            cap_used=r.get("cap_used"),
            cap_left=r.get("cap_left"),
            buyer_limit=r.get("bl"),
            buyer_used=r.get("buyer_used"),
            buyer_left=r.get("buyer_left"),
            holds_expiring_window_seconds=soon_seconds,
            holds_expiring_count=int(r["holds_expiring_soon"]["count"]),
            holds_expiring=tuple(
                HoldSoon(
                    h["reservation_id"], h["channel"], int(h["qty"]), ms_to_dt(h["expires_at"])
                )
                for h in r["holds_expiring_soon"]["holds"] or []
            ),
            at=ms_to_dt(r.pop("now")),
        )

    async def _explain(
        self,
        pairs: list[tuple[str, str]],
        channel: str,
        customer_id: str | None,
        *,
        brief: bool = False,
        soon_ms: int = 300_000,
    ) -> list[dict[str, Any]]:
        """Run explain.lua over ``pairs``: one call on one server, one per bucket on a
        cluster; retried with fresh rules when a bucket enforces another version."""
        cfg = _dumps({"reclaim": self.settings.reclaim_batch, "soon": soon_ms, "list": 20})
        for _ in range(_RULES_TRIES):
            rules = self._rules
            groups: dict[int, list[int]] = {}
            for i, (sku, _loc) in enumerate(pairs):
                groups.setdefault(0 if not self.cluster else self.keys.bucket(sku), []).append(i)
            calls = []
            for idxs in groups.values():
                keys: list[str] = []
                items = []
                for i in idxs:
                    sku, loc = pairs[i]
                    b = self.keys.bucket(sku)
                    lk = self._line_keys(sku, loc)  # agg, pos, hx, log, lx
                    bk = self._bucket_keys(b)  # res, holds, events, stats, exc
                    keys += (bk[3], bk[0], lk[1], lk[2], lk[0])
                    item: dict[str, Any] = {"sku": sku, "loc": loc}
                    if rules.version:
                        pr = rules.protections(sku, loc)
                        if pr:
                            item["pr"] = pr
                        cap = rules.cap(sku, channel)
                        if cap is not None:
                            item["cap"] = cap
                        bl = rules.buyer_limit(sku)
                        if bl is not None:
                            item["bl"] = bl
                    items.append(item)
                req: dict[str, Any] = {
                    "rv": rules.version,
                    "ch": channel,
                    "brief": brief,
                    "items": items,
                }
                if customer_id is not None:
                    req["cu"] = customer_id
                calls.append((idxs, keys, req))
            try:
                outs = [await self._run("explain", k, cfg, r) for _, k, r in calls]
            except RulesStale:
                await self._rules_caught_up({self.keys.bucket(sku): [] for sku, _ in pairs})
                continue
            rows: list[dict[str, Any]] = [{}] * len(pairs)
            for (idxs, _, req), out in zip(calls, outs, strict=True):
                for i, item, row in zip(idxs, req["items"], out["items"], strict=True):
                    if row.get("exists"):
                        row["rv"] = rules.version
                        row["now"] = out["now"]
                        row["bl"] = item.get("bl")
                    rows[i] = row
            return rows
        raise RulesStale("the allocation rules kept changing; try again")

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

    # -- allocation rules ------------------------------------------------------------------

    async def rules(self, *, max_age: float | None = None) -> Rules:
        """The allocation rules in force (atp.rules). Cached: the stored version is checked
        when the cache is older than ``max_age`` seconds (``settings.key_refresh_seconds``
        by default) and the document re-read when it moved. Reserving never waits on this:
        the script refuses a request resolved with another version, and it is retried."""
        age = self.settings.key_refresh_seconds if max_age is None else max_age
        now = time.monotonic()
        if now - self._rules_checked < age:
            return self._rules
        key = self.keys.rules_doc()
        version = int(await self.redis.hget(key, "version") or 0)
        if version != self._rules.version:
            v, doc, at, actor = await self.redis.hmget(key, "version", "doc", "at", "actor")
            rules = rules_from_stored(int(v or 0), doc, int(at or 0), _s(actor or ""))
            if rules.version >= self._rules.version or rules.version == 0:
                self._rules = rules
        self._rules_checked = now
        return self._rules

    async def apply_rules(
        self,
        document: RulesDocument | dict[str, Any] | str,
        *,
        expect_version: int | None = None,
        actor: str = "",
    ) -> Rules:
        """Validate and apply a rules document as the next version. It is in force for
        every process from the moment this returns (atp.rules explains how).

        :param expect_version: apply only if the version in force is this one, else
            :class:`~atp.errors.RulesVersionConflict` (for read-modify-write editors).
        :raises InvalidRules: with every problem found.
        """
        doc = parse_rules(document)
        if expect_version is not None:
            check_int(expect_version, "expect_version", 0, 10**15)
        check_text(actor, "actor", 128, required=False)
        keys = [self.keys.rules_doc(), self.keys.rules_history()]
        if not self.cluster:  # every bucket moves in the same script
            keys += [self._bucket_keys(b)[3] for b in range(self.keys.buckets)]
        req = {
            "doc": document_json(doc),
            "expect": -1 if expect_version is None else expect_version,
            "actor": actor,
        }
        out = await self._run("rules_apply", keys, _dumps({"keep": _RULES_KEEP}), req)
        version = int(out["version"])
        if self.cluster:
            await self._bump_buckets(range(self.keys.buckets), version)
        rules = Rules(version, doc, ms_to_dt(out["at"]), actor)
        self._rules = rules
        self._rules_checked = time.monotonic()
        return rules

    async def rules_version(self, version: int) -> Rules | None:
        """An earlier (or the current) rules version as it was applied, or ``None`` when it
        is not kept (the last 100 are)."""
        check_int(version, "version", 1, 10**15)
        raw = await self.redis.hget(self.keys.rules_history(), str(version))
        if raw is None:
            return None
        h = json.loads(raw)
        return rules_from_stored(version, h["doc"], int(h["at"]), h.get("actor", ""))

    async def _rules_caught_up(self, buckets: Iterable[int]) -> None:
        """A script said a bucket enforces another rules version: re-read the rules, and
        move buckets still behind them (an apply on a cluster that is under way, or was
        interrupted, finishes here)."""
        rules = await self.rules(max_age=0)
        if rules.version:
            await self._bump_buckets(buckets, rules.version)

    async def _bump_buckets(self, buckets: Iterable[int], version: int) -> None:
        req = _dumps({"version": version})
        for b in sorted(set(buckets)):
            await self._call("rules_bump", (self._bucket_keys(b)[3],), ("{}", req))

    async def _with_priorities(self, req: dict[str, Any]) -> None:
        """Add the channel priorities the shortage rule ranks by (when rules are applied)."""
        rules = await self.rules()
        if rules.version:
            req["prio"] = rules.priorities()

    def _cover_keys(self, sku: str, location: str) -> tuple[str, ...]:
        """KEYS of set_position and adjust: pos, log, events, lx, res, stats, exc."""
        _, pos, _, log, lx = self._line_keys(sku, location)
        res, _, events, stats, exc = self._bucket_keys(self.keys.bucket(sku))
        return (pos, log, events, lx, res, stats, exc)

    # -- reconciliation --------------------------------------------------------------------

    async def apply_counts(
        self,
        count_id: str,
        rows: Sequence[CountRow],
        *,
        dry_run: bool = False,
        source: str = "",
        actor: str = "",
    ) -> list[CountResult]:
        """Apply cycle-count rows, each as of its ``counted_at`` (lua/count.lua explains the
        arithmetic and every reason a row is refused). Rows are independent: a refused row
        changes nothing and the others apply. Applying the same rows again under the same
        ``count_id`` applies none twice (``already``), so a crashed batch can be retried.

        :param count_id: names the count (its movements' ``ref``), 1-128 characters.
        :param rows: at most 10,000 per call; results come back in the same order.
        :param dry_run: decide every row, write nothing (status ``dry``).
        """
        check_reservation_id(count_id)
        check_text(source, "source", 128, required=False)
        if len(rows) > 10_000:
            raise InvalidRequest("at most 10,000 count rows per call", field="rows")
        results: list[CountResult | None] = [None] * len(rows)
        groups: dict[int, list[tuple[int, CountRow]]] = {}
        for i, r in enumerate(rows):
            bad = _count_row_problem(r, self.settings.max_on_hand)
            if bad is not None:
                results[i] = CountResult(
                    row=r.row if isinstance(r.row, int) else 0, status="refused",
                    sku=str(getattr(r, "sku", "")), location=str(getattr(r, "location", "")),
                    reason=bad[0], detail=bad[1],
                )  # fmt: skip
                continue
            groups.setdefault(self.keys.bucket(r.sku), []).append((i, r))
        if groups:
            cfg = _dumps(
                {
                    **self._cfg_base, "actor": actor, "source": source,
                    "skew": self.settings.count_skew_seconds * 1000,
                    "risk_max": 500,
                }
            )  # fmt: skip
            prio = (await self.rules()).priorities()
            calls = [list(groups.items())] if not self.cluster else [[g] for g in groups.items()]
            for call in calls:
                keys: list[str] = []
                req_groups = []
                for b, members in call:
                    res, _, events, stats, exc = self._bucket_keys(b)
                    keys += (events, res, stats, exc)
                    for _, r in members:
                        # not through the reserve path's cache: a count names each
                        # position once, and would only push the hot ones out of it
                        _, pos, _, log, lx = self._make_line_keys(r.sku, r.location)
                        keys += (pos, log, lx)
                    req_groups.append(
                        {
                            "b": b,
                            "rows": [
                                {"sku": r.sku, "loc": r.location, "q": r.counted,
                                 "t": _dt_ms(r.counted_at), "row": r.row}
                                for _, r in members
                            ],
                        }
                    )  # fmt: skip
                req = {"cid": count_id, "dry": dry_run, "prio": prio, "groups": req_groups}
                out = await self._run("count", keys, cfg, req)
                flat = [(i, r) for _, members in call for i, r in members]
                for (i, r), o in zip(flat, out["rows"], strict=True):
                    results[i] = CountResult(
                        row=r.row, status=o["st"], sku=r.sku, location=r.location,
                        reason=o.get("reason"), detail=o.get("detail"),
                        on_hand_before=o.get("before"), on_hand_after=o.get("after"),
                        on_hand_at_count=o.get("at_t"), drift=o.get("drift"),
                        committed=o.get("committed"), safety_stock=o.get("safety_stock"),
                        units_at_risk=int(o.get("at_risk") or 0),
                        exception_id=o.get("exception"),
                    )  # fmt: skip
        return [r for r in results if r is not None]

    async def enqueue_counts(
        self,
        rows: Iterable[Mapping[str, Any]],
        *,
        count_id: str | None = None,
        source: str = "",
        assume_utc: bool = False,
        actor: str = "",
    ) -> str:
        """Queue a count for the workers (atp.worker) and return its batch id; rows are
        stored as received and each is parsed, or refused with its reason, by the worker.
        Parameters as :func:`atp.counts.enqueue_counts`."""
        return await counts.enqueue_counts(
            self, rows, count_id=count_id, source=source, assume_utc=assume_utc, actor=actor
        )

    async def count_batch(self, batch_id: str) -> dict[str, Any] | None:
        """A queued count batch: status, progress (``done`` of ``rows``) and, once done, its
        report; None for an unknown id. See :func:`atp.counts.count_batch`."""
        return await counts.count_batch(self, batch_id)

    async def exceptions(
        self,
        *,
        status: str | None = "open",
        kind: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[ExceptionRecord]:
        """Exceptions over the whole deployment, newest first (by time raised, then id).

        Every bucket's exceptions hash is scanned (HSCAN, so the server is never blocked)
        on each call: fine for the thousands of exceptions operators work through, not an
        index for millions. Memory stays bounded by ``limit`` however many there are.

        :param status: ``open``, ``resolved`` or ``None`` for both.
        :param kind: ``oversell`` or ``short_pick``; ``None`` for every kind.
        :param limit: at most this many (1..1000).
        :param before: an exception id; only exceptions after it in this order (for
            paging: pass the last id of the previous page).
        :raises UnknownException: ``before`` names no exception.
        """
        if status not in (None, "open", "resolved"):
            raise InvalidRequest("status must be open or resolved", field="status")
        if kind is not None:
            check_text(kind, "kind", 32)
        check_int(limit, "limit", 1, 1000)
        top = None if before is None else _exception_order(await self.exception(before))
        kept: dict[str, tuple[tuple[int, int, int], ExceptionRecord]] = {}
        for b in range(self.keys.buckets):
            # HSCAN may return an entry twice (a rehash under way): keyed by id
            async for _, raw in self.redis.hscan_iter(self._bucket_keys(b)[4], count=500):
                rec = _exception(json.loads(raw))
                if (status is not None and rec.status != status) or (
                    kind is not None and rec.kind != kind
                ):
                    continue
                order = _exception_order(rec)
                if top is not None and order >= top:
                    continue
                kept[rec.id] = (order, rec)
                if len(kept) >= 2 * limit:
                    kept = dict(sorted(kept.items(), key=lambda kv: kv[1][0], reverse=True)[:limit])
        newest = sorted(kept.values(), key=lambda v: v[0], reverse=True)
        return [rec for _, rec in newest[:limit]]

    async def exception(self, exception_id: str) -> ExceptionRecord:
        """One exception by id.

        :raises UnknownException: no exception has that id.
        """
        b = self._exception_bucket(exception_id)
        raw = await self.redis.hget(self._bucket_keys(b)[4], exception_id)
        if raw is None:
            raise UnknownException(f"no exception with id {exception_id}")
        return _exception(json.loads(raw))

    async def resolve_exception(
        self,
        exception_id: str,
        action: str,
        *,
        note: str = "",
        actor: str = "",
        source: str = "",
    ) -> ExceptionRecord:
        """Resolve an exception: ``release`` releases the reservations it names at risk
        (those still live; each release is its own audited movement), ``keep`` leaves them.
        The resolution is claimed first (lua/resolve.lua), so no other action can win once
        releasing starts, and a retry after a crash continues it; it is then recorded
        (action, note, who, when, the at-risk reservations that stand released) and
        announced on the outbox. Resolving again the same way returns it; another way
        raises :class:`~atp.errors.AlreadyResolved`."""
        if action not in ("release", "keep"):
            raise InvalidRequest("action must be release or keep", field="action")
        check_text(note, "note", 1000, required=False)
        b = self._exception_bucket(exception_id)
        keys = (self._bucket_keys(b)[4], self._bucket_keys(b)[2])
        cfg = self._cfg(actor, source)
        req: dict[str, Any] = {
            "id": exception_id, "phase": "claim", "action": action, "note": note, "released": [],
        }  # fmt: skip
        out = await self._run("resolve", keys, cfg, req)
        current = _exception(out["exception"])
        if out["replay"]:
            return current
        released: list[str] = []
        if action == "release":
            reason = f"exception {exception_id}"
            for r in current.data.get("at_risk") or []:
                rid = r["reservation_id"]
                try:
                    await self.release(rid, reason=reason, actor=actor, source=source)
                    parts, _ = await self._parts(rid)
                except (UnknownReservation, AlreadyFulfilled):
                    continue
                # released by this resolution (now, or by an attempt a crash interrupted),
                # not by someone else before
                if any(p["st"] == "released" and p.get("rsn") == reason for p in parts):
                    released.append(rid)
        out = await self._run(
            "resolve", keys, cfg, {**req, "phase": "finish", "released": released}
        )
        return _exception(out["exception"])

    def _exception_bucket(self, exception_id: str) -> int:
        b, sep, n = exception_id.partition("-") if isinstance(exception_id, str) else ("", "", "")
        if not (sep and b.isascii() and b.isdigit() and n.isascii() and n.isdigit()):
            raise InvalidRequest(f"not an exception id: {exception_id!r:.40}", field="exception_id")
        if int(b) >= self.keys.buckets:
            raise UnknownException(f"no exception with id {exception_id}")
        return int(b)

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
        :raises InsufficientStock: with ``lines`` saying requested, available and what
            limited it (``stock``, ``protection`` or ``cap``).
        :raises BuyerLimitExceeded: the customer would hold more than the SKU's limit.
        :raises CustomerRequired: a line's SKU has a buyer limit and no customer was given.
        :raises NoRoute: a line without a location, and the channel has no locations.
        """
        s = self.settings
        check_reservation_id(reservation_id)
        check_channel(channel)
        hold = s.default_hold_seconds if hold_seconds is None else hold_seconds
        check_int(hold, "hold_seconds", 0, s.max_hold_seconds)
        if customer_id is not None:
            check_customer(customer_id)
        if region is not None:
            check_region(region)
        if allow_split is not None and not isinstance(allow_split, bool):
            raise InvalidRequest("allow_split must be true or false", field="allow_split")
        if not lines:
            raise InvalidRequest("a reservation needs at least one line", field="lines")
        if len(lines) > s.max_lines:
            raise InvalidRequest(f"at most {s.max_lines} lines", field="lines")
        parts: dict[int, list[tuple[str, str | None, int]]] = {}
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
                routed.add(sku)
            seen.add((sku, loc))
            parts.setdefault(self.keys.bucket(sku), []).append((sku, loc, qty))
        for sku in sorted(routed):
            if sum(1 for k, _ in seen if k == sku) > 1:
                raise InvalidRequest(
                    f"a line without a location must be the only line for its SKU ({sku})",
                    field="lines",
                )
        # The hot path: the JSON argument and the fingerprint are written directly, not
        # through json. That is exact because every string in them has passed the checks
        # above (IDENT_RE, CHANNEL_RE, RESERVATION_ID_RE, CUSTOMER_RE, REGION_RE: ASCII, no
        # quote, backslash or control character, so nothing JSON escapes) and every number
        # is a checked int; the text is byte-for-byte what _dumps gives
        # (tests/test_reserve_wire.py).
        all_lines = sorted(
            (sku, loc or "", qty) for plines in parts.values() for sku, loc, qty in plines
        )
        fp = _fingerprint_text(
            _reserve_fp_json(channel, hold, all_lines, customer_id, region, allow_split)
        )
        cfg = self._cfg(actor, source)
        for _ in range(_RULES_TRIES):
            rules = self._rules
            try:
                specs = {
                    b: [self._line_spec(rules, channel, region, allow_split, ln) for ln in pl]
                    for b, pl in parts.items()
                }
                if self.cluster:
                    return await self._reserve_cluster(
                        reservation_id, channel, hold, fp, specs, customer_id, rules.version, cfg
                    )
                keys = self._spec_keys(self.keys.index(reservation_id), specs)
                home = self.keys.bucket(reservation_id)
                req = _reserve_req_json(
                    reservation_id,
                    channel,
                    hold * 1000,
                    fp,
                    home,
                    rules.version,
                    customer_id,
                    specs,
                )
                out = decode(await self._call("reserve", keys, (cfg, req)))
            except RulesStale:
                await self._rules_caught_up(parts)
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
            return _fresh(reservation_id, channel, specs, out, customer_id)
        raise RulesStale("the allocation rules kept changing; try again")

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

    def _line_spec(
        self,
        rules: Rules,
        channel: str,
        region: str | None,
        allow_split: bool | None,
        line: tuple[str, str | None, int],
    ) -> _Spec:
        """What the reserving script needs of one line under ``rules``: its candidate
        locations, the protections at each, the channel's cap and the buyer limit."""
        sku, loc, qty = line
        if rules.version == 0:
            if loc is None:
                raise NoRoute(
                    f"line {sku} names no location and no allocation rules are applied to "
                    "route it; give a location"
                )
            return (sku, loc, qty, None, False, None, None, None)
        cands: tuple[str, ...] | None = None
        split = False
        if loc is None:
            cands = rules.route(channel, None if region is None else region)
            if not cands:
                raise NoRoute(
                    f"line {sku} names no location and channel {channel} has no locations "
                    "to route it to; give a location"
                )
            split = rules.allow_split(channel) if allow_split is None else allow_split
            prs = [_others(rules.protections(sku, c), channel) for c in cands]
        else:
            prs = [_others(rules.protections(sku, loc), channel)]
        return (
            sku,
            loc,
            qty,
            cands,
            split,
            prs if any(prs) else None,
            rules.cap(sku, channel),
            rules.buyer_limit(sku),
        )

    def _spec_keys(self, index_key: str | None, specs: dict[int, list[_Spec]]) -> list[str]:
        """KEYS of reserve (``part_keys`` in lua/_lib.lua): a routed line brings the keys of
        every candidate location."""
        keys = [index_key] if index_key else []
        for b, sp in specs.items():
            keys += self._bucket_keys(b)
            for sku, loc, _, cands, *_ in sp:
                if cands is None:
                    keys += self._line_keys(sku, loc)
                else:
                    keys.append(self.keys.sku(sku))
                    for c in cands:
                        keys += self._line_keys(sku, c)[1:]
        return keys

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
        specs: dict[int, list[_Spec]],
        customer: str | None,
        rv: int,
        cfg: str,
    ) -> Reservation:
        idx_key = self.keys.index(rid)
        index: dict[str, Any] = {
            "fp": fp,
            "ch": channel,
            # a routed line's location is known once its part is taken
            "parts": [{"b": b, "lines": [[sp[0], sp[1]] for sp in sl]} for b, sl in specs.items()],
            "state": "pending",
        }
        if customer is not None:
            index["cu"] = customer
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
        home = self.keys.bucket(rid)
        for b, sl in specs.items():
            keys = self._spec_keys(None, {b: sl})
            req = _reserve_req_json(
                rid, channel, hold * 1000, fp, home, rv, customer, {b: sl}, idx=False
            )
            try:
                out = decode(await self._call("reserve", keys, (cfg, req)))
            except ATPError:
                await self._rollback(rid, taken, cfg)
                await self.redis.hdel(idx_key, rid)
                raise
            outs.append(out)
            got = _part_lines(out, sl)
            taken.append((b, len(got), self._keys(None, [(b, got)])))
        index["state"] = "done"
        index["parts"] = [
            {"b": b, "lines": [[sku, loc] for sku, loc, _ in _part_lines(o, sl)]}
            for (b, sl), o in zip(specs.items(), outs, strict=True)
        ]
        # parts an interrupted attempt took replay; the reservation dates from its first part
        cr = min(o["parts"][0]["cr"] if o["replay"] else o["cr"] for o in outs)
        index["cr"] = cr
        await self.redis.hset(idx_key, rid, _dumps(index))
        if all(o["replay"] for o in outs):
            merged = {"parts": [p for o in outs for p in o["parts"]], "replay": 1}
            return _original(_reservation(merged), hold)
        lines = [
            ln for (_, sl), o in zip(specs.items(), outs, strict=True) for ln in _part_lines(o, sl)
        ]
        ex = cr + hold * 1000 if hold else 0
        out = {"st": "held" if hold else "confirmed", "cr": cr, "ex": ex, "rv": rv, "lines": lines}
        return _fresh(rid, channel, specs, out, customer)

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
            pkeys = keys[k : k + 5 + 5 * p["n"]]
            k += 5 + 5 * p["n"]
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


def _reserve_fp_json(
    channel: str,
    hold: int,
    lines: list[tuple[str, str, int]],
    customer: str | None = None,
    region: str | None = None,
    split: bool | None = None,
) -> str:
    """``_dumps([channel, hold, lines])`` (plus ``{"cu","rg","sp"}`` when the request gives
    a customer, region or split choice): what a reserve request's fingerprint hashes.
    A routed line's location is ``""``."""
    body = ",".join([f'["{sku}","{loc}",{qty:d}]' for sku, loc, qty in lines])
    if customer is None and region is None and split is None:
        return f'["{channel}",{hold:d},[{body}]]'
    extra = _dumps({"cu": customer, "rg": region, "sp": split})
    return f'["{channel}",{hold:d},[{body}],{extra}]'


# One reserve line as the script takes it: sku, location (None when routed), qty, the
# candidate locations (routed) or None, split, protections per candidate or None, cap,
# buyer limit.
_Spec = tuple[
    str,
    str | None,
    int,
    tuple[str, ...] | None,
    bool,
    list[tuple[tuple[str, int], ...]] | None,
    int | None,
    int | None,
]


def _spec_json(spec: _Spec) -> str:
    sku, loc, qty, cands, split, prs, cap, bl = spec
    if cands is None and prs is None and cap is None and bl is None:
        return f'{{"sku":"{sku}","loc":"{loc}","qty":{qty:d}}}'
    out = [f'"sku":"{sku}"']
    if cands is None:
        out.append(f'"loc":"{loc}"')
    else:
        out.append('"locs":[' + ",".join([f'"{c}"' for c in cands]) + "]")
        out.append('"split":' + ("true" if split else "false"))
    out.append(f'"qty":{qty:d}')
    if prs is not None:
        cand = ["[" + ",".join([f'["{g}",{q:d}]' for g, q in pr]) + "]" for pr in prs]
        out.append('"pr":[' + ",".join(cand) + "]")
    if cap is not None:
        out.append(f'"cap":{cap:d}')
    if bl is not None:
        out.append(f'"bl":{bl:d}')
    return "{" + ",".join(out) + "}"


def _part_json(b: int, specs: list[_Spec]) -> str:
    counts = ""
    if any(sp[3] is not None for sp in specs):
        counts = (
            '"c":[' + ",".join([f"{1 if sp[3] is None else len(sp[3]):d}" for sp in specs]) + "],"
        )
    lines = ",".join([_spec_json(sp) for sp in specs])
    return f'{{"b":{b:d},"n":{len(specs):d},{counts}"lines":[{lines}]}}'


def _reserve_req_json(
    rid: str,
    channel: str,
    hold_ms: int,
    fp: str,
    home: int,
    rv: int,
    customer: str | None,
    specs: dict[int, list[_Spec]],
    *,
    idx: bool = True,
) -> str:
    """``_dumps`` of reserve.lua's ``req``: {id, ch, hold, fp, idx, home, rv, [cu], parts:
    [{b, n, [c], lines: [{sku, loc | locs+split, qty, [pr], [cap], [bl]}]}]}, in that key
    order."""
    ps = ",".join([_part_json(b, sp) for b, sp in specs.items()])
    cu = "" if customer is None else f',"cu":"{customer}"'
    return (
        f'{{"id":"{rid}","ch":"{channel}","hold":{hold_ms:d},"fp":"{fp}",'
        f'"idx":{"true" if idx else "false"},"home":{home:d},"rv":{rv:d}{cu},"parts":[{ps}]}}'
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


def _others(protections: tuple[tuple[str, int], ...], channel: str) -> tuple[tuple[str, int], ...]:
    """Protections of the channels other than ``channel`` (its own never limit it)."""
    if not any(g == channel for g, _ in protections):
        return protections
    return tuple([(g, q) for g, q in protections if g != channel])


def _dt_ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _count_row_problem(r: CountRow, max_on_hand: int) -> tuple[str, str] | None:
    """Why a count row cannot even be sent (reason, detail), or None."""
    if not isinstance(r, CountRow):
        return ("bad_row", f"not a count row: {r!r:.80}")
    if not isinstance(r.row, int) or isinstance(r.row, bool) or r.row < 0:
        return ("bad_row", "row must be a row number")
    for what, v in (("sku", r.sku), ("location", r.location)):
        if not isinstance(v, str) or not IDENT_RE.fullmatch(v):
            return ("bad_row", f"{what} must be 1-64 ASCII letters, digits or . _ -, got {v!r:.80}")
    if not isinstance(r.counted, int) or isinstance(r.counted, bool) or r.counted < 0:
        return (
            "bad_count",
            f"counted quantity must be a whole number of 0 or more, got {r.counted!r:.40}",
        )
    if r.counted > max_on_hand:
        return ("bad_count", f"counted quantity above the maximum {max_on_hand}")
    if not isinstance(r.counted_at, datetime) or r.counted_at.tzinfo is None:
        return ("bad_time", "counted_at must be a time with its time zone")
    return None


def _exception(d: dict[str, Any]) -> ExceptionRecord:
    return ExceptionRecord(
        id=d["id"],
        kind=d.get("kind", ""),
        status=d.get("status", "open"),
        raised_at=ms_to_dt(int(d.get("raised_at", 0))),
        data={k: v for k, v in d.items() if k != "resolution"},
        resolution=_resolution(d.get("resolution")),
    )


def _exception_order(e: ExceptionRecord) -> tuple[int, int, int]:
    """Where an exception sorts, oldest first: time raised (ms), then bucket and number of
    its id ("<bucket>-<n>")."""
    b, _, n = e.id.partition("-")
    return (
        int(e.data.get("raised_at", 0)),
        int(b) if b.isdigit() else 0,
        int(n) if n.isdigit() else 0,
    )


def _resolution(r: Any) -> dict[str, Any] | None:
    if not isinstance(r, dict):
        return None
    out = dict(r)
    if "at" in out:
        out["at"] = ms_to_dt(int(out["at"])).isoformat()
    out.setdefault("released", [])
    return out


def _int_map(m: Any) -> dict[str, int]:
    # an empty Lua table comes back as [] from cjson
    return {str(k): int(v) for k, v in m.items()} if isinstance(m, dict) else {}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _hash_to_pos(flat: dict[Any, Any]) -> dict[str, Any]:
    p: dict[str, Any] = {"on_hand": 0, "committed": 0, "safety_stock": 0, "ch": {}}
    for f, v in flat.items():
        name = _s(f)
        if name.startswith("ch:"):
            p["ch"][name[3:]] = int(v)
        elif name in _POS_FIGURES:
            p[name] = int(v)
    return p


_POS_FIGURES = frozenset({"on_hand", "committed", "safety_stock"})
_MOVEMENT_FIELDS = frozenset(
    {"at", "kind", "reason", "actor", "source", "ref", "rid", "channel", "on_hand_before",
     "on_hand_after", "committed_before", "committed_after"}
)  # fmt: skip


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
        detail={k: v for k, v in f.items() if k not in _MOVEMENT_FIELDS},
    )


def _part_lines(out: dict[str, Any], specs: list[_Spec]) -> list[tuple[str, str, int]]:
    """The (sku, location, qty) lines one reserve call took: from its reply when it routed
    a line or replayed, else the request's."""
    if out["replay"]:
        return [(ln["sku"], ln["loc"], ln["qty"]) for p in out["parts"] for ln in p["lines"]]
    taken = out.get("lines")
    if taken is not None:
        return [(sku, loc, qty) for sku, loc, qty in taken]
    return [(sp[0], cast(str, sp[1]), sp[2]) for sp in specs]


def _fresh(
    rid: str,
    channel: str,
    specs: dict[int, list[_Spec]],
    out: dict[str, Any],
    customer: str | None,
) -> Reservation:
    """A reservation just taken: the script answers its status, times and rules version,
    and the lines as taken only when it routed one; otherwise they are the request's (in
    the order of its parts)."""
    created = ms_to_dt(out["cr"])
    taken = out.get("lines")
    if taken is not None:
        lines = tuple([ReservationLine(sku, loc, qty) for sku, loc, qty in taken])
    else:
        lines = tuple([ReservationLine(sp[0], sp[1], sp[2]) for sl in specs.values() for sp in sl])  # type: ignore[arg-type]
    ex = out["ex"]
    return Reservation(
        id=rid,
        channel=channel,
        status=cast(Status, out["st"]),
        lines=lines,
        created_at=created,
        expires_at=ms_to_dt(ex) if ex else None,
        updated_at=created,
        customer_id=customer,
        rules_version=int(out.get("rv", 0)),
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
        customer_id=current.customer_id,
        rules_version=current.rules_version,
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
        customer_id=first.get("cu"),
        rules_version=int(first.get("rv", 0)),
    )
