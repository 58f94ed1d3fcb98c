"""Allocation rules at work (atp.rules has the document): applying a version, resolving a
reserve line under the rules in force (protections, cap, buyer limit, routing), and
explaining ATP with the same figures the reserving script uses (lua/explain.lua)."""

from __future__ import annotations

import json
import time
from datetime import date
from typing import Any

from ._base import _RULES_KEEP, _RULES_TRIES, CoreBase
from ._wire import (
    _dumps,
    _Spec,
)
from .errors import (
    NoRoute,
    RulesStale,
)
from .models import (
    Explanation,
    HoldSoon,
    Promise,
    ScheduleDay,
    check_channel,
    check_customer,
    check_date,
    check_ident,
    check_int,
    check_text,
    date_of,
    day_of,
    ms_to_dt,
)
from .rules import Rules, RulesDocument, document_json, parse_rules, rules_from_stored


class AllocationMixin(CoreBase):
    """Rules, routing and explain (see the module docstring)."""

    async def explain(
        self,
        sku: str,
        location: str,
        channel: str,
        *,
        customer_id: str | None = None,
        soon_seconds: int = 300,
        requested_date: date | None = None,
        qty: int | None = None,
    ) -> Explanation | None:
        """Why ATP is what it is for ``channel`` at one position: the breakdown the
        reserving script decides with (see :class:`~atp.models.Explanation`). ``None``
        when the position does not exist.

        :param customer_id: also show the buyer limit left for this customer.
        :param soon_seconds: list holds that expire within this many seconds (1..86400).
        :param requested_date: ATP for a reservation wanted on that date (time-phased);
            ``None``: now.
        :param qty: also answer the earliest date ``qty`` could be promised.
        """
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_channel(channel)
        if customer_id is not None:
            check_customer(customer_id)
        check_int(soon_seconds, "soon_seconds", 1, 86_400)
        rd = (
            None if requested_date is None else day_of(check_date(requested_date, "requested_date"))
        )
        if qty is not None:
            check_int(qty, "qty", 1, self.settings.max_line_qty)
        (r,) = await self._explain(
            [(sku, location)], channel, customer_id, soon_ms=soon_seconds * 1000, rd=rd, qty=qty
        )
        if not r["exists"]:
            return None
        rv = r.pop("rv")
        sched = r.get("schedule") or []
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
            in_transit=int(r.get("inbound", 0)),
            committed_dated=int(r.get("dated", 0)),
            requested_date=date_of(r["requested_day"])
            if r.get("requested_day") is not None
            else None,
            schedule=tuple(
                ScheduleDay(date_of(d["day"]), int(d["inbound"]), int(d["dated"]), int(d["atp"]))
                for d in (sched if isinstance(sched, list) else [])
            ),
            promise_date=date_of(r["promise_day"]) if r.get("promise_day") is not None else None,
            promise_blocked_by=r.get("promise_blocked_by"),
            backorders_ahead=int(r.get("backorders_ahead", 0)),
            backordered=int(r.get("backordered", 0)),
        )

    async def promise(
        self,
        sku: str,
        location: str,
        channel: str,
        qty: int,
        *,
        customer_id: str | None = None,
    ) -> Promise:
        """The earliest date (UTC, today or later) a reservation of ``qty`` for ``channel``
        at this position would be accepted now: from on hand, the inbound schedule, what is
        promised already (dated or not), safety stock, other channels' protections, the
        channel's cap and the buyer limit, decided as reserve decides (lua/explain.lua).
        ``promise_date`` is ``None`` when no date of the known schedule gives it
        (``blocked_by`` says when a cap or buyer limit, not supply, is the reason)."""
        check_ident(sku, "sku")
        check_ident(location, "location")
        check_channel(channel)
        if customer_id is not None:
            check_customer(customer_id)
        check_int(qty, "qty", 1, self.settings.max_line_qty)
        (r,) = await self._explain([(sku, location)], channel, customer_id, brief=True, qty=qty)
        if not r["exists"]:
            return Promise(sku, location, channel, qty, None, 0, None, exists=False)
        pd = r.get("promise_day")
        return Promise(
            sku,
            location,
            channel,
            qty,
            date_of(pd) if pd is not None else None,
            int(r["atp"]),
            r.get("promise_blocked_by"),
        )

    async def _explain(
        self,
        pairs: list[tuple[str, str]],
        channel: str,
        customer_id: str | None,
        *,
        brief: bool = False,
        soon_ms: int = 300_000,
        rd: int | None = None,
        qty: int | None = None,
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
                    lk = self._line_keys(sku, loc)  # agg, pos, hx, log, lx, sch, bq
                    bk = self._bucket_keys(b)  # res, holds, events, stats, exc
                    keys += (bk[3], bk[0], lk[1], lk[2], lk[0], lk[5])
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
                if rd is not None:
                    req["rd"] = rd
                if rules.version and rules.priority(channel):
                    req["pp"] = rules.priority(channel)
                if qty is not None:
                    req["qty"] = qty
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
        await self.restamp_backorders()
        return rules

    async def restamp_backorders(self) -> int:
        """Bring every waiting backorder under the rules in force (lua/bo_restamp.lua): the
        other channels' protections at its position, its channel's cap, the buyer limit and
        its channel's priority (its place in the queue). Until it is re-stamped, a backorder
        stamped with an earlier version waits and holds the queue behind it, so none is
        filled by rules no longer in force. ``apply_rules`` calls this; so does the worker
        when it starts (an apply interrupted before it finished). Walks every bucket's
        reservations once (HSCAN). Returns how many were re-stamped."""
        rules = await self.rules(max_age=0)
        cfg = self._cfg("rules", "")
        done = 0
        for b in range(self.keys.buckets):
            bk = self._bucket_keys(b)
            async for rid_raw, raw in self.redis.hscan_iter(bk[0], count=500):
                rec = json.loads(raw)
                if rec.get("st") != "backordered" or rec.get("rv", 0) == rules.version:
                    continue
                rid = rid_raw.decode() if isinstance(rid_raw, bytes) else str(rid_raw)
                (ln,) = rec["lines"]
                sku, loc, ch = ln["sku"], ln["loc"], rec["ch"]
                req: dict[str, Any] = {"id": rid, "rv": rules.version, "pp": 0}
                if rules.version:
                    req["pp"] = rules.priority(ch)
                    pr = _others(rules.protections(sku, loc), ch)
                    if pr:
                        req["pr"] = [list(gp) for gp in pr]
                    cap, bl = rules.cap(sku, ch), rules.buyer_limit(sku)
                    if cap is not None:
                        req["cap"] = cap
                    if bl is not None:
                        req["bl"] = bl
                keys = [*bk, *self._line_keys(sku, loc)]
                try:
                    out = await self._run("bo_restamp", keys, cfg, req)
                except RulesStale:  # another apply went by: that one re-stamps it
                    continue
                done += int(out["restamped"])
        return done

    async def rules_version(self, version: int) -> Rules | None:
        """An earlier (or the current) rules version as it was applied, or ``None`` when it
        is not kept (the last 100 are)."""
        check_int(version, "version", 1, 10**15)
        raw = await self.redis.hget(self.keys.rules_history(), str(version))
        if raw is None:
            return None
        h = json.loads(raw)
        return rules_from_stored(version, h["doc"], int(h["at"]), h.get("actor", ""))

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


def _others(protections: tuple[tuple[str, int], ...], channel: str) -> tuple[tuple[str, int], ...]:
    """Protections of the channels other than ``channel`` (its own never limit it)."""
    if not any(g == channel for g, _ in protections):
        return protections
    return tuple([(g, q) for g, q in protections if g != channel])


def _int_map(m: Any) -> dict[str, int]:
    # an empty Lua table comes back as [] from cjson
    return {str(k): int(v) for k, v in m.items()} if isinstance(m, dict) else {}
