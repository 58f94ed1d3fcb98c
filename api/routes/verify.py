"""``GET /v1/verify``: the whole book checked against the invariants (atp.verify), for
operators without Redis access (``atp verify --url``).

The answer is a 200 whether or not the book is sound: the request succeeded and the report
is its result (``ok``, ``problems``), as a test runner's report is. A 409 would say the
request conflicts with the resource's state, which the caller can change and retry; here
nothing is asked of the book, and a client (or a monitor) that reads ``ok`` needs no
special case for an error answer that carries a full report.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from atp.verify import verify as check_book

from ..deps import Admin, core_of
from ..schemas import VerifyOut, problem_responses

router = APIRouter(prefix="/v1/verify", tags=["verify"])


@router.get("", response_model=VerifyOut, responses=problem_responses(401, 403, 422))
async def verify(
    request: Request,
    who: Admin,
    allow_uncovered: Annotated[
        bool,
        Query(description="report, don't fail, positions left uncovered by short picks or counts"),
    ] = False,
    check_log: Annotated[
        bool, Query(description="also check every position's movement log chain (I5)")
    ] = True,
) -> VerifyOut:
    """Check the whole book (I1, I2, I5, index and totals); 200 with ok=false if it fails."""
    rep = await check_book(core_of(request), check_log=check_log, allow_uncovered=allow_uncovered)
    return VerifyOut(
        ok=rep.ok,
        positions=rep.positions,
        reservations=rep.reservations,
        movements=rep.movements,
        problems=rep.problems,
        uncovered=rep.uncovered,
        summary=rep.summary(),
    )
