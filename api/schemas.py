"""Request and response bodies (pydantic). Strict: wrong types and unknown fields are 422."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from atp.models import CHANNEL_RE, IDENT_RE, RESERVATION_ID_RE

Ident = Annotated[str, Field(pattern=f"^{IDENT_RE.pattern}$", max_length=64, examples=["SKU-1"])]
Channel = Annotated[str, Field(pattern=f"^{CHANNEL_RE.pattern}$", max_length=32, examples=["web"])]
ReservationId = Annotated[str, Field(pattern=f"^{RESERVATION_ID_RE.pattern}$", max_length=128)]


def _whole(value: object) -> object:
    # JSON has one number type, and the JSON Schema this app publishes counts 2.0 as an
    # integer; 1.5, "2" and true stay refused by strict validation
    return int(value) if isinstance(value, float) and value.is_integer() else value


Whole = BeforeValidator(_whole)  # after the bounds, so the JSON Schema keeps them
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


class ReceiveBody(Strict):
    qty: Annotated[int, Field(ge=1, le=10**13), Whole]
    reference: Reason


class PositionOut(BaseModel):
    sku: str
    location: str
    on_hand: int
    committed: int
    safety_stock: int
    available: int
    committed_by_channel: dict[str, int]


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


class LineIn(Strict):
    sku: Ident
    location: Ident
    qty: Qty


class ReserveBody(Strict):
    reservation_id: ReservationId
    channel: Channel
    lines: Annotated[list[LineIn], Field(min_length=1, max_length=1000)]
    hold_seconds: Annotated[int, Field(ge=0, le=30 * 86400), Whole] | None = None


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
    status: Literal["held", "confirmed", "fulfilled", "released", "expired"]
    lines: list[ReservationLineOut]
    created_at: str
    expires_at: str | None
    updated_at: str


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
