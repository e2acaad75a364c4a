"""The RQ task: run one edit job by id. Safe to run twice: a terminal or cancelled job returns at once.

The worker process that runs it owns the model cache, the store and the artifact store (see `worker.py`).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import redis
from rq import get_current_job

from hoppatch.artifacts import ArtifactStore
from hoppatch.engine.errors import Cancelled, EngineError, InvalidJob
from hoppatch.engine.pipeline import base_weights_intact, patch, trim_disk_caches
from hoppatch.jobs import JobError, JobResult, JobStatus, JobStore, now
from hoppatch.spec import JobSpec

from . import metrics
from .model_cache import ModelCache

log = logging.getLogger("hoppatch.worker")

ACTIVE = {JobStatus.RUNNING, JobStatus.CANCELLING}


@dataclass
class WorkerContext:
    """What the worker process gives every task it runs."""

    store: JobStore
    artifacts: ArtifactStore
    models: ModelCache
    heartbeat_timeout: float
    name: str
    statistics_disk_bytes: int


_worker: WorkerContext | None = None


def configure(context: WorkerContext) -> None:
    global _worker
    _worker = context


class Heartbeat:
    """Refreshes the job's heartbeat key from a thread while the job runs, riding out Redis errors."""

    def __init__(self, store: JobStore, job_id: str, timeout: float):
        self.store, self.job_id, self.timeout = store, job_id, timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{job_id}")

    def _run(self) -> None:
        wait = self.timeout / 3
        while not self._stop.wait(wait):
            try:
                self.store.heartbeat(self.job_id, self.timeout)
                wait = self.timeout / 3
            except redis.RedisError as exc:
                # retried soon: a heartbeat missed for the whole timeout gets the job reaped as worker_lost
                log.warning("heartbeat of %s: %s", self.job_id, exc)
                wait = min(1.0, self.timeout / 10)

    def __enter__(self):
        self.store.heartbeat(self.job_id, self.timeout)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_edit_job(job_id: str | None = None) -> str:
    """Run the job whose id is RQ's job id. The API enqueues it without arguments (see `service.rq_writes`);
    `job_id` is given by jobs that an earlier release queued with their id as an argument, so a queue
    that waits through an upgrade still runs."""
    assert _worker is not None, "the worker calls configure() before it takes jobs"
    job_id = job_id or get_current_job().id
    store = _worker.store
    record = store.get(job_id)
    if record is None or record.status is not JobStatus.QUEUED:
        return record.status.value if record else "missing"
    spec = msgspec.json.decode(store.spec_json(job_id), type=JobSpec)
    # Heartbeat before the job shows as running, so the reaper never sees it running without one.
    store.heartbeat(job_id, _worker.heartbeat_timeout)
    if not store.transition(job_id, JobStatus.RUNNING, {JobStatus.QUEUED}, started_at=now(), worker=_worker.name):
        return "not-started"
    started = time.perf_counter()
    metrics.BUSY.set(1)
    try:
        with Heartbeat(store, job_id, _worker.heartbeat_timeout):
            outcome = _run(_worker, job_id, spec)
    finally:
        metrics.BUSY.set(0)
        metrics.JOB_SECONDS.observe(time.perf_counter() - started)
        _check_model(_worker.models, spec.model)
        trim_disk_caches(_worker.statistics_disk_bytes)
    metrics.JOBS.labels(outcome).inc()
    return outcome


def _run(worker: WorkerContext, job_id: str, spec: JobSpec) -> str:
    store = worker.store

    def should_stop() -> bool:
        try:
            return store.cancel_requested(job_id)
        except redis.RedisError:
            return False  # asked again before the next pass

    def progress(stage: str, fraction: float, message: str) -> None:
        try:
            store.set_progress(job_id, stage, fraction, message)
        except redis.RedisError as exc:
            log.warning("progress of %s not recorded: %s", job_id, exc)

    try:
        progress("load", 0.0, f"loading {spec.model}")
        lm = worker.models.get(spec.model)
        with tempfile.TemporaryDirectory(prefix=f"{job_id}-") as tmp:
            bases = fetch_base_patches(worker.artifacts, spec.base_patches, Path(tmp) / "bases")
            outcome, document = patch(lm, spec, Path(tmp) / "out", progress=progress, should_stop=should_stop, base_patches=bases)
            artifacts = worker.artifacts.put(job_id, Path(tmp) / "out")
        for stage, seconds in outcome.seconds.items():
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
        metrics.EXAMPLES_PATCHED.inc(len(outcome.patched))
        metrics.EDIT_SECONDS.inc(outcome.seconds.get("edit", 0.0))
        if should_stop():
            raise Cancelled("cancelled while publishing")
        progress("done", 1.0, "succeeded")
        if store.transition(job_id, JobStatus.SUCCEEDED, ACTIVE, result=JobResult(artifacts, document["summary"]), finished_at=now()):
            return "succeeded"
        # reaped as worker_lost (Redis was out of reach too long) or ended otherwise: its files are nobody's
        worker.artifacts.delete(job_id)
        return "lost"
    except Cancelled:
        store.transition(job_id, JobStatus.CANCELLED, ACTIVE, finished_at=now())
        outcome_name = "cancelled"
    except EngineError as exc:
        _fail(store, job_id, exc.code, str(exc))
        outcome_name = "failed"
    except Exception:  # a bug or a broken model: the job fails, the worker lives on
        log.exception("job %s failed with an internal error", job_id)
        _fail(store, job_id, "internal_error", f"the worker hit an internal error; its log names job {job_id}")
        outcome_name = "failed"
    worker.artifacts.delete(job_id)  # a job that did not succeed leaves no files
    return outcome_name


def fetch_base_patches(artifacts: ArtifactStore, job_ids: list[str], directory: Path) -> list[tuple[str, Path]]:
    """The deltas of the base-patch jobs, downloaded in order: (job id, file)."""
    directory.mkdir(parents=True, exist_ok=True)
    chain = []
    for job_id in job_ids:
        data = artifacts.read(job_id, "delta.safetensors")
        if data is None:
            raise InvalidJob(f"base patch {job_id} has no delta any more (its artifacts have expired)")
        path = directory / f"{job_id}.safetensors"
        path.write_bytes(data)
        chain.append((job_id, path))
    return chain


def _check_model(models: ModelCache, ref: str) -> None:
    """A model whose edited weights did not come back to base never serves another job."""
    lm = models.peek(ref)
    if lm is not None and not base_weights_intact(lm):
        log.error("%s: edited weights differ from the base after a job; dropping the model to reload it", ref)
        models.discard(ref)
        metrics.MODEL_RELOADS.inc()


def _fail(store: JobStore, job_id: str, code: str, message: str) -> None:
    store.transition(job_id, JobStatus.FAILED, ACTIVE, error=JobError(code, message[:2000]), finished_at=now())
