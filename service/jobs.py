"""Job operations behind the HTTP handlers: submit (idempotent), read, list, cancel. No HTTP here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import redis
import redis.asyncio as aioredis
from rq import Queue

from hoppatch.jobs import TASK, JobRecord, JobStatus, JobStore, idempotency_key, job_key, new_job_id, now
from hoppatch.settings import Settings
from hoppatch.spec import JobSpec, ModelRefError, check_model_ref

from .problems import IdempotencyConflict, JobRejected, JobNotFound, NotCancellable

LOAD_ALLOWANCE_SECONDS = 600
"""Added to the job's own time budget for RQ's hard timeout: loading (or converting) a model."""
IDEMPOTENCY_TTL = 24 * 3600


def check_model(ref: str, model_roots: tuple[Path, ...]) -> None:
    """Reject at the door what no worker could load: unknown built-ins, paths outside the model roots."""
    try:
        check_model_ref(ref, model_roots)
    except ModelRefError as exc:
        raise JobRejected(str(exc), "/model") from None


def check_spec(spec: JobSpec, max_examples: int) -> None:
    if len(spec.examples) > max_examples:
        raise JobRejected(f"{len(spec.examples)} examples; this service takes at most {max_examples} per job", "/examples")


async def submit(
    store: JobStore, aredis: aioredis.Redis, queue: Queue, tenant: str, spec: JobSpec, idempotency: str | None, settings: Settings
) -> tuple[JobRecord, bool]:
    """Create and enqueue a job; returns (job, created). Nothing is stored unless everything is valid.

    Redis is awaited on the asyncio client, so the event loop serves other requests meanwhile.
    """
    check_model(spec.model, settings.model_roots)
    check_spec(spec, settings.max_examples)
    spec_json = msgspec.json.encode(spec)
    digest = hashlib.sha256(spec_json).hexdigest()
    job_id = new_job_id()
    if idempotency:
        key = idempotency_key(tenant, idempotency)
        claimed = await aredis.set(key, f"{job_id} {digest}", nx=True, ex=IDEMPOTENCY_TTL)
        if not claimed:
            existing_id, existing_digest = ((await aredis.get(key)) or b" ").decode().split(" ")
            if existing_digest != digest:
                raise IdempotencyConflict(f"Idempotency-Key {idempotency!r} was used with a different body")
            record = JobStore.parse(await aredis.get(job_key(existing_id)))
            if record is None:
                raise JobNotFound(f"the job of Idempotency-Key {idempotency!r} has expired")
            return record, False
    record = JobRecord(
        id=job_id, tenant=tenant, status=JobStatus.QUEUED, model=spec.model, num_examples=len(spec.examples),
        budget=spec.budget, created_at=now(), metadata=dict(spec.metadata),
    )
    # RQ writes its job through a synchronous pipeline: the writes are staged on one that never runs (RQ
    # opens the MULTI block itself, so it goes first; the record joins it), then sent in one transaction.
    staged = store.redis.pipeline()
    queue.enqueue_call(
        TASK, args=(job_id,), job_id=job_id, pipeline=staged,
        timeout=int(spec.budget.max_seconds) + LOAD_ALLOWANCE_SECONDS,
        result_ttl=store.retention, failure_ttl=store.retention,
    )
    store.create(record, spec_json, staged)
    async with aredis.pipeline(transaction=True) as transaction:
        for args, options in staged.command_stack:
            transaction.execute_command(*args, **options)
        await transaction.execute()
    return record, True


def get_job(store: JobStore, tenant: str, job_id: str) -> JobRecord:
    record = store.get(job_id) if job_id.startswith("job_") else None
    if record is None or record.tenant != tenant:
        raise JobNotFound(f"no job {job_id!r}")
    return record


def cancel(store: JobStore, queue: Queue, tenant: str, job_id: str) -> JobRecord:
    """Queued: cancelled at once. Running: `cancelling` until the worker stops. Ended: 409 (cancelled: as is)."""
    record = get_job(store, tenant, job_id)
    if record.status in (JobStatus.CANCELLED, JobStatus.CANCELLING):
        return record
    if record.status.terminal:
        raise NotCancellable(f"job {job_id} has already {record.status.value}")
    store.request_cancel(job_id)
    done = store.transition(job_id, JobStatus.CANCELLED, {JobStatus.QUEUED}, finished_at=now())
    if done:
        try:
            queue.remove(job_id)
        except redis.RedisError:
            pass  # the task returns at once anyway: the record says cancelled
        return done
    stopping = store.transition(job_id, JobStatus.CANCELLING, {JobStatus.RUNNING})
    return stopping or get_job(store, tenant, job_id)
