from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from atp import ATP, ATPError, FulfilLine, Line, Reservation
from atp.apikeys import Principal

from .. import convert, metrics
from ..deps import Caller, core_of, forbid
from ..lane import LaneRequest, LaneRouter, check, parse
from ..schemas import (
    FulfilBody,
    ReleaseBody,
    ReservationId,
    ReservationOut,
    ReserveBody,
    problem_responses,
)

router = APIRouter(prefix="/v1/reservations", tags=["reservations"])
fast = LaneRouter(router)
IdPath = Annotated[ReservationId, Path()]
ERRORS = problem_responses(401, 403, 404, 409, 422)
BODY_ERRORS = problem_responses(400, 401, 403, 404, 409, 413, 422)


# Each route's work is a function of (core, caller, validated input) that both the FastAPI
# route and its fast-lane twin (api/lane.py) call: one behaviour, two ways in.


async def _reserve(core: ATP, who: Principal, body: ReserveBody) -> dict[str, Any]:
    if not who.has(f"reserve:{body.channel}"):
        raise forbid(f"this key may not reserve for channel {body.channel}")
    try:
        r = await core.reserve(
            body.reservation_id,
            body.channel,
            [Line(ln.sku, ln.location, ln.qty) for ln in body.lines],
            hold_seconds=body.hold_seconds,
            customer_id=body.customer_id,
            region=body.region,
            allow_split=body.allow_split,
            requested_date=body.requested_date,
            on_short=body.on_short,
            actor=who.key_id,
            source="api",
        )
    except ATPError as e:
        metrics.child(metrics.RESERVATIONS, e.code, body.channel).inc()
        raise
    if r.replayed:
        metrics.child(metrics.RESERVATIONS, "replayed", body.channel).inc()
    elif r.status == "backordered":
        metrics.child(metrics.RESERVATIONS, "backordered", body.channel).inc()
    else:
        metrics.child(metrics.RESERVATIONS, "accepted", body.channel).inc()
        metrics.child(metrics.UNITS_RESERVED, body.channel, r.status).inc(
            sum(ln.qty for ln in r.lines)
        )
    return convert.reservation(r)


def _channels(who: Principal, refusal: str, *extra: str) -> set[str] | None:
    """None (any channel) for admin or an extra scope, else the caller's own channels;
    403 with ``refusal`` for a key that has neither."""
    if any(who.has(s) for s in ("admin", *extra)):
        return None
    own = who.channels()
    if not own:
        raise forbid(refusal)
    return own


async def _counted(action: str, call: Awaitable[Reservation]) -> Reservation:
    """Await a transition, counting its outcome."""
    try:
        r = await call
    except ATPError as e:
        metrics.child(metrics.TRANSITIONS, action, e.code).inc()
        raise
    metrics.child(metrics.TRANSITIONS, action, "replayed" if r.replayed else "ok").inc()
    return r


async def _get(core: ATP, who: Principal, reservation_id: str) -> dict[str, Any]:
    channels = _channels(who, "this key needs the read scope or a reserve:<channel> scope", "read")
    return convert.reservation(await core.reservation(reservation_id, channels=channels))


async def _confirm(core: ATP, who: Principal, reservation_id: str) -> dict[str, Any]:
    channels = _channels(who, "confirming needs the owning channel's reserve:<channel> scope")
    r = await _counted(
        "confirm", core.confirm(reservation_id, channels=channels, actor=who.key_id, source="api")
    )
    return convert.reservation(r)


async def _release(
    core: ATP, who: Principal, reservation_id: str, body: ReleaseBody | None
) -> dict[str, Any]:
    channels = _channels(
        who, "releasing needs admin or the owning channel's reserve:<channel> scope"
    )
    reason = body.reason if body else "released"
    r = await _counted(
        "release",
        core.release(
            reservation_id, reason=reason, channels=channels, actor=who.key_id, source="api"
        ),
    )
    return convert.reservation(r)


@router.post(
    "",
    status_code=201,
    response_model=ReservationOut,
    responses=BODY_ERRORS,
)
async def reserve(body: ReserveBody, request: Request, who: Caller) -> JSONResponse:
    """Reserve units for a channel, all lines or none; idempotent by reservation_id."""
    return JSONResponse(await _reserve(core_of(request), who, body), status_code=201)


@router.get("/{reservation_id}", response_model=ReservationOut, responses=ERRORS)
async def get_reservation(reservation_id: IdPath, request: Request, who: Caller) -> JSONResponse:
    """A reservation and its state (read scope, or the owning channel)."""
    return JSONResponse(await _get(core_of(request), who, reservation_id))


@router.post("/{reservation_id}/confirm", response_model=ReservationOut, responses=ERRORS)
async def confirm(reservation_id: IdPath, request: Request, who: Caller) -> JSONResponse:
    """Confirm a held reservation (the owning channel)."""
    return JSONResponse(await _confirm(core_of(request), who, reservation_id))


@router.post("/{reservation_id}/release", response_model=ReservationOut, responses=BODY_ERRORS)
async def release(
    reservation_id: IdPath,
    request: Request,
    who: Caller,
    body: Annotated[ReleaseBody | None, Body()] = None,
) -> JSONResponse:
    """Release a reservation; its open units return (the owning channel or admin)."""
    return JSONResponse(await _release(core_of(request), who, reservation_id, body))


# The fast lane (api/lane.py): the same routes' ordinary requests, anything else falls back.
_RESERVATION_ID: TypeAdapter[str] = TypeAdapter(ReservationId)


@fast.route("POST", "", body=True)
async def _reserve_fast(req: LaneRequest) -> tuple[int, Any]:
    return 201, await _reserve(req.core, req.who, parse(ReserveBody, req.body))


@fast.route("GET", "/{reservation_id}")
async def _get_fast(req: LaneRequest) -> tuple[int, Any]:
    return 200, await _get(req.core, req.who, check(_RESERVATION_ID, req.params["reservation_id"]))


@fast.route("POST", "/{reservation_id}/confirm")
async def _confirm_fast(req: LaneRequest) -> tuple[int, Any]:
    return 200, await _confirm(
        req.core, req.who, check(_RESERVATION_ID, req.params["reservation_id"])
    )


@fast.route("POST", "/{reservation_id}/release", body=True)
async def _release_fast(req: LaneRequest) -> tuple[int, Any]:
    reservation_id = check(_RESERVATION_ID, req.params["reservation_id"])
    body = None if req.body is None else parse(ReleaseBody, req.body)
    return 200, await _release(req.core, req.who, reservation_id, body)


@router.post("/{reservation_id}/fulfil", response_model=ReservationOut, responses=BODY_ERRORS)
async def fulfil(
    reservation_id: IdPath, body: FulfilBody, request: Request, who: Caller
) -> JSONResponse:
    """Ship units of a confirmed reservation, with short picks (fulfil scope or admin)."""
    if not who.has("fulfil"):
        raise forbid("fulfilling needs the fulfil scope")
    lines = [
        FulfilLine(ln.sku, ln.location, ln.shipped, ln.short, ln.release_remainder)
        for ln in body.lines
    ]
    r = await _counted(
        "fulfil",
        core_of(request).fulfil(
            reservation_id, lines, fulfilment_id=body.fulfilment_id, actor=who.key_id, source="api"
        ),
    )
    if not r.replayed:
        metrics.UNITS_SHIPPED.inc(sum(ln.shipped for ln in body.lines))
        shorts = [ln.short for ln in body.lines if ln.short]
        if shorts:
            metrics.SHORT_PICKS.inc(len(shorts))
            metrics.SHORT_UNITS.inc(sum(shorts))
    return JSONResponse(convert.reservation(r))
