"""The job record in Redis: states, keys and the transitions both the service and the workers make.

Our record, not RQ's, is the source of truth (RQ's keys expire): `queued → running → succeeded | failed |
cancelled`, plus `cancelling` while a cooperative stop is pending. Terminal states never change. Every key
comes from one function here, under the `hoppatch:` prefix. Imports redis, msgspec and prometheus_client (the
reaper's counter: the API and the workers both reap).
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import Any

import msgspec
import redis
from msgspec import Struct
from prometheus_client import Counter

from .spec import Budget

PREFIX = "hoppatch"
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


def tenant_active_key(tenant: str) -> str:
    """Set of the tenant's jobs that have not ended: its queued-plus-running quota counts these."""
    return f"{PREFIX}:tenant:{tenant}:active"


NO_IDEMPOTENCY_KEY = f"{PREFIX}:idem:none"
"""Stands in for the idempotency key of a request without one (a script's keys may not be empty: ACLs)."""


def tenant_bucket_key(tenant: str) -> str:
    """The tenant's submission token bucket: tokens left and when they were counted."""
    return f"{PREFIX}:tenant:{tenant}:bucket"


def ended_key(status: JobStatus) -> str:
    """Sorted set of ended job ids by the time their record expires, so counts drop as records do."""
    return f"{PREFIX}:ended:{status.value}"


def idempotency_key(tenant: str, key: str) -> str:
    return f"{PREFIX}:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def api_key_key(digest: str) -> str:
    return f"{PREFIX}:apikey:{digest}"


JOBS_REAPED = Counter("hoppatch_jobs_reaped_total", "Jobs this process ended worker_lost.")

RUNNING_KEY = f"{PREFIX}:running"
"""Set of job ids that a worker has started and not finished; the reaper watches their heartbeats."""
ACTIVE_KEY = f"{PREFIX}:active"
"""Set of every job id that has not ended; the reaper checks the queued ones against RQ."""
STATUS_COUNTS_KEY = f"{PREFIX}:status_counts"
"""Hash: number of jobs per status that has not ended (ended ones are counted in `ended_key`)."""
RQ_JOB_PREFIX = "rq:job:"
TURN_PREFIX = f"{PREFIX}:turn:"
"""Keys of the service-wide duties' turns (`JobStore.claim_turn`); they expire within a window."""
ORPHAN_CURSOR_KEY = f"{PREFIX}:orphan_scan_cursor"
"""Where the reaper's scan of the active jobs goes on from (an SSCAN cursor; 0: from the start)."""
ORPHAN_CURSOR_TTL = 3600
"""A cursor left by a service that stopped expires, and the next scan starts from the beginning."""
ORPHAN_SCAN_LIMIT = 2000
"""Active jobs whose RQ status one reaper turn reads: a turn's cost stays bounded when the queue holds
thousands, and a queued job lost by RQ (rare) is still found within a few turns."""
ORPHAN_SCAN_BATCH = 500
"""SSCAN's COUNT hint: about this many ids a round trip, their statuses read in one pipeline."""


def now() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return "job_" + os.urandom(12).hex()


class Limits(Struct, frozen=True):
    """What one submission is admitted against; 0 switches a limit off."""

    tenant_active: int
    """Jobs of the tenant queued or running at once."""
    queue_cap: int
    """Jobs waiting in one model's queue, all tenants together."""
    rate: float
    """Submissions per second a tenant's token bucket refills with."""
    burst: int
    """Submissions a tenant may make at once (the bucket's size)."""


SUBMIT_SCRIPT = """
-- KEYS: idempotency key (unused when ARGV[7] is '0'), tenant's active set, the model's RQ queue list, tenant's bucket, job key
-- ARGV: idempotency value, active limit, queue cap, rate, burst, idempotency TTL, '1' if idempotent, then the job's writes,
--       each as its argument count followed by its arguments
local idempotent = ARGV[7] == '1'
if idempotent then
  local existing = redis.call('GET', KEYS[1])
  if existing then return {'existing', existing} end
end
if redis.call('EXISTS', KEYS[5]) == 1 then return {'existing', ARGV[1]} end
local active_limit, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local rate, burst = tonumber(ARGV[4]), tonumber(ARGV[5])
if active_limit > 0 and redis.call('SCARD', KEYS[2]) >= active_limit then return {'tenant_active', ''} end
if cap > 0 and redis.call('LLEN', KEYS[3]) >= cap then return {'queue_full', ''} end
if rate > 0 then
  local t = redis.call('TIME')
  local moment = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local bucket = redis.call('HMGET', KEYS[4], 'tokens', 'at')
  local tokens = math.min(burst, (tonumber(bucket[1]) or burst) + (moment - (tonumber(bucket[2]) or moment)) * rate)
  if tokens < 1 then return {'rate', tostring((1 - tokens) / rate)} end
  redis.call('HSET', KEYS[4], 'tokens', tostring(tokens - 1), 'at', tostring(moment))
  redis.call('EXPIRE', KEYS[4], math.ceil(burst / rate) + 1)
end
if idempotent then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[6]) end
local i = 8
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return {'created', ''}
"""
"""Admission and creation in one step: the idempotency claim, the quotas and the job's writes (its record
and RQ's job) happen together or not at all."""


def flatten_commands(commands: Iterable[Sequence]) -> list:
    """Commands (each its name and arguments) as `SUBMIT_SCRIPT`'s trailing arguments."""
    flat: list = []
    for args in commands:
        flat += [len(args), *args]
    return flat


_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(JobRecord)


class JobStore:
    """Job records, events, cancel flags and heartbeats in Redis."""

    def __init__(self, client: redis.Redis, retention_seconds: int = 7 * 24 * 3600):
        self.redis = client
        self.retention = retention_seconds

    def creation_commands(self, record: JobRecord, spec_json: bytes) -> list[tuple]:
        """The writes of a new job, each its command and arguments; `SUBMIT_SCRIPT` runs them once the job is
        admitted. Plain tuples: a redis-py pipeline per submission costs more than the writes' own encoding."""
        status = record.status.value
        return [
            ("SET", job_key(record.id), _encoder.encode(record)),
            ("SET", spec_key(record.id), spec_json),
            ("ZADD", tenant_jobs_key(record.tenant), repr(record.created_at.timestamp()), record.id),
            ("SADD", tenant_active_key(record.tenant), record.id),
            ("SADD", ACTIVE_KEY, record.id),
            ("HINCRBY", STATUS_COUNTS_KEY, status, 1),
            ("XADD", events_key(record.id), "*", "type", "status", "data", _encoder.encode({"status": status})),
        ]

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
                    if updated.status.terminal:
                        pipe.zadd(ended_key(updated.status), {job_id: time.time() + self.retention})
                        for members in (RUNNING_KEY, ACTIVE_KEY, tenant_active_key(record.tenant)):
                            pipe.srem(members, job_id)
                        for k in (key, spec_key(job_id), events_key(job_id), cancel_key(job_id)):
                            pipe.expire(k, self.retention)
                    elif updated.status is not record.status:
                        pipe.hincrby(STATUS_COUNTS_KEY, updated.status.value, 1)
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

    def claim_turn(self, duty: str, seconds: float) -> bool:
        """Whether this caller does `duty` now: the first to ask in a window of `seconds` does, the other
        processes sharing this Redis (API processes, workers) do not: reaping and the artifact sweep are
        service-wide work."""
        return bool(self.redis.set(TURN_PREFIX + duty, os.getpid(), nx=True, px=max(1, int(seconds * 1000))))

    def reap_lost_in_turn(self, interval: float) -> list[str]:
        """`reap_lost` for a caller that asks every `interval` seconds, when its turn has come (the window
        ends just before its next ask); [] when another process has the turn."""
        return self.reap_lost() if self.claim_turn("reap", interval * 0.9) else []

    def reap_lost(self, scan_limit: int = ORPHAN_SCAN_LIMIT) -> list[str]:
        """Fail the jobs nobody will finish: started ones whose worker stopped heartbeating (it died), and
        queued ones whose RQ job is gone or ended without starting ours (about `scan_limit` of the active jobs
        are checked for that a call). Code `worker_lost` for both."""
        lost = []
        for raw_id in self.redis.smembers(RUNNING_KEY):
            job_id = raw_id.decode()
            if self.redis.exists(heartbeat_key(job_id)):
                continue
            error = JobError("worker_lost", "the worker running this job stopped heartbeating (it died or lost Redis)")
            if self.transition(job_id, JobStatus.FAILED, {JobStatus.RUNNING, JobStatus.CANCELLING}, error=error, finished_at=now()):
                lost.append(job_id)
            else:
                self.redis.srem(RUNNING_KEY, job_id)
        for job_id in self._orphaned_queued(scan_limit):
            error = JobError("worker_lost", "the queue lost this job before a worker started it; submit it again")
            if self.transition(job_id, JobStatus.FAILED, {JobStatus.QUEUED}, error=error, finished_at=now()):
                lost.append(job_id)
        JOBS_REAPED.inc(len(lost))
        return lost

    def _orphaned_queued(self, limit: int) -> list[str]:
        """Queued records whose RQ job no longer exists or has ended: no worker will ever pick them up.

        Each call reads RQ's status of about `limit` active jobs, going on where the last call (in any process)
        stopped, so a turn costs the same however long the queue is; a full queue is read over several turns.
        The record is read only where RQ's status says the job is gone or over."""
        cursor = int(self.redis.get(ORPHAN_CURSOR_KEY) or 0)
        orphans: list[str] = []
        examined = 0
        while True:
            cursor, raw_ids = self.redis.sscan(ACTIVE_KEY, cursor, count=ORPHAN_SCAN_BATCH)
            orphans += self._orphans_among([i.decode() for i in raw_ids])
            examined += len(raw_ids)
            if cursor == 0 or examined >= limit:
                break
        if cursor:
            self.redis.set(ORPHAN_CURSOR_KEY, cursor, ex=ORPHAN_CURSOR_TTL)
        else:
            self.redis.delete(ORPHAN_CURSOR_KEY)
        return orphans

    def _orphans_among(self, job_ids: list[str]) -> list[str]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(RQ_JOB_PREFIX + job_id, "status")
            suspects = [job_id for job_id, rq_status in zip(job_ids, pipe.execute()) if rq_status is None or rq_status in _RQ_ENDED]
        if not suspects:
            return []
        orphans = []
        for job_id, raw in zip(suspects, self.redis.mget([job_key(job_id) for job_id in suspects])):
            record = self.parse(raw)
            if record is None:
                self.redis.srem(ACTIVE_KEY, job_id)
            elif record.status is JobStatus.QUEUED:
                orphans.append(job_id)
        return orphans

    def existing(self, job_ids: list[str]) -> list[bool]:
        """Whether each job still has a record (ended ones expire after the retention)."""
        found: list[bool] = []
        for start in range(0, len(job_ids), 500):
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids[start : start + 500]:
                    pipe.exists(job_key(job_id))
                found += [bool(n) for n in pipe.execute()]
        return found

    def status_counts(self) -> dict[str, int]:
        """Jobs per status: those not ended, and the ended ones whose record has not expired yet."""
        moment = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(STATUS_COUNTS_KEY)
            for status in _ENDED:
                pipe.zremrangebyscore(ended_key(status), "-inf", moment)
                pipe.zcard(ended_key(status))
            replies = pipe.execute()
        counts = {status.value: 0 for status in JobStatus}
        counts.update({k.decode(): max(0, int(v)) for k, v in replies[0].items() if not JobStatus(k.decode()).terminal})
        for status, count in zip(_ENDED, replies[2::2]):
            counts[status.value] = int(count)
        return counts


_ENDED = [status for status in JobStatus if status.terminal]
_RQ_ENDED = {b"finished", b"failed", b"stopped", b"canceled"}
"""RQ job states after which RQ will not run the job again."""
