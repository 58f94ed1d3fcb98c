"""The fast lane: the hot routes' ordinary requests, served as plain ASGI before FastAPI.

Why. Python CPU is this service's limit (../shared/PERFORMANCE.md). Measured in-process
(no HTTP server), the trivial endpoint costs ~45 µs of CPU a request and a reserve through
FastAPI ~175 µs (~200 µs before its dependencies were collapsed into one), while the
core's auto-pipelined script call inside it costs ~32 µs: most of a reserve was FastAPI's
request machinery (routing, solving dependencies, reading and validating the body, the
response), not the work. Through the lane a reserve costs ~65 µs.

How it stays the same API. The FastAPI routes remain the contract (the OpenAPI document,
the tests) and the way every request goes that the lane is not *certain* about. The lane
serves a request only when FastAPI would accept it too, and hands anything else to FastAPI
untouched, replaying what it read of the body, so that FastAPI answers exactly as before.
It serves:

* the method and path of a lane route (each is the twin of a FastAPI route with the same
  method, path and auth dependency, checked when it is declared), at the app's root;
* with a key its route's :class:`~api.deps.KeyAuth` accepts (else FastAPI's 401/403);
* a body, when there is one, sent with ``Content-Length`` and an ``application/json``
  content type and accepted by the route's model (:func:`parse`); what the model refuses
  goes to FastAPI, which parses it its own way and gives the exact 400/422;
* path and query parameters their own types accept (:func:`check`); else FastAPI's 422.

Past those checks the handler runs the same code as the FastAPI route (shared functions in
``routes/``). An :class:`~api.problems.AuthError` or a core error it raises becomes the
same problem answer FastAPI's exception handlers give (:mod:`api.problems`); any other
error propagates to Starlette's ServerErrorMiddleware (a 500), as from a route. A handler
raises :class:`Fallback` only before it has done anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.types import Message, Receive, Scope, Send

from atp import ATP, ATPError
from atp.apikeys import Principal

from . import problems
from .deps import KeyAuth, caller

__all__ = [
    "Fallback",
    "FastLane",
    "LaneRequest",
    "LaneRoute",
    "LaneRouter",
    "check",
    "parse",
    "replay",
]

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class Fallback(Exception):
    """This request is FastAPI's to answer (raised before anything was done)."""


@dataclass(slots=True)
class LaneRequest:
    core: ATP
    who: Principal
    params: dict[str, str]
    """path parameters, as matched (check them)"""
    query_string: bytes
    body: bytes | None
    """the JSON body; None when the request has none (no or an empty body)"""

    def query(self) -> list[tuple[str, str]]:
        """The query's name/value pairs, decoded as Starlette decodes them."""
        return parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True)


Handler = Callable[[LaneRequest], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True, slots=True)
class LaneRoute:
    method: str
    path: str
    """the FastAPI route's path template; also the route label of the latency metric"""
    handler: Handler
    auth: KeyAuth
    takes_body: bool
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        # Starlette's default ``{name}`` convertor: one non-empty path segment
        regex = re.sub(r"\\\{([a-z_]+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.path))
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))


class LaneRouter:
    """A module's lane routes, each the twin of one of ``router``'s routes, declared after
    it with the same method and path: ``@fast.route("POST", "")``."""

    def __init__(self, router: APIRouter) -> None:
        self.router = router
        self.routes: list[LaneRoute] = []

    def route(
        self, method: str, path: str, *, body: bool = False, auth: KeyAuth = caller
    ) -> Callable[[Handler], Handler]:
        """``body``: the route takes a JSON body; ``auth``: the route's own dependency."""
        full = self.router.prefix + path
        twin = any(
            isinstance(r, APIRoute)
            and r.path == full
            and method in (r.methods or ())
            and any(d.call is auth for d in r.dependant.dependencies)
            for r in self.router.routes
        )
        if not twin:
            raise RuntimeError(f"lane route {method} {full}: no FastAPI route with that auth")

        def add(handler: Handler) -> Handler:
            self.routes.append(LaneRoute(method, full, handler, auth, body))
            return handler

        return add


def parse(model: type[M], body: bytes | None) -> M:
    """The body as ``model``, or :class:`Fallback`. What ``model_validate_json`` accepts,
    FastAPI's ``json.loads`` and validation accept as the same value (tests/api/test_lane.py);
    the reverse need not hold, and that is FastAPI's to answer."""
    if body is None:
        raise Fallback
    try:
        return model.model_validate_json(body)
    except ValidationError:
        raise Fallback from None


def check(adapter: TypeAdapter[T], value: object) -> T:
    """A parameter validated by its route's own type, or :class:`Fallback`."""
    try:
        return adapter.validate_python(value)
    except ValidationError:
        raise Fallback from None


def replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that first gives back ``messages`` (what the lane read)."""
    if not messages:
        return receive
    pending = iter(messages)

    async def again() -> Message:
        for message in pending:
            return message
        return await receive()

    return again


def _is_json(content_type: bytes | None) -> bool:
    # only the plain spelling; FastAPI reads other JSON media types, so those fall back
    return (
        content_type is not None
        and content_type.split(b";", 1)[0].strip().lower() == b"application/json"
    )


def _json_bytes(content: Any) -> bytes:
    # exactly Starlette's JSONResponse.render
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode()


class FastLane:
    """Matches and serves lane routes; used by :class:`api.app.EdgeMiddleware`."""

    def __init__(self, routes: Iterable[LaneRoute], max_body: int) -> None:
        self.routes = list(routes)
        self.max_body = max_body
        self.exact: dict[tuple[str, str], LaneRoute] = {}
        self.templated: dict[str, list[LaneRoute]] = {}
        for r in self.routes:
            if "{" in r.path:
                self.templated.setdefault(r.method, []).append(r)
            else:
                self.exact[(r.method, r.path)] = r

    def match(self, scope: Scope) -> tuple[LaneRoute, dict[str, str]] | None:
        if scope.get("root_path"):
            return None
        method, path = scope["method"], scope["path"]
        route = self.exact.get((method, path))
        if route is not None:
            return route, {}
        for route in self.templated.get(method, ()):
            m = route.pattern.match(path)
            if m is not None:
                return route, m.groupdict()
        return None

    async def serve(
        self, route: LaneRoute, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> list[Message] | None:
        """Serve the request: None when answered, else the messages read from ``receive``
        (for :func:`replay`) and the request is FastAPI's."""
        read: list[Message] = []
        authorization = content_type = length = None
        chunked = False
        for k, v in scope["headers"]:  # the first of repeated headers, as Starlette's Headers.get
            if k == b"authorization":
                authorization = v if authorization is None else authorization
            elif k == b"content-type":
                content_type = v if content_type is None else content_type
            elif k == b"content-length":
                length = v if length is None else length
            elif k == b"transfer-encoding":
                chunked = True
        state = scope["app"].state
        try:
            who = await route.auth.principal(
                None if authorization is None else authorization.decode("latin-1"), state.keys
            )
        except problems.AuthError:
            return read
        body: bytes | None = None
        if route.takes_body and (chunked or length is not None):
            if chunked or not length or not length.isdigit() or int(length) > self.max_body:
                return read
            size = int(length)
            if size:  # FastAPI reads the content type of a non-empty body only
                if not _is_json(content_type):
                    return read
                chunks = []
                while True:
                    message = await receive()
                    read.append(message)
                    if message["type"] != "http.request":
                        return read
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
                body = b"".join(chunks)
                if len(body) != size:
                    return read
        request = LaneRequest(state.core, who, params, scope["query_string"], body)
        try:
            status, content = await route.handler(request)
        except Fallback:
            return read
        except ATPError as e:
            await problems.core_problem(e)(scope, receive, send)
            return None
        except problems.AuthError as e:
            await problems.auth_problem(e)(scope, receive, send)
            return None
        payload = _json_bytes(content)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-length", str(len(payload)).encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        return None
