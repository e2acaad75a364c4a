import msgspec
from pathlib import Path

import pytest
from litestar.testing import TestClient

from hoppatch.jobs import TURN_PREFIX, JobRecord, JobStore
from hoppatch.settings import Settings
from hoppatch.spec import read_examples
from hoppatch.service.app import create_app
from hoppatch.service.auth import create_key

EXAMPLES_FILE = Path(__file__).resolve().parents[2] / "examples" / "gemma-3-270m.json"


def shipped_examples() -> list[dict]:
    return msgspec.to_builtins(read_examples(EXAMPLES_FILE))


def write_record(store: JobStore, record: JobRecord) -> JobRecord:
    """A job's record written as a submission writes it, without RQ's job or the admission checks."""
    with store.redis.pipeline() as pipe:
        for command in store.creation_commands(record, b"{}"):
            pipe.execute_command(*command)
        pipe.execute()
    return record


def stored_keys(redis_client) -> set[bytes]:
    """Every key in Redis but the maintenance turns, which the app's own loop takes while it runs."""
    return {key for key in redis_client.scan_iter() if not key.startswith(TURN_PREFIX.encode())}


def job_body(**overrides) -> dict:
    return {"model": "builtin:gemma-3-270m", "examples": shipped_examples()[:1], **overrides}


@pytest.fixture
def settings(redis_url, tmp_path, redis_client):
    return Settings(redis_url=redis_url, artifact_dir=tmp_path / "artifacts", auth=True, model_roots=(tmp_path / "models",))


@pytest.fixture
def client(settings):
    with TestClient(app=create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def key(redis_client):
    return create_key(redis_client, "team-a")[1]


@pytest.fixture
def other_key(redis_client):
    return create_key(redis_client, "team-b")[1]
