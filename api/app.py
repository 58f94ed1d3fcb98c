"""The app factory: wiring only. ``create_app()`` reads settings from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from contextlib import asynccontextmanager


from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atp import ATP, Settings
from atp.apikeys import KeyStore

from . import metrics, problems
from .routes import availability, health, keys, positions, reservations

log = logging.getLogger("atp.api")


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``. An HTTPException, because FastAPI turns any other error met
    while it reads a body into a 400; this one reaches the problem handlers as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request bodies are limited to {limit} bytes")


class EdgeMiddleware:
    """Pure ASGI (cheap): refuses bodies over the limit with 413 and records latency by
    route template and status."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._too_large(scope, receive, send_status)
        else:
            seen = 0

            async def counted() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge(self.max_body)
                return message

            try:
                await self.app(scope, counted, send_status)
            except _BodyTooLarge:
                if started:
                    raise
                await self._too_large(scope, receive, send_status)
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.REQUEST_LATENCY.labels(scope["method"], path, str(status)).observe(
            time.perf_counter() - start
        )

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = problems.problem(
            413,
            "body_too_large",
            "Body too large",
            f"request bodies are limited to {self.max_body} bytes",
        )
        await resp(scope, receive, send)


async def _reaper(core: ATP, interval: float) -> None:
    """Give expired holds back by themselves, even on positions nobody touches."""
    while True:
        await asyncio.sleep(interval)
        try:
            res = await core.expire_holds()
            if res.expired:
                metrics.HOLDS_RECLAIMED.inc(len(res.expired))
                metrics.UNITS_RECLAIMED.inc(res.units)
        except Exception:  # noqa: BLE001 - a reaper that dies would stop reclaiming
            log.exception("reaping expired holds failed; retrying")


# FastAPI's native OpenTelemetry (newer releases) costs every request a few checks even
# with no provider configured; this service exports Prometheus metrics instead.
_NO_OTEL: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(settings: Settings | None = None, core: ATP | None = None) -> FastAPI:
    """Build the app.

    :param settings: defaults to the environment (``ATP_*``); ``redis_url`` must be set
        unless ``core`` is given (``atp serve`` sets it to the embedded server).
    :param core: an existing core (tests); the app then does not close it.
    """
    settings = settings or Settings()
    if core is None and not settings.redis_url:
        raise RuntimeError(
            "ATP_REDIS_URL is not set (atp serve starts an embedded server and sets it)"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = core is None
        c = core or ATP.from_url(str(settings.redis_url), settings, max_connections=1024)
        await c.start()
        admin = settings.admin_key.get_secret_value() if settings.admin_key else None
        app.state.core = c
        app.state.keys = KeyStore(c.redis, settings.key_prefix, admin, settings.key_refresh_seconds)
        task = (
            asyncio.create_task(_reaper(c, settings.reaper_interval))
            if settings.reaper_interval
            else None
        )
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if own:
                await c.aclose()

    app = FastAPI(
        title="ATP core",
        version="1.0.0",
        summary="Available to promise: reserve stock without ever committing a unit twice.",
        lifespan=lifespan,
        **_NO_OTEL,
    )
    problems.install(app)
    for r in (health, positions, availability, reservations, keys):
        app.include_router(r.router)
    app.add_middleware(EdgeMiddleware, max_body=settings.max_body_bytes)
    return app
