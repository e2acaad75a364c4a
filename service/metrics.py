"""API metrics: requests by route template, jobs submitted, queue depth, jobs by state."""

from __future__ import annotations

import time

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from rq import Queue, Worker

from hoppatch.jobs import JobStatus, JobStore
from hoppatch.spec import BUILTIN_MODELS

from .problems import answered_status

APP_NAME = "hoppatch"
REQUEST_LABELS = ("method", "path", "status_code", "app_name")
REQUESTS = Counter("hoppatch_api_requests_total", "Requests, by method, route template and status.", REQUEST_LABELS)
REQUEST_SECONDS = Histogram("hoppatch_api_request_duration_seconds", "Seconds from a request's arrival to the end of its response body.", REQUEST_LABELS)
REQUEST_ERRORS = Counter("hoppatch_api_requests_error_total", "Requests answered with a 5xx status.", REQUEST_LABELS)
JOBS_SUBMITTED = Counter("hoppatch_api_jobs_submitted_total", "Jobs accepted by the API, by model (built-ins, else other).", ["model"])
IN_PROGRESS = Gauge("hoppatch_api_requests_in_progress", "Requests being served, by method and route template.", ("method", "path", "app_name"))


class RequestMetrics(ASGIMiddleware):
    """Counts and times each request by method, route template and status (the series of Litestar's
    Prometheus plugin). It keeps each label set's children, so a request costs a dict lookup: building the
    labels per request costs about a tenth of a submission's time on the plugin's path."""

    scopes = (ScopeType.HTTP,)
    exclude_path_pattern = "^/metrics$"

    def __init__(self) -> None:
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._in_progress: dict[tuple[str, str], Gauge] = {}

    def _series(self, method: str, path: str, status: int) -> tuple[Counter, Histogram]:
        key = (method, path, status)
        series = self._children.get(key)
        if series is None:
            labels = (method, path, str(status), APP_NAME)
            series = self._children[key] = (REQUESTS.labels(*labels), REQUEST_SECONDS.labels(*labels))
        return series

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        started = time.perf_counter()
        method, path = scope["method"], scope["path_template"]
        status, seconds = HTTP_500_INTERNAL_SERVER_ERROR, None

        async def observed_send(message: Message) -> None:
            nonlocal status, seconds
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seconds = time.perf_counter() - started
            await send(message)

        gauge = self._in_progress.get((method, path))
        if gauge is None:
            gauge = self._in_progress[(method, path)] = IN_PROGRESS.labels(method, path, APP_NAME)
        gauge.inc()
        try:
            await next_app(scope, receive, observed_send)
        except Exception as exc:
            status = answered_status(exc)
            raise
        finally:
            gauge.dec()
            count, duration = self._series(method, path, status)
            count.inc()
            duration.observe(time.perf_counter() - started if seconds is None else seconds)
            if status >= HTTP_500_INTERNAL_SERVER_ERROR:
                REQUEST_ERRORS.labels(method, path, str(status), APP_NAME).inc()


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
