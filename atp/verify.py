"""Checking the whole book against the invariants, on a live server.

:func:`verify` reads every position, reservation part, index entry and movement log of a
deployment (SCAN, so it never blocks the server) and checks:

* **I1** ``committed <= on_hand - safety_stock`` on every position, in its time-phased
  form where reservations carry a requested date: at the now point (the shelf, against
  the undated commitments) and at every day of the schedule (on hand + inbound due by
  then against everything due by then), :func:`least_slack` (``allow_uncovered`` lists
  positions a short pick or a count left uncovered on purpose: they are reported, not
  failed);
* the dated schedule balances: ``dated`` and each ``-<day>`` entry equal the open units of
  live reservations for that day; ``inbound`` and each ``<day>`` entry equal the open
  expected receipts due that day;
* each position's backorder queue lists exactly its backordered reservations (which hold
  no committed units), and ``bo`` and ``bp:<priority>`` add up to them;
* **I2** ``committed`` equals the open units of the live reservation lines on the
  position, per channel too; terminal reservations hold no open units; each SKU's totals
  over its locations (per channel, for caps; per customer, for buyer limits) equal its
  reservations' open units; each position's live index (the shortage rule walks it)
  lists exactly its live reservations;
* **I5** each position's movement log chains (every entry starts where the one before
  ended) and ends at the position's current figures;
* every index entry points at parts that exist, and every part at its index entry;
* each bucket's unit totals (committed, held) equal its reservations' open units;
* each open replenishment signal (``{p b}:rp``) belongs to a position whose signal flag is
  set, and the other way round (atp.replenishment).

Fields of a position hash named ``<x>:…`` other than ``ch:`` (demand history ``h:``, and
what other features keep there) are not figures of the position and are not read.

It is what the tests, ``atp verify`` (and ``GET /v1/verify``) and the load tests use to
prove the book balances. Served, it shares the event loop with the other requests: every
Redis call yields it, and the loops over what was read give it back every
:data:`_YIELD_EVERY` items, so a big book slows the check, not the other requests.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UnknownReservation
from .store import ATP

__all__ = ["VerifyReport", "check_acknowledged", "verify"]

_YIELD_EVERY = 2000  # items of pure-Python work between yields to the event loop (~1 ms)


@dataclass
class VerifyReport:
    positions: int = 0
    reservations: int = 0
    movements: int = 0
    problems: list[str] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"FAILED ({len(self.problems)} problems)"
        return (
            f"{verdict}: {self.positions} positions, {self.reservations} reservation parts, "
            f"{self.movements} movements checked; {len(self.uncovered)} uncovered positions"
        )


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def verify(
    atp: ATP, *, check_log: bool = True, allow_uncovered: bool = False, max_problems: int = 200
) -> VerifyReport:
    """Check I1, I2 and I5 over the whole deployment; see the module docstring."""
    r = atp.redis
    ks = atp.keys
    rep = VerifyReport()

    def problem(msg: str) -> None:
        if len(rep.problems) < max_problems:
            rep.problems.append(msg)

    t = await r.time()
    today = (int(t[0]) * 1000 + int(t[1]) // 1000) // 86_400_000
    waiting: dict[tuple[str, str], set[str]] = defaultdict(set)
    waiting_prio: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    open_pos: dict[tuple[str, str], int] = defaultdict(int)
    open_rd: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    open_ch: dict[tuple[str, str, str], int] = defaultdict(int)
    sku_tot: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    live_ix: dict[tuple[str, str], set[str]] = defaultdict(set)
    parts_seen: dict[str, set[int]] = defaultdict(set)
    for b in range(ks.buckets):
        bk = ks.bucket_keys(b)
        b_committed = b_held = 0
        async for rid_raw, raw in r.hscan_iter(bk.res, count=500):
            rid = _s(rid_raw)
            rec = json.loads(raw)
            rep.reservations += 1
            parts_seen[rid].add(b)
            if rec["st"] == "backordered":  # waits in its position's queue, holds nothing
                (ln,) = rec["lines"]
                waiting[(ln["sku"], ln["loc"])].add(f"{ln['qty']}:{rid}")
                waiting_prio[(ln["sku"], ln["loc"])][f"bp:{rec['bq'][0]}"] += ln["qty"]
                continue
            for ln in rec["lines"]:
                if ks.bucket(ln["sku"]) != b:
                    problem(f"{rid}: line {ln['sku']} filed in bucket {b}")
                o = ln["qty"] - ln["shipped"] - ln["released"]
                if o < 0 or ln["shipped"] < 0 or ln["released"] < 0:
                    problem(f"{rid}: line {ln['sku']}@{ln['loc']} has negative figures {ln}")
                if rec["st"] in ("released", "fulfilled") and o != 0:
                    problem(f"{rid}: {rec['st']} but {o} units still open on {ln['sku']}")
                open_pos[(ln["sku"], ln["loc"])] += o
                open_ch[(ln["sku"], ln["loc"], rec["ch"])] += o
                if o and rec.get("rd") is not None:
                    open_rd[(ln["sku"], ln["loc"])][int(rec["rd"])] += o
                if o:
                    sku_tot[ln["sku"]][f"ch:{rec['ch']}"] += o
                    if rec.get("cu"):
                        sku_tot[ln["sku"]][f"cu:{rec['cu']}"] += o
                    live_ix[(ln["sku"], ln["loc"])].add(_lx_member(rec))
                b_committed += o
                if rec["st"] in ("held", "expired"):
                    b_held += o
        stats = {_s(k): int(v) for k, v in (await r.hgetall(bk.stats)).items()}
        if (stats.get("committed", 0), stats.get("held", 0)) != (b_committed, b_held):
            problem(
                f"bucket {b}: totals say committed {stats.get('committed', 0)}, held "
                f"{stats.get('held', 0)}; its reservations hold {b_committed}, {b_held} on hold"
            )

    index: dict[str, set[int]] = {}
    for b in range(ks.buckets):
        async for rid_raw, raw in r.hscan_iter(f"{ks.tag(b)}:rix", count=500):
            rid = _s(rid_raw)
            index[rid] = {p["b"] for p in json.loads(raw)["parts"]}
            if ks.bucket(rid) != b:
                problem(f"index entry {rid} is in bucket {b}, not its home")
    for i, (rid, buckets) in enumerate(index.items()):
        if i % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)
        if parts_seen.get(rid, set()) != buckets:
            problem(
                f"{rid}: index names parts {sorted(buckets)}, "
                f"found {sorted(parts_seen.get(rid, set()))}"
            )
    for rid in parts_seen.keys() - index.keys():
        problem(f"{rid}: parts without an index entry")

    open_signals: set[tuple[str, str]] = set()
    for b in range(ks.buckets):
        async for member, _ in r.hscan_iter(ks.bucket_keys(b).rp, count=500):
            s, _, loc = _s(member).partition("|")
            open_signals.add((s, loc))
    seen_pos: set[tuple[str, str]] = set()
    async for key_raw in r.scan_iter(match=f"{ks.keys_pattern()[:-1]}pos:*", count=1000):
        key = _s(key_raw)
        sku, _, loc = key.split(":pos:", 1)[1].partition("|")
        seen_pos.add((sku, loc))
        rep.positions += 1
        raw_pos = {_s(k): v for k, v in (await r.hgetall(key)).items()}
        if (_s(raw_pos.get("rs", b"")) == "1") != ((sku, loc) in open_signals):
            problem(
                f"{sku}@{loc}: signal flag {_s(raw_pos.get('rs', b'')) or 'unset'} but "
                f"{'listed' if (sku, loc) in open_signals else 'not listed'} as an open signal"
            )
        open_signals.discard((sku, loc))
        flat = {
            k: int(v) for k, v in raw_pos.items() if k in _FIGURES or k.startswith(("ch:", "bp:"))
        }
        oh, cm, ss = flat.get("on_hand", 0), flat.get("committed", 0), flat.get("safety_stock", 0)
        pk = ks.position(sku, loc)
        sch = {_s(k): int(v) for k, v in (await r.hgetall(pk.sch)).items()}
        _check_schedule(sku, loc, flat, sch, open_rd.get((sku, loc), {}), problem)
        await _check_inbound(atp, sku, loc, flat.get("inbound", 0), sch, problem)
        if oh < 0 or cm < 0:
            problem(f"{sku}@{loc}: on_hand {oh}, committed {cm}")
        if cm != open_pos.get((sku, loc), 0):
            problem(
                f"{sku}@{loc}: committed {cm} but live reservations hold "
                f"{open_pos.get((sku, loc), 0)} (I2)"
            )
        for f, v in flat.items():
            if f.startswith("ch:") and v != open_ch.get((sku, loc, f[3:]), 0):
                problem(
                    f"{sku}@{loc}: channel {f[3:]} committed {v} but its reservations hold "
                    f"{open_ch.get((sku, loc, f[3:]), 0)} (I2)"
                )
        slack = least_slack(oh, cm, flat.get("dated", 0), sch, today)
        if slack < ss:
            rep.uncovered.append(f"{sku}@{loc}")
            if not allow_uncovered:
                problem(
                    f"{sku}@{loc}: committed {cm} (dated {flat.get('dated', 0)}) not covered: "
                    f"least slack {slack} < safety_stock {ss} (I1)"
                )
        queue = {_s(m) for m in await r.zrange(pk.bq, 0, -1)}
        want_q = waiting.get((sku, loc), set())
        if queue != want_q:
            problem(
                f"{sku}@{loc}: backorder queue has {sorted(queue - want_q)[:5]} too many and "
                f"{sorted(want_q - queue)[:5]} missing"
            )
        bp = {f: v for f, v in flat.items() if f.startswith("bp:") and v}
        want_bp = {f: v for f, v in waiting_prio.get((sku, loc), {}).items() if v}
        if bp != want_bp or flat.get("bo", 0) != sum(want_bp.values()):
            problem(
                f"{sku}@{loc}: backordered {flat.get('bo', 0)} by priority {bp}, but the "
                f"backorders wait for {want_bp}"
            )
        ix = {_s(m) for m in await r.zrange(ks.position(sku, loc).lx, 0, -1)}
        if ix != live_ix.get((sku, loc), set()):
            want = live_ix.get((sku, loc), set())
            problem(
                f"{sku}@{loc}: live index has {sorted(ix - want)[:5]} too many and "
                f"{sorted(want - ix)[:5]} missing"
            )
        if check_log:
            await _check_log(atp, sku, loc, oh, cm, rep, problem)
    for sku, loc in sorted(open_signals)[:20]:
        problem(f"{sku}@{loc}: an open replenishment signal for a position that does not exist")
    for i, ((sku, loc), o) in enumerate(open_pos.items()):
        if i % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)
        if o and (sku, loc) not in seen_pos:
            problem(f"{sku}@{loc}: reservations hold {o} units of a position that does not exist")
    seen_sku: set[str] = set()
    async for key_raw in r.scan_iter(match=f"{ks.keys_pattern()[:-1]}sku:*", count=1000):
        sku = _s(key_raw).split(":sku:", 1)[1]
        seen_sku.add(sku)
        got = {_s(k): int(v) for k, v in (await r.hgetall(key_raw)).items()}
        held = {k: v for k, v in sku_tot.get(sku, {}).items() if v}
        if got != held:
            bad = sorted(k for k in got.keys() | held.keys() if got.get(k, 0) != held.get(k, 0))
            problem(
                f"{sku}: SKU totals {[(k, got.get(k, 0)) for k in bad[:5]]} but its "
                f"reservations hold {[(k, held.get(k, 0)) for k in bad[:5]]} (I2)"
            )
    for i, (sku, tot) in enumerate(sku_tot.items()):
        if i % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)
        if sku not in seen_sku and any(tot.values()):
            problem(f"{sku}: reservations hold units but the SKU has no totals (I2)")
    return rep


_FIGURES = frozenset({"on_hand", "committed", "safety_stock", "inbound", "dated", "bo"})


def least_slack(
    on_hand: int, committed: int, dated: int, sch: Mapping[str, int], today: int
) -> int:
    """The least of supply - commitments over a position's points in time (written apart
    from lua/_lib.lua's phased_points, as a check of it): the now point (on hand against
    the undated commitments) and each day of the schedule, days before ``today`` taken as
    today (on hand + inbound due by then against everything due by then). Without dated
    commitments it is ``on_hand - committed``."""
    if dated == 0:
        return on_hand - committed
    by_day: dict[int, int] = defaultdict(int)
    for f, v in sch.items():  # "<day>": inbound due, "-<day>": promised for that day
        day = int(f)
        by_day[max(abs(day), today)] += v if day > 0 else -v
    least = cur = on_hand - (committed - dated)
    for d in sorted(by_day):
        cur += by_day[d]
        least = min(least, cur)
    return least


def _check_schedule(
    sku: str,
    loc: str,
    flat: Mapping[str, int],
    sch: Mapping[str, int],
    open_rd: Mapping[int, int],
    problem: Any,
) -> None:
    dated = {-int(f): v for f, v in sch.items() if int(f) < 0}
    want = {d: u for d, u in open_rd.items() if u}
    if dated != want:
        problem(f"{sku}@{loc}: dated schedule {dated} but dated reservations hold {want} (I2)")
    if flat.get("dated", 0) != sum(want.values()):
        problem(
            f"{sku}@{loc}: dated {flat.get('dated', 0)} but dated reservations hold "
            f"{sum(want.values())} (I2)"
        )
    if any(v <= 0 for v in sch.values()):
        problem(f"{sku}@{loc}: schedule holds zero or negative entries {dict(sch)}")


async def _check_inbound(
    atp: ATP, sku: str, loc: str, inbound: int, sch: Mapping[str, int], problem: Any
) -> None:
    due: dict[int, int] = defaultdict(int)
    for e in await atp.inbound(sku, loc):  # the open ones
        if e.qty <= 0:
            problem(f"{sku}@{loc}: expected receipt {e.reference} is open with {e.qty} units")
        due[e.expected_date.toordinal() - _EPOCH_ORDINAL] += e.qty
    got = {int(f): v for f, v in sch.items() if int(f) > 0}
    if got != dict(due) or inbound != sum(due.values()):
        problem(
            f"{sku}@{loc}: inbound {inbound} and schedule {got} but open expected receipts "
            f"are due {dict(due)}"
        )


_EPOCH_ORDINAL = 719_163  # date(1970, 1, 1).toordinal()


def _lx_member(rec: dict[str, Any]) -> str:
    """The live index member of a reservation part (``lx_member`` in lua/_lib.lua)."""
    flag = "0" if rec["st"] in ("held", "expired") else "1"
    return f"{rec['ch']}:{flag}:{9999999999999 - int(rec['cr']):013d}:{rec['id']}"


async def _check_log(
    atp: ATP, sku: str, loc: str, oh: int, cm: int, rep: VerifyReport, problem: Any
) -> None:
    key = atp.keys.position(sku, loc).log
    prev: tuple[int, int] | None = None
    last = "-"
    first = True
    while True:
        rows = await atp.redis.xrange(key, last if first else f"({last}", "+", count=1000)
        first = False
        if not rows:
            break
        for mid, fields in rows:
            f = {_s(k): _s(v) for k, v in (fields or {}).items()}
            rep.movements += 1
            before = (int(f["on_hand_before"]), int(f["committed_before"]))
            after = (int(f["on_hand_after"]), int(f["committed_after"]))
            if prev is not None and before != prev:
                problem(
                    f"{sku}@{loc}: movement {_s(mid)} starts at {before}, "
                    f"previous ended at {prev} (I5)"
                )
            prev = after
            last = _s(mid)
    if prev is not None and prev != (oh, cm):
        problem(f"{sku}@{loc}: log ends at {prev}, position is {(oh, cm)} (I5)")
    if prev is None and (oh or cm):
        problem(f"{sku}@{loc}: position {(oh, cm)} has no movement log (I5)")


async def check_acknowledged(
    atp: ATP, acks: Iterable[Mapping[str, Any]], *, max_problems: int = 200
) -> tuple[int, list[str]]:
    """Check what clients were told against the book: every acknowledged reservation
    (``{"reservation_id": …, "qty": …}``, qty the units over all its lines, as a load test
    records them) is present, once, with that quantity. Returns how many were checked and
    the problems found.
    """
    want: dict[str, int] = {}
    problems: list[str] = []

    def problem(msg: str) -> None:
        if len(problems) < max_problems:
            problems.append(msg)

    for n, a in enumerate(acks, start=1):
        rid, qty = a.get("reservation_id"), a.get("qty")
        if not isinstance(rid, str) or not isinstance(qty, int) or isinstance(qty, bool):
            problem(f"acknowledgement {n}: needs reservation_id and a whole qty, got {a!r:.80}")
            continue
        if rid in want and want[rid] != qty:
            problem(f"{rid}: acknowledged twice, with {want[rid]} and {qty} units")
        want[rid] = qty

    async def one(rid: str, qty: int) -> None:
        try:
            res = await atp.reservation(rid)
        except UnknownReservation:
            problem(f"{rid}: acknowledged ({qty} units) but not in the book")
            return
        held = sum(ln.qty for ln in res.lines)
        if held != qty:
            problem(f"{rid}: acknowledged {qty} units, the book has {held}")

    items = list(want.items())
    for i in range(0, len(items), 256):  # auto-pipelined, a bounded number at a time
        await asyncio.gather(*(one(rid, qty) for rid, qty in items[i : i + 256]))
    return len(items), problems
