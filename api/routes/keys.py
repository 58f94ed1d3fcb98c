from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from ..deps import Admin, keys_of
from ..schemas import KeyCreate, KeyCreated, KeyList, KeyOut, problem_responses

router = APIRouter(prefix="/v1/keys", tags=["keys"])
ERRORS = problem_responses(401, 403, 422)
CREATE_ERRORS = problem_responses(400, 401, 403, 413, 422)


@router.post("", status_code=201, response_model=KeyCreated, responses=CREATE_ERRORS)
async def create_key(body: KeyCreate, request: Request, who: Admin) -> JSONResponse:
    """Create an API key; the secret is in the answer, once."""
    rec, secret = await keys_of(request).create(body.name, body.scopes)
    return JSONResponse({**rec.public(), "key": secret}, status_code=201)


@router.get("", response_model=KeyList, responses=ERRORS)
async def list_keys(request: Request, who: Admin) -> JSONResponse:
    """List API keys (never their secrets)."""
    return JSONResponse({"items": [k.public() for k in await keys_of(request).list()]})


@router.delete("/{key_id}", response_model=KeyOut, responses=problem_responses(401, 403, 404, 422))
async def revoke_key(
    key_id: Annotated[str, Path(pattern=r"^[a-f0-9]{16}$")], request: Request, who: Admin
) -> JSONResponse:
    """Revoke an API key (takes effect in every process within a second)."""
    return JSONResponse((await keys_of(request).revoke(key_id)).public())
