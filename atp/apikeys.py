"""API keys: created, listed, revoked, and checked on every request.

A key reads ``atp_<id>_<secret>``: the id finds the record, the secret is checked against
its SHA-256 in constant time (the secret is 32 random bytes, so a fast hash is the right
one; there is nothing to brute-force). Records live in one Redis hash so every API
process shares them; each process keeps them in memory and re-reads them when a version
counter moves, checked at most every ``refresh_seconds``: a new or revoked key takes effect
everywhere within that time, and the request path costs no Redis round trip.

Scopes: ``admin`` (everything), ``read``, ``fulfil``, ``reserve:<channel>``.
The bootstrap admin key (``ATP_ADMIN_KEY``) is never stored; it is compared in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from .errors import InvalidRequest, NotFound

__all__ = ["ApiKey", "KeyStore", "Principal", "valid_scope"]

_SCOPE_RE = re.compile(r"admin|read|fulfil|reserve:[a-z0-9][a-z0-9_\-]{0,31}")
_TOKEN_RE = re.compile(r"atp_([a-f0-9]{16})_([A-Za-z0-9_\-]{43})")


def valid_scope(scope: str) -> bool:
    return _SCOPE_RE.fullmatch(scope) is not None


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    revoked_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a key id (``bootstrap`` for ATP_ADMIN_KEY) and its scopes."""

    key_id: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def channels(self) -> set[str]:
        return {s[8:] for s in self.scopes if s.startswith("reserve:")}


class KeyStore:
    """API keys in Redis (``<prefix>keys`` hash and ``<prefix>keys:ver`` counter)."""

    def __init__(
        self,
        client: Redis,
        prefix: str = "atp:",
        bootstrap_admin_key: str | None = None,
        refresh_seconds: float = 1.0,
    ) -> None:
        self.redis = client
        self.hash_key = f"{prefix}keys"
        self.ver_key = f"{prefix}keys:ver"
        self._bootstrap = (
            hashlib.sha256(bootstrap_admin_key.encode()).digest() if bootstrap_admin_key else None
        )
        self.refresh_seconds = refresh_seconds
        self._records: dict[str, dict[str, Any]] = {}
        self._version: int | None = None
        self._checked = 0.0
        self._lock = asyncio.Lock()

    async def create(self, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
        """Create a key; returns the record and the secret token (shown once)."""
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            raise InvalidRequest("name must be 1-100 characters", field="name")
        if not scopes:
            raise InvalidRequest("a key needs at least one scope", field="scopes")
        for s in scopes:
            if not valid_scope(s):
                raise InvalidRequest(
                    f"unknown scope {s!r:.60}: use admin, read, fulfil or reserve:<channel>",
                    field="scopes",
                )
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        rec = {
            "id": key_id,
            "name": name,
            "scopes": sorted(set(scopes)),
            "created_at": time.time(),
            "revoked_at": None,
            "hash": hashlib.sha256(secret.encode()).hexdigest(),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.hash_key, key_id, json.dumps(rec))
        pipe.incr(self.ver_key)
        await pipe.execute()
        self._checked = 0.0
        return _key(rec), f"atp_{key_id}_{secret}"

    async def list(self) -> list[ApiKey]:
        raw = await self.redis.hgetall(self.hash_key)
        return sorted((_key(json.loads(v)) for v in raw.values()), key=lambda k: k.created_at)

    async def revoke(self, key_id: str) -> ApiKey:
        raw = (
            await self.redis.hget(self.hash_key, key_id)
            if re.fullmatch(r"[a-f0-9]{16}", key_id)
            else None
        )
        if raw is None:
            raise NotFound(f"no key with id {key_id!r:.40}")
        rec = json.loads(raw)
        if rec.get("revoked_at") is None:
            rec["revoked_at"] = time.time()
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.hash_key, key_id, json.dumps(rec))
            pipe.incr(self.ver_key)
            await pipe.execute()
            self._checked = 0.0
        return _key(rec)

    async def authenticate(self, token: str) -> Principal | None:
        """The principal for a bearer token, or None. Never logs the token."""
        if self._bootstrap is not None:
            digest = hashlib.sha256(token.encode()).digest()
            if hmac.compare_digest(digest, self._bootstrap):
                return Principal("bootstrap", frozenset({"admin"}))
        m = _TOKEN_RE.fullmatch(token)
        if m is None:
            return None
        await self._refresh()
        rec = self._records.get(m.group(1))
        if rec is None:
            return None
        # compare even for revoked keys, so timing does not tell revoked from wrong
        good = hmac.compare_digest(
            hashlib.sha256(m.group(2).encode()).hexdigest().encode(), str(rec["hash"]).encode()
        )
        if not good or rec.get("revoked_at") is not None:
            return None
        return Principal(rec["id"], frozenset(rec["scopes"]))

    async def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.refresh_seconds:
            return
        async with self._lock:
            if time.monotonic() - self._checked < self.refresh_seconds:
                return
            ver_raw = await self.redis.get(self.ver_key)
            ver = int(ver_raw or 0)
            if ver != self._version:
                raw = await self.redis.hgetall(self.hash_key)
                self._records = {
                    (k.decode() if isinstance(k, bytes) else k): json.loads(v)
                    for k, v in raw.items()
                }
                self._version = ver
            self._checked = time.monotonic()


def _key(rec: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=rec["id"],
        name=rec["name"],
        scopes=tuple(rec["scopes"]),
        created_at=float(rec["created_at"]),
        revoked_at=rec.get("revoked_at"),
    )
