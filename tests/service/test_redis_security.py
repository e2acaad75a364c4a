"""Redis as a trust boundary: an ACL user with a password, and nothing pickled crosses it."""

import json
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import redis
from litestar.testing import TestClient

from hoppatch.service.app import create_app
from hoppatch.service.auth import create_key
from hoppatch.settings import Settings
from tests.conftest import free_port

from .conftest import job_body


README_ACL = ["~hoppatch:*", "~rq:*", "&rq:*", "+@all", "-@admin"]
"""The ACL rule the README gives for hoppatch's Redis user."""


def test_the_readme_gives_that_acl_rule():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"ACL SETUSER hoppatch on >SECRET {' '.join(README_ACL)}" in readme


@pytest.fixture
def acl_redis(tmp_path):
    """A redis-server whose default user is off: only `hoppatch` with its password gets in."""
    if not shutil.which("redis-server"):
        pytest.skip("needs redis-server (make test installs it)")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
         "--user", "default", "off", "--user", "hoppatch", "on", ">s3cret", *README_ACL],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, username="hoppatch", password="s3cret")
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.RedisError:
            time.sleep(0.05)
    yield port, client
    proc.terminate()
    proc.wait()


def test_the_service_works_through_an_acl_user_and_fails_closed_without_it(acl_redis, tmp_path):
    port, admin = acl_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    _, key = create_key(admin, "team-a")
    with pytest.raises(redis.exceptions.NoPermissionError):
        admin.set("someone-else:key", 1)
    good = Settings(redis_url=f"redis://hoppatch:s3cret@127.0.0.1:{port}/0", artifact_dir=tmp_path / "a", auth=True)
    with TestClient(app=create_app(good)) as client:
        assert client.post("/v1/jobs", json=job_body(), headers={"X-API-Key": key}).status_code == 202
    bad = Settings(redis_url=f"redis://hoppatch:wrong@127.0.0.1:{port}/0", artifact_dir=tmp_path / "a", auth=True)
    with TestClient(app=create_app(bad)) as client:
        assert client.post("/v1/jobs", json=job_body(), headers={"X-API-Key": key}).status_code == 503


def test_the_queued_job_is_json_not_pickle(client, key, redis_client):
    job_id = client.post("/v1/jobs", json=job_body(), headers={"X-API-Key": key}).json()["id"]
    data = redis_client.hget(f"rq:job:{job_id}", "data")
    payload = json.loads(zlib.decompress(data))
    assert payload[0] == "hoppatch.workers.tasks.run_edit_job" and payload[2] == []  # the task reads its id from RQ
