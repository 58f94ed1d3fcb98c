"""Every Redis key name the ATP core uses is built here, and nowhere else.

The hash-tag decision
=====================

Keys are grouped by **bucket**, not by SKU and not by reservation::

    bucket(sku) = crc32(sku) mod ATP_BUCKETS          (default 128)
    tag         = "{<prefix><bucket>}"                e.g. "{atp:17}"

and every key carries that tag, so a bucket is one Redis Cluster slot. Per bucket ``b``:

==============================  =====================================================
``{p b}:pos:<sku>|<loc>``       hash: ``on_hand``, ``committed``, ``safety_stock``,
                                ``ch:<channel>`` (committed per channel); replenishment
                                (atp.replenishment): ``rop``, ``out`` (reorder point,
                                order-up-to), ``rs`` (1 while a signal is open),
                                ``h:<day>`` (units committed that UTC day: today and
                                the 120 days before); readers ignore other ``<x>:``
                                fields
``{p b}:hx:<sku>|<loc>``        zset: reservation id -> hold expiry (ms), holds on
                                this position (reserve reclaims expired ones here)
``{p b}:log:<sku>|<loc>``       stream: the position's movement log (I5), append-only,
                                trimmed to a retention length
``{p b}:lx:<sku>|<loc>``        zset, all scores 0: the live reservations on this
                                position, ``<channel>:<0 held|1 confirmed>:<newest
                                first>:<id>``, walked per channel by the shortage rule
``{p b}:sch:<sku>|<loc>``       hash: the position's dated schedule (time-phased ATP):
                                ``<day>`` open inbound units expected that day,
                                ``-<day>`` units committed to reservations with that
                                requested day (``day`` = UTC days since 1970-01-01);
                                their totals are ``inbound`` and ``dated`` in ``pos``
``{p b}:ib:<sku>|<loc>``        hash: reference -> JSON of an expected receipt (open, or
                                closed with its `st`: a retried expect is a replay)
``{p b}:bq:<sku>|<loc>``        zset: the position's backorder queue, ``<qty>:<id>``
                                scored by channel priority, then arrival (the
                                position keeps ``bo``, units waiting, ``bp:<prio>``
                                per priority, and ``bqseq``, the arrival counter)
``{p b}:sku:<sku>``             hash: the SKU's commitments over all its locations,
                                ``ch:<channel>`` (caps) and ``cu:<customer>`` (buyer
                                limits)
``{p b}:res``                   hash: reservation id -> JSON of that reservation's
                                *part* in this bucket (its lines on this bucket's SKUs)
``{p b}:holds``                 zset: reservation id -> expiry, parts held here (worker)
``{p b}:events``                stream: the bucket's outbox (reserved, released, …)
``{p b}:stats``                 hash: ``committed`` and ``held`` units of the bucket's
                                reservations (kept by the scripts, read by /metrics),
                                and ``rv``, the allocation rules version the bucket
                                enforces (atp.rules)
``{p b}:exc``                   hash: exception id -> JSON of the exceptions raised on
                                the bucket's positions (oversell, short pick), open
                                until an operator resolves them
``{p b}:rp``                    hash: ``<sku>|<loc>`` -> JSON of the open replenishment
                                signal of that position (raised, not yet cleared)
``{p b}:rpc``                   hash: SKU -> JSON of its replenishment planning
                                settings (service level, lead time, review period…)
``{p h}:rix``                   hash, in the *home* bucket ``h = bucket(reservation id)``:
                                reservation id -> JSON index (fingerprint, parts, lines)
==============================  =====================================================

and, outside the buckets, ``{<p>rules}:doc`` (the allocation rules in force, with their
version) and ``{<p>rules}:history`` (earlier versions), and the queue of count batches
(atp.counts, atp.worker), all in one slot ``{<p>counts}``: ``:queue`` (stream, read by the
workers' consumer group), ``:batch:<id>`` (the batch's rows as received, JSON) and
``:result:<id>`` (hash: status, progress, report).

Why buckets:

* **Everything one position's change touches is in one slot**: the position, its hold
  index, its movement log, the reservation parts that hold units of it, the bucket's hold
  queue and the bucket's outbox stream. A script on one position is therefore atomic on a
  Redis Cluster too, and the event it writes can never be lost or invented (DESIGN.md).
* **An outbox stream per bucket, not per SKU**: consumers follow a fixed, small number of
  streams (``ATP_BUCKETS``) with consumer groups instead of one stream per SKU.
* **Reservation parts live in fixed per-bucket hashes**, so a script that reclaims an
  expired hold it discovers (reserve does this on the positions it touches) can update
  that reservation's record through a key it was given in ``KEYS``: no script ever builds
  a key name.
* **A multi-line reservation is a set of parts, one per bucket its lines touch.** On a
  single server the reserving script receives every part's keys at once and is atomic
  over all of them (I4). On a cluster the same script is called once per part, slot by
  slot, and a failed part rolls back the parts already taken: that is a change of
  *routing* in ``atp.store``, not of scripts, because every script already works on a
  list of parts and takes the home index key only when it shares the call.

``ATP_BUCKETS`` and ``ATP_KEY_PREFIX`` are fixed for the life of a deployment: changing
either re-homes every key.

SKUs and locations are restricted (``atp.models.IDENT_RE``) to characters that cannot
contain ``{``, ``}`` or ``|``, so a tag or a separator can never be forged from input.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["KeySpace", "PositionKeys"]


@dataclass(frozen=True, slots=True)
class PositionKeys:
    """The keys of one (SKU, location) position, and of its SKU's totals (``sku``)."""

    pos: str
    hx: str
    log: str
    lx: str
    sku: str
    sch: str
    ib: str
    bq: str

    def line(self) -> tuple[str, str, str, str, str, str, str]:
        """A reservation line's keys in the scripts' order (``part_keys`` in lua/_lib.lua):
        the SKU's totals, then the position's six keys."""
        return (self.sku, self.pos, self.hx, self.log, self.lx, self.sch, self.bq)

    def candidate(self) -> tuple[str, str, str, str, str, str]:
        """One candidate location of a routed line: the position's six keys."""
        return (self.pos, self.hx, self.log, self.lx, self.sch, self.bq)


@dataclass(frozen=True, slots=True)
class BucketKeys:
    """The per-bucket keys a reservation part uses."""

    res: str
    holds: str
    events: str
    stats: str
    exc: str
    rp: str

    def tuple(self) -> tuple[str, str, str, str, str, str]:
        """In the order the scripts take them (``part_keys`` in lua/_lib.lua)."""
        return (self.res, self.holds, self.events, self.stats, self.exc, self.rp)


class KeySpace:
    """Builds key names for one deployment (prefix and bucket count)."""

    __slots__ = ("_index_keys", "_tag_cache", "buckets", "prefix")

    def __init__(self, prefix: str = "atp:", buckets: int = 128) -> None:
        if buckets < 1 or buckets > 16384:
            raise ValueError("buckets must be between 1 and 16384")
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix may not contain '{' or '}'")
        self.prefix = prefix
        self.buckets = buckets
        self._tag_cache = [f"{{{prefix}{b}}}" for b in range(buckets)]
        self._index_keys = [f"{t}:rix" for t in self._tag_cache]

    def bucket(self, name: str) -> int:
        """Bucket of a SKU (or, for the reservation index, of a reservation id)."""
        return _crc(name) % self.buckets

    def tag(self, bucket: int) -> str:
        return self._tag_cache[bucket]

    def position(self, sku: str, location: str) -> PositionKeys:
        t = self._tag_cache[_crc(sku) % self.buckets]
        suffix = f"{sku}|{location}"
        return PositionKeys(
            f"{t}:pos:{suffix}",
            f"{t}:hx:{suffix}",
            f"{t}:log:{suffix}",
            f"{t}:lx:{suffix}",
            f"{t}:sku:{sku}",
            f"{t}:sch:{suffix}",
            f"{t}:ib:{suffix}",
            f"{t}:bq:{suffix}",
        )

    def sku(self, sku: str) -> str:
        """The SKU's totals over all its locations (committed per channel and customer)."""
        return f"{self._tag_cache[_crc(sku) % self.buckets]}:sku:{sku}"

    def rules_doc(self) -> str:
        """The allocation rules in force: hash {version, doc, at, actor}."""
        return f"{{{self.prefix}rules}}:doc"

    def rules_history(self) -> str:
        """Earlier rules versions: hash version -> JSON {doc, at, actor}."""
        return f"{{{self.prefix}rules}}:history"

    def counts_queue(self) -> str:
        """The stream of queued count batches (one entry per batch, read by a consumer group)."""
        return f"{{{self.prefix}counts}}:queue"

    def count_batch(self, batch_id: str) -> str:
        """A queued count batch's rows, as received (JSON)."""
        return f"{{{self.prefix}counts}}:batch:{batch_id}"

    def count_result(self, batch_id: str) -> str:
        """A count batch's state: hash of status, progress, report, times, worker."""
        return f"{{{self.prefix}counts}}:result:{batch_id}"

    def bucket_keys(self, bucket: int) -> BucketKeys:
        t = self._tag_cache[bucket]
        return BucketKeys(
            f"{t}:res", f"{t}:holds", f"{t}:events", f"{t}:stats", f"{t}:exc", f"{t}:rp"
        )

    def replen_settings(self, bucket: int) -> str:
        """The replenishment planning settings of the bucket's SKUs: hash SKU -> JSON."""
        return f"{self._tag_cache[bucket]}:rpc"

    def index(self, reservation_id: str) -> str:
        """The reservation index key, in the home bucket of the reservation id."""
        return f"{self._tag_cache[_crc(reservation_id) % self.buckets]}:rix"

    def index_and_home(self, reservation_id: str) -> tuple[str, int]:
        """The reservation index key and its bucket (the reservation's home). Not through
        the cached ``_crc``: reservation ids are mostly new, so a cache would only churn."""
        home = zlib.crc32(reservation_id.encode()) % self.buckets
        return self._index_keys[home], home

    def index_of_bucket(self, bucket: int) -> str:
        """The reservation index hash of one bucket (the entries of the reservation ids
        whose home it is): walked to list every reservation once."""
        return f"{self._tag_cache[bucket]}:rix"

    def events(self, bucket: int) -> str:
        return f"{self._tag_cache[bucket]}:events"

    def all_events(self) -> list[str]:
        return [f"{t}:events" for t in self._tag_cache]

    def all_holds(self) -> list[str]:
        return [f"{t}:holds" for t in self._tag_cache]

    def keys_pattern(self) -> str:
        """A SCAN pattern matching every key of this deployment."""
        return f"{{{_glob_escape(self.prefix)}*}}:*"


@lru_cache(maxsize=65536)
def _crc(name: str) -> int:
    return zlib.crc32(name.encode())


def _glob_escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in "*?[]\\":
            out.append("\\")
        out.append(ch)
    return "".join(out)
