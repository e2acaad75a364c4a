"""API keys: sent in `X-API-Key`, stored as sha256 digests in Redis, each key naming one tenant."""

from __future__ import annotations

import hashlib
import secrets

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


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        key = connection.headers.get(HEADER)
        if not key:
            raise Unauthorized(f"send an API key in the {HEADER} header")
        tenant = await connection.app.state.aredis.get(api_key_key(digest(key)))
        if tenant is None:
            raise Unauthorized("unknown or revoked API key")
        return AuthenticationResult(user=tenant.decode(), auth=key)


class NoAuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        return AuthenticationResult(user=LOCAL_TENANT, auth=None)
