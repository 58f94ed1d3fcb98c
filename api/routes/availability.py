from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from .. import convert
from ..deps import Caller, Core, forbid
from ..schemas import AvailabilityOut, Channel, Ident, problem_responses

router = APIRouter(prefix="/v1/availability", tags=["availability"])
MAX_SKUS = 500


@router.get(
    "",
    response_model=AvailabilityOut,
    responses=problem_responses(401, 403, 422),
)
async def availability(
    core: Core,
    who: Caller,
    sku: Annotated[list[Ident], Query(min_length=1, max_length=MAX_SKUS)],
    location: Annotated[Ident, Query()],
    channel: Annotated[Channel, Query()],
) -> JSONResponse:
    """Available to promise for up to 500 SKUs at one location, for one channel."""
    if not (who.has("read") or channel in who.channels()):
        raise forbid(f"this key may read availability only for its own channels, not {channel}")
    items = await core.availability([(s, location) for s in sku], channel)
    return JSONResponse({"items": [convert.availability(a) for a in items]})
