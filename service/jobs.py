"""Job operations behind the HTTP handlers: submit (idempotent), read, list, cancel. No HTTP here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from rq import Queue

from hoppatch.jobs import (
    NO_IDEMPOTENCY_KEY, JobRecord, JobStatus, JobStore, Limits, flatten_commands, idempotency_key,
    job_key, new_job_id, now, tenant_active_key, tenant_bucket_key,
)
from hoppatch.routing import Routes, rq_queue_key
from hoppatch.settings import Settings
from hoppatch.spec import JobSpec, ModelRefError, check_model_ref

from .auth import ApiKey
from .problems import IdempotencyConflict, JobNotFound, JobRejected, ModelNotAllowed, ModelNotServed, NotCancellable, TooManyRequests
from .rq_writes import RQJobWrites
from .trust import Trusted

LOAD_ALLOWANCE_SECONDS = 600
"""Added to the job's own time budget for RQ's hard timeout: loading (or converting) a model. The engine's
own deadline (the budget) ends a job long before RQ's alarm could interrupt it."""
IDEMPOTENCY_TTL = 24 * 3600
RETRY_ACTIVE = 30
"""Seconds a tenant at its active-jobs limit is told to wait: about the time a job takes."""
RETRY_QUEUE_FULL = 60


MODEL_TRUST_SECONDS = 5.0
"""How long a process trusts a model reference it has checked: a directory's check resolves its real path on
disk, which cost more than the rest of a submission. The worker checks the reference again when it loads it."""
MODEL_TRUST_SIZE = 1024


class CheckedModels:
    """The door check of model references, remembering the ones found valid (never the rejected ones) for
    `MODEL_TRUST_SECONDS`."""

    def __init__(self, model_roots: tuple[Path, ...]) -> None:
        self.model_roots = model_roots
        self._trusted: Trusted[str, bool] = Trusted(MODEL_TRUST_SECONDS, MODEL_TRUST_SIZE)

    def check(self, ref: str, key: ApiKey) -> None:
        """Reject what no worker could load (unknown built-ins, paths outside the model roots) and what this
        key may not patch."""
        if self._trusted.get(ref) is None:
            try:
                check_model_ref(ref, self.model_roots)
            except ModelRefError as exc:
                raise JobRejected(str(exc), "/model") from None
            self._trusted.put(ref, True)
        if key.models and ref not in key.models:
            raise ModelNotAllowed(f"this API key may patch only: {', '.join(key.models)}", "/model")


def route(ref: str, routes: Routes) -> str:
    """The label of the queue a job for `ref` waits in; 422 where no worker group serves the model."""
    label = routes.label_for(ref)
    if label is None:
        raise ModelNotServed(f"no worker group serves {ref!r}; this service serves: {', '.join(routes.served)}", "/model")
    return label


async def check_base_patches(aredis: aioredis.Redis, tenant: str, spec: JobSpec) -> None:
    """Each base patch is a succeeded job of the same tenant and model (its delta is what the worker applies)."""
    if not spec.base_patches:
        return
    raws = await aredis.mget([job_key(job_id) for job_id in spec.base_patches])
    for i, (job_id, raw) in enumerate(zip(spec.base_patches, raws)):
        record = JobStore.parse(raw)
        pointer = f"/base_patches/{i}"
        if record is None or record.tenant != tenant:
            raise JobRejected(f"base patch {job_id}: no such job (or it has expired)", pointer)
        if record.status is not JobStatus.SUCCEEDED:
            raise JobRejected(f"base patch {job_id} is {record.status.value}; only a succeeded job has a delta", pointer)
        if record.model != spec.model:
            raise JobRejected(f"base patch {job_id} patched {record.model!r}, not {spec.model!r}", pointer)


def check_spec(spec: JobSpec, key: ApiKey, settings: Settings) -> None:
    if len(spec.examples) > settings.max_examples:
        raise JobRejected(f"{len(spec.examples)} examples; this service takes at most {settings.max_examples} per job", "/examples")
    ceiling = key.max_seconds or settings.tenant_max_seconds
    if ceiling and spec.budget.max_seconds > ceiling:
        raise TooManyRequests(f"budget.max_seconds {spec.budget.max_seconds:g} is over this key's ceiling of {ceiling:g}", "/budget/max_seconds")


def limits(settings: Settings) -> Limits:
    return Limits(settings.tenant_max_active, settings.queue_cap, settings.tenant_rate, settings.tenant_burst)


async def submit(
    store: JobStore, admit: AsyncScript, queues: dict[str, Queue], rq_writes: RQJobWrites, models: CheckedModels,
    key: ApiKey, spec: JobSpec, idempotency: str | None, settings: Settings,
) -> tuple[JobRecord, bool]:
    """Create and enqueue a job; returns (job, created). Nothing is stored unless it is valid and admitted.

    One Lua script claims the idempotency key, checks the quotas and writes the record with RQ's job, so a
    rejected request leaves nothing behind and two identical requests make one job.
    """
    tenant = key.tenant
    models.check(spec.model, key)
    queue = queues[route(spec.model, settings.routes)]
    check_spec(spec, key, settings)
    await check_base_patches(admit.registered_client, tenant, spec)
    spec_json = msgspec.json.encode(spec)
    digest = hashlib.sha256(spec_json).hexdigest()
    job_id = new_job_id()
    record = JobRecord(
        id=job_id, tenant=tenant, status=JobStatus.QUEUED, model=spec.model, num_examples=len(spec.examples),
        budget=spec.budget, created_at=now(), metadata=dict(spec.metadata),
    )
    timeout = int(spec.budget.max_seconds) + LOAD_ALLOWANCE_SECONDS
    writes = [*rq_writes.commands(queue, job_id, timeout, record.created_at), *store.creation_commands(record, spec_json)]
    quota = limits(settings)
    claim = idempotency_key(tenant, idempotency) if idempotency else NO_IDEMPOTENCY_KEY
    keys = [claim, tenant_active_key(tenant), rq_queue_key(queue.name), tenant_bucket_key(tenant), job_key(job_id)]
    args = [f"{job_id} {digest}", quota.tenant_active, quota.queue_cap, quota.rate, quota.burst, IDEMPOTENCY_TTL, int(bool(idempotency))]
    verdict, detail = await admit(keys=keys, args=[*args, *flatten_commands(writes)])
    match verdict.decode():
        case "created":
            return record, True
        case "existing":
            return await _existing(admit.registered_client, idempotency or "", detail.decode(), digest), False
        case "tenant_active":
            raise TooManyRequests(f"tenant {tenant!r} has {quota.tenant_active} jobs queued or running, its limit", retry_after=RETRY_ACTIVE)
        case "queue_full":
            raise TooManyRequests(f"the queue holds {quota.queue_cap} jobs, its cap; try again later", retry_after=RETRY_QUEUE_FULL)
        case "rate":
            raise TooManyRequests(f"tenant {tenant!r} submits faster than {quota.rate:g} jobs/s", retry_after=float(detail))
    raise AssertionError(f"unknown admission verdict {verdict!r}")


async def _existing(aredis: aioredis.Redis, idempotency: str, claim: str, digest: str) -> JobRecord:
    existing_id, existing_digest = claim.split(" ")
    if existing_digest != digest:
        raise IdempotencyConflict(f"Idempotency-Key {idempotency!r} was used with a different body")
    record = JobStore.parse(await aredis.get(job_key(existing_id)))
    if record is None:
        raise JobNotFound(f"the job of Idempotency-Key {idempotency!r} has expired")
    return record


def get_job(store: JobStore, tenant: str, job_id: str) -> JobRecord:
    record = store.get(job_id) if job_id.startswith("job_") else None
    if record is None or record.tenant != tenant:
        raise JobNotFound(f"no job {job_id!r}")
    return record


def cancel(store: JobStore, queues: dict[str, Queue], routes: Routes, tenant: str, job_id: str) -> JobRecord:
    """Queued: cancelled at once. Running: `cancelling` until the worker stops. Ended: 409 (cancelled: as is)."""
    record = get_job(store, tenant, job_id)
    if record.status in (JobStatus.CANCELLED, JobStatus.CANCELLING):
        return record
    if record.status.terminal:
        raise NotCancellable(f"job {job_id} has already {record.status.value}")
    store.request_cancel(job_id)
    done = store.transition(job_id, JobStatus.CANCELLED, {JobStatus.QUEUED}, finished_at=now())
    if done:
        queue = queues.get(routes.label_for(record.model) or "")
        try:
            if queue is not None:
                queue.remove(job_id)
        except redis.RedisError:
            pass  # the task returns at once anyway: the record says cancelled
        return done
    stopping = store.transition(job_id, JobStatus.CANCELLING, {JobStatus.RUNNING})
    return stopping or get_job(store, tenant, job_id)
