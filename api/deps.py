"""Dependencies: the core, the key store, and the caller's principal with scope checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from atp import ATP
from atp.apikeys import KeyStore, Principal

from .problems import AuthError

_bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer atp_…")


async def get_core(request: Request) -> ATP:
    core: ATP = request.app.state.core
    return core


async def get_keys(request: Request) -> KeyStore:
    keys: KeyStore = request.app.state.keys
    return keys


Core = Annotated[ATP, Depends(get_core)]
Keys = Annotated[KeyStore, Depends(get_keys)]


async def principal(
    keys: Keys, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if cred is None or cred.scheme.lower() != "bearer" or not cred.credentials:
        raise AuthError(401, "unauthorized", "send an API key: Authorization: Bearer <key>")
    who = await keys.authenticate(cred.credentials)
    if who is None:
        raise AuthError(401, "unauthorized", "the API key is not valid or was revoked")
    return who


Caller = Annotated[Principal, Depends(principal)]


def require_any(*scopes: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets the caller through when it has one of ``scopes`` (or admin)."""

    async def check(who: Caller) -> Principal:
        if not any(who.has(s) for s in scopes):
            raise AuthError(403, "forbidden", f"this key needs one of the scopes: {', '.join(scopes)}")
        return who

    return check


Admin = Annotated[Principal, Depends(require_any("admin"))]
Reader = Annotated[Principal, Depends(require_any("read"))]


def forbid(detail: str) -> AuthError:
    return AuthError(403, "forbidden", detail)
