"""The worker's Prometheus metrics, served by each worker process on its own port."""

from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hoppatch.engine.warm import WarmState

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

JOBS = Counter("hoppatch_worker_jobs_total", "Jobs finished by this worker, by outcome.", ["outcome"])
JOB_SECONDS = Histogram("hoppatch_worker_job_seconds", "Wall time of a whole job, model load included.", buckets=STAGE_BUCKETS)
STAGE_SECONDS = Histogram("hoppatch_worker_stage_seconds", "Wall time per job stage.", ["stage"], buckets=STAGE_BUCKETS)
EXAMPLES_PATCHED = Counter("hoppatch_worker_examples_patched_total", "Compositional failures patched.")
EDIT_SECONDS = Counter("hoppatch_worker_edit_seconds_total", "Seconds spent in the edit stage (throughput = patched / this).")
MODEL_CACHE = Counter("hoppatch_worker_model_cache_total", "Model cache lookups, by result.", ["result"])
MODEL_LOAD_SECONDS = Histogram("hoppatch_worker_model_load_seconds", "Time to load a model into the cache.", buckets=STAGE_BUCKETS)
MODELS_WARM = Gauge("hoppatch_worker_models_warm", "Models held in this worker's cache.")
BUSY = Gauge("hoppatch_worker_busy", "1 while this worker runs a job.")
MODEL_RELOADS = Counter("hoppatch_worker_model_reloads_total", "Models dropped because a job left their weights off base.")


class WarmCacheCollector(Collector):
    """Bytes held, budget and evictions of each warm cache, summed over the worker's warm models."""

    def __init__(self, warm_states: Callable[[], Iterable[WarmState]]):
        self.warm_states = warm_states

    def collect(self):
        held = GaugeMetricFamily("hoppatch_worker_warm_cache_bytes", "Bytes a warm cache holds.", labels=["cache"])
        budget = GaugeMetricFamily("hoppatch_worker_warm_cache_budget_bytes", "Bytes a warm cache may hold.", labels=["cache"])
        evicted = CounterMetricFamily("hoppatch_worker_warm_cache_evictions", "Entries evicted to stay within budget.", labels=["cache"])
        totals: dict[str, list[int]] = {}
        for state in self.warm_states():
            for cache in state.caches():
                row = totals.setdefault(cache.name, [0, 0, 0])
                row[0] += cache.bytes
                row[1] += cache.budget
                row[2] += cache.evictions
        for name, (size, limit, evictions) in sorted(totals.items()):
            held.add_metric([name], size)
            budget.add_metric([name], limit)
            evicted.add_metric([name], evictions)
        yield from (held, budget, evicted)


def watch_warm_caches(warm_states: Callable[[], Iterable[WarmState]]) -> None:
    REGISTRY.register(WarmCacheCollector(warm_states))
