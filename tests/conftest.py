import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
import redis

from hoppatch.engine.tiny_models import FAMILIES, tiny_model


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


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
