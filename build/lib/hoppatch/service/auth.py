"""API keys: sent in `X-API-Key`, stored as sha256 digests in Redis, each key naming one tenant."""

from __future__ import annotations

import hashlib
import secrets
import time

import redis
from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from hoppatch.jobs import api_key_key

from .problems import Unauthorized

HEADER = "X-API-Key"
LOCAL_TENANT = "local"
"""The tenant of every request when auth is switched off."""
OPEN_PATHS = ["^/healthz$", "^/readyz$", "^/metrics$", "^/schema"]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(client: redis.Redis, tenant: str) -> str:
    """A new key for `tenant`; only its digest is stored, so it is shown once."""
    key = "hp_" + secrets.token_urlsafe(32)
    client.set(api_key_key(digest(key)), tenant)
    return key


def revoke_key(client: redis.Redis, key: str) -> bool:
    return bool(client.delete(api_key_key(digest(key))))


KEY_CACHE_SECONDS = 5.0
"""How long a process trusts a key it has looked up: a revoked key stops working within this time."""
KEY_CACHE_SIZE = 10_000
_clock = time.monotonic


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        key = connection.headers.get(HEADER)
        if not key:
            raise Unauthorized(f"send an API key in the {HEADER} header")
        # The app's cache holds known keys only: a new key works at once, unknown ones cannot fill it.
        known: dict[str, tuple[str, float]] = connection.app.state.api_key_cache
        hashed = digest(key)
        tenant, expires = known.get(hashed, ("", 0.0))
        if _clock() >= expires:
            found = await connection.app.state.aredis.get(api_key_key(hashed))
            if found is None:
                known.pop(hashed, None)
                raise Unauthorized("unknown or revoked API key")
            if len(known) >= KEY_CACHE_SIZE:
                known.clear()
            tenant = found.decode()
            known[hashed] = (tenant, _clock() + KEY_CACHE_SECONDS)
        return AuthenticationResult(user=tenant, auth=key)


class NoAuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        return AuthenticationResult(user=LOCAL_TENANT, auth=None)
