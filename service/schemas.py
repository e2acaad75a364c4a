"""Shapes used only over HTTP. The job specification itself is `hoppatch.spec.JobSpec`, defined once."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from msgspec import Struct

from hoppatch.jobs import Artifact, JobError, JobRecord, JobResult, JobStatus, Progress
from hoppatch.spec import Budget


class JobUrls(Struct):
    self: str
    cancel: str
    events: str
    stream: str
    artifacts: str
    metrics: str


class Job(Struct):
    """A patch job as the API shows it."""

    id: str
    status: JobStatus
    model: str
    num_examples: int
    budget: Budget
    metadata: dict[str, str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    error: JobError | None
    result: JobResult | None
    urls: JobUrls
    worker: str | None = None
    """The worker process that ran (or runs) the job."""
    object: str = "job"

    @classmethod
    def of(cls, record: JobRecord) -> Job:
        base = f"/v1/jobs/{record.id}"
        urls = JobUrls(base, f"{base}/cancel", f"{base}/events", f"{base}/events/stream", f"{base}/artifacts", f"{base}/metrics")
        return cls(
            record.id, record.status, record.model, record.num_examples, record.budget, record.metadata,
            record.created_at, record.started_at, record.finished_at, record.progress, record.error, record.result, urls,
            record.worker,
        )


class JobPage(Struct):
    data: list[Job]
    has_more: bool
    next_cursor: str | None
    object: str = "list"


class Event(Struct):
    id: str
    type: str  # status | progress
    data: dict[str, Any]


class EventList(Struct):
    data: list[Event]
    object: str = "list"


class ArtifactList(Struct):
    data: list[Artifact]
    object: str = "list"


class ProblemError(Struct):
    pointer: str | None
    detail: str


class Problem(Struct, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[ProblemError] | None = None


class ModelQueue(Struct):
    queued: int
    """Jobs waiting for a worker."""
    workers: int
    """Live workers listening to this model's queue."""


class Health(Struct):
    status: str
    redis: bool | None = None
    workers: int | None = None
    models: dict[str, ModelQueue] | None = None
    """Per served model (or `any`, the shared queue): its queue and its live workers."""
