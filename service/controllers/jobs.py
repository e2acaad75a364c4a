"""Jobs: create, list, read, cancel, events (list and SSE stream), metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from hoppatch.jobs import JobStatus, events_key
from hoppatch.spec import JobSpec

from .. import jobs
from ..metrics import JOBS_SUBMITTED, model_label
from ..deps import Services
from ..problems import PROBLEM_JSON, ArtifactNotFound, NoMetrics, TooManyRequests
from ..schemas import Event, EventList, Job, JobPage, Problem

STREAM_LIFETIME_SECONDS = 3600
"""An SSE stream ends after this long; the client resumes with Last-Event-ID."""
EVENT_ID = r"^[0-9]{1,19}(-[0-9]{1,19})?$"
"""A Redis stream entry id, as the events carry them (Redis reads a bare number as NUMBER-0). 19 digits keep
each part below 2**64, past which Redis refuses the id."""
STREAM_RETRY = 10
"""Seconds a client over its stream cap is told to wait."""


class OpenStreams:
    """Event streams open on this process, per tenant: the caps that keep SSE from holding every connection."""

    def __init__(self) -> None:
        self.by_tenant: Counter[str] = Counter()

    def check(self, tenant: str, per_tenant: int, per_process: int) -> None:
        if self.by_tenant[tenant] >= per_tenant:
            raise TooManyRequests(f"tenant {tenant!r} already has {per_tenant} event streams open here", retry_after=STREAM_RETRY)
        if sum(self.by_tenant.values()) >= per_process:
            raise TooManyRequests(f"this API process already serves {per_process} event streams", retry_after=STREAM_RETRY)

    async def counted(self, tenant: str, stream: AsyncIterator[ServerSentEventMessage]) -> AsyncIterator[ServerSentEventMessage]:
        """`stream`, counted while it is being sent (a response never sent never counts)."""
        self.by_tenant[tenant] += 1
        try:
            async for message in stream:
                yield message
        finally:
            self.by_tenant[tenant] -= 1
            if self.by_tenant[tenant] <= 0:
                del self.by_tenant[tenant]



def problems(*statuses: int) -> dict[int, ResponseSpec]:
    return {s: ResponseSpec(Problem, description="Problem details (RFC 9457)", media_type=PROBLEM_JSON, generate_examples=False) for s in statuses}


COMMON = (400, 401, 503)


class JobController(Controller):
    path = "/v1/jobs"
    tags = ["jobs"]
    security = [{"ApiKey": []}]

    @post("/", operation_id="CreateJob", status_code=202, responses=problems(*COMMON, 403, 404, 413, 422, 429))
    async def create_job(
        self,
        request: Request,
        data: JobSpec,
        services: Services,
        idempotency_key: Annotated[str | None, Parameter(header="Idempotency-Key", max_length=255)] = None,
    ) -> Response[Job]:
        """Queue a patch job; 202 with the job and its Location."""
        record, created = await jobs.submit(
            services.store, request.app.state.admit, services.queues, services.rq_writes, services.models, request.auth,
            data, idempotency_key, services.settings,
        )
        if created:
            JOBS_SUBMITTED.labels(model_label(record.model)).inc()
        return Response(Job.of(record), status_code=202, headers={"Location": f"/v1/jobs/{record.id}"})

    @get("/", operation_id="ListJobs", sync_to_thread=True, responses=problems(*COMMON))
    def list_jobs(
        self,
        request: Request,
        services: Services,
        status: JobStatus | None = None,
        cursor: Annotated[str | None, Parameter(max_length=64, pattern=r"^[0-9]+(\.[0-9]+)?$")] = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
    ) -> JobPage:
        """Jobs of this tenant, newest first; pass `next_cursor` back as `cursor` for the next page."""
        records = services.store.list_jobs(request.user, status, float(cursor) if cursor else None, limit + 1)
        page = records[:limit]
        more = len(records) > limit
        next_cursor = repr(page[-1].created_at.timestamp()) if more and page else None
        return JobPage([Job.of(r) for r in page], more, next_cursor)

    @get("/{job_id:str}", operation_id="GetJob", sync_to_thread=True, responses=problems(*COMMON, 404))
    def get_job(self, request: Request, services: Services, job_id: str) -> Job:
        """One job."""
        return Job.of(jobs.get_job(services.store, request.user, job_id))

    @post("/{job_id:str}/cancel", operation_id="CancelJob", status_code=200, sync_to_thread=True, responses=problems(*COMMON, 404, 409))
    def cancel_job(self, request: Request, services: Services, job_id: str) -> Job:
        """Cancel: a queued job at once, a running one at the worker's next step (status `cancelling`)."""
        return Job.of(jobs.cancel(services.store, services.queues, services.settings.routes, request.user, job_id))

    @get("/{job_id:str}/events", operation_id="ListJobEvents", sync_to_thread=True, responses=problems(*COMMON, 404))
    def list_events(
        self,
        request: Request,
        services: Services,
        job_id: str,
        after: Annotated[str | None, Parameter(max_length=64, pattern=EVENT_ID)] = None,
    ) -> EventList:
        """The job's status and progress events, oldest first."""
        jobs.get_job(services.store, request.user, job_id)
        return EventList([Event(i, t, d) for i, t, d in services.store.events(job_id, after or "-")])

    @get(
        "/{job_id:str}/events/stream", operation_id="StreamJobEvents", media_type="text/event-stream",
        responses=problems(*COMMON, 404, 429), response_description="Server-sent events: status, progress, done",
    )
    async def stream_events(
        self,
        request: Request,
        services: Services,
        job_id: str,
        last_event_id: Annotated[str, Parameter(header="Last-Event-ID", required=False, max_length=64, pattern=EVENT_ID)] = "0-0",
    ) -> ServerSentEvent:
        """Server-sent events; ends after the terminal status. Resumes after `Last-Event-ID`.

        A tenant holds at most `HOPPATCH_STREAMS_PER_TENANT` streams per API process, and a process at most
        `HOPPATCH_STREAMS_PER_PROCESS` (429 beyond)."""
        record = await asyncio.to_thread(jobs.get_job, services.store, request.user, job_id)
        streams: OpenStreams = request.app.state.streams
        streams.check(request.user, services.settings.streams_per_tenant, services.settings.streams_per_process)
        stream = _event_stream(request.app.state.stream_redis, job_id, last_event_id, record.status.terminal)
        return ServerSentEvent(streams.counted(request.user, stream))

    @get("/{job_id:str}/metrics", operation_id="GetJobMetrics", sync_to_thread=True, responses=problems(*COMMON, 404, 409))
    def job_metrics(self, request: Request, services: Services, job_id: str) -> Response[dict[str, Any]]:
        """The job's metrics.json: 409 while the job has not succeeded (it has none yet, or none at all)."""
        record = jobs.get_job(services.store, request.user, job_id)
        if record.status is not JobStatus.SUCCEEDED:
            raise NoMetrics(f"job {job_id} is {record.status.value}: a job has metrics once it has succeeded")
        document = services.artifacts.read(job_id, "metrics.json")
        if document is None:
            raise ArtifactNotFound(f"job {job_id} has no metrics.json")
        return Response(json.loads(document), media_type="application/json")


async def _event_stream(aredis, job_id: str, start: str, ended: bool) -> AsyncIterator[ServerSentEventMessage]:
    last = start
    deadline = time.monotonic() + STREAM_LIFETIME_SECONDS
    while time.monotonic() < deadline:
        rows = await aredis.xread({events_key(job_id): last}, block=15000, count=100)
        if not rows:
            yield ServerSentEventMessage(comment="keep-alive")
            if ended:
                return
            continue
        for event_id, fields in rows[0][1]:
            last = event_id.decode()
            data = json.loads(fields[b"data"])
            kind = fields[b"type"].decode()
            yield ServerSentEventMessage(data=json.dumps(data), event=kind, id=last)
            if kind == "status" and JobStatus(data["status"]).terminal:
                yield ServerSentEventMessage(data="{}", event="done")
                return
