"""The core's wire formats: the JSON the scripts take (written by hand on the reserve hot
path, byte for byte what ``json`` would write: tests/test_reserve_wire.py) and the decoding
of their replies into the typed results of ``atp.models``."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from functools import lru_cache
from typing import Any, cast

from .errors import (
    InvalidRequest,
)
from .models import (
    Movement,
    Position,
    Reservation,
    ReservationLine,
    Status,
    check_reservation_id,
    date_of,
    ms_to_dt,
)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


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
    rd: int | None = None,
    backorder: bool = False,
) -> str:
    """``_dumps([channel, hold, lines])`` (plus ``{"cu","rg","sp"[,"rd"][,"bo"]}`` when the
    request gives a customer, region, split choice, requested day or asks to be
    backordered): what a reserve request's fingerprint hashes. A routed line's location
    is ``""``."""
    body = ",".join([f'["{sku}","{loc}",{qty:d}]' for sku, loc, qty in lines])
    if customer is None and region is None and split is None and rd is None and not backorder:
        return f'["{channel}",{hold:d},[{body}]]'
    eo: dict[str, Any] = {"cu": customer, "rg": region, "sp": split}
    if rd is not None:
        eo["rd"] = rd
    if backorder:
        eo["bo"] = True
    extra = _dumps(eo)
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
    rd: int | None = None,
    pp: int = 0,
    backorder: bool = False,
) -> str:
    """``_dumps`` of reserve.lua's ``req``: {id, ch, hold, fp, idx, home, rv, [cu], [rd],
    [pp], [bo], parts: [{b, n, [c], lines: [{sku, loc | locs+split, qty, [pr], [cap],
    [bl]}]}]}, in that key order."""
    mid, tail = _reserve_req_around(
        channel, hold_ms, fp, rv, customer, specs, idx=idx, rd=rd, pp=pp, backorder=backorder
    )
    return f'{{"id":"{rid}",{mid}{home:d}{tail}'


def _reserve_req_around(
    channel: str,
    hold_ms: int,
    fp: str,
    rv: int,
    customer: str | None,
    specs: dict[int, list[_Spec]],
    *,
    idx: bool = True,
    rd: int | None = None,
    pp: int = 0,
    backorder: bool = False,
) -> tuple[str, str]:
    """The text of ``_reserve_req_json`` around its two per-call values, the reservation id
    and its home bucket: what follows ``{"id":"<id>",`` up to the home bucket, and what
    follows it. Everything else is the same for every call with the same request."""
    ps = ",".join([_part_json(b, sp) for b, sp in specs.items()])
    cu = "" if customer is None else f',"cu":"{customer}"'
    if rd is not None:
        cu += f',"rd":{rd:d}'
    if pp:
        cu += f',"pp":{pp:d}'
    if backorder:
        cu += ',"bo":true'
    return (
        f'"ch":"{channel}","hold":{hold_ms:d},"fp":"{fp}",'
        f'"idx":{"true" if idx else "false"},"home":',
        f',"rv":{rv:d}{cu},"parts":[{ps}]}}',
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
    p: dict[str, Any] = {
        "on_hand": 0, "committed": 0, "safety_stock": 0, "inbound": 0, "dated": 0, "bo": 0,
        "ch": {},
    }  # fmt: skip
    for f, v in flat.items():
        name = _s(f)
        if name.startswith("ch:"):
            p["ch"][name[3:]] = int(v)
        elif name in _POS_FIGURES:
            p[name] = int(v)
    return p


_POS_FIGURES = frozenset({"on_hand", "committed", "safety_stock", "inbound", "dated", "bo"})
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
        in_transit=int(p.get("inbound", 0)),
        committed_dated=int(p.get("dated", 0)),
        backordered=int(p.get("bo", 0)),
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
    lines: tuple[ReservationLine, ...] | None = None,
) -> Reservation:
    """A reservation just taken: the script answers its status, times and rules version,
    and the lines as taken only when it routed one; otherwise they are the request's (in
    the order of its parts), ``lines`` when the caller has them already."""
    created = _created_dt(out["cr"])
    taken = out.get("lines")
    if taken is not None:
        lines = tuple([ReservationLine(sku, loc, qty) for sku, loc, qty in taken])
    elif lines is None:
        lines = tuple([ReservationLine(sp[0], sp[1], sp[2]) for sl in specs.values() for sp in sl])  # type: ignore[arg-type]
    ex = out["ex"]
    st = out["st"]
    return Reservation(
        id=rid,
        channel=channel,
        status=cast(Status, st),
        lines=lines,
        created_at=created,
        expires_at=ms_to_dt(ex) if ex else None,
        updated_at=created,
        customer_id=customer,
        rules_version=int(out.get("rv", 0)),
        requested_date=date_of(out["rd"]) if out.get("rd") is not None else None,
        backordered=st == "backordered",
    )


# the calls of one batch were taken in the same millisecond, mostly: one datetime for them
_created_dt = lru_cache(maxsize=64)(ms_to_dt)


def _original(current: Reservation, hold_seconds: int) -> Reservation:
    """The outcome a reserve call first returned, rebuilt for its replay (I3): the request
    is the same (the fingerprint matched), so its lines, status and expiry are known."""
    return Reservation(
        id=current.id,
        channel=current.channel,
        status="backordered" if current.backordered else "held" if hold_seconds else "confirmed",
        lines=tuple(ReservationLine(ln.sku, ln.location, ln.qty) for ln in current.lines),
        created_at=current.created_at,
        expires_at=current.created_at + timedelta(seconds=hold_seconds) if hold_seconds else None,
        updated_at=current.created_at,
        replayed=True,
        customer_id=current.customer_id,
        rules_version=current.rules_version,
        requested_date=current.requested_date,
        backordered=current.backordered,
    )


_STATUS_ORDER = ("expired", "backordered", "held", "confirmed", "released", "fulfilled")


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
        requested_date=date_of(first["rd"]) if first.get("rd") is not None else None,
        backordered="bq" in first,
        filled_at=ms_to_dt(first["fl"]) if first.get("fl") else None,
    )
