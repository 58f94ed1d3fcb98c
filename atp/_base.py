"""The state and plumbing every part of the core shares: the connection, settings, key
names, the script runner (auto-pipelined), the allocation rules in force, and reading a
reservation's index and parts. :class:`atp.ATP` is built from this and its mixins
(``_allocation``, ``_cluster``, ``_reconciliation``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Collection, Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Self, cast

from redis.asyncio import Redis, RedisCluster

from ._wire import (
    _dumps,
    _s,
)
from .errors import (
    UnknownReservation,
    WrongChannel,
)
from .keys import KeySpace
from .models import (
    Reservation,
    check_reservation_id,
    check_text,
)
from .rules import EMPTY_RULES, Rules, rules_from_stored
from .scripts import AutoPipeline, ScriptRunner, decode
from .settings import Settings

# a call refused as `rules_stale` reloads the rules and tries again, this many times in all
_RULES_TRIES = 5
_RULES_KEEP = 100  # earlier rules versions kept in {prefix rules}:history


class CoreBase:
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
        self._rules_read: asyncio.Future[Rules] | None = None

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None, **kwargs: Any) -> Self:
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

    async def __aenter__(self) -> Self:
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

    def _make_bucket_keys(self, bucket: int) -> tuple[str, str, str, str, str, str]:
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

    def _cover_keys(self, sku: str, location: str) -> tuple[str, ...]:
        """KEYS of set_position, adjust and replen_levels: pos, log, events, lx, res, stats,
        exc, sch, agg, bq, rp."""
        agg, pos, _, log, lx, sch, bq = self._line_keys(sku, location)
        res, _, events, stats, exc, rp = self._bucket_keys(self.keys.bucket(sku))
        return (pos, log, events, lx, res, stats, exc, sch, agg, bq, rp)

    def _make_line_keys(self, sku: str, location: str) -> tuple[str, str, str, str, str, str, str]:
        return self.keys.position(sku, location).line()

    def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        """One script call, to be awaited for its reply. Auto-pipelined, it is a future
        (not a coroutine around one: every layer costs the reserve hot path when resumed)."""
        if self._pipe is not None:
            return self._pipe.submit(name, keys, args)
        return self.scripts.call(self.redis, name, keys, args)

    async def _run(
        self, name: str, keys: Sequence[str], cfg: str, req: dict[str, Any]
    ) -> dict[str, Any]:
        return decode(await self._call(name, keys, (cfg, _dumps(req))))

    async def rules(self, *, max_age: float | None = None) -> Rules:
        """The allocation rules in force (atp.rules). Cached: the stored version is checked
        when the cache is older than ``max_age`` seconds (``settings.key_refresh_seconds``
        by default) and the document re-read when it moved. Reserving never waits on this:
        the script refuses a request resolved with another version, and it is retried."""
        age = self.settings.key_refresh_seconds if max_age is None else max_age
        if time.monotonic() - self._rules_checked < age:
            return self._rules
        # one read at a time: the calls that find the cache stale meanwhile share it (a
        # thousand concurrent calls make one round trip, not a thousand)
        if self._rules_read is None or self._rules_read.done():
            self._rules_read = asyncio.ensure_future(self._read_rules())
        return await asyncio.shield(self._rules_read)

    async def _read_rules(self) -> Rules:
        now = time.monotonic()
        key = self.keys.rules_doc()
        version = int(await self.redis.hget(key, "version") or 0)
        if version != self._rules.version:
            v, doc, at, actor = await self.redis.hmget(key, "version", "doc", "at", "actor")
            rules = rules_from_stored(int(v or 0), doc, int(at or 0), _s(actor or ""))
            if rules.version >= self._rules.version or rules.version == 0:
                self._rules = rules
        self._rules_checked = now
        return self._rules

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

    if TYPE_CHECKING:  # defined by ATP (atp.store); declared for the mixins that call it

        async def release(
            self,
            reservation_id: str,
            *,
            reason: str = "released",
            channels: Collection[str] | None = None,
            actor: str = "",
            source: str = "",
        ) -> Reservation: ...
