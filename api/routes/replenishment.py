"""Replenishment (atp.replenishment): the open signals (what needs ordering, and how
much), the planning settings per SKU, and the plan that computes reorder points from the
demand history. A position's levels are set under ``/v1/positions/{sku}/{location}/
replenishment`` (routes/positions.py)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse

from atp.errors import NotFound
from atp.replenishment import ReplenishmentSettings

from ..deps import Admin, Reader, core_of
from ..schemas import (
    Ident,
    PlanBody,
    PlanOut,
    ReplenishmentPage,
    ReplenishmentSettingsIn,
    ReplenishmentSettingsOut,
    problem_responses,
)

router = APIRouter(prefix="/v1/replenishment", tags=["replenishment"])
ERRORS = problem_responses(401, 403, 404, 422)
BODY_ERRORS = problem_responses(400, 401, 403, 404, 413, 422)
After = Annotated[
    str | None,
    Query(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}\|[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$",
        description="next_after of the previous page (<sku>|<location>)",
    ),
]


@router.get("", response_model=ReplenishmentPage, responses=ERRORS)
async def list_signals(
    request: Request,
    who: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: After = None,
    sku: Annotated[Ident | None, Query()] = None,
) -> JSONResponse:
    """Open replenishment signals by SKU and location; page with ``after=<next_after>``."""
    items = await core_of(request).replenishment(limit=limit, after=after, sku=sku)
    nxt = f"{items[-1].sku}|{items[-1].location}" if len(items) == limit else None
    return JSONResponse({"items": [s.to_dict() for s in items], "next_after": nxt})


@router.put("/settings/{sku}", response_model=ReplenishmentSettingsOut, responses=BODY_ERRORS)
async def put_settings(
    sku: Annotated[Ident, Path()], body: ReplenishmentSettingsIn, request: Request, who: Admin
) -> JSONResponse:
    """Store how a SKU's reorder points are planned (admin)."""
    st = ReplenishmentSettings(
        body.service_level, body.lead_time_days, body.review_days, body.window_days
    )
    await core_of(request).set_replenishment_settings(sku, st, actor=who.key_id, source="api")
    return JSONResponse({"sku": sku, **asdict(st)})


@router.get("/settings/{sku}", response_model=ReplenishmentSettingsOut, responses=ERRORS)
async def get_settings(
    sku: Annotated[Ident, Path()], request: Request, who: Reader
) -> JSONResponse:
    """A SKU's planning settings."""
    st = await core_of(request).replenishment_settings(sku)
    if st is None:
        raise NotFound(f"no replenishment settings for {sku}")
    return JSONResponse({"sku": sku, **asdict(st)})


@router.post("/plan", response_model=PlanOut, responses=BODY_ERRORS)
async def plan(body: PlanBody, request: Request, who: Admin) -> JSONResponse:
    """Compute reorder points from demand history and write them (admin; dry_run writes nothing)."""
    rows = await core_of(request).plan_replenishment(
        body.skus,
        dry_run=body.dry_run,
        apply_safety_stock=body.apply_safety_stock,
        actor=who.key_id,
        source="api",
    )
    return JSONResponse({"items": [r.to_dict() for r in rows]})
