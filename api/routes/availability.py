from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field, TypeAdapter

from atp import ATP
from atp.apikeys import Principal
from atp.errors import UnknownPosition

from .. import convert
from ..deps import Caller, core_of, forbid
from ..lane import Fallback, LaneRequest, LaneRouter, check
from ..schemas import (
    AvailabilityOut,
    Channel,
    CustomerId,
    Day,
    ExplanationOut,
    Ident,
    PromiseOut,
    problem_responses,
)

router = APIRouter(prefix="/v1/availability", tags=["availability"])
fast = LaneRouter(router)
MAX_SKUS = 500


def _may_read(who: Principal, channel: str) -> None:
    if not (who.has("read") or channel in who.channels()):
        raise forbid(f"this key may read availability only for its own channels, not {channel}")


async def _availability(
    core: ATP,
    who: Principal,
    sku: list[str],
    location: str,
    channel: str,
    customer_id: str | None = None,
) -> dict[str, Any]:
    _may_read(who, channel)
    items = await core.availability([(s, location) for s in sku], channel, customer_id=customer_id)
    return {"items": [convert.availability(a) for a in items]}


@router.get(
    "",
    response_model=AvailabilityOut,
    responses=problem_responses(401, 403, 422),
)
async def availability(
    request: Request,
    who: Caller,
    sku: Annotated[list[Ident], Query(min_length=1, max_length=MAX_SKUS)],
    location: Annotated[Ident, Query()],
    channel: Annotated[Channel, Query()],
    customer_id: Annotated[
        CustomerId | None, Query(description="also apply the buyer limits left to this buyer")
    ] = None,
) -> JSONResponse:
    """Available to promise for up to 500 SKUs at one location, for one channel."""
    return JSONResponse(
        await _availability(core_of(request), who, sku, location, channel, customer_id)
    )


@router.get(
    "/explain",
    response_model=ExplanationOut,
    responses=problem_responses(401, 403, 404, 422),
)
async def explain(
    request: Request,
    who: Caller,
    sku: Annotated[Ident, Query()],
    location: Annotated[Ident, Query()],
    channel: Annotated[Channel, Query()],
    customer_id: Annotated[
        CustomerId | None, Query(description="also show the buyer limit left to this buyer")
    ] = None,
    soon_seconds: Annotated[
        int, Query(ge=1, le=86_400, description="list holds that expire within this window")
    ] = 300,
    requested_date: Annotated[
        Day | None, Query(description="ATP for a reservation wanted on this date (time-phased)")
    ] = None,
    qty: Annotated[
        int | None, Query(ge=1, le=1_000_000_000, description="also answer its promise date")
    ] = None,
) -> JSONResponse:
    """Why ATP is what it is for one channel at one position: the figures reserve uses,
    with the time-phased schedule (inbound due and dated promises per day)."""
    _may_read(who, channel)
    e = await core_of(request).explain(
        sku,
        location,
        channel,
        customer_id=customer_id,
        soon_seconds=soon_seconds,
        requested_date=requested_date,
        qty=qty,
    )
    if e is None:
        raise UnknownPosition(f"no position for {sku} at {location}")
    return JSONResponse(convert.explanation(e))


@router.get(
    "/promise",
    response_model=PromiseOut,
    responses=problem_responses(401, 403, 404, 422),
)
async def promise(
    request: Request,
    who: Caller,
    sku: Annotated[Ident, Query()],
    location: Annotated[Ident, Query()],
    channel: Annotated[Channel, Query()],
    qty: Annotated[int, Query(ge=1, le=1_000_000_000)],
    customer_id: Annotated[
        CustomerId | None, Query(description="also apply the buyer limit left to this buyer")
    ] = None,
) -> JSONResponse:
    """The earliest date (UTC) a reservation of ``qty`` would be accepted now, from on hand
    and the inbound schedule, after everything promised, safety stock, protections, cap and
    buyer limit; ``promise_date`` is null when no known date gives it."""
    _may_read(who, channel)
    p = await core_of(request).promise(sku, location, channel, qty, customer_id=customer_id)
    if not p.exists:
        raise UnknownPosition(f"no position for {sku} at {location}")
    return JSONResponse(convert.promise(p))


# The fast lane (api/lane.py): the parameters exactly once each (sku: 1 to 500 times) and
# valid by the route's own types; anything else falls back to the route above.
_SKUS: TypeAdapter[list[str]] = TypeAdapter(
    Annotated[list[Ident], Field(min_length=1, max_length=MAX_SKUS)]
)
_IDENT: TypeAdapter[str] = TypeAdapter(Ident)
_CHANNEL: TypeAdapter[str] = TypeAdapter(Channel)
_CUSTOMER: TypeAdapter[str] = TypeAdapter(CustomerId)


@fast.route("GET", "")
async def _availability_fast(req: LaneRequest) -> tuple[int, Any]:
    sku: list[str] = []
    single: dict[str, list[str]] = {"location": [], "channel": [], "customer_id": []}
    for name, value in req.query():
        if name == "sku":
            sku.append(value)
        elif name in single:
            single[name].append(value)
        else:
            raise Fallback
    if len(single["location"]) != 1 or len(single["channel"]) != 1:
        raise Fallback
    if len(single["customer_id"]) > 1:
        raise Fallback
    location = check(_IDENT, single["location"][0])
    channel = check(_CHANNEL, single["channel"][0])
    customer = check(_CUSTOMER, single["customer_id"][0]) if single["customer_id"] else None
    return 200, await _availability(
        req.core, req.who, check(_SKUS, sku), location, channel, customer
    )
