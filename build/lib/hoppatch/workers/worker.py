"""`hoppatch worker`: one RQ worker process per GPU that keeps models warm between jobs.

RQ's SimpleWorker runs each job in this process (no fork), so a loaded model survives from job to job.
Cancellation is a Redis flag the engine checks between steps; RQ's stop command does nothing here. A
reaper thread fails jobs whose worker stopped heartbeating (see `JobStore.reap_lost`).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading

import redis
from prometheus_client import start_http_server
from rq import Queue, SimpleWorker

from hoppatch.jobs import QUEUE_NAME, JobStore
from hoppatch.settings import Settings

from . import tasks
from hoppatch.artifacts import LocalArtifactStore
from .model_cache import ModelCache

log = logging.getLogger("hoppatch.worker")


def reap_forever(store: JobStore, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            for job_id in store.reap_lost():
                log.warning("job %s lost its worker: failed with worker_lost", job_id)
        except redis.RedisError as exc:
            log.warning("reaper: %s", exc)


def run_worker(settings: Settings, burst: bool = False, preload: str | None = None) -> None:
    """Serve jobs until stopped (or, with `burst`, until the queue is empty)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    connection = redis.Redis.from_url(settings.redis_url)
    store = JobStore(connection, settings.retention_seconds)
    models = ModelCache(settings.model_cache_size, list(settings.model_roots), settings.device)
    name = f"hoppatch-{socket.gethostname()}-{os.getpid()}"
    tasks.configure(store, LocalArtifactStore(settings.artifact_dir), models, settings.heartbeat_timeout, name)
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port)
        log.info("worker metrics on :%d/metrics", settings.worker_metrics_port)
    # Everything imported so far (torch, transformers: millions of objects) lives as long as the process;
    # without this, each full garbage collection walks them all and stalls a job for about 0.2 s.
    gc.freeze()
    if preload:
        models.get(preload)
    stop = threading.Event()
    threading.Thread(target=reap_forever, args=(store, max(1.0, settings.heartbeat_timeout / 4), stop), daemon=True).start()
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=connection)], connection=connection, name=name)
    try:
        worker.work(burst=burst, with_scheduler=False)
    finally:
        stop.set()
