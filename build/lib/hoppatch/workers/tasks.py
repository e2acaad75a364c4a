"""The RQ task: run one edit job by id. Safe to run twice: a terminal or cancelled job returns at once.

The worker process that runs it owns the model cache, the store and the artifact store (see `worker.py`).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import msgspec

from hoppatch.jobs import JobError, JobResult, JobStatus, JobStore, now
from hoppatch.spec import JobSpec

from . import metrics
from hoppatch.artifacts import ArtifactStore
from hoppatch.engine.errors import Cancelled, EngineError
from hoppatch.engine.pipeline import patch
from .model_cache import ModelCache

_context: dict = {}
"""Set by the worker at start: store, artifacts, models, settings."""


def configure(store: JobStore, artifacts: ArtifactStore, models: ModelCache, heartbeat_timeout: float, name: str) -> None:
    _context.update(store=store, artifacts=artifacts, models=models, heartbeat_timeout=heartbeat_timeout, name=name)


class Heartbeat:
    """Refreshes the job's heartbeat key from a thread while the job runs."""

    def __init__(self, store: JobStore, job_id: str, timeout: float):
        self.store, self.job_id, self.timeout = store, job_id, timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{job_id}")

    def _run(self) -> None:
        while not self._stop.wait(self.timeout / 3):
            self.store.heartbeat(self.job_id, self.timeout)

    def __enter__(self):
        self.store.heartbeat(self.job_id, self.timeout)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_edit_job(job_id: str) -> str:
    store: JobStore = _context["store"]
    record = store.get(job_id)
    if record is None or record.status is not JobStatus.QUEUED:
        return record.status.value if record else "missing"
    spec = msgspec.json.decode(store.spec_json(job_id), type=JobSpec)
    # Heartbeat before the job shows as running, so the reaper never sees it running without one.
    store.heartbeat(job_id, _context["heartbeat_timeout"])
    if not store.transition(job_id, JobStatus.RUNNING, {JobStatus.QUEUED}, started_at=now(), worker=_context["name"]):
        return "not-started"
    started = time.perf_counter()
    metrics.BUSY.set(1)
    try:
        with Heartbeat(store, job_id, _context["heartbeat_timeout"]):
            outcome = _run(store, job_id, spec)
    finally:
        metrics.BUSY.set(0)
        metrics.JOB_SECONDS.observe(time.perf_counter() - started)
    metrics.JOBS.labels(outcome).inc()
    return outcome


def _run(store: JobStore, job_id: str, spec: JobSpec) -> str:
    def should_stop() -> bool:
        return store.cancel_requested(job_id)

    try:
        store.set_progress(job_id, "load", 0.0, f"loading {spec.model}")
        lm = _context["models"].get(spec.model)
        with tempfile.TemporaryDirectory(prefix=f"{job_id}-") as tmp:
            progress = lambda s, f, m: store.set_progress(job_id, s, f, m)  # noqa: E731
            outcome, document = patch(lm, spec, Path(tmp) / "out", progress=progress, should_stop=should_stop)
            artifacts = _context["artifacts"].put(job_id, Path(tmp) / "out")
        for stage, seconds in outcome.seconds.items():
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)
        metrics.EXAMPLES_PATCHED.inc(len(outcome.patched))
        metrics.EDIT_SECONDS.inc(outcome.seconds.get("edit", 0.0))
        if should_stop():
            raise Cancelled("cancelled while publishing")
        result = JobResult(artifacts, document["summary"])
        active = {JobStatus.RUNNING, JobStatus.CANCELLING}
        store.set_progress(job_id, "done", 1.0, "succeeded")
        store.transition(job_id, JobStatus.SUCCEEDED, active, result=result, finished_at=now())
        return "succeeded"
    except Cancelled:
        store.transition(job_id, JobStatus.CANCELLED, {JobStatus.RUNNING, JobStatus.CANCELLING}, finished_at=now())
        return "cancelled"
    except EngineError as exc:
        _fail(store, job_id, exc.code, str(exc))
        return "failed"
    except Exception as exc:  # a bug or a broken model: the job fails, the worker lives on
        _fail(store, job_id, "internal_error", f"{type(exc).__name__}: {exc}")
        return "failed"


def _fail(store: JobStore, job_id: str, code: str, message: str) -> None:
    active = {JobStatus.RUNNING, JobStatus.CANCELLING}
    store.transition(job_id, JobStatus.FAILED, active, error=JobError(code, message[:2000]), finished_at=now())
