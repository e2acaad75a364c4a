"""RQ's writes recorded once and filled in per submission are the writes RQ itself makes for that job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from hoppatch.artifacts import LocalArtifactStore
from hoppatch.jobs import TASK, JobRecord, JobStatus, JobStore, new_job_id
from hoppatch.service.rq_writes import TIME_FIELDS, RQJobWrites
from hoppatch.spec import Budget
from hoppatch.workers import tasks
from hoppatch.workers.model_cache import ModelCache

from .conftest import write_record

RETENTION = 3600


def _rq_own_writes(queue: Queue, job_id: str, timeout: int) -> list[list]:
    staged = queue.connection.pipeline()
    queue.enqueue_call(TASK, job_id=job_id, pipeline=staged, timeout=timeout, result_ttl=RETENTION, failure_ttl=RETENTION)
    return [list(args) for args, _ in staged.command_stack]


def test_filled_writes_are_rq_own_writes_for_that_id_but_the_time(redis_client):
    queue = Queue("team-queue", connection=redis_client, serializer=JSONSerializer)
    writes = RQJobWrites(RETENTION)
    created = datetime(2026, 12, 7, 3, 4, 5, 678901, tzinfo=UTC)
    writes.commands(queue, "job_first", 700, created)  # the recording is made for another id
    ours = writes.commands(queue, "job_second", 700, created)
    theirs = _rq_own_writes(queue, "job_second", 700)
    assert [c[0] for c in ours] == [c[0] for c in theirs] and "RPUSH" in [c[0] for c in ours]
    for mine, rq_own in zip(ours, theirs, strict=True):
        assert len(mine) == len(rq_own)
        for i, (a, b) in enumerate(zip(mine, rq_own)):
            if i > 0 and mine[i - 1] in TIME_FIELDS:
                assert utcparse(a) == created and abs(utcparse(b) - datetime.now(UTC)) < timedelta(minutes=1)
            else:
                assert a == b, (mine[0], i, a, b)


def test_a_filled_job_is_one_rq_reads_back_with_its_own_id_timeout_and_time(redis_client):
    queue = Queue("team-queue", connection=redis_client, serializer=JSONSerializer)
    writes = RQJobWrites(RETENTION)
    created = datetime(2026, 12, 7, 3, 4, 5, 678901, tzinfo=UTC)
    for job_id, timeout in (("job_a", 700), ("job_b", 700), ("job_c", 1600)):
        with redis_client.pipeline() as pipe:
            for command in writes.commands(queue, job_id, timeout, created):
                pipe.execute_command(*command)
            pipe.execute()
    assert queue.job_ids == ["job_a", "job_b", "job_c"]
    jobs = {j: Job.fetch(j, connection=redis_client, serializer=JSONSerializer) for j in queue.job_ids}
    assert {j: job.timeout for j, job in jobs.items()} == {"job_a": 700, "job_b": 700, "job_c": 1600}
    for job_id, job in jobs.items():
        assert (job.id, job.func_name, list(job.args), job.origin) == (job_id, TASK, [], "team-queue")
        assert job.created_at == job.enqueued_at == created and job.get_status() == "queued"
        assert job.result_ttl == RETENTION and job.failure_ttl == RETENTION


def test_the_task_finds_its_record_by_rq_job_id_or_by_an_earlier_release_argument(redis_client, tmp_path, monkeypatch):
    store = JobStore(redis_client, retention_seconds=RETENTION)
    context = tasks.WorkerContext(store, LocalArtifactStore(tmp_path), ModelCache(), 30.0, "test-worker", 0)
    monkeypatch.setattr(tasks, "_worker", context)  # what `configure` sets in a worker process
    queue = Queue("team-queue", connection=redis_client, serializer=JSONSerializer)
    writes, ids = RQJobWrites(RETENTION), []
    for argument in (False, True):
        record = JobRecord(
            id=new_job_id(), tenant="team-a", status=JobStatus.QUEUED, model="m", num_examples=1, budget=Budget(),
            created_at=datetime.now(UTC),
        )
        write_record(store, record)
        store.transition(record.id, JobStatus.CANCELLED, {JobStatus.QUEUED})  # the task returns its status at once
        if argument:
            queue.enqueue_call(TASK, args=(record.id,), job_id=record.id)
        else:
            with redis_client.pipeline() as pipe:
                for command in writes.commands(queue, record.id, 60, record.created_at):
                    pipe.execute_command(*command)
                pipe.execute()
        ids.append(record.id)
    SimpleWorker([queue], connection=redis_client, serializer=JSONSerializer).work(burst=True)
    returned = [Job.fetch(j, connection=redis_client, serializer=JSONSerializer).return_value() for j in ids]
    assert returned == ["cancelled", "cancelled"]
