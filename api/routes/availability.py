from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field, TypeAdapter

from atp import ATP
from atp.apikeys import Principal

from .. import convert
from ..deps import Caller, core_of, forbid
from ..lane import Fallback, LaneRequest, LaneRouter, check
from ..schemas import AvailabilityOut, Channel, Ident, problem_responses

router = APIRouter(prefix="/v1/availability", tags=["availability"])
fast = LaneRouter(router)
MAX_SKUS = 500


async def _availability(
    core: ATP, who: Principal, sku: list[str], location: str, channel: str
) -> dict[str, Any]:
    if not (who.has("read") or channel in who.channels()):
        raise forbid(f"this key may read availability only for its own channels, not {channel}")
    items = await core.availability([(s, location) for s in sku], channel)
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
) -> JSONResponse:
    """Available to promise for up to 500 SKUs at one location, for one channel."""
    return JSONResponse(await _availability(core_of(request), who, sku, location, channel))


# The fast lane (api/lane.py): the parameters exactly once each (sku: 1 to 500 times) and
# valid by the route's own types; anything else falls back to the route above.
_SKUS: TypeAdapter[list[str]] = TypeAdapter(
    Annotated[list[Ident], Field(min_length=1, max_length=MAX_SKUS)]
)
_IDENT: TypeAdapter[str] = TypeAdapter(Ident)
_CHANNEL: TypeAdapter[str] = TypeAdapter(Channel)


@fast.route("GET", "")
async def _availability_fast(req: LaneRequest) -> tuple[int, Any]:
    sku: list[str] = []
    single: dict[str, list[str]] = {"location": [], "channel": []}
    for name, value in req.query():
        if name == "sku":
            sku.append(value)
        elif name in single:
            single[name].append(value)
        else:
            raise Fallback
    if len(single["location"]) != 1 or len(single["channel"]) != 1:
        raise Fallback
    location = check(_IDENT, single["location"][0])
    channel = check(_CHANNEL, single["channel"][0])
    return 200, await _availability(req.core, req.who, check(_SKUS, sku), location, channel)
