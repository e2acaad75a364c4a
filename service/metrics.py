"""API metrics: requests by route template (Litestar's middleware), jobs submitted, queue depth, jobs by state."""

from __future__ import annotations

from litestar.plugins.prometheus import PrometheusConfig
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from rq import Queue, Worker

from hoppatch.jobs import JobStatus, JobStore
from hoppatch.spec import BUILTIN_MODELS

PROMETHEUS = PrometheusConfig(app_name="hoppatch", prefix="hoppatch_api", group_path=True, exclude=["/metrics"])

JOBS_SUBMITTED = Counter("hoppatch_api_jobs_submitted_total", "Jobs accepted by the API, by model (built-ins, else other).", ["model"])


def model_label(ref: str) -> str:
    """A bounded label: tenants name models freely (and local paths are nobody else's business)."""
    return ref if ref in BUILTIN_MODELS else "other"


class QueueCollector(Collector):
    """Serves queue depth and live workers per served model, and job counts by state, as last read by
    `refresh`, so a scrape never waits on Redis (the app refreshes them from a thread every few seconds).
    The model label takes the configured served models, or `any` for the shared queue: a bounded set."""

    def __init__(self) -> None:
        self.queues: dict[str, tuple[int, int]] | None = None  # label → (depth, live workers)
        self.counts: dict[str, int] = {}

    def refresh(self, store: JobStore, queues: dict[str, Queue]) -> None:
        self.queues = read_queues(queues)
        self.counts = store.status_counts()

    def collect(self):
        if self.queues is None:
            return
        depth = GaugeMetricFamily("hoppatch_queue_depth", "Jobs waiting in a model's queue.", labels=["model"])
        live = GaugeMetricFamily("hoppatch_workers_live", "Worker processes listening to a model's queue and heartbeating.", labels=["model"])
        for label, (waiting, workers) in sorted(self.queues.items()):
            depth.add_metric([label], waiting)
            live.add_metric([label], workers)
        states = GaugeMetricFamily("hoppatch_jobs", "Job records by status (within retention).", labels=["status"])
        for status in JobStatus:
            states.add_metric([status.value], self.counts.get(status.value, 0))
        yield from (depth, live, states)


def read_queues(queues: dict[str, Queue]) -> dict[str, tuple[int, int]]:
    """(jobs waiting, live workers) for each queue, by its label."""
    return {label: (queue.count, Worker.count(connection=queue.connection, queue=queue)) for label, queue in queues.items()}


QUEUE_STATS = QueueCollector()
REGISTRY.register(QUEUE_STATS)
