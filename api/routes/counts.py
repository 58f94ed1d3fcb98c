from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from atp.errors import NotFound

from ..deps import Admin, Reader, core_of
from ..schemas import CountBatchOut, CountQueuedOut, CountsBody, problem_responses

router = APIRouter(prefix="/v1/counts", tags=["counts"])

BatchId = Annotated[str, Path(max_length=64, examples=["cnt-1735689600000-0a1b2c3d"])]
_LOCATION = {
    "Location": {"description": "where the batch is read back", "schema": {"type": "string"}}
}


@router.post(
    "",
    status_code=202,
    response_model=CountQueuedOut,
    responses={202: {"headers": _LOCATION}, **problem_responses(400, 401, 403, 413, 422)},
)
async def queue_count(body: CountsBody, request: Request, who: Admin) -> JSONResponse:
    """Queue a cycle count for the workers; read its progress and report back by its id."""
    core = core_of(request)
    batch_id = await core.enqueue_counts(
        [r.model_dump() for r in body.rows],
        count_id=body.count_id,
        source=body.source or "api",
        assume_utc=body.assume_utc,
        actor=who.key_id,
    )
    return JSONResponse(
        {
            "batch_id": batch_id,
            "count_id": body.count_id or batch_id,
            "status": "queued",
            "rows": len(body.rows),
        },
        status_code=202,
        headers={"Location": f"/v1/counts/{batch_id}"},
    )


@router.get(
    "/{batch_id}", response_model=CountBatchOut, responses=problem_responses(401, 403, 404, 422)
)
async def get_count(batch_id: BatchId, request: Request, who: Reader) -> JSONResponse:
    """A queued count: its status, progress and, once done, its report."""
    batch = await core_of(request).count_batch(batch_id)
    if batch is None:
        raise NotFound(f"no count batch {batch_id} (unknown, or finished longer ago than kept)")
    return JSONResponse(batch)
