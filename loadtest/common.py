"""Helpers the locustfiles share: admin calls through the API, and ``GET /v1/verify``."""

from __future__ import annotations

from typing import Any

import requests


def admin_request(
    host: str, key: str, method: str, path: str, body: Any = None, **kw: Any
) -> requests.Response:
    """One call with the admin key; ``session=`` reuses connections (default: none)."""
    session = kw.pop("session", None) or requests
    return session.request(
        method,
        host.rstrip("/") + path,
        json=body,
        headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})},
        timeout=30,
        **kw,
    )


def ok(resp: requests.Response, what: str) -> Any:
    """The JSON body, or a RuntimeError naming what failed."""
    if resp.status_code >= 300:
        raise RuntimeError(f"{what}: HTTP {resp.status_code} {resp.text[:300]}")
    return resp.json()


def verify(resp: requests.Response) -> tuple[Any, str | None]:
    """``GET /v1/verify``'s answer as (what to report, the failure or None); a 404 (a server
    without it) is reported, not failed."""
    if resp.status_code == 404:
        return "not available (404): only the checks above", None
    rep = ok(resp, "GET /v1/verify")
    out = {k: rep.get(k) for k in ("ok", "summary", "problems")}
    if not rep.get("ok"):
        return out, f"GET /v1/verify failed: {rep.get('summary')} {rep.get('problems')}"
    return out, None
