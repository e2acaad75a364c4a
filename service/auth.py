"""API keys: sent in `X-API-Key`, stored as sha256 digests in Redis, each key naming one tenant.

A key's record also carries what the key may do: the models it may patch (none listed: any the service
serves) and its own ceiling on a job's `budget.max_seconds`. Keys are listed and revoked by id or tenant;
the plaintext is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

import msgspec
import redis
from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from msgspec import Struct

from hoppatch.jobs import PREFIX, api_key_key, now

from .problems import Unauthorized
from .trust import Trusted

HEADER = "X-API-Key"
LOCAL_TENANT = "local"
"""The tenant of every request when auth is switched off."""
OPEN_PATHS = ["^/healthz$", "^/readyz$", "^/metrics$", "^/schema"]
KEY_INDEX = f"{PREFIX}:apikeys"
"""Hash: key id → digest, for listing and revoking without the plaintext."""


class ApiKey(Struct, frozen=True):
    id: str
    tenant: str
    created_at: datetime
    models: tuple[str, ...] = ()
    """Model references this key may patch; empty: every model the service serves."""
    max_seconds: float | None = None
    """Ceiling on `budget.max_seconds` for this key's jobs; None: the service's default."""


LOCAL_KEY = ApiKey("local", LOCAL_TENANT, datetime.fromtimestamp(0))
_decoder = msgspec.json.Decoder(ApiKey)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(client: redis.Redis, tenant: str, models: tuple[str, ...] = (), max_seconds: float | None = None) -> tuple[ApiKey, str]:
    """A new key for `tenant`: its record and the plaintext, which is never stored."""
    plaintext = "hp_" + secrets.token_urlsafe(32)
    record = ApiKey("key_" + secrets.token_hex(8), tenant, now(), tuple(models), max_seconds)
    hashed = digest(plaintext)
    with client.pipeline() as pipe:
        pipe.set(api_key_key(hashed), msgspec.json.encode(record))
        pipe.hset(KEY_INDEX, record.id, hashed)
        pipe.execute()
    return record, plaintext


def list_keys(client: redis.Redis, tenant: str | None = None) -> list[ApiKey]:
    digests = client.hvals(KEY_INDEX)
    raws = client.mget([api_key_key(d.decode()) for d in digests]) if digests else []
    keys = [_decoder.decode(raw) for raw in raws if raw]
    return sorted((k for k in keys if tenant is None or k.tenant == tenant), key=lambda k: k.created_at)


def revoke_keys(client: redis.Redis, *, key: str | None = None, key_id: str | None = None, tenant: str | None = None) -> list[ApiKey]:
    """Revoke by plaintext, by id, or every key of a tenant; returns what was revoked."""
    hashed_by_id = {i.decode(): d.decode() for i, d in client.hgetall(KEY_INDEX).items()}
    targets = []
    for record in list_keys(client):
        hashed = hashed_by_id[record.id]
        if (key and digest(key) == hashed) or (key_id and record.id == key_id) or (tenant and record.tenant == tenant):
            targets.append((record, hashed))
    with client.pipeline() as pipe:
        for record, hashed in targets:
            pipe.delete(api_key_key(hashed))
            pipe.hdel(KEY_INDEX, record.id)
        pipe.execute()
    return [record for record, _ in targets]


KEY_CACHE_SECONDS = 5.0
"""How long a process trusts a key it has looked up: a revoked key stops working within this time."""
KEY_CACHE_SIZE = 10_000


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        key = connection.headers.get(HEADER)
        if not key:
            raise Unauthorized(f"send an API key in the {HEADER} header")
        # The app's cache holds known keys only: a new key works at once, unknown ones cannot fill it.
        known: Trusted[str, ApiKey] = connection.app.state.api_key_cache
        hashed = digest(key)
        record = known.get(hashed)
        if record is None:
            found = await connection.app.state.aredis.get(api_key_key(hashed))
            if found is None:
                known.forget(hashed)
                raise Unauthorized("unknown or revoked API key")
            record = known.put(hashed, _decoder.decode(found))
        return AuthenticationResult(user=record.tenant, auth=record)


class NoAuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        return AuthenticationResult(user=LOCAL_TENANT, auth=LOCAL_KEY)
