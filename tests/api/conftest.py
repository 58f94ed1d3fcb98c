"""API fixtures: the app over the test's core, served in-process with its lifespan running.

* ``settings`` (overrides the root one, so the core and the app share it): a bootstrap
  admin key, keys re-read every 50 ms (revocation is seen quickly), no reaper task.
* ``app``: ``create_app(settings, core=atp)`` with its lifespan entered.
* ``client``: an ``httpx.AsyncClient`` on an ``ASGITransport`` to that app, with no key.
* ``admin``: the bootstrap admin key's headers; ``new_key(*scopes)`` creates a key with
  ``POST /v1/keys`` and returns its headers.
* ``seed(sku, location, on_hand)``: puts a position through the API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import ADMIN_KEY, Headers, NewKey, Seed, bearer
from fastapi import FastAPI
from pydantic import SecretStr

from api.app import create_app
from atp import ATP, Settings


@pytest.fixture
def settings() -> Settings:
    return Settings(
        redis_url=None,
        key_prefix="t:",
        buckets=16,
        data_dir=Path("/nonexistent"),
        admin_key=SecretStr(ADMIN_KEY),
        key_refresh_seconds=0.05,
        reaper_interval=0,
    )


@pytest.fixture
async def app(settings: Settings, atp: ATP) -> AsyncIterator[FastAPI]:
    app = create_app(settings, core=atp)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
def admin() -> Headers:
    return bearer(ADMIN_KEY)


@pytest.fixture
def new_key(client: httpx.AsyncClient, admin: Headers) -> NewKey:
    async def make(*scopes: str, name: str = "test") -> Headers:
        r = await client.post(
            "/v1/keys", json={"name": name, "scopes": list(scopes)}, headers=admin
        )
        assert r.status_code == 201, r.text
        return bearer(r.json()["key"])

    return make


@pytest.fixture
def seed(client: httpx.AsyncClient, admin: Headers) -> Seed:
    async def put(sku: str, location: str, on_hand: int, safety_stock: int = 0) -> dict[str, Any]:
        r = await client.put(
            f"/v1/positions/{sku}/{location}",
            json={"on_hand": on_hand, "safety_stock": safety_stock, "reason": "initial load"},
            headers=admin,
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    return put
