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
    """Receive inbound units against a reference (PO, ASN)."""
    p = await core_of(request).receive(
        sku, location, body.qty, reference=body.reference, actor=who.key_id, source="api"
    )
    return JSONResponse(convert.position(p))


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
