"""Scale benchmark: 1, 2 and 4 workers sharing one Redis take a burst of small jobs (tiny model, CPU).

    .venv/bin/python bench/scale.py [--jobs 40]

Reports jobs/s per worker count and whether any job was lost (not terminal at the end). The tiny random
model has no compositional failures, so each job ends `failed` with `no_composition_failure` after loading
and diagnosing: the cost measured is the queue, the record, the model cache and the diagnosis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import api_server, environment, redis_server, tiny_job, tiny_model_dir, workers  # noqa: E402
from hoppatch.service.auth import create_key  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}


def burst(url: str, key: str, body: dict, jobs: int, timeout: float) -> dict:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as client:
        ids = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(jobs)]
        started = time.perf_counter()
        pending = set(ids)
        deadline = started + timeout
        while pending and time.perf_counter() < deadline:
            for job_id in list(pending):
                if client.get(f"/v1/jobs/{job_id}").json()["status"] in TERMINAL:
                    pending.discard(job_id)
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
    return {"jobs": jobs, "seconds": elapsed, "jobs_per_second": (jobs - len(pending)) / elapsed, "lost": len(pending)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--json", default="bench/results/scale.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hoppatch-bench-"))
    body = tiny_job(tiny_model_dir(work))
    rows = {}
    with redis_server() as redis_url:
        key = create_key(redis.Redis.from_url(redis_url), "bench")[1]
        # one thread per worker: on a small machine, threads of several workers would fight for the cores
        env = environment(redis_url, work, OMP_NUM_THREADS="1")
        with api_server(env) as url:
            for count in [int(c) for c in args.counts.split(",")]:
                with workers(env, count):
                    with httpx.Client(base_url=url) as client:
                        while client.get("/readyz").json().get("workers", 0) < count:
                            time.sleep(0.2)
                    burst(url, key, body, count, 120)  # warm: each worker loads the model once
                    rows[count] = burst(url, key, body, args.jobs, 600)
                print(f"{count} worker(s) on {os.cpu_count()} cores: {rows[count]['jobs_per_second']:.2f} jobs/s, "
                      f"lost {rows[count]['lost']}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
