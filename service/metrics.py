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
    """Serves queue depth and job counts by state as last read by `refresh`, so a scrape never waits on Redis
    (the app refreshes them from a thread every few seconds)."""

    def __init__(self) -> None:
        self.depth: int | None = None
        self.counts: dict[str, int] = {}
        self.workers = 0

    def refresh(self, store: JobStore, queue: Queue) -> None:
        depth, counts, workers = queue.count, store.status_counts(), Worker.count(connection=queue.connection, queue=queue)
        self.depth, self.counts, self.workers = depth, counts, workers

    def collect(self):
        if self.depth is None:
            return
        depth = GaugeMetricFamily("hoppatch_queue_depth", "Jobs waiting in the RQ queue.")
        depth.add_metric([], self.depth)
        states = GaugeMetricFamily("hoppatch_jobs", "Job records by status (within retention).", labels=["status"])
        for status in JobStatus:
            states.add_metric([status.value], self.counts.get(status.value, 0))
        live = GaugeMetricFamily("hoppatch_workers_live", "Worker processes registered on the queue and heartbeating.")
        live.add_metric([], self.workers)
        yield depth
        yield states
        yield live


QUEUE_STATS = QueueCollector()
REGISTRY.register(QUEUE_STATS)
