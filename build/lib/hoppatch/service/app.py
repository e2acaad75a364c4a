"""The one app factory: controllers, auth, problem details, metrics and the Redis clients are wired here."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.datastructures import State
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusController
from rq import Queue

from hoppatch import __version__
from hoppatch.artifacts import LocalArtifactStore
from hoppatch.jobs import QUEUE_NAME, JobStore
from hoppatch.settings import Settings

from .auth import HEADER, OPEN_PATHS, ApiKeyMiddleware, NoAuthMiddleware
from .controllers.artifacts import ArtifactController
from .controllers.health import HealthController
from .controllers.jobs import JobController
from .metrics import PROMETHEUS, register_queue_collector
from .problems import EXCEPTION_HANDLERS

log = logging.getLogger("hoppatch.api")


class MetricsController(PrometheusController):
    include_in_schema = False


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings()
    client = redis.Redis.from_url(settings.redis_url, max_connections=64, socket_timeout=5, socket_connect_timeout=2)
    store = JobStore(client, settings.retention_seconds)
    queue = Queue(QUEUE_NAME, connection=client)
    register_queue_collector(store, queue)
    state = State(
        {
            "settings": settings,
            "redis": client,
            "aredis": aioredis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=2),
            "api_key_cache": {},  # digest → (tenant, trusted until), see service.auth
            "store": store,
            "queue": queue,
            "artifacts": LocalArtifactStore(settings.artifact_dir),
        }
    )
    if not settings.auth:
        log.warning("API keys are OFF (HOPPATCH_AUTH=off): every request acts as tenant 'local'")
    auth = ApiKeyMiddleware if settings.auth else NoAuthMiddleware

    @contextlib.asynccontextmanager
    async def reaper(app: Litestar):
        """The service also fails jobs whose worker died, so a lone dead worker cannot leave one running."""

        async def loop():
            while True:
                await asyncio.sleep(max(1.0, settings.heartbeat_timeout / 4))
                with contextlib.suppress(redis.RedisError):
                    await asyncio.to_thread(store.reap_lost)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()

    return Litestar(
        route_handlers=[JobController, ArtifactController, HealthController, MetricsController],
        state=state,
        middleware=[PROMETHEUS.middleware, DefineMiddleware(auth, exclude=OPEN_PATHS)],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        lifespan=[reaper],
        openapi_config=OpenAPIConfig(
            title="hoppatch",
            version=__version__,
            description="Patch two-hop reasoning failures of causal LMs with a small attention edit (CREME).",
            components=Components(security_schemes={"ApiKey": SecurityScheme(type="apiKey", name=HEADER, security_scheme_in="header")}),
            security=[{"ApiKey": []}],
        ),
    )
