"""The job record in Redis: states, keys and the transitions both the service and the workers make.

Our record, not RQ's, is the source of truth (RQ's keys expire): `queued → running → succeeded | failed |
cancelled`, plus `cancelling` while a cooperative stop is pending. Terminal states never change. Every key
comes from one function here, under the `hoppatch:` prefix. Imports redis and msgspec only.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import UTC, datetime
from collections.abc import Callable
from enum import Enum
from typing import Any

import msgspec
import redis
from msgspec import Struct

from .spec import Budget

PREFIX = "hoppatch"
QUEUE_NAME = "hoppatch"
TASK = "hoppatch.workers.tasks.run_edit_job"
"""The RQ task, enqueued by dotted path so the service never imports the workers."""


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Progress(Struct, frozen=True):
    stage: str | None = None
    fraction: float = 0.0
    message: str = ""


class JobError(Struct):
    code: str
    message: str


class Artifact(Struct):
    name: str
    size_bytes: int
    sha256: str
    media_type: str


class JobResult(Struct):
    artifacts: list[Artifact]
    summary: dict[str, Any]


class JobRecord(Struct):
    id: str
    tenant: str
    status: JobStatus
    model: str
    num_examples: int
    budget: Budget
    created_at: datetime
    metadata: dict[str, str] = {}
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Progress()
    error: JobError | None = None
    result: JobResult | None = None
    worker: str | None = None


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def spec_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:spec"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:cancel"


def heartbeat_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:heartbeat"


def tenant_jobs_key(tenant: str) -> str:
    return f"{PREFIX}:tenant:{tenant}:jobs"


def idempotency_key(tenant: str, key: str) -> str:
    return f"{PREFIX}:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def api_key_key(digest: str) -> str:
    return f"{PREFIX}:apikey:{digest}"


RUNNING_KEY = f"{PREFIX}:running"
"""Set of job ids that a worker has started and not finished; the reaper watches their heartbeats."""
STATUS_COUNTS_KEY = f"{PREFIX}:status_counts"
"""Hash: number of live job records per status, for the service's gauge."""


def now() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex[:24]


_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(JobRecord)


class JobStore:
    """Job records, events, cancel flags and heartbeats in Redis."""

    def __init__(self, client: redis.Redis, retention_seconds: int = 7 * 24 * 3600):
        self.redis = client
        self.retention = retention_seconds

    def create(self, record: JobRecord, spec_json: bytes, pipe: redis.client.Pipeline) -> None:
        """Queue the writes of a new job on `pipe` (the caller adds the enqueue and executes)."""
        pipe.set(job_key(record.id), _encoder.encode(record))
        pipe.set(spec_key(record.id), spec_json)
        pipe.zadd(tenant_jobs_key(record.tenant), {record.id: record.created_at.timestamp()})
        pipe.hincrby(STATUS_COUNTS_KEY, record.status.value, 1)
        pipe.xadd(events_key(record.id), {"type": "status", "data": _encoder.encode({"status": record.status.value})})

    def get(self, job_id: str) -> JobRecord | None:
        return self.parse(self.redis.get(job_key(job_id)))

    @staticmethod
    def parse(raw: bytes | None) -> JobRecord | None:
        """A record as stored under `job_key` (None where there is none)."""
        return _record_decoder.decode(raw) if raw else None

    def spec_json(self, job_id: str) -> bytes | None:
        return self.redis.get(spec_key(job_id))

    def _update(self, job_id: str, change: Callable[[JobRecord], tuple[JobRecord, dict] | None]) -> JobRecord | None:
        """Optimistic read-modify-write of a record; `change` returns (new record, event) or None to leave it."""
        key = job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if not raw:
                        return None
                    record = _record_decoder.decode(raw)
                    changed = change(record)
                    if changed is None:
                        pipe.unwatch()
                        return None
                    updated, event = changed
                    pipe.multi()
                    pipe.set(key, _encoder.encode(updated))
                    pipe.xadd(events_key(job_id), {"type": event.pop("type"), "data": _encoder.encode(event)})
                    if updated.status is not record.status:
                        pipe.hincrby(STATUS_COUNTS_KEY, record.status.value, -1)
                        pipe.hincrby(STATUS_COUNTS_KEY, updated.status.value, 1)
                    if updated.status.terminal:
                        pipe.srem(RUNNING_KEY, job_id)
                        for k in (key, spec_key(job_id), events_key(job_id), cancel_key(job_id)):
                            pipe.expire(k, self.retention)
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    def transition(self, job_id: str, to: JobStatus, allowed_from: set[JobStatus], **changes: Any) -> JobRecord | None:
        """Move a job to `to` if its status is in `allowed_from`; atomic, with its status event."""

        def change(record: JobRecord):
            if record.status not in allowed_from:
                return None
            updated = msgspec.structs.replace(record, status=to, **changes)
            event: dict[str, Any] = {"type": "status", "status": to.value}
            if updated.error:
                event["error"] = msgspec.to_builtins(updated.error)
            return updated, event

        return self._update(job_id, change)

    def set_progress(self, job_id: str, stage: str, fraction: float, message: str) -> None:
        """Record progress on a live job, and as an event."""
        progress = Progress(stage, round(fraction, 4), message)

        def change(record: JobRecord):
            if record.status.terminal:
                return None
            return msgspec.structs.replace(record, progress=progress), {"type": "progress", **msgspec.to_builtins(progress)}

        self._update(job_id, change)

    def events(self, job_id: str, after: str = "-", count: int = 1000) -> list[tuple[str, str, Any]]:
        """(event id, type, data) after the event id `after` (exclusive), oldest first."""
        start = "-" if after in ("-", "0", "") else f"({after}"
        rows = self.redis.xrange(events_key(job_id), min=start, max="+", count=count)
        return [(eid.decode(), f[b"type"].decode(), msgspec.json.decode(f[b"data"])) for eid, f in rows]

    def list_jobs(self, tenant: str, status: JobStatus | None, before: float | None, limit: int) -> list[JobRecord]:
        """Newest first, created strictly before `before` (the cursor)."""
        found: list[JobRecord] = []
        top = f"({before}" if before is not None else "+inf"
        offset = 0
        while len(found) < limit:
            ids = self.redis.zrevrangebyscore(tenant_jobs_key(tenant), top, "-inf", start=offset, num=limit * 2)
            if not ids:
                break
            offset += len(ids)
            raws = self.redis.mget([job_key(i.decode()) for i in ids])
            for job_id, raw in zip(ids, raws):
                if raw is None:  # expired by retention
                    self.redis.zrem(tenant_jobs_key(tenant), job_id)
                    continue
                record = _record_decoder.decode(raw)
                if status is None or record.status is status:
                    found.append(record)
        return found[:limit]

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(cancel_key(job_id), 1, ex=self.retention)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(job_id)))

    def heartbeat(self, job_id: str, timeout: float) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(heartbeat_key(job_id), int(time.time()), px=int(timeout * 1000))
            pipe.sadd(RUNNING_KEY, job_id)
            pipe.execute()

    def reap_lost(self) -> list[str]:
        """Fail the started jobs whose worker stopped heartbeating (died): code `worker_lost`."""
        lost = []
        for raw_id in self.redis.smembers(RUNNING_KEY):
            job_id = raw_id.decode()
            if self.redis.exists(heartbeat_key(job_id)):
                continue
            error = JobError("worker_lost", "the worker running this job stopped heartbeating (it died or lost Redis)")
            active = {JobStatus.RUNNING, JobStatus.CANCELLING}
            if self.transition(job_id, JobStatus.FAILED, active, error=error, finished_at=now()):
                lost.append(job_id)
            else:
                self.redis.srem(RUNNING_KEY, job_id)
        return lost

    def status_counts(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(STATUS_COUNTS_KEY).items()}
