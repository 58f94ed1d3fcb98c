from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from atp.apikeys import Principal
from atp.errors import UnknownPosition

from .. import convert
from ..deps import Admin, Reader, core_of, require_any
from ..schemas import (
    AdjustBody,
    Ident,
    InboundAmend,
    InboundBody,
    InboundPage,
    InboundResultOut,
    MovementsPage,
    PositionOut,
    PositionSet,
    ReceiveBody,
    ReplenishmentLevelsIn,
    ReplenishmentLevelsOut,
    problem_responses,
)

router = APIRouter(prefix="/v1/positions", tags=["positions"])
SkuPath = Annotated[Ident, Path()]
LocPath = Annotated[Ident, Path()]
ERRORS = problem_responses(401, 403, 404, 409, 422)
BODY_ERRORS = problem_responses(400, 401, 403, 404, 409, 413, 422)


@router.put("/{sku}/{location}", response_model=PositionOut, responses=BODY_ERRORS)
async def set_position(
    sku: SkuPath, location: LocPath, body: PositionSet, request: Request, who: Admin
) -> JSONResponse:
    """Set on hand (and safety stock) of a position absolutely."""
    p = await core_of(request).set_position(
        sku,
        location,
        body.on_hand,
        body.safety_stock,
        reason=body.reason,
        actor=who.key_id,
        source="api",
    )
    return JSONResponse(convert.position(p))


@router.post("/{sku}/{location}/adjust", response_model=PositionOut, responses=BODY_ERRORS)
async def adjust(
    sku: SkuPath, location: LocPath, body: AdjustBody, request: Request, who: Admin
) -> JSONResponse:
    """Change on hand by a signed delta, with a reason."""
    p = await core_of(request).adjust(
        sku,
        location,
        body.delta,
        reason=body.reason,
        reference=body.reference,
        actor=who.key_id,
        source="api",
    )
    return JSONResponse(convert.position(p))


@router.post("/{sku}/{location}/receive", response_model=PositionOut, responses=BODY_ERRORS)
async def receive(
    sku: SkuPath,
    location: LocPath,
    body: ReceiveBody,
    request: Request,
    who: Annotated[Principal, Depends(require_any("fulfil"))],
) -> JSONResponse:
    """Receive inbound units against a reference (PO, ASN). When the reference is an open
    expected receipt of the position, the units come off what is still expected; it closes
    when nothing more is expected, or at once with ``close`` (a short shipment)."""
    p = await core_of(request).receive(
        sku,
        location,
        body.qty,
        reference=body.reference,
        close=body.close,
        actor=who.key_id,
        source="api",
    )
    return JSONResponse(convert.position(p))


@router.post(
    "/{sku}/{location}/inbound",
    status_code=201,
    response_model=InboundResultOut,
    responses={
        200: {"model": InboundResultOut, "description": "the same request again: nothing changed"},
        **BODY_ERRORS,
    },
)
async def expect_inbound(
    sku: SkuPath, location: LocPath, body: InboundBody, request: Request, who: Admin
) -> JSONResponse:
    """Record an expected receipt: ``qty`` units due at ``expected_at`` (they count as supply
    for reservations with a requested date from that UTC day on). The same request again
    answers 200 and changes nothing; the same reference with other figures is 409."""
    r = await core_of(request).expect_inbound(
        sku,
        location,
        body.reference,
        body.qty,
        body.expected_at,
        actor=who.key_id,
        source="api",
    )
    return JSONResponse(convert.inbound_result(r), status_code=200 if r.replayed else 201)


@router.get("/{sku}/{location}/inbound", response_model=InboundPage, responses=ERRORS)
async def list_inbound(
    sku: SkuPath, location: LocPath, request: Request, who: Reader
) -> JSONResponse:
    """The position's open expected receipts, soonest first."""
    items = await core_of(request).inbound(sku, location)
    return JSONResponse({"items": [convert.inbound(i) for i in items]})


@router.patch(
    "/{sku}/{location}/inbound/{reference:path}",
    response_model=InboundResultOut,
    responses=BODY_ERRORS,
)
async def amend_inbound(
    sku: SkuPath,
    location: LocPath,
    reference: Annotated[str, Path(min_length=1, max_length=200)],
    body: InboundAmend,
    request: Request,
    who: Admin,
) -> JSONResponse:
    """Amend an open expected receipt: ``qty`` still expected and/or ``expected_at``. Less
    supply, or later, that leaves dated promises uncovered raises an oversell exception."""
    r = await core_of(request).amend_inbound(
        sku,
        location,
        reference,
        qty=body.qty,
        expected_at=body.expected_at,
        actor=who.key_id,
        source="api",
    )
    return JSONResponse(convert.inbound_result(r))


@router.delete(
    "/{sku}/{location}/inbound/{reference:path}",
    response_model=InboundResultOut,
    responses=ERRORS,
)
async def cancel_inbound(
    sku: SkuPath,
    location: LocPath,
    reference: Annotated[str, Path(min_length=1, max_length=200)],
    request: Request,
    who: Admin,
) -> JSONResponse:
    """Cancel an open expected receipt: its units leave the schedule."""
    r = await core_of(request).cancel_inbound(
        sku, location, reference, actor=who.key_id, source="api"
    )
    return JSONResponse(convert.inbound_result(r))


@router.get("/{sku}/{location}", response_model=PositionOut, responses=ERRORS)
async def get_position(
    sku: SkuPath, location: LocPath, request: Request, who: Reader
) -> JSONResponse:
    """Read a position."""
    p = await core_of(request).position(sku, location)
    if p is None:
        raise UnknownPosition(f"no position for {sku} at {location}")
    return JSONResponse(convert.position(p))


@router.get("/{sku}/{location}/movements", response_model=MovementsPage, responses=ERRORS)
async def movements(
    sku: SkuPath,
    location: LocPath,
    request: Request,
    who: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[str | None, Query(pattern=r"^[0-9]{1,20}(-[0-9]{1,20})?$")] = None,
) -> JSONResponse:
    """The position's audit trail, newest first; page with ``before=<next_before>``."""
    items = await core_of(request).movements(sku, location, count=limit, before=before)
    nxt = items[-1].id if len(items) == limit else None
    return JSONResponse({"items": [convert.movement(m) for m in items], "next_before": nxt})


@router.put(
    "/{sku}/{location}/replenishment", response_model=ReplenishmentLevelsOut, responses=BODY_ERRORS
)
async def set_replenishment(
    sku: SkuPath, location: LocPath, body: ReplenishmentLevelsIn, request: Request, who: Admin
) -> JSONResponse:
    """Set the position's reorder point and order-up-to level; the signal is re-evaluated."""
    lv = await core_of(request).set_replenishment(
        sku, location, body.reorder_point, body.order_up_to, actor=who.key_id, source="api"
    )
    return JSONResponse(asdict(lv))


@router.get(
    "/{sku}/{location}/replenishment", response_model=ReplenishmentLevelsOut, responses=ERRORS
)
async def get_replenishment(
    sku: SkuPath, location: LocPath, request: Request, who: Reader
) -> JSONResponse:
    """The position's reorder point, order-up-to level and whether a signal is open."""
    lv = await core_of(request).replenishment_levels(sku, location)
    if lv is None:
        raise UnknownPosition(f"no position for {sku} at {location}")
    return JSONResponse(asdict(lv))


@router.delete(
    "/{sku}/{location}/replenishment", response_model=ReplenishmentLevelsOut, responses=ERRORS
)
async def clear_replenishment(
    sku: SkuPath, location: LocPath, request: Request, who: Admin
) -> JSONResponse:
    """Remove the position's levels; an open signal is cleared (admin)."""
    lv = await core_of(request).clear_replenishment(sku, location, actor=who.key_id, source="api")
    return JSONResponse(asdict(lv))
