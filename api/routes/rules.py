from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic.json_schema import SkipJsonSchema

from atp import ATP
from atp.errors import InvalidRules, NotFound, RulesVersionConflict
from atp.rules import Rules

from ..deps import Admin, Reader, core_of
from ..problems import etag
from ..schemas import RulesBody, RulesOut, problem_responses


class _RulesRoute(APIRoute):
    """A rules document that does not validate gets one answer, the ``invalid_rules``
    problem with ``errors: [{loc, msg}]``, whichever check finds it: pydantic's field
    checks (met by FastAPI's body validation, here turned into the core's
    :class:`~atp.errors.InvalidRules`) or the document's own (atp.rules). Malformed JSON
    and bad headers or parameters stay FastAPI's ``validation_error``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                errs = e.errors()
                if not errs or any(
                    tuple(err.get("loc", ()))[:1] != ("body",) or err.get("type") == "json_invalid"
                    for err in errs
                ):
                    raise
                raise InvalidRules(
                    "the rules document is not valid",
                    errors=[{"loc": list(err["loc"][1:]), "msg": err["msg"]} for err in errs],
                ) from None

        return run


router = APIRouter(prefix="/v1/rules", tags=["rules"], route_class=_RulesRoute)

_ETAG = {
    "ETag": {
        "description": 'the rules version, quoted: "3" (send it back as If-Match)',
        "schema": {"type": "string"},
    }
}
IfMatch = Annotated[
    str | SkipJsonSchema[None],  # absent, never null: a header has no null
    Header(
        alias="If-Match",
        max_length=1000,
        description='apply only if the rules in force are this version: "3" (the ETag)',
    ),
]
_TAG = re.compile(r'"([0-9]{1,15})"')


async def _expected_version(core: ATP, if_match: str | None) -> int | None:
    """``If-Match`` (RFC 9110 13.1.1) as the version to apply over: ``*`` or no header,
    any; else one of the listed strong tags, compared in the same atomic step as the
    apply; a list that names no version in force is refused (412) here."""
    if if_match is None:
        return None
    tags = [t.strip() for t in if_match.split(",")]
    if "*" in tags:
        return None
    versions = {int(m.group(1)) for t in tags if (m := _TAG.fullmatch(t))}
    if len(versions) == 1:
        return versions.pop()
    current = (await core.rules(max_age=0)).version
    if current in versions:
        return current
    raise RulesVersionConflict(f"the rules are at version {current}", version=current)


def _answer(rules: Rules) -> JSONResponse:
    return JSONResponse(rules.to_dict(), headers={"ETag": etag(rules.version)})


@router.put(
    "",
    response_model=RulesOut,
    responses={200: {"headers": _ETAG}, **problem_responses(400, 401, 403, 412, 413, 422)},
)
async def apply_rules(
    document: Annotated[RulesBody, Body()],
    request: Request,
    who: Admin,
    if_match: IfMatch = None,
) -> JSONResponse:
    """Apply a rules document as the next version, in force everywhere when this answers."""
    core = core_of(request)
    expect = await _expected_version(core, if_match)
    return _answer(await core.apply_rules(document, expect_version=expect, actor=who.key_id))


@router.get(
    "",
    response_model=RulesOut,
    responses={200: {"headers": _ETAG}, **problem_responses(401, 403, 404, 422)},
)
async def get_rules(
    request: Request,
    who: Reader,
    version: Annotated[
        int | None,
        Query(ge=1, le=10**15, description="an earlier version (the last 100 are kept)"),
    ] = None,
) -> JSONResponse:
    """The rules in force (version 0: none applied), or an earlier version."""
    core = core_of(request)
    if version is None:
        return _answer(await core.rules(max_age=0))
    rules = await core.rules_version(version)
    if rules is None:
        raise NotFound(f"rules version {version} is not kept (or was never applied)")
    return _answer(rules)
