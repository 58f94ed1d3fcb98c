"""Request and response bodies (pydantic). Strict: wrong types and unknown fields are 422."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from atp.models import CHANNEL_RE, CUSTOMER_RE, IDENT_RE, REGION_RE, RESERVATION_ID_RE
from atp.rules import RulesDocument

Ident = Annotated[str, Field(pattern=f"^{IDENT_RE.pattern}$", max_length=64, examples=["SKU-1"])]
Channel = Annotated[str, Field(pattern=f"^{CHANNEL_RE.pattern}$", max_length=32, examples=["web"])]
ReservationId = Annotated[str, Field(pattern=f"^{RESERVATION_ID_RE.pattern}$", max_length=128)]
CustomerId = Annotated[
    str, Field(pattern=f"^{CUSTOMER_RE.pattern}$", max_length=128, examples=["cust-42"])
]
Region = Annotated[str, Field(pattern=f"^{REGION_RE.pattern}$", max_length=32, examples=["EU"])]


def _whole(value: object) -> object:
    # JSON has one number type, and the JSON Schema this app publishes counts 2.0 as an
    # integer; 1.5, "2" and true stay refused by strict validation
    return int(value) if isinstance(value, float) and value.is_integer() else value


Whole = BeforeValidator(_whole)  # after the bounds, so the JSON Schema keeps them


def _whole_numbers(value: object) -> object:
    """``_whole`` through a whole JSON document (lists and objects)."""
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return _whole(value)


Qty = Annotated[int, Field(ge=1, le=1_000_000_000), Whole]
Units = Annotated[int, Field(ge=0, le=10**13), Whole]
Reason = Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]
SCOPE_PATTERN = r"^(admin|read|fulfil|reserve:[a-z0-9][a-z0-9_\-]{0,31})$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PositionSet(Strict):
    on_hand: Units
    safety_stock: Units | None = None
    reason: Reason


class AdjustBody(Strict):
    delta: Annotated[
        int, Field(ge=-(10**13), le=10**13, json_schema_extra={"not": {"const": 0}}), Whole
    ]
    reason: Reason
    reference: Annotated[str, Field(max_length=200)] = ""


# JSON carries dates as text: parsed (ISO 8601) even in strict bodies
Day = Annotated[date, Field(strict=False, examples=["2026-12-24"])]
When = Annotated[
    Annotated[date, Field(strict=False)] | Annotated[datetime, Field(strict=False)],
    Field(
        description="a date (YYYY-MM-DD, midnight UTC) or a date-time with a time zone",
        examples=["2026-12-24", "2026-12-24T09:00:00Z"],
    ),
]


class ReceiveBody(Strict):
    qty: Annotated[int, Field(ge=1, le=10**13), Whole]
    reference: Reason
    close: bool = Field(
        default=False,
        description="the expected receipt under this reference closes: the rest will not come",
    )


class PositionOut(BaseModel):
    sku: str
    location: str
    on_hand: int
    committed: int
    safety_stock: int
    available: int
    committed_by_channel: dict[str, int]
    in_transit: int = Field(description="units of open expected receipts, not yet on hand")
    committed_dated: int = Field(description="the part of committed promised for a date")
    backordered: int = Field(description="units backorders wait for (not committed)")


class InboundBody(Strict):
    reference: Reason
    qty: Annotated[int, Field(ge=1, le=10**13), Whole]
    expected_at: When


class InboundAmend(Strict):
    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["qty"]}, {"required": ["expected_at"]}]}
    )
    qty: (
        Annotated[int, Field(ge=1, le=10**13, description="units still expected"), Whole] | None
    ) = None
    expected_at: When | None = None


class InboundOut(BaseModel):
    sku: str
    location: str
    reference: str
    qty: int = Field(description="units still expected")
    ordered: int
    received: int
    expected_at: str
    expected_date: str = Field(description="the UTC day its units count as supply from")
    created_at: str
    updated_at: str


class InboundResultOut(BaseModel):
    position: PositionOut
    inbound: InboundOut | None = Field(
        description="the expected receipt after the call; null once closed"
    )
    replayed: bool
    exception_id: str | None = Field(
        description="the oversell exception raised when dated promises lost their cover"
    )


class InboundPage(BaseModel):
    items: list[InboundOut]


class PromiseOut(BaseModel):
    sku: str
    location: str
    channel: str
    qty: int
    promise_date: str | None = Field(
        description="the earliest date (UTC) a reservation of qty would be accepted; null: none"
    )
    available_now: int
    blocked_by: Literal["cap", "buyer_limit"] | None


class MovementOut(BaseModel):
    id: str
    at: str
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


class MovementsPage(BaseModel):
    items: list[MovementOut]
    next_before: str | None


class AvailabilityItem(BaseModel):
    sku: str
    location: str
    channel: str
    atp: int
    exists: bool


class AvailabilityOut(BaseModel):
    items: list[AvailabilityItem]


class ScheduleDayOut(BaseModel):
    date: str
    inbound: int
    dated: int
    atp: int


class HoldSoonOut(BaseModel):
    reservation_id: str
    channel: str
    qty: int
    expires_at: str


class ExplanationOut(BaseModel):
    """``atp = max(0, min(position_atp, cap_left, buyer_left))`` (an absent limit counts
    as no limit), ``position_atp = on_hand - committed - safety_stock -
    protected_for_others_total``; ``limited_by`` names the term that sets ``atp``."""

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
    expired_holds_reclaimable: int = Field(
        description="units of lapsed holds the next reserve reclaims (not in committed)"
    )
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
    holds_expiring: list[HoldSoonOut]
    at: str
    in_transit: int
    committed_dated: int
    requested_date: str | None
    schedule: list[ScheduleDayOut] = Field(
        description="per day with inbound due or dated promises: what a reservation for it gets"
    )
    promise_date: str | None
    promise_blocked_by: str | None
    backorders_ahead: int = Field(
        description="units backorders of this channel's priority or above wait for (not in atp)"
    )
    backordered: int


class LineIn(Strict):
    sku: Ident
    location: Ident | None = Field(
        default=None,
        description="leave out to route the line over the channel's locations (rules)",
    )
    qty: Qty


class ReserveBody(Strict):
    reservation_id: ReservationId
    channel: Channel
    lines: Annotated[list[LineIn], Field(min_length=1, max_length=1000)]
    hold_seconds: Annotated[int, Field(ge=0, le=30 * 86400), Whole] | None = None
    customer_id: CustomerId | None = Field(
        default=None, description="the buyer; required for a SKU that has a buyer limit"
    )
    region: Region | None = Field(
        default=None, description="routes lines without a location by the channel's region list"
    )
    allow_split: bool | None = Field(
        default=None,
        description="may a routed line be split over locations; null: the channel's rule",
    )
    requested_date: Day | None = Field(
        default=None,
        description="the date the units are wanted (UTC; time-phased: may count inbound due "
        "by then); null: now, from the shelf",
    )
    on_short: Literal["refuse", "backorder"] = Field(
        default="refuse",
        description="backorder: when short, wait in the position's queue (status backordered) "
        "until supply fills it; one line at a location, no hold, no requested_date",
    )


class ReservationLineOut(BaseModel):
    sku: str
    location: str
    qty: int
    shipped: int
    short: int
    released: int
    open: int


class ReservationOut(BaseModel):
    reservation_id: str
    channel: str
    status: Literal["held", "confirmed", "fulfilled", "released", "expired", "backordered"]
    lines: list[ReservationLineOut]
    created_at: str
    expires_at: str | None
    updated_at: str
    customer_id: str | None
    rules_version: int = Field(description="the allocation rules version that decided it")
    requested_date: str | None = None
    backordered: bool = Field(
        default=False, description="it waited (or waits) in a backorder queue"
    )
    filled_at: str | None = Field(default=None, description="when supply filled the backorder")


class ReleaseBody(Strict):
    reason: Reason = "released"


class FulfilLineIn(Strict):
    # the core refuses a line that ships nothing, reports no short pick and releases nothing
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["shipped"], "properties": {"shipped": {"minimum": 1}}},
                {"required": ["short"], "properties": {"short": {"minimum": 1}}},
                {
                    "required": ["release_remainder"],
                    "properties": {"release_remainder": {"const": True}},
                },
            ]
        }
    )
    sku: Ident
    location: Ident
    shipped: Annotated[int, Field(ge=0, le=1_000_000_000), Whole] = 0
    short: Annotated[int, Field(ge=0, le=1_000_000_000), Whole] = 0
    release_remainder: bool = False


class FulfilBody(Strict):
    lines: Annotated[list[FulfilLineIn], Field(min_length=1, max_length=1000)]
    fulfilment_id: ReservationId | None = None


class KeyCreate(Strict):
    name: Annotated[str, Field(min_length=1, max_length=100)]
    # the pattern is documentation: atp.apikeys checks scopes and says what is wrong
    scopes: Annotated[
        list[Annotated[str, Field(max_length=41, json_schema_extra={"pattern": SCOPE_PATTERN})]],
        Field(min_length=1, max_length=50),
    ]


class KeyOut(BaseModel):
    id: str
    name: str
    scopes: list[str]
    created_at: float
    revoked_at: float | None


class KeyCreated(KeyOut):
    key: str = Field(description="the bearer secret; shown once, never again")


class KeyList(BaseModel):
    items: list[KeyOut]


# A rules document as PUT /v1/rules takes it: atp.rules.RulesDocument, whole-number
# floats read as integers (JSON has one number type, as for every body here).
RulesBody = Annotated[RulesDocument, BeforeValidator(_whole_numbers)]


class RulesOut(BaseModel):
    version: int = Field(description="0 when no rules were ever applied")
    applied_at: str | None
    applied_by: str = Field(description="the API key id (or CLI user) that applied it")
    rules: RulesDocument


ExceptionId = Annotated[
    str,
    Field(
        pattern=r"^[0-9]{1,5}-[0-9]{1,15}$",
        max_length=21,
        description="<bucket>-<n>, as the exception lists give it",
        examples=["3-17"],
    ),
]


class ResolveBody(Strict):
    action: Literal["release", "keep"] = Field(
        description="release: release the reservations the exception names at risk (those "
        "still live); keep: leave them"
    )
    note: Annotated[str, Field(max_length=1000)] = ""


class AtRiskOut(BaseModel):
    reservation_id: str
    channel: str
    priority: int = Field(description="the channel's priority (lowest is put at risk first)")
    status: str = Field(description="its status when the exception was raised")
    qty: int = Field(description="its open units on the position")
    created_at: str


class ResolutionOut(BaseModel):
    action: Literal["release", "keep"]
    note: str
    by: str = Field(description="the API key id (or CLI user) that resolved it")
    at: str
    released: list[str] = Field(description="reservations this resolution released")


class ExceptionOut(BaseModel):
    """An exception for order management. ``kind`` oversell: a position no longer covers
    its commitments (``cause``: cycle_count, adjust, set_position, short_pick); kind
    short_pick: a bin was found short while fulfilling ``reservation_id``. Other fields
    as the kind records them."""

    model_config = ConfigDict(extra="allow")
    id: str
    kind: str = Field(examples=["oversell", "short_pick"])
    status: Literal["open", "resolved"]
    raised_at: str
    sku: str | None = None
    location: str | None = None
    cause: str | None = None
    reservation_id: str | None = None
    count: str | None = Field(default=None, description="the count id (cause cycle_count)")
    on_hand: int | None = None
    committed: int | None = None
    safety_stock: int | None = None
    shortfall: int | None = Field(
        default=None, description="committed units on hand can no longer cover"
    )
    units_at_risk: int | None = None
    truncated: bool | None = None
    short: int | None = None
    remainder: int | None = None
    fulfilment: str | None = None
    at_risk: list[AtRiskOut] = Field(
        description="the reservations the shortage rule puts at risk: lowest channel "
        "priority, newest first"
    )
    resolution: ResolutionOut | None


class ExceptionsPage(BaseModel):
    items: list[ExceptionOut]
    next_before: str | None = Field(
        description="pass as before= for the next page; null when this page is the last"
    )


class CountRowIn(Strict):
    """One counted position, as the system of record gives it. Only the shape is checked
    here: each row is validated by the worker (a bad SKU or location, a negative count, a
    time that is not ISO 8601 or has no zone, an unknown position, a row the batch already
    counted) and refused, with its reason, in the batch's report; the others apply."""

    sku: Annotated[str, Field(max_length=200, examples=["SKU-1"])]
    location: Annotated[str, Field(max_length=200, examples=["DC1"])]
    counted_qty: Annotated[int, Field(ge=-(10**15), le=10**15, examples=[42]), Whole]
    counted_at: Annotated[
        str, Field(max_length=64, description="ISO 8601, with its time zone",
                   examples=["2025-01-31T06:00:00Z"])
    ]  # fmt: skip


class CountsBody(Strict):
    count_id: ReservationId | None = Field(
        default=None,
        description="names the count (its movements' reference); the batch id if not given. "
        "A count id applies each row at most once, however often it is sent",
    )
    source: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="where the count came from (default: api)"
    )
    assume_utc: bool = Field(default=False, description="read times without a zone as UTC")
    rows: Annotated[list[CountRowIn], Field(min_length=1, max_length=100_000)]


class CountQueuedOut(BaseModel):
    batch_id: str
    count_id: str
    status: Literal["queued"]
    rows: int


class CountReportOut(BaseModel):
    """What the count did (atp.reconcile.CountReport)."""

    model_config = ConfigDict(extra="allow")
    count_id: str
    source: str
    rows: int
    applied: int
    already_applied: int = Field(
        description="rows this count id had applied before (a batch sent again, or the chunk "
        "a crashed worker was applying): not applied twice"
    )
    refused: int
    counted_positions: int
    within_tolerance: int
    inventory_record_accuracy: float | None = Field(
        description="share of counted positions whose drift is within the tolerance"
    )
    total_abs_drift: int
    net_drift: int
    units_at_risk: int
    exceptions: list[str] = Field(description="ids of the oversell exceptions raised")
    refused_by_reason: dict[str, int]
    refused_rows: list[dict[str, Any]] = Field(
        description="a sample of refused rows: row, sku, location, reason, detail"
    )


class CountBatchOut(BaseModel):
    batch_id: str
    count_id: str
    source: str
    status: Literal["queued", "running", "done", "failed"]
    rows: int
    done: int = Field(description="rows finished so far")
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    worker: str | None = Field(description="the worker that has (or had) it")
    attempts: int = Field(description="worker runs that took it (more than 1: resumed)")
    error: str | None
    report: CountReportOut | None = Field(description="once done (for failed: so far)")


class VerifyOut(BaseModel):
    """The book checked against the invariants (atp.verify). A book that fails is still a
    200: the check ran; ``ok`` and ``problems`` say what it found."""

    model_config = ConfigDict(extra="forbid")
    ok: bool = Field(description="no problem found")
    positions: int = Field(description="positions checked")
    reservations: int = Field(description="reservation parts checked")
    movements: int = Field(description="movement log entries checked (0 with check_log=false)")
    problems: list[str] = Field(description="what failed, one line each (at most 200)")
    uncovered: list[str] = Field(
        description="positions (sku@location) whose committed exceeds on_hand - safety_stock; "
        "problems unless allow_uncovered"
    )
    summary: str = Field(description="the verdict in one line, as `atp verify` prints it")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
    lines: list[dict[str, Any]] | None = None


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the problem answers a route can give."""
    return {code: {"model": Problem, "content": {"application/problem+json": {}}} for code in codes}


# -- replenishment (atp.replenishment) ----------------------------------------------------


class ReplenishmentLevelsIn(Strict):
    """A position's reorder point and order-up-to level (whole units, order_up_to >=
    reorder_point >= 0)."""

    reorder_point: Units
    order_up_to: Units


class ReplenishmentLevelsOut(BaseModel):
    sku: str
    location: str
    reorder_point: int | None
    order_up_to: int | None
    signal_open: bool = Field(description="a replenishment signal is open for the position")
    signal: Literal["raised", "cleared"] | None = Field(
        default=None, description="what this call did to the signal"
    )


class ReplenishmentSignalOut(BaseModel):
    """An open signal: what to order at one position, and how much. Figures as they stand
    now (inventory_position = on_hand + inbound - committed; suggested_qty = order_up_to -
    inventory_position); raised_* as they were when the signal was raised."""

    sku: str
    location: str
    on_hand: int
    inbound: int
    committed: int
    inventory_position: int
    reorder_point: int
    order_up_to: int
    suggested_qty: int
    raised_at: str
    raised_inventory_position: int


class ReplenishmentPage(BaseModel):
    items: list[ReplenishmentSignalOut]
    next_after: str | None = Field(
        description="pass as after= for the next page; null when this page is the last"
    )


class ReplenishmentSettingsIn(Strict):
    """How a SKU's levels are planned: safety stock = z(service_level) x sd of daily demand
    x sqrt(lead_time_days); reorder point = mean x lead time + safety stock; order-up-to =
    mean x (lead + review) + z x sd x sqrt(lead + review)."""

    service_level: Annotated[float, Field(gt=0, lt=1, examples=[0.95])]
    lead_time_days: Annotated[float, Field(gt=0, le=3650, examples=[4])]
    review_days: Annotated[float, Field(ge=0, le=3650)] = 7.0
    window_days: Annotated[int, Field(ge=2, le=120), Whole] = 56


class ReplenishmentSettingsOut(ReplenishmentSettingsIn):
    sku: str


class PlanBody(Strict):
    skus: Annotated[list[Ident] | None, Field(max_length=1000)] = Field(
        default=None,
        description="only these SKUs (each must have settings); all planned if omitted",
    )
    dry_run: bool = False
    apply_safety_stock: bool = Field(
        default=False, description="also set each position's ATP safety stock to the computed one"
    )


class PlanRowOut(BaseModel):
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
    signal: Literal["raised", "cleared"] | None


class PlanOut(BaseModel):
    items: list[PlanRowOut]
