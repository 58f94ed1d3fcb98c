"""The app factory: wiring only. ``create_app()`` reads settings from the environment."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atp import ATP, Settings
from atp.apikeys import KeyStore

from . import lane, metrics, problems
from .lane import FastLane
from .routes import (
    availability,
    counts,
    exceptions,
    health,
    keys,
    positions,
    replenishment,
    reservations,
    rules,
    verify,
)

log = logging.getLogger("atp.api")


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``. An HTTPException, because FastAPI turns any other error met
    while it reads a body into a 400; this one reaches the problem handlers as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request bodies are limited to {limit} bytes")


class EdgeMiddleware:
    """Pure ASGI (cheap): refuses bodies over the limit with 413, serves the fast lane's
    requests (api/lane.py; everything else goes on to FastAPI) and records latency by route
    template and status."""

    def __init__(self, app: ASGIApp, max_body: int, lane: FastLane | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.lane = lane

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
            path = "unmatched"
        else:
            if self.lane is not None and (hit := self.lane.match(scope)) is not None:
                read = await self.lane.serve(*hit, scope, receive, send_status)
                if read is None:
                    metrics.observe_request(
                        scope["method"], hit[0].path, status, time.perf_counter() - start
                    )
                    return
                receive = lane.replay(read, receive)
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
            path = getattr(scope.get("route"), "path", "unmatched")
        metrics.observe_request(scope["method"], path, status, time.perf_counter() - start)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = problems.problem(
            413,
            "body_too_large",
            "Body too large",
            f"request bodies are limited to {self.max_body} bytes",
        )
        await resp(scope, receive, send)


async def _reaper(core: ATP, interval: float, stop: asyncio.Event) -> None:
    """Give expired holds back by themselves, even on positions nobody touches.

    Runs every ``ATP_REAPER_INTERVAL`` seconds (0: off). ``atp serve`` turns it off when it
    runs its worker (atp.worker reaps); it serves ``atp serve --no-worker`` and apps served
    some other way, alone or beside dedicated workers (two reapers never reclaim a hold
    twice: the script re-checks each one).

    Stopped by ``stop``, not by cancelling: redis-py can turn a cancellation that lands
    mid-read into a ConnectionError, which a loop that must survive errors would swallow
    (seen here: shutdown then waited forever)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            break
        try:
            res = await core.expire_holds()
            if res.expired:
                metrics.HOLDS_RECLAIMED.inc(len(res.expired))
                metrics.UNITS_RECLAIMED.inc(res.units)
        except Exception:  # a reaper that dies would stop reclaiming
            log.exception("reaping expired holds failed; retrying")


def _freeze_startup_heap() -> None:
    """Take what is alive after startup (modules, classes, schemas, the app: ~80k objects,
    all living as long as the process) out of the cyclic GC's sight. Under load its full
    collections ran more than once a second and each paused every request in flight for
    25-35 ms: that was the p99, for the trivial endpoint too. Frozen, one takes ~1 ms.
    Reference counting still frees these objects; only cycles among them would stay."""
    gc.collect()
    gc.freeze()


# FastAPI's native OpenTelemetry (newer releases) costs every request a few checks even
# with no provider configured; this service exports Prometheus metrics instead.
_NO_OTEL: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(
    settings: Settings | None = None, core: ATP | None = None, *, fast_lane: bool = True
) -> FastAPI:
    """Build the app.

    :param settings: defaults to the environment (``ATP_*``); ``redis_url`` must be set
        unless ``core`` is given (``atp serve`` sets it to the embedded server).
    :param core: an existing core (tests); the app then does not close it.
    :param fast_lane: serve the hot routes' ordinary requests before FastAPI (api/lane.py);
        off, FastAPI serves every request (the tests compare the two).
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
        if own:  # a served process, not a test's app over a test's core
            _freeze_startup_heap()
        stop = asyncio.Event()
        task = (
            asyncio.create_task(_reaper(c, settings.reaper_interval, stop))
            if settings.reaper_interval
            else None
        )
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                # a reap in flight finishes (it is bounded); past that, cancel
                done, _ = await asyncio.wait({task}, timeout=10)
                if not done:
                    task.cancel()
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
    for r in (
        health,
        positions,
        availability,
        reservations,
        rules,
        keys,
        exceptions,
        counts,
        verify,
        replenishment,
    ):
        app.include_router(r.router)
    fast = FastLane([*reservations.fast.routes, *availability.fast.routes], settings.max_body_bytes)
    app.add_middleware(
        EdgeMiddleware, max_body=settings.max_body_bytes, lane=fast if fast_lane else None
    )
    return app
