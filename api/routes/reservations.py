from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path
from fastapi.responses import JSONResponse

from atp import ATPError, FulfilLine, Line

from .. import convert, metrics
from ..deps import Caller, Core, forbid
from ..schemas import (
    FulfilBody,
    ReleaseBody,
    ReservationId,
    ReservationOut,
    ReserveBody,
    problem_responses,
)

router = APIRouter(prefix="/v1/reservations", tags=["reservations"])
IdPath = Annotated[ReservationId, Path()]
ERRORS = problem_responses(401, 403, 404, 409, 422)
BODY_ERRORS = problem_responses(400, 401, 403, 404, 409, 413, 422)


@router.post(
    "",
    status_code=201,
    response_model=ReservationOut,
    responses=BODY_ERRORS,
)
async def reserve(body: ReserveBody, core: Core, who: Caller) -> JSONResponse:
    """Reserve units for a channel, all lines or none; idempotent by reservation_id."""
    if not who.has(f"reserve:{body.channel}"):
        raise forbid(f"this key may not reserve for channel {body.channel}")
    try:
        r = await core.reserve(
            body.reservation_id,
            body.channel,
            [Line(ln.sku, ln.location, ln.qty) for ln in body.lines],
            hold_seconds=body.hold_seconds,
            actor=who.key_id,
            source="api",
        )
    except ATPError as e:
        metrics.RESERVATIONS.labels(e.code, body.channel).inc()
        raise
    if r.replayed:
        metrics.RESERVATIONS.labels("replayed", body.channel).inc()
    else:
        metrics.RESERVATIONS.labels("accepted", body.channel).inc()
        metrics.UNITS_RESERVED.labels(body.channel, r.status).inc(sum(ln.qty for ln in r.lines))
    return JSONResponse(convert.reservation(r), status_code=201)


def _own(who: Caller, *extra: str) -> set[str] | None:
    """None (any channel) for admin or an extra scope, else the caller's own channels."""
    if any(who.has(s) for s in ("admin", *extra)):
        return None
    return who.channels()


@router.get("/{reservation_id}", response_model=ReservationOut, responses=ERRORS)
async def get_reservation(reservation_id: IdPath, core: Core, who: Caller) -> JSONResponse:
    """A reservation and its state (read scope, or the owning channel)."""
    channels = _own(who, "read")
    if channels is not None and not channels:
        raise forbid("this key needs the read scope or a reserve:<channel> scope")
    r = await core.reservation(reservation_id, channels=channels)
    return JSONResponse(convert.reservation(r))


@router.post("/{reservation_id}/confirm", response_model=ReservationOut, responses=ERRORS)
async def confirm(reservation_id: IdPath, core: Core, who: Caller) -> JSONResponse:
    """Confirm a held reservation (the owning channel)."""
    channels = _own(who)
    if channels is not None and not channels:
        raise forbid("confirming needs the owning channel's reserve:<channel> scope")
    try:
        r = await core.confirm(reservation_id, channels=channels, actor=who.key_id, source="api")
    except ATPError as e:
        metrics.TRANSITIONS.labels("confirm", e.code).inc()
        raise
    metrics.TRANSITIONS.labels("confirm", "replayed" if r.replayed else "ok").inc()
    return JSONResponse(convert.reservation(r))


@router.post("/{reservation_id}/release", response_model=ReservationOut, responses=BODY_ERRORS)
async def release(
    reservation_id: IdPath,
    core: Core,
    who: Caller,
    body: Annotated[ReleaseBody | None, Body()] = None,
) -> JSONResponse:
    """Release a reservation; its open units return (the owning channel or admin)."""
    channels = _own(who)
    if channels is not None and not channels:
        raise forbid("releasing needs admin or the owning channel's reserve:<channel> scope")
    reason = body.reason if body else "released"
    try:
        r = await core.release(reservation_id, reason=reason, channels=channels, actor=who.key_id, source="api")
    except ATPError as e:
        metrics.TRANSITIONS.labels("release", e.code).inc()
        raise
    metrics.TRANSITIONS.labels("release", "replayed" if r.replayed else "ok").inc()
    return JSONResponse(convert.reservation(r))


@router.post("/{reservation_id}/fulfil", response_model=ReservationOut, responses=BODY_ERRORS)
async def fulfil(reservation_id: IdPath, body: FulfilBody, core: Core, who: Caller) -> JSONResponse:
    """Ship units of a confirmed reservation, with short picks (fulfil scope or admin)."""
    if not who.has("fulfil"):
        raise forbid("fulfilling needs the fulfil scope")
    lines = [FulfilLine(ln.sku, ln.location, ln.shipped, ln.short, ln.release_remainder) for ln in body.lines]
    try:
        r = await core.fulfil(
            reservation_id, lines, fulfilment_id=body.fulfilment_id, actor=who.key_id, source="api"
        )
    except ATPError as e:
        metrics.TRANSITIONS.labels("fulfil", e.code).inc()
        raise
    metrics.TRANSITIONS.labels("fulfil", "replayed" if r.replayed else "ok").inc()
    if not r.replayed:
        metrics.UNITS_SHIPPED.inc(sum(ln.shipped for ln in body.lines))
        shorts = [ln.short for ln in body.lines if ln.short]
        if shorts:
            metrics.SHORT_PICKS.inc(len(shorts))
            metrics.SHORT_UNITS.inc(sum(shorts))
    return JSONResponse(convert.reservation(r))
