"""JobStore on its own over a real Redis, and the worker's ModelCache over real (tiny) model directories."""

import time
from datetime import UTC, datetime

import pytest
import redis

from hoppatch.engine.errors import ModelNotFound
from hoppatch.engine.tiny_models import tiny_model
from hoppatch.jobs import ACTIVE_KEY, ORPHAN_CURSOR_KEY, TURN_PREFIX, JobError, JobRecord, JobStatus, JobStore, new_job_id
from hoppatch.spec import Budget
from hoppatch.workers.model_cache import ModelCache

from .conftest import write_record


def _create(store: JobStore, tenant: str = "team-a") -> JobRecord:
    record = JobRecord(
        id=new_job_id(), tenant=tenant, status=JobStatus.QUEUED, model="m", num_examples=1, budget=Budget(),
        created_at=datetime.now(UTC), metadata={},
    )
    return write_record(store, record)


def test_terminal_states_never_change_and_every_transition_is_an_event(redis_client):
    store = JobStore(redis_client, retention_seconds=60)
    job = _create(store)
    assert store.transition(job.id, JobStatus.RUNNING, {JobStatus.QUEUED}).status is JobStatus.RUNNING
    store.set_progress(job.id, "edit", 0.5, "editing")
    done = store.transition(job.id, JobStatus.SUCCEEDED, {JobStatus.RUNNING})
    assert done.status is JobStatus.SUCCEEDED and done.progress.stage == "edit"
    assert store.transition(job.id, JobStatus.FAILED, {JobStatus.RUNNING}) is None
    store.set_progress(job.id, "late", 0.9, "after the end")  # ignored on an ended job
    assert store.get(job.id).status is JobStatus.SUCCEEDED and store.get(job.id).progress.stage == "edit"
    kinds = [(kind, data.get("status") or data.get("stage")) for _, kind, data in store.events(job.id)]
    assert kinds == [("status", "queued"), ("status", "running"), ("progress", "edit"), ("status", "succeeded")]
    assert 0 < redis_client.ttl(f"hoppatch:job:{job.id}") <= 60
    assert store.status_counts() == {"queued": 0, "running": 0, "cancelling": 0, "succeeded": 1, "failed": 0, "cancelled": 0}


def test_counts_drop_as_ended_records_expire(redis_client):
    store = JobStore(redis_client, retention_seconds=1)
    ended = _create(store)
    _create(store)
    store.transition(ended.id, JobStatus.FAILED, {JobStatus.QUEUED})
    assert store.status_counts()["failed"] == 1 and store.status_counts()["queued"] == 1
    time.sleep(1.2)
    assert redis_client.get(f"hoppatch:job:{ended.id}") is None
    assert store.status_counts()["failed"] == 0 and store.status_counts()["queued"] == 1


def test_a_running_job_without_a_heartbeat_is_reaped_as_worker_lost(redis_client):
    store = JobStore(redis_client)
    alive, dead = _create(store), _create(store)
    for job in (alive, dead):
        store.heartbeat(job.id, timeout=30)
        store.transition(job.id, JobStatus.RUNNING, {JobStatus.QUEUED})
    store.heartbeat(dead.id, timeout=0.05)
    time.sleep(0.2)
    assert store.reap_lost() == [dead.id]
    lost = store.get(dead.id)
    assert lost.status is JobStatus.FAILED and lost.error == JobError("worker_lost", lost.error.message)
    assert store.get(alive.id).status is JobStatus.RUNNING
    assert store.reap_lost() == []


def test_a_queued_job_whose_queue_entry_is_gone_or_ended_is_reaped(redis_client):
    store = JobStore(redis_client)
    waiting, vanished, failed = _create(store), _create(store), _create(store)
    redis_client.hset(f"rq:job:{waiting.id}", "status", "queued")
    redis_client.hset(f"rq:job:{failed.id}", "status", "failed")
    assert sorted(store.reap_lost()) == sorted([vanished.id, failed.id])
    assert store.get(vanished.id).error.code == "worker_lost"
    assert store.get(waiting.id).status is JobStatus.QUEUED
    assert redis_client.scard("hoppatch:tenant:team-a:active") == 1


def test_a_long_queue_is_checked_for_lost_jobs_a_part_at_a_time_until_all_of_it_is(redis_client):
    store = JobStore(redis_client)
    waiting = [f"job_waiting_{i}" for i in range(1000)]  # RQ holds them; their records are never read
    redis_client.sadd(ACTIVE_KEY, *waiting)
    with redis_client.pipeline() as pipe:
        for job_id in waiting:
            pipe.hset(f"rq:job:{job_id}", "status", "queued")
        pipe.execute()
    vanished = _create(store)
    reaped, turns = [], 0
    while not reaped and turns < 10:
        reaped = store.reap_lost(scan_limit=300)
        turns += 1
        if turns == 1:
            assert int(redis_client.get(ORPHAN_CURSOR_KEY)) != 0  # the first turn read part of the queue only
    assert reaped == [vanished.id] and turns <= 5
    assert redis_client.scard(ACTIVE_KEY) == 1000  # the waiting jobs stay; the lost one has ended


def test_jobs_are_listed_per_tenant_newest_first(redis_client):
    store = JobStore(redis_client)
    mine = [_create(store, "team-a") for _ in range(3)]
    _create(store, "team-b")
    listed = store.list_jobs("team-a", None, None, limit=10)
    assert [r.id for r in listed] == [r.id for r in reversed(mine)]
    assert store.list_jobs("team-a", JobStatus.RUNNING, None, limit=10) == []


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("llama", "gpt2"):
        lm = tiny_model(family)
        lm.model.save_pretrained(root / family)
        lm.tokenizer.save_pretrained(root / family)
    return root


def test_model_cache_keeps_the_most_recent_models_and_fails_unknown_ones_before_evicting(model_dirs):
    cache = ModelCache(capacity=1, model_roots=[model_dirs], device="cpu")
    llama = cache.get(str(model_dirs / "llama"))
    assert cache.get(str(model_dirs / "llama")) is llama  # warm: the same object
    with pytest.raises(ModelNotFound):
        cache.get(str(model_dirs / "missing"))
    assert str(model_dirs / "llama") in cache  # the failed load evicted nothing
    gpt2 = cache.get(str(model_dirs / "gpt2"))
    assert gpt2.model.config.model_type == "gpt2"
    assert str(model_dirs / "llama") not in cache and str(model_dirs / "gpt2") in cache
    with pytest.raises(ModelNotFound, match="outside the configured model roots"):
        cache.get("/etc")


def test_one_of_the_processes_sharing_redis_takes_each_turn_of_a_service_wide_duty(redis_client):
    first, second = JobStore(redis_client), JobStore(redis.Redis(connection_pool=redis_client.connection_pool))
    assert first.claim_turn("reap", 0.3)
    assert not second.claim_turn("reap", 0.3) and not first.claim_turn("reap", 0.3)
    assert second.claim_turn("sweep", 0.3)  # another duty has turns of its own
    time.sleep(0.4)
    assert second.claim_turn("reap", 0.3)


def test_a_process_reaps_only_in_its_turn(redis_client):
    store, other = JobStore(redis_client), JobStore(redis.Redis(connection_pool=redis_client.connection_pool))
    vanished = _create(store)  # queued, and RQ has no job for it
    assert other.claim_turn("reap", 30)
    assert store.reap_lost_in_turn(1.0) == [] and store.get(vanished.id).status is JobStatus.QUEUED
    redis_client.delete(TURN_PREFIX + "reap")
    assert store.reap_lost_in_turn(1.0) == [vanished.id]
