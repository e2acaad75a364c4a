"""`hoppatch worker`: one RQ worker process per GPU that keeps models warm between jobs.

RQ's SimpleWorker runs each job in this process (no fork), so a loaded model survives from job to job.
Cancellation is a Redis flag the engine checks between steps; RQ's stop command does nothing here. A
reaper thread fails jobs whose worker stopped heartbeating (see `JobStore.reap_lost`), taking turns with the
other workers and the API (`JobStore.reap_lost_in_turn`), so the scan runs once per window however many there are.

RQ's work loop returns on most Redis errors; `run_worker` starts it again, with backoff, until a stop is
asked for, so a Redis restart or pause never needs a supervisor to bring the worker back.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time

import redis
from prometheus_client import start_http_server
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from hoppatch.artifacts import open_artifact_store
from hoppatch.connection import connect
from hoppatch.engine.warm import WarmBudget
from hoppatch.jobs import JobStore
from hoppatch.settings import Settings

from . import metrics, tasks
from .model_cache import ModelCache

log = logging.getLogger("hoppatch.worker")

WORKER_TTL = 30
"""Seconds RQ keeps a silent worker registered; it also sets how long one blocking dequeue waits."""
MAX_BACKOFF = 10.0


def reap_forever(store: JobStore, interval: float, stop: threading.Event) -> None:
    """Every `interval`, reap lost jobs when no other process (worker or API) sharing Redis has just done so."""
    while not stop.wait(interval):
        try:
            for job_id in store.reap_lost_in_turn(interval):
                log.warning("job %s lost its worker: failed with worker_lost", job_id)
        except redis.RedisError as exc:
            log.warning("reaper: %s", exc)


def listened_queues(settings: Settings, models: tuple[str, ...]) -> list[str]:
    """The queues the routes give `models` (the CLI refuses a model they do not serve); without any, every
    queue the configured routes have (the shared one when no models are configured)."""
    routes = settings.routes
    return [routes.queue_for(model) for model in models] if models else list(routes.queues().values())


def run_worker(settings: Settings, burst: bool = False, preload: str | None = None, models: tuple[str, ...] = ()) -> None:
    """Serve jobs until stopped (or, with `burst`, until the queues are empty). With `models`, listen only to
    those models' queues and load them first."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = JobStore(connect(settings.redis_url), settings.retention_seconds)
    cache = ModelCache(
        max(settings.model_cache_size, len(models)), list(settings.model_roots), settings.device,
        warm_budget=WarmBudget.within(settings.warm_cache_bytes),
    )
    name = f"hoppatch-{socket.gethostname()}-{os.getpid()}"
    tasks.configure(tasks.WorkerContext(
        store, open_artifact_store(settings), cache, settings.heartbeat_timeout, name, settings.statistics_disk_bytes
    ))
    metrics.watch_warm_caches(cache.warm_states)
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port)
        log.info("worker metrics on :%d/metrics", settings.worker_metrics_port)
    # Everything imported so far (torch, transformers: millions of objects) lives as long as the process;
    # without this, each full garbage collection walks them all and stalls a job for about 0.2 s.
    gc.freeze()
    for ref in (*models, *([preload] if preload else [])):
        cache.get(ref)
    queues = listened_queues(settings, models)
    log.info("listening to %s", ", ".join(queues))
    stop = threading.Event()
    threading.Thread(target=reap_forever, args=(store, max(1.0, settings.heartbeat_timeout / 4), stop), daemon=True).start()
    try:
        _work_until_stopped(settings.redis_url, queues, name, burst)
    finally:
        stop.set()


def _work_until_stopped(redis_url: str, queue_names: list[str], name: str, burst: bool) -> None:
    # RQ raises its connection's socket timeout to outlast a blocking dequeue: it gets a client of its own,
    # so the job store's commands keep their short timeouts.
    connection = connect(redis_url)
    backoff = 0.5
    for generation in range(1_000_000):
        # A worker that lost Redis may leave its registration behind, live until its TTL: a new name each time.
        worker = SimpleWorker(
            [Queue(queue_name, connection=connection, serializer=JSONSerializer) for queue_name in queue_names],
            connection=connection, name=name if generation == 0 else f"{name}.{generation}",
            serializer=JSONSerializer, worker_ttl=WORKER_TTL,
        )
        started = time.monotonic()
        try:
            worker.work(burst=burst, with_scheduler=False)
        except redis.RedisError as exc:
            log.warning("worker loop: %s", exc)
        # RQ notes a SIGTERM/SIGINT here whether it came while busy or idle
        if burst or worker._shutdown_requested_date is not None:
            return
        backoff = 0.5 if time.monotonic() - started > 60 else min(MAX_BACKOFF, backoff * 2)
        log.warning("worker loop ended without a stop request (Redis unreachable?); starting again in %.1f s", backoff)
        time.sleep(backoff)
