"""Replenishment signals that see the open order book (DESIGN.md, failure pattern 2).

Per position::

    inventory position  IP = on_hand + inbound - committed - backordered

(``inbound``: open expected receipts, ``atp._supply``; ``backordered``: units backorders
wait for, demand not yet committed; absent counts 0).
When IP falls to the position's reorder point or below, the script that made the change
raises a signal (``replen_check`` in lua/_lib.lua): a ``replenishment`` event on the
bucket's outbox, with ``suggested_qty = order_up_to - IP``, and an entry in the bucket's
open-signal hash (``{p b}:rp``), listed by :meth:`ReplenishmentMixin.replenishment`. It is
raised once, and not again until IP rises above the reorder point, which clears it
(``replenishment_cleared``); the next fall raises it again.

Levels are set directly (:meth:`~ReplenishmentMixin.set_replenishment`) or planned from
the demand history (:meth:`~ReplenishmentMixin.plan_replenishment`). Demand is recorded
by the reserving script as commitments happen: the units of every accepted reservation
line (held or confirmed) on the UTC day it was made, in the position's ``h:<day>``
fields, today and the :data:`HISTORY_DAYS` days before. It is gross demand: a release or an expiry
does not take it back (the customer asked for it that day).

The plan, per SKU with planning settings (service level ``p``, lead time ``L`` days,
review period ``R`` days, window ``N`` days), over the ``N`` complete days before today,
days without demand counted as 0::

    mu, sigma      mean and sample standard deviation of daily demand
    z              NormalDist().inv_cdf(p)                      (95% -> 1.645)
    safety stock   z * sigma * sqrt(L)
    reorder point  ceil(mu * L + safety stock)
    order-up-to    ceil(mu * (L + R) + z * sigma * sqrt(L + R)), at least the reorder point

(the order-up-to level of a periodic-review (R, S) policy: it covers demand over the lead
time plus one review period, at the same service level). The computed safety stock is
reported; it becomes the position's ATP ``safety_stock`` only with
``apply_safety_stock=True``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ._base import CoreBase
from ._wire import _s
from .errors import InvalidRequest
from .models import check_ident, check_int, ms_to_dt
from .scripts import decode

__all__ = [
    "DAY_MS",
    "HISTORY_DAYS",
    "PlanRow",
    "ReplenishmentLevels",
    "ReplenishmentMixin",
    "ReplenishmentSettings",
    "ReplenishmentSignal",
    "compute_levels",
    "day_of",
    "levels_from",
]

DAY_MS = 86_400_000
HISTORY_DAYS = 120  # HISTORY_DAYS in lua/_lib.lua


def day_of(ms: int) -> int:
    """The UTC day number of a time in ms since the epoch (floor(ms / 86400000))."""
    return ms // DAY_MS


@dataclass(frozen=True, slots=True)
class ReplenishmentSettings:
    """How one SKU's levels are planned.

    :param service_level: the probability of not running out during a lead time, 0 < p < 1.
    :param lead_time_days: days from ordering to receiving, > 0 (fractions allowed).
    :param review_days: days between reviews (the order-up-to level covers them too), >= 0.
    :param window_days: days of demand history the plan uses, 2..HISTORY_DAYS.
    """

    service_level: float
    lead_time_days: float
    review_days: float = 7.0
    window_days: int = 56

    def check(self) -> ReplenishmentSettings:
        def num(v: object, what: str) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InvalidRequest(f"{what} must be a number", field=what)
            return float(v)

        p = num(self.service_level, "service_level")
        if not 0 < p < 1:
            raise InvalidRequest(
                "service_level must be between 0 and 1 (exclusive)", field="service_level"
            )
        lt = num(self.lead_time_days, "lead_time_days")
        if not 0 < lt <= 3650:
            raise InvalidRequest(
                "lead_time_days must be more than 0 and at most 3650", field="lead_time_days"
            )
        r = num(self.review_days, "review_days")
        if not 0 <= r <= 3650:
            raise InvalidRequest("review_days must be from 0 to 3650", field="review_days")
        check_int(self.window_days, "window_days", 2, HISTORY_DAYS)
        return self


@dataclass(frozen=True, slots=True)
class ReplenishmentLevels:
    """A position's reorder point and order-up-to level, and whether a signal is open."""

    sku: str
    location: str
    reorder_point: int | None
    order_up_to: int | None
    signal_open: bool
    signal: str | None = None
    """What this call did to the signal: ``raised``, ``cleared`` or ``None``."""


@dataclass(frozen=True, slots=True)
class ReplenishmentSignal:
    """An open signal: what needs ordering at one position, and how much (figures as they
    stand now; ``raised_*`` as they were when the signal was raised)."""

    sku: str
    location: str
    on_hand: int
    inbound: int
    committed: int
    inventory_position: int
    reorder_point: int
    order_up_to: int
    suggested_qty: int
    raised_at_ms: int
    raised_inventory_position: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["raised_at"] = ms_to_dt(d.pop("raised_at_ms")).isoformat()
        return d


@dataclass(frozen=True, slots=True)
class PlanRow:
    """What the plan computed for one position (and wrote, unless a dry run)."""

    sku: str
    location: str
    days: int
    mean_daily_demand: float
    std_daily_demand: float
    z: float
    safety_stock: float
    reorder_point: int
    order_up_to: int
    applied: bool
    signal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def levels_from(
    mu: float, sigma: float, settings: ReplenishmentSettings
) -> tuple[float, float, int, int]:
    """z, safety stock, reorder point and order-up-to level from the mean and standard
    deviation of daily demand (the formulas of the module docstring)."""
    s = settings.check()
    z = statistics.NormalDist().inv_cdf(s.service_level)
    lt, cover = s.lead_time_days, s.lead_time_days + s.review_days
    ss = z * sigma * math.sqrt(lt)
    rop = max(0, _ceil(mu * lt + ss))
    out = max(rop, _ceil(mu * cover + z * sigma * math.sqrt(cover)))
    return z, ss, rop, out


def compute_levels(
    demand: Sequence[int | float], settings: ReplenishmentSettings
) -> tuple[float, float, float, float, int, int]:
    """Mean, sample standard deviation, z, safety stock, reorder point and order-up-to
    level from a daily demand series, oldest first, days without demand as 0."""
    if len(demand) < 2:
        raise InvalidRequest("the demand history needs at least two days", field="window_days")
    mu = statistics.fmean(demand)
    sigma = statistics.stdev(demand)
    z, ss, rop, out = levels_from(mu, sigma, settings)
    return mu, sigma, z, ss, rop, out


def _ceil(x: float) -> int:
    # 465.80000000000001 is 466, but 12.000000000000002 (float noise) is 12
    return math.ceil(round(x, 9))


class ReplenishmentMixin(CoreBase):
    """Replenishment levels, signals and planning (mixed into :class:`atp.ATP`)."""

    def _replen_keys(self, sku: str, location: str) -> tuple[str, ...]:
        """KEYS of replen_levels.lua: those of set_position (``_cover_keys``)."""
        return self._cover_keys(sku, location)

    async def _levels(
        self, sku: str, location: str, req: dict[str, Any], actor: str, source: str
    ) -> ReplenishmentLevels:
        req = {"sku": sku, "loc": location, "b": self.keys.bucket(sku), **req}
        if "ss" in req:
            await self._with_priorities(req)
        cfg = json.loads(self._cfg(actor, source))
        cfg["risk_max"] = 500
        out = decode(
            await self._call(
                "replen_levels",
                self._replen_keys(sku, location),
                (json.dumps(cfg), json.dumps(req)),
            )
        )
        return ReplenishmentLevels(
            sku, location, out.get("rop"), out.get("out"), bool(out["open"]), out.get("signal")
        )

    async def set_replenishment(
        self,
        sku: str,
        location: str,
        reorder_point: int,
        order_up_to: int,
        *,
        actor: str = "",
        source: str = "",
    ) -> ReplenishmentLevels:
        """Set a position's reorder point and order-up-to level directly; the signal is
        re-evaluated at once (a position already at or below the new reorder point raises
        one now).

        :param reorder_point: whole units, >= 0.
        :param order_up_to: whole units, >= ``reorder_point``.
        :raises UnknownPosition: the position does not exist.
        """
        check_ident(sku, "sku")
        check_ident(location, "location")
        m = self.settings.max_on_hand
        check_int(reorder_point, "reorder_point", 0, m)
        check_int(order_up_to, "order_up_to", 0, m)
        if order_up_to < reorder_point:
            raise InvalidRequest(
                f"order_up_to ({order_up_to}) must be at least reorder_point ({reorder_point})",
                field="order_up_to",
            )
        req = {"rop": reorder_point, "out": order_up_to, "why": "set"}
        return await self._levels(sku, location, req, actor, source)

    async def clear_replenishment(
        self, sku: str, location: str, *, actor: str = "", source: str = ""
    ) -> ReplenishmentLevels:
        """Remove a position's levels; an open signal is cleared."""
        check_ident(sku, "sku")
        check_ident(location, "location")
        return await self._levels(sku, location, {"clear": True, "why": "set"}, actor, source)

    async def replenishment_levels(self, sku: str, location: str) -> ReplenishmentLevels | None:
        """A position's levels, or ``None`` when the position does not exist."""
        check_ident(sku, "sku")
        check_ident(location, "location")
        key = self.keys.position(sku, location).pos
        oh, rop, out, rs = await self.redis.hmget(key, "on_hand", "rop", "out", "rs")
        if oh is None:
            return None
        return ReplenishmentLevels(
            sku,
            location,
            None if rop is None else int(rop),
            None if out is None else int(out),
            _s(rs or "") == "1",
        )

    async def replenishment(
        self, *, limit: int = 100, after: str | None = None, sku: str | None = None
    ) -> list[ReplenishmentSignal]:
        """Open replenishment signals (what needs ordering, and how much), ordered by SKU
        and location, with the positions' current figures.

        Reads every bucket's open-signal hash on each call (one pipelined round trip) and
        the page's positions in a second: fine for the signals a buyer works through.

        :param limit: at most this many (1..1000).
        :param after: ``"<sku>|<location>"`` of the last signal of the previous page.
        :param sku: only this SKU's positions.
        """
        check_int(limit, "limit", 1, 1000)
        if sku is not None:
            check_ident(sku, "sku")
        if after is not None:
            a_sku, bar, a_loc = after.partition("|") if isinstance(after, str) else ("", "", "")
            if not bar:
                raise InvalidRequest("after must be <sku>|<location>", field="after")
            check_ident(a_sku, "after")
            check_ident(a_loc, "after")
        buckets = [self.keys.bucket(sku)] if sku is not None else range(self.keys.buckets)
        pipe = self.redis.pipeline(transaction=False)
        for b in buckets:
            pipe.hgetall(self._bucket_keys(b)[5])
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for flat in await pipe.execute():
            for k, raw in flat.items():
                s, _, loc = _s(k).partition("|")
                if sku is not None and s != sku:
                    continue
                if after is not None and f"{s}|{loc}" <= after:
                    continue
                found[(s, loc)] = json.loads(raw)
        page = sorted(found)[:limit]
        if not page:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for s, loc in page:
            pipe.hmget(
                self.keys.position(s, loc).pos,
                "on_hand",
                "committed",
                "inbound",
                "rop",
                "out",
                "bo",
            )
        out: list[ReplenishmentSignal] = []
        for (s, loc), cur in zip(page, await pipe.execute(), strict=True):
            raised = found[(s, loc)]
            oh, cm, inb = (int(v or 0) for v in cur[:3])
            rop = int(cur[3]) if cur[3] is not None else int(raised["reorder_point"])
            upto = int(cur[4]) if cur[4] is not None else int(raised["order_up_to"])
            ip = oh + inb - cm - int(cur[5] or 0)
            out.append(
                ReplenishmentSignal(
                    s,
                    loc,
                    oh,
                    inb,
                    cm,
                    ip,
                    rop,
                    upto,
                    max(0, upto - ip),
                    int(raised["raised_at"]),
                    int(raised["inventory_position"]),
                )
            )
        return out

    # -- planning --------------------------------------------------------------------------

    async def set_replenishment_settings(
        self, sku: str, settings: ReplenishmentSettings, *, actor: str = "", source: str = ""
    ) -> ReplenishmentSettings:
        """Store how ``sku``'s levels are planned (:meth:`plan_replenishment`)."""
        check_ident(sku, "sku")
        settings.check()
        req = {"sku": sku, "settings": asdict(settings)}
        key = self.keys.replen_settings(self.keys.bucket(sku))
        await self._run("replen_config", (key,), self._cfg(actor, source), req)
        return settings

    async def remove_replenishment_settings(self, sku: str, *, actor: str = "") -> bool:
        """Stop planning ``sku`` (levels already written stay). True when it had settings."""
        check_ident(sku, "sku")
        key = self.keys.replen_settings(self.keys.bucket(sku))
        out = await self._run(
            "replen_config", (key,), self._cfg(actor, ""), {"sku": sku, "remove": True}
        )
        return bool(out["removed"])

    async def replenishment_settings(self, sku: str) -> ReplenishmentSettings | None:
        check_ident(sku, "sku")
        raw = await self.redis.hget(self.keys.replen_settings(self.keys.bucket(sku)), sku)
        return None if raw is None else _settings(json.loads(raw))

    async def demand_history(
        self, sku: str, location: str, *, days: int = 28, end_day: int | None = None
    ) -> list[int]:
        """Units committed per UTC day at a position, oldest first, for the ``days`` days
        ending with ``end_day`` (default: yesterday, the last complete day); 0 for a day
        without demand."""
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_int(days, "days", 1, HISTORY_DAYS)
        end = day_of(await self._now_ms()) - 1 if end_day is None else end_day
        check_int(end, "end_day", 0, 10**7)
        fields = [f"h:{d}" for d in range(end - days + 1, end + 1)]
        vals = await self.redis.hmget(self.keys.position(sku, location).pos, fields)
        return [int(v or 0) for v in vals]

    async def _positions_of(self, skus: Iterable[str] | None) -> list[tuple[str, str]]:
        pat = self.keys.keys_pattern()[:-1] + "pos:*"
        wanted = None if skus is None else set(skus)
        found: set[tuple[str, str]] = set()
        async for raw in self.redis.scan_iter(match=pat, count=1000):
            s, _, loc = _s(raw).split(":pos:", 1)[1].partition("|")
            if wanted is None or s in wanted:
                found.add((s, loc))
        return sorted(found)

    async def plan_replenishment(
        self,
        skus: Sequence[str] | None = None,
        *,
        dry_run: bool = False,
        apply_safety_stock: bool = False,
        end_day: int | None = None,
        actor: str = "",
        source: str = "",
    ) -> list[PlanRow]:
        """Compute and write the reorder point and order-up-to level of every position of
        the SKUs that have planning settings (or of ``skus``: each must have settings),
        from their demand history; see the module docstring for the formulas.

        :param dry_run: compute and report, write nothing.
        :param apply_safety_stock: also set each position's ATP safety stock to the
            computed one (rounded up); by default ATP is left alone.
        :param end_day: the last day of the window (UTC day number); default yesterday.
        """
        if skus is not None:
            skus = [check_ident(s, "sku") for s in skus]
        pipe = self.redis.pipeline(transaction=False)
        buckets = (
            sorted({self.keys.bucket(s) for s in skus})
            if skus is not None
            else range(self.keys.buckets)
        )
        for b in buckets:
            pipe.hgetall(self.keys.replen_settings(b))
        conf: dict[str, ReplenishmentSettings] = {}
        for flat in await pipe.execute():
            for k, raw in flat.items():
                conf[_s(k)] = _settings(json.loads(raw))
        if skus is not None:
            missing = [s for s in skus if s not in conf]
            if missing:
                raise InvalidRequest(
                    f"no replenishment settings for {', '.join(missing[:5])}", field="sku"
                )
            conf = {s: conf[s] for s in skus}
        if not conf:
            return []
        end = day_of(await self._now_ms()) - 1 if end_day is None else end_day
        rows: list[PlanRow] = []
        for sku, loc in await self._positions_of(conf):
            st = conf[sku]
            hist = await self.demand_history(sku, loc, days=st.window_days, end_day=end)
            mu, sigma, z, ss, rop, out = compute_levels(hist, st)
            signal = None
            if not dry_run:
                req: dict[str, Any] = {"rop": rop, "out": out, "why": "plan"}
                if apply_safety_stock:
                    req["ss"] = _ceil(ss)
                signal = (await self._levels(sku, loc, req, actor, source)).signal
            rows.append(
                PlanRow(sku, loc, len(hist), mu, sigma, z, ss, rop, out, not dry_run, signal)
            )
        return rows


def _settings(d: dict[str, Any]) -> ReplenishmentSettings:
    return ReplenishmentSettings(
        float(d["service_level"]),
        float(d["lead_time_days"]),
        float(d.get("review_days", 0)),
        int(d["window_days"]),
    )
