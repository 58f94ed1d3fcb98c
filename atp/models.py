"""Typed values the core takes and returns, and the validation of identifiers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from .errors import InvalidRequest

__all__ = [
    "IDENT_RE",
    "Availability",
    "CountResult",
    "CountRow",
    "ExceptionRecord",
    "ExpireResult",
    "Explanation",
    "FulfilLine",
    "Line",
    "Movement",
    "Position",
    "Reservation",
    "ReservationLine",
    "Status",
]

# SKUs and locations: ASCII letters, digits and . _ - (they are URL path segments);
# no '{', '}' or '|' (see atp.keys).
IDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")
CHANNEL_RE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,31}")
RESERVATION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
# customer ids (buyer limits) may be emails; still nothing JSON would escape
CUSTOMER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,127}")
REGION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,31}")

Status = Literal["held", "confirmed", "fulfilled", "released", "expired", "backordered"]


def check_ident(value: object, what: str) -> str:
    if not isinstance(value, str) or not IDENT_RE.fullmatch(value):
        raise InvalidRequest(
            f"{what} must be 1-64 ASCII letters, digits or . _ - (starting with a letter "
            f"or digit), got {value!r:.80}",
            field=what,
        )
    return value


def check_channel(value: object) -> str:
    if not isinstance(value, str) or not CHANNEL_RE.fullmatch(value):
        raise InvalidRequest(
            f"channel must be 1-32 lowercase letters, digits, _ or -, got {value!r:.80}",
            field="channel",
        )
    return value


def check_reservation_id(value: object) -> str:
    if not isinstance(value, str) or not RESERVATION_ID_RE.fullmatch(value):
        raise InvalidRequest(
            "reservation_id must be 1-128 ASCII letters, digits or . _ : - (starting with a "
            f"letter or digit), got {value!r:.80}",
            field="reservation_id",
        )
    return value


def check_customer(value: object) -> str:
    if not isinstance(value, str) or not CUSTOMER_RE.fullmatch(value):
        raise InvalidRequest(
            "customer_id must be 1-128 ASCII letters, digits or . _ : @ + - (starting with a "
            f"letter or digit), got {value!r:.80}",
            field="customer_id",
        )
    return value


def check_region(value: object) -> str:
    if not isinstance(value, str) or not REGION_RE.fullmatch(value):
        raise InvalidRequest(
            f"region must be 1-32 ASCII letters, digits, _ or -, got {value!r:.80}",
            field="region",
        )
    return value


def check_int(value: object, what: str, lo: int, hi: int) -> int:
    # bool is an int subclass; True is not a quantity
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidRequest(
            f"{what} must be a whole number from {lo} to {hi}, got {value!r:.40}", field=what
        )
    return value


def check_text(value: object, what: str, maxlen: int = 200, required: bool = True) -> str:
    if value is None and not required:
        return ""
    # the scripts count bytes, so the limit is in UTF-8 bytes here too
    if (
        not isinstance(value, str)
        or len(value.encode()) > maxlen
        or (required and not value.strip())
    ):
        raise InvalidRequest(f"{what} must be text of 1-{maxlen} bytes", field=what)
    return value


def ms_to_dt(ms: int | float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


_EPOCH_DAY = date(1970, 1, 1)
FIRST_DATE = date(2000, 1, 1)
"""The earliest requested or expected date taken (earlier is a mistake, not a plan)."""
LAST_DATE = date(2199, 12, 31)


def day_of(d: date) -> int:
    """A calendar date as the scripts' day number (UTC days since 1970-01-01)."""
    return (d - _EPOCH_DAY).days


def date_of(day: int) -> date:
    """The scripts' day number as a calendar date (UTC)."""
    return _EPOCH_DAY + timedelta(days=day)


def check_date(value: object, name: str) -> date:
    """A calendar date (not a datetime) within FIRST_DATE..LAST_DATE."""
    if not isinstance(value, date) or isinstance(value, datetime):
        raise InvalidRequest(f"{name} must be a date (YYYY-MM-DD)", field=name)
    if not FIRST_DATE <= value <= LAST_DATE:
        raise InvalidRequest(f"{name} must be between {FIRST_DATE} and {LAST_DATE}", field=name)
    return value


def check_when(value: object, name: str) -> int:
    """A date (midnight UTC) or an aware datetime within FIRST_DATE..LAST_DATE, as ms."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidRequest(f"{name} needs a time zone (e.g. Z or +00:00)", field=name)
        at = value
    elif isinstance(value, date):
        at = datetime(value.year, value.month, value.day, tzinfo=UTC)
    else:
        raise InvalidRequest(f"{name} must be a date or a date-time", field=name)
    if not FIRST_DATE <= at.astimezone(UTC).date() <= LAST_DATE:
        raise InvalidRequest(f"{name} must be between {FIRST_DATE} and {LAST_DATE}", field=name)
    return int(at.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a reservation request. ``location=None`` routes the line by the
    channel's locations (atp.rules)."""

    sku: str
    location: str | None
    qty: int


@dataclass(frozen=True, slots=True)
class FulfilLine:
    """One line of a fulfilment: units shipped, units found missing, and what to do
    with the rest of the line (keep it committed, or release it)."""

    sku: str
    location: str
    shipped: int = 0
    short: int = 0
    release_remainder: bool = False


@dataclass(frozen=True, slots=True)
class ReservationLine:
    sku: str
    location: str
    qty: int
    shipped: int = 0
    short: int = 0
    released: int = 0

    @property
    def open(self) -> int:
        """Units of the line still committed: not shipped, not released (units reported
        short stay open until shipped or released)."""
        return self.qty - self.shipped - self.released


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    channel: str
    status: Status
    lines: tuple[ReservationLine, ...]
    created_at: datetime
    expires_at: datetime | None
    updated_at: datetime
    replayed: bool = False
    """True when this call changed nothing and returned the stored outcome (I3)."""
    customer_id: str | None = None
    rules_version: int = 0
    """The allocation rules version that decided the reservation (atp.rules)."""
    requested_date: date | None = None
    """The day the units are promised for (time-phased ATP); ``None``: now, from the shelf."""
    backordered: bool = False
    """It waited (or waits) in a backorder queue: ``status`` is ``backordered`` until supply
    fills it, then ``confirmed`` with ``filled_at``."""
    filled_at: datetime | None = None

    @property
    def open_units(self) -> int:
        """Units it holds committed (a backorder still waiting holds none)."""
        if self.status == "backordered":
            return 0
        return sum(line.open for line in self.lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reservation_id": self.id,
            "channel": self.channel,
            "status": self.status,
            "lines": [
                {
                    "sku": ln.sku,
                    "location": ln.location,
                    "qty": ln.qty,
                    "shipped": ln.shipped,
                    "short": ln.short,
                    "released": ln.released,
                    "open": ln.open,
                }
                for ln in self.lines
            ],
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "updated_at": self.updated_at.isoformat(),
            "customer_id": self.customer_id,
            "rules_version": self.rules_version,
            "requested_date": self.requested_date.isoformat() if self.requested_date else None,
            "backordered": self.backordered,
            "filled_at": self.filled_at.isoformat() if self.filled_at else None,
        }


@dataclass(frozen=True, slots=True)
class Position:
    sku: str
    location: str
    on_hand: int
    committed: int
    safety_stock: int
    committed_by_channel: dict[str, int] = field(default_factory=dict)
    in_transit: int = 0
    """Units of open expected receipts (inbound supply), not yet on hand."""
    committed_dated: int = 0
    """The part of ``committed`` promised for a requested date (time-phased ATP)."""
    backordered: int = 0
    """Units backorders wait for in the position's queue (not committed)."""

    @property
    def available(self) -> int:
        """On hand less committed, safety stock and what backorders wait for, never below
        zero: what an undated reservation of any channel may take when nothing dated is
        promised and no rules protect units (``ATP.explain`` gives a channel's own figure,
        time-phased, with protections and the backorders ahead of it)."""
        return max(0, self.on_hand - self.committed - self.safety_stock - self.backordered)


@dataclass(frozen=True, slots=True)
class Inbound:
    """An open expected receipt (purchase order line, ASN) of one position."""

    sku: str
    location: str
    reference: str
    qty: int
    """Units still expected."""
    ordered: int
    """Units expected in all (received + still expected)."""
    received: int
    expected_at: datetime
    expected_date: date
    """The UTC day its units count as supply from."""
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ScheduleDay:
    """One day of a position's time-phased schedule (``ATP.explain``)."""

    date: date
    inbound: int
    """Units expected that day (earlier, overdue receipts count on today)."""
    dated: int
    """Units promised for that day (earlier, overdue promises count on today)."""
    atp: int
    """What a reservation for that day could still be promised, for the channel asked."""


@dataclass(frozen=True, slots=True)
class Promise:
    """When can ``qty`` of a SKU be promised at a location, for a channel?"""

    sku: str
    location: str
    channel: str
    qty: int
    promise_date: date | None
    """The earliest date (today or later, UTC) a reservation of ``qty`` for it would be
    accepted now; ``None`` when no date of the known inbound schedule gives it."""
    available_now: int
    """ATP now, undated (what the shelf can give)."""
    blocked_by: str | None
    """``cap`` or ``buyer_limit`` when that, not supply, stands in the way (no date)."""
    exists: bool = True


@dataclass(frozen=True, slots=True)
class Availability:
    sku: str
    location: str
    channel: str
    atp: int
    exists: bool = True


@dataclass(frozen=True, slots=True)
class HoldSoon:
    """A hold on the position that expires within the explanation's window."""

    reservation_id: str
    channel: str
    qty: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why ATP is what it is, for one channel at one position: the figures the reserving
    script decides with (lua/explain.lua shares its helpers with lua/reserve.lua).

    ``atp = max(0, min(position_atp, cap_left, buyer_left))`` with
    ``position_atp = on_hand - committed - safety_stock - protected_for_others_total -
    backorders_ahead`` when nothing dated is promised on the position and no date is asked
    (else the time-phased least over the ``schedule`` stands for ``on_hand - committed``);
    ``committed`` already leaves out ``expired_holds_reclaimable`` (units of lapsed holds
    the next reserve reclaims before deciding).
    """

    sku: str
    location: str
    channel: str
    customer_id: str | None
    rules_version: int
    atp: int
    limited_by: str | None
    position_atp: int
    on_hand: int
    committed: int
    committed_by_channel: dict[str, int]
    safety_stock: int
    expired_holds_reclaimable: int
    protected_for_others: dict[str, int]
    protected_for_others_total: int
    cap: int | None
    cap_used: int | None
    cap_left: int | None
    buyer_limit: int | None
    buyer_used: int | None
    buyer_left: int | None
    holds_expiring_window_seconds: float
    holds_expiring_count: int
    holds_expiring: tuple[HoldSoon, ...]
    at: datetime
    in_transit: int = 0
    committed_dated: int = 0
    requested_date: date | None = None
    """The date asked about (time-phased); ``None``: now."""
    schedule: tuple[ScheduleDay, ...] = ()
    """The time-phased view, one entry per day with inbound due or dated promises."""
    promise_date: date | None = None
    """With ``qty``: the earliest date it could be promised (``None``: none, see
    ``promise_blocked_by``)."""
    promise_blocked_by: str | None = None
    backorders_ahead: int = 0
    """Units backorders of this channel's priority or above wait for (not in ``atp``)."""
    backordered: int = 0
    """Units all backorders on the position wait for."""


@dataclass(frozen=True, slots=True)
class Movement:
    """One entry of a position's movement log (I5)."""

    id: str
    at: datetime
    kind: str
    reason: str
    actor: str
    source: str
    ref: str
    reservation_id: str
    channel: str
    on_hand_before: int
    on_hand_after: int
    committed_before: int
    committed_after: int
    detail: dict[str, str] = field(default_factory=dict)
    """Fields of particular kinds: a count's ``counted``, ``counted_at``, ``drift``, ``row``."""


@dataclass(frozen=True, slots=True)
class CountRow:
    """One row of a cycle count from the system of record: ``counted`` units of ``sku`` at
    ``location`` at the time ``counted_at`` (timezone-aware). ``row`` numbers it in its
    source (1-based), for the report and for applying it exactly once."""

    sku: str
    location: str
    counted: int
    counted_at: datetime
    row: int


@dataclass(frozen=True, slots=True)
class CountResult:
    """What became of one count row.

    ``status``: ``applied``; ``already`` (this count id applied the row before: the figures
    are the original ones); ``dry`` (would apply; nothing written); ``refused`` (``reason``
    and ``detail`` say why; nothing written).
    """

    row: int
    status: Literal["applied", "already", "dry", "refused"]
    sku: str = ""
    location: str = ""
    reason: str | None = None
    detail: str | None = None
    on_hand_before: int | None = None
    on_hand_after: int | None = None
    on_hand_at_count: int | None = None
    """on_hand the position had at ``counted_at`` (from its movement log)."""
    drift: int | None = None
    """counted - on_hand at the count's time: what the system had wrong."""
    committed: int | None = None
    safety_stock: int | None = None
    units_at_risk: int = 0
    exception_id: str | None = None


@dataclass(frozen=True, slots=True)
class ExceptionRecord:
    """Something order management must act on (an oversell after a count or a short pick,
    a short pick): open until an operator resolves it."""

    id: str
    kind: str
    status: Literal["open", "resolving", "resolved"]
    """``resolving``: an operator's resolution is under way (its action is decided)."""
    raised_at: datetime
    data: dict[str, Any]
    """Everything the script recorded: sku, location, cause, shortfall, at_risk (the
    reservations the shortage rule chose), count, reservation_id…"""
    resolution: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON: times as ISO 8601 text, ``at_risk`` always a list (empty when the
        shortage rule named no reservation)."""
        out = {k: v for k, v in self.data.items() if k not in ("id", "kind", "status", "raised_at")}
        out["at_risk"] = [
            {**r, "created_at": ms_to_dt(int(r["created_at"])).isoformat()}
            if isinstance(r.get("created_at"), int | float)
            else dict(r)
            for r in (out.get("at_risk") or [])
            if isinstance(r, dict)
        ]
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "raised_at": self.raised_at.isoformat(),
            **out,
            "resolution": self.resolution,
        }


@dataclass(frozen=True, slots=True)
class ExpireResult:
    expired: tuple[str, ...]
    units: int
