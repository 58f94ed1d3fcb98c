"""Exceptions for order management: oversells (a count, an adjustment or a short pick left
a position unable to cover its commitments) and short picks, listed and resolved.

Listing scans every bucket's exceptions on each call (atp.store ``ATP.exceptions``): fine
for the open exceptions operators work through, paged with ``limit`` and ``before``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse

from ..deps import Admin, Reader, core_of
from ..schemas import ExceptionId, ExceptionOut, ExceptionsPage, ResolveBody, problem_responses

router = APIRouter(prefix="/v1/exceptions", tags=["exceptions"])
IdPath = Annotated[ExceptionId, Path()]
ERRORS = problem_responses(401, 403, 404, 422)
BODY_ERRORS = problem_responses(400, 401, 403, 404, 409, 413, 422)


@router.get("", response_model=ExceptionsPage, responses=ERRORS)
async def list_exceptions(
    request: Request,
    who: Reader,
    status: Annotated[Literal["open", "resolved", "all"], Query()] = "open",
    kind: Annotated[Literal["oversell", "short_pick"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[ExceptionId | None, Query(description="next_before of the last page")] = None,
) -> JSONResponse:
    """Exceptions, newest first; page with ``before=<next_before>``."""
    items = await core_of(request).exceptions(
        status=None if status == "all" else status, kind=kind, limit=limit, before=before
    )
    nxt = items[-1].id if len(items) == limit else None
    return JSONResponse({"items": [e.to_dict() for e in items], "next_before": nxt})


@router.get("/{exception_id}", response_model=ExceptionOut, responses=ERRORS)
async def get_exception(exception_id: IdPath, request: Request, who: Reader) -> JSONResponse:
    """One exception, with the reservations it puts at risk and its resolution."""
    return JSONResponse((await core_of(request).exception(exception_id)).to_dict())


@router.post("/{exception_id}/resolve", response_model=ExceptionOut, responses=BODY_ERRORS)
async def resolve_exception(
    exception_id: IdPath, body: ResolveBody, request: Request, who: Admin
) -> JSONResponse:
    """Resolve an exception: release its reservations at risk, or keep them (admin)."""
    e = await core_of(request).resolve_exception(
        exception_id, body.action, note=body.note, actor=who.key_id, source="api"
    )
    return JSONResponse(e.to_dict())
