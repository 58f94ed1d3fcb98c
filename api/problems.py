"""Every error leaves as an RFC 9457 ``application/problem+json`` body, mapped here, once."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from atp import errors

PROBLEM_BASE = "https://atp-core.dev/problems/"
MEDIA_TYPE = "application/problem+json"

# core error -> (HTTP status, title)
_STATUS: list[tuple[type[errors.ATPError], int, str]] = [
    (errors.InvalidRules, 422, "Invalid rules document"),
    (errors.CustomerRequired, 422, "Customer required"),
    (errors.NoRoute, 422, "No route"),
    (errors.InvalidRequest, 422, "Invalid request"),
    (errors.UnknownReservation, 404, "Unknown reservation"),
    (errors.UnknownException, 404, "Unknown exception"),
    (errors.UnknownPosition, 404, "Unknown position"),
    (errors.NotFound, 404, "Not found"),
    (errors.InsufficientStock, 409, "Insufficient stock"),
    (errors.BuyerLimitExceeded, 409, "Buyer limit exceeded"),
    (errors.AlreadyResolved, 409, "Exception already resolved"),
    (errors.IdempotencyConflict, 409, "Idempotency conflict"),
    (errors.HoldExpired, 409, "Hold expired"),
    (errors.AlreadyReleased, 409, "Reservation released"),
    (errors.AlreadyFulfilled, 409, "Reservation fulfilled"),
    (errors.NotConfirmed, 409, "Reservation not confirmed"),
    (errors.InvalidTransition, 409, "Invalid transition"),
    (errors.OverFulfil, 409, "More than the line has open"),
    (errors.NegativeOnHand, 409, "On hand would go negative"),
    (errors.UnknownLine, 422, "Unknown reservation line"),
    (errors.Refused, 409, "Refused"),
    (errors.WrongChannel, 403, "Wrong channel"),
    (errors.RulesVersionConflict, 412, "Rules version conflict"),
    (errors.RulesStale, 503, "Rules changing"),
    (errors.BackendError, 503, "Backend unavailable"),
]


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {
        "type": PROBLEM_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def etag(version: int) -> str:
    """The rules version as an entity tag (``GET``/``PUT /v1/rules``, ``If-Match``)."""
    return f'"{version}"'


def core_problem(exc: errors.ATPError) -> JSONResponse:
    # every core error is listed; the fallback is for one that is not
    status, title = next(
        ((s, t) for cls, s, t in _STATUS if isinstance(exc, cls)), (500, "Internal error")
    )
    extra = dict(exc.extra)
    if isinstance(exc, errors.InvalidRequest) and exc.field:
        extra["errors"] = [{"field": exc.field, "message": exc.detail}]
    headers = None
    if isinstance(exc, errors.RulesStale):  # the next try meets the new version
        headers = {"Retry-After": "1"}
    elif isinstance(exc, errors.RulesVersionConflict) and isinstance(extra.get("version"), int):
        headers = {"ETag": etag(extra["version"])}
    return problem(status, exc.code, title, exc.detail, headers, **extra)


class AuthError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status, self.code, self.detail = status, code, detail


def auth_problem(exc: AuthError) -> JSONResponse:
    title = "Unauthorized" if exc.status == 401 else "Forbidden"
    return problem(exc.status, exc.code, title, exc.detail)


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.ATPError)
    async def _core(_: Request, exc: errors.ATPError) -> JSONResponse:
        return core_problem(exc)

    @app.exception_handler(AuthError)
    async def _auth(_: Request, exc: AuthError) -> JSONResponse:
        return auth_problem(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                # its loc is ("body", <character offset>): name the body, not a field "17"
                where, why = e.get("loc", ("body", "?"))[-1], e.get("ctx", {}).get("error", "")
                msg = f"malformed JSON at character {where}: {why}".rstrip(": ")
                errs.append({"field": "body", "message": msg, "type": "json_invalid"})
                continue
            loc = [str(p) for p in e.get("loc", ()) if p != "body"]
            errs.append(
                {
                    "field": ".".join(loc) or "body",
                    "message": e.get("msg", ""),
                    "type": e.get("type", ""),
                }
            )
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errs[:5])
        return problem(422, "validation_error", "Invalid request", detail, errors=errs)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            404: "not_found",
            405: "method_not_allowed",
            413: "body_too_large",
            400: "bad_request",
        }
        title = "Body too large" if exc.status_code == 413 else str(exc.detail)
        code = codes.get(exc.status_code, "http_error")
        resp = problem(exc.status_code, code, title, str(exc.detail))
        resp.headers.update(exc.headers or {})  # a 405 must say what is Allowed (RFC 9110)
        return resp
