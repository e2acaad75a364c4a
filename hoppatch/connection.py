"""The one way every process connects to Redis: timeouts, keepalive and retries that survive a restart.

A URL may carry an ACL user and password (`redis://user:secret@host:6379/0`) and TLS (`rediss://…`, with
`?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem`); redis-py reads all of it from the URL.
"""

from __future__ import annotations

import hiredis
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

SOCKET_TIMEOUT = 5.0
"""Seconds a command may take before the client gives up on the socket (a paused Redis must not hang us)."""
CONNECT_TIMEOUT = 2.0
RETRIES = 3
"""Reconnects a command tries, backing off from 0.1 s to 1 s, before its error reaches the caller. Only
refused or dropped connections are retried: a timed-out command (a paused Redis) fails after one timeout."""
HEALTH_CHECK_SECONDS = 15
"""An idle pooled connection is pinged before reuse after this long, so a restarted Redis is noticed."""

_TRANSIENT = (redis.ConnectionError,)


def _common(socket_timeout: float) -> dict:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_SECONDS,
    }


def connect(url: str, *, max_connections: int | None = None) -> redis.Redis:
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), RETRIES, supported_errors=_TRANSIENT)
    return redis.Redis.from_url(url, retry=retry, max_connections=max_connections, **_common(SOCKET_TIMEOUT))


def connect_async(url: str, *, socket_timeout: float = SOCKET_TIMEOUT) -> aioredis.Redis:
    """The API's event-loop client; blocking reads (SSE) pass a longer `socket_timeout`."""
    retry = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.1), RETRIES, supported_errors=_TRANSIENT)
    client = aioredis.Redis.from_url(url, retry=retry, **_common(socket_timeout))
    pool = client.connection_pool
    pool.connection_class = type(pool.connection_class.__name__, (_HiredisPacking, pool.connection_class), {})
    return client


class _HiredisPacking:
    """Packs commands in C (hiredis), as redis-py's blocking client already does; its asyncio connection packs
    them in Python, which for the admission script's ~60 arguments is most of a submission's client time."""

    def pack_command(self, *args) -> list[bytes]:
        if isinstance(args[0], str):  # a command name with literal arguments in it ("CONFIG GET")
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            pass  # a buffer type this hiredis does not take: copied to bytes, and tried once more
        args = tuple(bytes(a) if isinstance(a, (bytearray, memoryview)) else a for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise redis.DataError(str(exc)) from None
