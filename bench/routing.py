"""Routing: two models, two workers, one shared queue against one queue per model.

    .venv/bin/python bench/routing.py [--jobs 40]

Two tiny random LLaMAs (different seeds) stand for two served models; each worker keeps one model warm
(`HOPPATCH_MODEL_CACHE_SIZE=1`). Jobs alternate between the models. With one shared queue any worker takes
any job and loads whichever model it lacks; with `HOPPATCH_SERVED_MODELS` and `worker --models`, each job waits
for the worker that holds its model. Reports model loads (cache misses), cache hits and jobs/s for both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import HOPPATCH, api_server, environment, free_port, redis_server, tiny_job  # noqa: E402
from hoppatch.engine.tiny_models import tiny_model  # noqa: E402
from hoppatch.service.auth import create_key  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}


def save_models(work: Path) -> list[Path]:
    paths = []
    for seed in (1, 2):
        lm = tiny_model("llama", seed=seed)
        path = work / "models" / f"tiny-{seed}"
        lm.model.save_pretrained(path)
        lm.tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def cache_counts(port: int) -> dict[str, float]:
    counts = {"miss": 0.0, "hit": 0.0}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        for result in counts:
            if line.startswith(f'hoppatch_worker_model_cache_total{{result="{result}"}}'):
                counts[result] = float(line.split()[-1])
    return counts


def run(env: dict[str, str], models: list[Path], routed: bool, jobs: int, key: str) -> dict:
    ports = [free_port() for _ in models]
    commands = [[*HOPPATCH, "worker", *(["--models", str(m)] if routed else ["--preload", str(m)])] for m in models]
    procs = [
        subprocess.Popen(c, env={**env, "HOPPATCH_WORKER_METRICS_PORT": str(p)}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for c, p in zip(commands, ports)
    ]
    try:
        with api_server(env) as url, httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as client:
            while client.get("/readyz").json().get("workers", 0) < len(models):
                time.sleep(0.2)
            before = [cache_counts(p) for p in ports]
            started = time.perf_counter()
            ids = [client.post("/v1/jobs", json=tiny_job(models[i % len(models)])).json()["id"] for i in range(jobs)]
            pending = set(ids)
            while pending:
                pending = {j for j in pending if client.get(f"/v1/jobs/{j}").json()["status"] not in TERMINAL}
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            after = [cache_counts(p) for p in ports]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    return {
        "queues": "one per model" if routed else "one shared",
        "jobs": jobs,
        "model_loads": sum(a["miss"] - b["miss"] for a, b in zip(after, before)),
        "cache_hits": sum(a["hit"] - b["hit"] for a, b in zip(after, before)),
        "jobs_per_second": round(jobs / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--json", default="bench/results/routing.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hoppatch-routing-"))
    models = save_models(work)
    rows = []
    with redis_server() as redis_url:
        key = create_key(redis.Redis.from_url(redis_url), "bench")[1]
        for routed in (False, True):
            served = ",".join(map(str, models)) if routed else ""
            env = environment(redis_url, work, HOPPATCH_MODEL_CACHE_SIZE="1", HOPPATCH_SERVED_MODELS=served)
            rows.append(run(env, models, routed, args.jobs, key))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| queues | jobs | model loads during the run | cache hits | jobs/s |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['queues']} | {r['jobs']} | {r['model_loads']:.0f} | {r['cache_hits']:.0f} | {r['jobs_per_second']} |")
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
