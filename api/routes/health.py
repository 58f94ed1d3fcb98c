from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from .. import metrics
from ..deps import core_of

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis unreachable or scripts not loaded"}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness: Redis answers and every script is loaded."""
    core = core_of(request)
    try:
        await core.ready()
    except Exception as e:  # any failure means not ready
        return JSONResponse({"status": "unavailable", "detail": type(e).__name__}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus(request: Request) -> Response:
    """Prometheus metrics."""
    try:
        committed, held = await core_of(request).totals()
        metrics.UNITS_COMMITTED.set(committed)
        metrics.UNITS_HELD.set(held)
    except Exception:  # the process metrics are still worth a scrape without Redis
        metrics.SCRAPE_ERRORS.inc()
    body, ctype = metrics.render()
    return Response(body, media_type=ctype)
