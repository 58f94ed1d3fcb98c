"""Helpers shared by the API tests (importable, unlike conftest)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from atp import ATP

ADMIN_KEY = "test-admin-key-0123456789abcdefXYZ"
PROBLEM = "application/problem+json"

Headers = dict[str, str]
NewKey = Callable[..., Awaitable[Headers]]
Seed = Callable[..., Awaitable[dict[str, Any]]]


def bearer(key: str) -> Headers:
    return {"Authorization": f"Bearer {key}"}


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The answer is an RFC 9457 problem of that status and type; returns its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    assert body["type"].endswith("/" + code), body
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


async def snapshot(atp: ATP) -> dict[bytes, bytes]:
    """Every key of the database and its serialized value (to show nothing changed)."""
    out = {}
    async for key in atp.redis.scan_iter(count=1000):
        out[key] = await atp.redis.dump(key)
    return out
