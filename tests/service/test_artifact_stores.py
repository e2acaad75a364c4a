"""Both artifact stores, the local directory and S3 (a real SeaweedFS server), behind the same interface and
the same API: stored whole with their sha256, streamed with ETags, presigned where configured, swept once
their job's record has expired."""

import hashlib
from datetime import UTC, datetime

import boto3
import httpx
import pytest
from litestar.testing import TestClient

from hoppatch.artifacts import LocalArtifactStore, S3ArtifactStore, open_artifact_store, sweep_artifacts
from hoppatch.jobs import JobRecord, JobResult, JobStatus, JobStore, new_job_id
from hoppatch.service.app import create_app
from hoppatch.settings import Settings
from hoppatch.spec import Budget

from bench.harness import S3_BUCKET

from .conftest import write_record

PAYLOAD = bytes(range(256)) * 8192  # 2 MiB: more than one chunk


@pytest.fixture
def s3_url(s3_env, monkeypatch, request):
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{S3_BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"


@pytest.fixture(params=["local", "s3"])
def artifacts(request, tmp_path):
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    return S3ArtifactStore(request.getfixturevalue("s3_url"))


def _staging(tmp_path):
    staging = tmp_path / "staging"
    (staging / "adapter").mkdir(parents=True, exist_ok=True)
    (staging / "delta.safetensors").write_bytes(PAYLOAD)
    (staging / "metrics.json").write_text('{"summary": {}}')
    (staging / "adapter" / "adapter_config.json").write_text("{}")
    return staging


def _succeeded_job(store: JobStore, artifacts, staging, tenant: str = "local") -> JobRecord:
    record = JobRecord(
        id=new_job_id(), tenant=tenant, status=JobStatus.QUEUED, model="builtin:gemma-3-270m", num_examples=1,
        budget=Budget(), created_at=datetime.now(UTC),
    )
    write_record(store, record)
    store.transition(record.id, JobStatus.RUNNING, {JobStatus.QUEUED})
    stored = artifacts.put(record.id, staging)
    return store.transition(record.id, JobStatus.SUCCEEDED, {JobStatus.RUNNING}, result=JobResult(stored, {}))


def test_a_store_keeps_whole_files_with_their_sha256_and_deletes_them(artifacts, tmp_path):
    stored = {a.name: a for a in artifacts.put("job_a", _staging(tmp_path))}
    assert set(stored) == {"delta.safetensors", "metrics.json", "adapter/adapter_config.json"}
    delta = stored["delta.safetensors"]
    assert delta.sha256 == hashlib.sha256(PAYLOAD).hexdigest() and delta.size_bytes == len(PAYLOAD)
    assert delta.media_type == "application/octet-stream" and stored["metrics.json"].media_type == "application/json"
    assert b"".join(artifacts.chunks("job_a", "delta.safetensors")) == PAYLOAD
    assert artifacts.read("job_a", "metrics.json") == b'{"summary": {}}'
    assert artifacts.read("job_a", "missing.json") is None and artifacts.chunks("job_a", "missing.json") is None
    assert artifacts.read("job_other", "metrics.json") is None
    artifacts.put("job_b", _staging(tmp_path))
    assert sorted(artifacts.job_ids()) == ["job_a", "job_b"]
    artifacts.delete("job_a")
    assert artifacts.job_ids() == ["job_b"] and artifacts.read("job_a", "metrics.json") is None
    artifacts.delete("job_never")  # nothing to delete is not an error


def test_s3_objects_carry_their_sha256_and_media_type(s3_url, s3_env, tmp_path):
    store = S3ArtifactStore(s3_url)
    store.put("job_meta", _staging(tmp_path))
    head = boto3.client("s3").head_object(Bucket=S3_BUCKET, Key=f"{store.prefix}/job_meta/delta.safetensors")
    assert head["Metadata"]["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert head["ContentLength"] == len(PAYLOAD) and head["ContentType"] == "application/octet-stream"


def test_a_malformed_artifact_url_is_a_clear_error():
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        S3ArtifactStore("https://example.com/bucket")


def test_the_sweeper_deletes_the_files_of_expired_jobs_only(artifacts, redis_client, tmp_path):
    store = JobStore(redis_client)
    live = _succeeded_job(store, artifacts, _staging(tmp_path))
    artifacts.put("job_expired000000000000000", _staging(tmp_path))
    assert sweep_artifacts(store, artifacts) == ["job_expired000000000000000"]
    assert artifacts.read(live.id, "metrics.json") is not None
    assert artifacts.job_ids() == [live.id]


@pytest.mark.parametrize("storage", ["local", "s3", "s3-presigned"])
def test_the_api_serves_artifacts_from_either_store(storage, redis_url, redis_client, tmp_path, request):
    settings = Settings(redis_url=redis_url, artifact_dir=tmp_path / "artifacts", auth=False)
    if storage != "local":
        settings = Settings(
            redis_url=redis_url, artifact_dir=tmp_path / "unused", auth=False, artifact_url=request.getfixturevalue("s3_url"),
            artifact_presign_seconds=60 if storage == "s3-presigned" else 0,
        )
    app = create_app(settings)
    # before the app starts: its reaper would fail a queued record with no RQ job, or a running one with no heartbeat
    job = _succeeded_job(JobStore(redis_client), open_artifact_store(settings), _staging(tmp_path))
    with TestClient(app=app) as client:
        base = f"/v1/jobs/{job.id}/artifacts"
        sha = hashlib.sha256(PAYLOAD).hexdigest()
        assert client.get(f"{base}/delta.safetensors", headers={"If-None-Match": f'"{sha}"'}).status_code == 304
        response = client.get(f"{base}/delta.safetensors", follow_redirects=False)
        assert response.headers["etag"] == f'"{sha}"'
        if storage == "s3-presigned":
            assert response.status_code == 307
            assert "Signature=" in response.headers["location"] or "X-Amz-Signature=" in response.headers["location"]
            body = httpx.get(response.headers["location"]).content  # the client fetches from the store itself
        else:
            assert response.status_code == 200 and response.headers["content-length"] == str(len(PAYLOAD))
            assert response.headers["content-disposition"] == 'attachment; filename="delta.safetensors"'
            body = response.content
        assert hashlib.sha256(body).hexdigest() == sha
        assert client.get(f"/v1/jobs/{job.id}/metrics").json() == {"summary": {}}
        assert client.get(f"{base}/nothing.bin").status_code == 404
