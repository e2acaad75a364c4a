import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import subprocess
import tempfile
import time

import pytest
import redis

from bench.harness import s3_server
from hoppatch.engine.tiny_models import FAMILIES, tiny_model


@contextmanager
def live_service(env: dict[str, str], work: Path, worker_args: tuple[str, ...] = (), timeout: float = 300) -> Iterator[str]:
    """`hoppatch serve` and one `hoppatch worker` as processes; yields the API's URL once /readyz says 200."""
    port = free_port()
    command = [sys.executable, "-m", "hoppatch.cli"]
    root = Path(__file__).resolve().parents[1]
    logs = (work / "api.log").open("wb"), (work / "worker.log").open("wb")
    procs = [
        subprocess.Popen([*command, "serve", "--port", str(port)], env=env, cwd=root, stdout=logs[0], stderr=subprocess.STDOUT),
        subprocess.Popen([*command, "worker", *worker_args], env=env, cwd=root, stdout=logs[1], stderr=subprocess.STDOUT),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if time.monotonic() > deadline:
                pytest.fail(f"the API or the worker did not come up: {(work / 'worker.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        for log in logs:
            log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=FAMILIES)
def tiny(request):
    """A tiny random model of each supported family."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def redis_url():
    """The test Redis: HOPPATCH_TEST_REDIS_URL (scripts/test.sh starts one), else a private redis-server."""
    url = os.environ.get("HOPPATCH_TEST_REDIS_URL")
    if url:
        yield url
        return
    if not shutil.which("redis-server"):
        pytest.fail("no Redis: run the tests through `make test`, which installs and starts redis-server")
    directory = tempfile.mkdtemp()
    port = 6393
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--dir", directory, "--save", ""], stdout=subprocess.DEVNULL)
    for _ in range(50):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_env():
    """A real S3 server (SeaweedFS), loopback only, with the bucket `S3_BUCKET`: the environment a client needs."""
    try:
        with s3_server() as env:
            yield env
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
