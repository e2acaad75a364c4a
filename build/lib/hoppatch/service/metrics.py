"""API metrics: requests by route template (Litestar's middleware), jobs submitted, queue depth, jobs by state."""

from __future__ import annotations

import redis
from litestar.plugins.prometheus import PrometheusConfig
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from rq import Queue

from hoppatch.jobs import JobStatus, JobStore

PROMETHEUS = PrometheusConfig(app_name="hoppatch", prefix="hoppatch_api", group_path=True, exclude=["/metrics"])

JOBS_SUBMITTED = Counter("hoppatch_api_jobs_submitted_total", "Jobs accepted by the API, by model.", ["model"])


class QueueCollector(Collector):
    """Reads queue depth and job counts by state from Redis at scrape time."""

    def __init__(self, store: JobStore, queue: Queue):
        self.store, self.queue = store, queue

    def collect(self):
        depth = GaugeMetricFamily("hoppatch_queue_depth", "Jobs waiting in the RQ queue.")
        states = GaugeMetricFamily("hoppatch_jobs", "Job records by status (within retention).", labels=["status"])
        try:
            depth.add_metric([], self.queue.count)
            counts = self.store.status_counts()
            for status in JobStatus:
                states.add_metric([status.value], max(0, counts.get(status.value, 0)))
        except redis.RedisError:
            return
        yield depth
        yield states


_collector: QueueCollector | None = None


def register_queue_collector(store: JobStore, queue: Queue) -> None:
    """One collector per process, pointed at the latest app's Redis (tests build several apps)."""
    global _collector
    if _collector is None:
        _collector = QueueCollector(store, queue)
        REGISTRY.register(_collector)
    else:
        _collector.store, _collector.queue = store, queue
