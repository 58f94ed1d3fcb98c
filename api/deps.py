"""Dependencies: the caller's principal with scope checks; the core and the key store.

FastAPI solves every dependency of a route on every request, at ~8 µs of CPU each here
(a fifth of the trivial endpoint; ../shared/PERFORMANCE.md: Python CPU is the limit). So a
route has exactly one: a :class:`KeyAuth`, which reads the bearer key, authenticates it
and checks the scopes in one step, and documents itself in OpenAPI as the ``HTTPBearer``
scheme. The core and the key store come from ``request.app.state`` (:func:`core_of`,
:func:`keys_of`): plain calls, not dependencies. The fast lane (api/lane.py) authenticates
with the same :meth:`KeyAuth.principal`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from atp import ATP
from atp.apikeys import KeyStore, Principal

from .problems import AuthError

__all__ = [
    "Admin",
    "Caller",
    "KeyAuth",
    "Reader",
    "caller",
    "core_of",
    "forbid",
    "keys_of",
    "require_any",
]


def core_of(request: Request) -> ATP:
    c: ATP = request.app.state.core
    return c


def keys_of(request: Request) -> KeyStore:
    k: KeyStore = request.app.state.keys
    return k


class KeyAuth(HTTPBearer):
    """``Authorization: Bearer <key>``: 401 without a valid key; with ``scopes``, 403 for a
    key that has none of them (admin has every scope)."""

    def __init__(self, *scopes: str) -> None:
        # the scheme keeps HTTPBearer's name and description: the OpenAPI document is the contract
        super().__init__(
            scheme_name="HTTPBearer",
            auto_error=False,
            description="an API key: Authorization: Bearer atp_…",
        )
        self.scopes = scopes
        self._refusal = f"this key needs one of the scopes: {', '.join(scopes)}"

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        return await self.principal(request.headers.get("authorization"), keys_of(request))

    async def principal(self, authorization: str | None, store: KeyStore) -> Principal:
        """The caller behind an ``Authorization`` header value; raises :class:`AuthError`."""
        # as HTTPBearer: "<scheme> <credentials>", the scheme case-insensitive
        scheme, _, credentials = (authorization or "").partition(" ")
        credentials = credentials.strip()
        if not (scheme and credentials) or scheme.lower() != "bearer":
            raise AuthError(401, "unauthorized", "send an API key: Authorization: Bearer <key>")
        who = await store.authenticate(credentials)
        if who is None:
            raise AuthError(401, "unauthorized", "the API key is not valid or was revoked")
        if self.scopes and not any(who.has(s) for s in self.scopes):
            raise AuthError(403, "forbidden", self._refusal)
        return who


def require_any(*scopes: str) -> KeyAuth:
    """A dependency that lets the caller through when it has one of ``scopes`` (or admin)."""
    return KeyAuth(*scopes)


caller = KeyAuth()
Caller = Annotated[Principal, Depends(caller)]
Admin = Annotated[Principal, Depends(require_any("admin"))]
Reader = Annotated[Principal, Depends(require_any("read"))]


def forbid(detail: str) -> AuthError:
    return AuthError(403, "forbidden", detail)
