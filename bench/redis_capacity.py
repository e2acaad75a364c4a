"""Redis capacity: how many whole job lifecycles one Redis carries, the shared part of every deployment.

    .venv/bin/python bench/redis_capacity.py [--jobs 4000] [--clients 8]

Each lifecycle makes the Redis calls a real job makes, through the real code: the API's admission script
(idempotency claim, quotas, the record and RQ's job; `service.jobs.submit`), RQ's dequeue, the transition to
running, a heartbeat per stage, the seven progress updates, the transition to succeeded and a status read.
No model and no HTTP: what is left is Redis's share. Redis runs as in production (AOF fsynced on every write,
`scripts/redis.sh`). Prints lifecycles/s, Redis commands per lifecycle, and the CPU seconds Redis itself spent:
Redis is single-threaded, so one core divided by its CPU time per lifecycle is its ceiling, whatever the
clients on this machine could drive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rq import Queue  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from bench.harness import redis_server  # noqa: E402
from hoppatch.connection import connect, connect_async  # noqa: E402
from hoppatch.jobs import SUBMIT_SCRIPT, JobStatus, JobStore, now  # noqa: E402
from hoppatch.routing import ANY_MODEL, SHARED_QUEUE  # noqa: E402
from hoppatch.service.auth import ApiKey  # noqa: E402
from hoppatch.service.jobs import CheckedModels, submit  # noqa: E402
from hoppatch.service.rq_writes import RQJobWrites  # noqa: E402
from hoppatch.settings import Settings  # noqa: E402
from hoppatch.spec import JobSpec, read_examples  # noqa: E402

STAGES = ("diagnose", "locate", "prepare", "evaluate", "edit", "calibrate", "publish")


async def submit_all(settings: Settings, spec: JobSpec, jobs: int, clients: int) -> float:
    aredis = connect_async(settings.redis_url)
    store = JobStore(connect(settings.redis_url), settings.retention_seconds)
    admit = aredis.register_script(SUBMIT_SCRIPT)
    queues = {ANY_MODEL: Queue(SHARED_QUEUE, connection=store.redis, serializer=JSONSerializer)}
    key = ApiKey(id="key_bench", tenant="bench", created_at=now())
    models = CheckedModels(settings.model_roots)
    rq_writes = RQJobWrites(settings.retention_seconds)
    remaining = iter(range(jobs))

    async def client() -> None:
        for _ in remaining:
            await submit(store, admit, queues, rq_writes, models, key, spec, None, settings)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started


def run_all(redis_url: str, jobs: int, clients: int) -> float:
    """Workers' side: dequeue, start, heartbeat and progress per stage, succeed."""
    done = iter(range(jobs))
    lock = threading.Lock()

    def worker() -> None:
        connection = connect(redis_url)
        store = JobStore(connection)
        queue = Queue(SHARED_QUEUE, connection=connection, serializer=JSONSerializer)
        while True:
            with lock:
                if next(done, None) is None:
                    return
            job = queue.dequeue_any([queue], timeout=None, connection=connection, serializer=JSONSerializer)
            job_id = job[0].id
            store.heartbeat(job_id, 30)
            store.transition(job_id, JobStatus.RUNNING, {JobStatus.QUEUED}, started_at=now(), worker="bench")
            for i, stage in enumerate(STAGES):
                store.heartbeat(job_id, 30)
                store.set_progress(job_id, stage, i / len(STAGES), stage)
            store.transition(job_id, JobStatus.SUCCEEDED, {JobStatus.RUNNING}, finished_at=now())
            store.get(job_id)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def _redis_cpu(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", default="bench/results/redis_capacity.json")
    args = parser.parse_args()
    example = read_examples(ROOT / "examples" / "gemma-3-270m.json")[:1]
    spec = JobSpec(model="builtin:gemma-3-270m", examples=example)
    with redis_server() as redis_url:
        settings = Settings(redis_url=redis_url, tenant_max_active=0, tenant_rate=0, queue_cap=0)
        info = redis.Redis.from_url(redis_url)
        cpu_before = _redis_cpu(info)
        before = int(info.info("stats")["total_commands_processed"])
        submit_seconds = asyncio.run(submit_all(settings, spec, args.jobs, args.clients))
        middle = int(info.info("stats")["total_commands_processed"])
        run_seconds = run_all(redis_url, args.jobs, args.clients)
        after = int(info.info("stats")["total_commands_processed"])
        redis_cpu = _redis_cpu(info) - cpu_before
        assert info.llen(f"rq:queue:{SHARED_QUEUE}") == 0
        counts = JobStore(info).status_counts()
    result = {
        "cores": os.cpu_count(), "jobs": args.jobs, "clients": args.clients,
        "submissions_per_second": round(args.jobs / submit_seconds, 1),
        "redis_commands_per_submission": round((middle - before) / args.jobs, 1),
        "worker_side_lifecycles_per_second": round(args.jobs / run_seconds, 1),
        "redis_commands_per_worker_side": round((after - middle) / args.jobs, 1),
        "whole_lifecycles_per_second": round(args.jobs / (submit_seconds + run_seconds), 1),
        "redis_commands_per_second": round((after - before) / (submit_seconds + run_seconds), 0),
        "redis_cpu_ms_per_lifecycle": round(1000 * redis_cpu / args.jobs, 3),
        "redis_ceiling_lifecycles_per_second": round(args.jobs / redis_cpu, 0),
        "succeeded": counts["succeeded"],
    }
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
