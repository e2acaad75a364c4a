"""The one app factory: controllers, auth, problem details, metrics and the Redis clients are wired here."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

import redis
from litestar import Litestar, Request, Response
from litestar.routes import HTTPRoute
from litestar.datastructures import State
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusController
from rq import Queue
from rq.serializers import JSONSerializer

from hoppatch import __version__
from hoppatch.artifacts import open_artifact_store, sweep_artifacts
from hoppatch.connection import connect, connect_async
from hoppatch.jobs import SUBMIT_SCRIPT, JobStore
from hoppatch.settings import Settings

from .auth import HEADER, KEY_CACHE_SECONDS, KEY_CACHE_SIZE, OPEN_PATHS, ApiKeyMiddleware, NoAuthMiddleware
from .controllers.artifacts import ArtifactController
from .controllers.health import HealthController
from .controllers.jobs import JobController, OpenStreams
from .deps import Services, services_dependency
from .jobs import CheckedModels
from .metrics import QUEUE_STATS, RequestMetrics
from .openapi import complete_schemas
from .problems import EXCEPTION_HANDLERS
from .rq_writes import RQJobWrites
from .trust import Trusted

log = logging.getLogger("hoppatch.api")


class MetricsController(PrometheusController):
    include_in_schema = False


SWEEP_SECONDS = 300.0
"""How often the API deletes the artifacts of expired jobs (one process of all those sharing Redis)."""
MAINTENANCE_SECONDS = 5.0
"""How often, at most, the API refreshes its queue gauges and one of its processes reaps lost jobs."""


GC_THRESHOLDS = (50_000, 50, 100)
"""The collector's generation thresholds in an API process. A submission allocates thousands of objects, so
Python's default (a young collection every 700) ran several collections per request, and the older ones
scanned every object the app holds."""


def settle_collector() -> None:
    """Move what the app built at start (routes, schemas, clients), which lives as long as the process, out of
    the collector's scans, and collect young objects less often (`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def release_collector() -> None:
    """Hand the frozen objects back to the collector when the app stops, for a process that goes on (a test
    process builds many apps)."""
    gc.unfreeze()


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings()
    client = connect(settings.redis_url, max_connections=64)
    store = JobStore(client, settings.retention_seconds)
    queues = {label: Queue(name, connection=client, serializer=JSONSerializer) for label, name in settings.routes.queues().items()}
    aredis = connect_async(settings.redis_url)
    artifacts = open_artifact_store(settings)
    services = Services(
        store, queues, RQJobWrites(settings.retention_seconds), artifacts, settings, CheckedModels(settings.model_roots),
    )
    state = State(
        {
            "redis": client,
            "aredis": aredis,
            # SSE reads block for up to 15 s: a client of their own, with a timeout that outlasts them
            "stream_redis": connect_async(settings.redis_url, socket_timeout=30),
            "admit": aredis.register_script(SUBMIT_SCRIPT),
            "api_key_cache": Trusted(KEY_CACHE_SECONDS, KEY_CACHE_SIZE),  # digest → ApiKey, see service.auth
            "streams": OpenStreams(),
        }
    )
    if not settings.auth:
        log.warning("API keys are OFF (HOPPATCH_AUTH=off): every request acts as tenant 'local'")
    auth = ApiKeyMiddleware if settings.auth else NoAuthMiddleware

    interval = min(MAINTENANCE_SECONDS, max(1.0, settings.heartbeat_timeout / 4))

    def maintain() -> None:
        QUEUE_STATS.refresh(store, queues)  # this process's own gauges
        store.reap_lost_in_turn(interval)  # service-wide work: one process of all those sharing Redis does it
        if store.claim_turn("sweep", SWEEP_SECONDS * 0.9):
            sweep_artifacts(store, artifacts)

    @contextlib.asynccontextmanager
    async def maintenance(app: Litestar):
        """Gauges, the reaper (so a lone dead worker cannot leave a job running) and the artifact sweeper."""

        async def loop():
            while True:
                try:
                    await asyncio.to_thread(maintain)
                except redis.RedisError as exc:
                    log.warning("maintenance: %s", exc)
                await asyncio.sleep(interval)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()

    allowed: dict[str, str] = {}  # path → its methods, once the routes exist

    async def answer_options(request: Request) -> Response | None:
        # Litestar's own OPTIONS answer lists only the methods of the first handler registered on a path
        if request.method == "OPTIONS":
            return Response(None, status_code=204, headers={"Allow": allowed[request.scope["path_template"]]})
        return None

    app = Litestar(
        before_request=answer_options,
        route_handlers=[JobController, ArtifactController, HealthController, MetricsController],
        state=state,
        dependencies={"services": services_dependency(services)},
        middleware=[RequestMetrics(), DefineMiddleware(auth, exclude=OPEN_PATHS)],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        lifespan=[maintenance],
        on_startup=[settle_collector],
        on_shutdown=[release_collector],
        openapi_config=OpenAPIConfig(
            title="hoppatch",
            version=__version__,
            description="Patch two-hop reasoning failures of causal LMs with a small attention edit (CREME).",
            components=Components(security_schemes={"ApiKey": SecurityScheme(type="apiKey", name=HEADER, security_scheme_in="header")}),
        ),
    )
    complete_schemas(app)
    allowed.update({route.path_format: ", ".join(sorted(route.methods)) for route in app.routes if isinstance(route, HTTPRoute)})
    return app
