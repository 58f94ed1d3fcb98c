"""Cluster routing. On one server a reservation call is one script over every part
(atomic, I4). On a cluster the parts live in different slots, so the same scripts run once
per part and the index entry is written around them: a journal ("pending") before, "done"
after. A refused part rolls back the parts already taken before the call returns."""

from __future__ import annotations

import json
from typing import Any

from ._allocation import AllocationMixin
from ._wire import (
    _dumps,
    _fresh,
    _merged_status,
    _original,
    _part_lines,
    _reservation,
    _reserve_req_json,
    _Spec,
)
from .errors import (
    ATPError,
    HoldExpired,
    IdempotencyConflict,
    OverFulfil,
    UnknownLine,
)
from .models import (
    Reservation,
)
from .scripts import decode


class ClusterMixin(AllocationMixin):
    """Reservation calls part by part on a Redis Cluster (see the module docstring)."""

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
        rd: int | None = None,
        pp: int = 0,
        backorder: bool = False,
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
                rid,
                channel,
                hold * 1000,
                fp,
                home,
                rv,
                customer,
                {b: sl},
                idx=False,
                rd=rd,
                pp=pp,
                backorder=backorder,
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
        if any(o.get("st") == "backordered" for o in outs):  # one part: it waits in its queue
            out["st"] = "backordered"
        if rd is not None:  # as the scripts took it (a past day is today)
            out["rd"] = max(o.get("rd", rd) for o in outs)
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
        per_line = len(self._line_keys("-", "-"))
        for p in req["parts"]:
            # the part's bucket keys, then its lines' keys (agg and the position's keys)
            n = len(self._bucket_keys(p["b"])) + per_line * p["n"]
            pkeys = keys[k : k + n]
            k += n
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
