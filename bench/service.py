"""Service benchmark: POST /v1/jobs throughput and latency against the real API and Redis, beside the bare
stack in the same run (bench/bare_app.py: same uvicorn, Redis, body and connections; the two take turns for
`--rounds` rounds and the ratio is the rounds' median), with 1 and 2 API processes, and with artifacts on an
S3 server (SeaweedFS) instead of the local directory; and the end-to-end
latency of a job through the queue (tiny model), publishing its artifacts to each store.

    .venv/bin/python bench/service.py [--requests 4000] [--connections 16]

Load: wrk (Debian package `wrk`) when installed, else an asyncio client in a second process. Auth, validation,
idempotency-key handling and metrics are all on. Loopback only; the request count is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import (  # noqa: E402
    ROOT, S3_BUCKET, api_server, environment, failing_tiny_job, free_port, percentile, redis_server, s3_server, tiny_job,
    tiny_model_dir, workers,
)
from hoppatch.service.auth import create_key  # noqa: E402

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "%s"
"""


def run_wrk(url: str, body: dict, key: str, connections: int, seconds: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (json.dumps(body), key))
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, f"{url}/v1/jobs"],
        capture_output=True, text=True, check=True,
    ).stdout
    stats = {"tool": "wrk", "raw": out}
    for line in out.splitlines():
        parts = line.split()
        if line.strip().startswith("50%"):
            stats["p50_ms"] = _ms(parts[1])
        if line.strip().startswith("99%"):
            stats["p99_ms"] = _ms(parts[1])
        if line.startswith("Requests/sec"):
            stats["requests_per_second"] = float(parts[1])
        if "Non-2xx" in line:
            stats["non_2xx"] = int(parts[-1])
    return stats


def _ms(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


async def _load(url: str, body: dict, key: str, connections: int, total: int) -> dict:
    latencies: list[float] = []
    failures = 0
    counter = iter(range(total))

    async def client_loop(client: httpx.AsyncClient):
        nonlocal failures
        for _ in counter:
            started = time.perf_counter()
            response = await client.post("/v1/jobs", json=body)
            latencies.append((time.perf_counter() - started) * 1000)
            failures += response.status_code != 202

    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return {
        "tool": "asyncio-httpx",
        "requests": total,
        "requests_per_second": total / elapsed,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "non_2xx": failures,
    }


def job_latency(url: str, body: dict, key: str, runs: int) -> dict:
    """Submit → terminal status of `runs` jobs one after another, after one unmeasured job (the worker's
    first job loads the model)."""
    latencies = []
    with httpx.Client(base_url=url, headers={"X-API-Key": key}) as client:
        for _ in range(runs + 1):
            started = time.perf_counter()
            job = client.post("/v1/jobs", json=body).json()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.005)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            latencies.append((time.perf_counter() - started) * 1000)
    latencies = latencies[1:]
    return {"runs": runs, "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99), "final_status": job["status"], "error": job["error"]}


@contextmanager
def bare_server(redis_url: str):
    """bench/bare_app.py on one uvicorn process (httptools, uvloop), against the same Redis."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", str(port), "--http", "httptools",
               "--loop", "uvloop", "--log-level", "warning"]
    proc = subprocess.Popen(command, env={**os.environ, "BARE_REDIS_URL": redis_url}, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{url}/schema/openapi.json")
        yield url
    finally:
        proc.terminate()
        proc.wait()


def _wait_for(url: str) -> None:
    for _ in range(200):
        try:
            httpx.get(url)
            return
        except httpx.HTTPError:
            time.sleep(0.1)


def redis_reset(redis_url: str):
    """A function that empties Redis back to what it holds now (the API key): every job a load made is gone."""
    client = redis.Redis.from_url(redis_url)
    kept = {key: client.dump(key) for key in client.keys("*")}

    def reset() -> None:
        client.flushdb()
        for key, value in kept.items():
            client.restore(key, 0, value)

    return reset


def _median_round(measured: list[dict]) -> dict:
    """The round with the median requests/s (its p50 and p99 with it)."""
    ordered = sorted(measured, key=lambda m: m["requests_per_second"])
    return {**ordered[len(ordered) // 2], "rounds_requests_per_second": [round(m["requests_per_second"]) for m in measured]}


def measure(url: str, body: dict, key: str, args: argparse.Namespace) -> dict:
    if shutil.which("wrk"):
        return run_wrk(url, body, key, args.connections, args.seconds)
    return asyncio.run(_load(url, body, key, args.connections, args.requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="without wrk: requests per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="turns of the bare stack and the 1-process API")
    parser.add_argument("--json", default="bench/results/service.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hoppatch-bench-"))
    model_dir = tiny_model_dir(work)
    body = tiny_job(model_dir)
    result: dict = {"cores": os.cpu_count(), "connections": args.connections}
    with redis_server() as redis_url:
        key = create_key(redis.Redis.from_url(redis_url), "bench")[1]
        env = environment(redis_url, work)
        reset = redis_reset(redis_url)
        # bare and hoppatch take turns, so a machine whose speed drifts during the run affects both alike
        rounds: dict[str, list[dict]] = {"bare": [], "api_1": []}
        with bare_server(redis_url) as bare_url, api_server(env, 1) as api_url:
            for _ in range(args.rounds):
                for name, url in (("bare", bare_url), ("api_1", api_url)):
                    rounds[name].append(measure(url, body, key, args))
                    reset()  # the load's jobs are not for running; each round starts from an empty store
        ratios = [a["requests_per_second"] / b["requests_per_second"] for a, b in zip(rounds["api_1"], rounds["bare"])]
        result["ratios_api_1_to_bare"] = [round(r, 3) for r in ratios]
        for name, measured in rounds.items():
            result[name] = _median_round(measured)
        with api_server(env, 2) as url:
            result["api_2"] = measure(url, body, key, args)
        reset()
        publishing = failing_tiny_job(work)  # a compositional failure: the job patches and publishes
        with s3_server() as s3_env:
            env_s3 = environment(redis_url, work, HOPPATCH_ARTIFACT_URL=f"s3://{S3_BUCKET}/bench", **s3_env)
            with api_server(env_s3) as url:
                result["api_1_s3"] = measure(url, body, key, args)
            reset()
            for store, store_env in (("local", env), ("s3", env_s3)):
                with api_server(store_env) as url, workers(store_env, 1):
                    time.sleep(8)  # the worker starts and imports torch
                    result[f"job_through_queue_{store}"] = job_latency(url, publishing, key, 20)
    for name in ("bare", "api_1", "api_2", "api_1_s3"):
        r = result[name]
        print(f"{name:6} POST /v1/jobs ({r['tool']}, {args.connections} connections): {r['requests_per_second']:.0f} req/s, "
              f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, non-2xx {r.get('non_2xx', 0)}")
        r.pop("raw", None)
    result["ratio_api_1_to_bare"] = round(statistics.median(result["ratios_api_1_to_bare"]), 3)
    print(f"hoppatch (1 process) / bare stack: {result['ratio_api_1_to_bare']:.2f}, the median of rounds "
          f"{', '.join(f'{r:.2f}' for r in result['ratios_api_1_to_bare'])}  ({os.cpu_count()} cores)")
    for store in ("local", "s3"):
        queue = result[f"job_through_queue_{store}"]
        print(f"tiny-model job submit→terminal, artifacts {store}: p50 {queue['p50_ms']:.0f} ms, p99 {queue['p99_ms']:.0f} ms "
              f"(ends {queue['final_status']})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
