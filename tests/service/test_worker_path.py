"""The whole path with real parts: API (in process), Redis, a worker process, the built-in model.

submit → worker → succeeded → artifacts downloadable and sha256-correct → metrics, with artifacts in the
local directory and on a real S3 server (SeaweedFS); cancel while running;
a worker killed with SIGKILL mid-job leaves the job failed with `worker_lost`, and a new worker takes jobs.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient

from hoppatch.engine.tiny_models import tiny_model
from hoppatch.settings import Settings
from hoppatch.service.app import create_app

from bench.harness import S3_BUCKET
from tests.conftest import free_port

from .conftest import job_body, shipped_examples

pytestmark = pytest.mark.builtin
PREAMBLE = (Path(__file__).resolve().parents[2] / "examples" / "preamble.txt").read_text()
HEARTBEAT_TIMEOUT = 6.0


class WorkerProcess:
    def __init__(self, settings: Settings, log: Path, args: tuple[str, ...] = ("--preload", "builtin:gemma-3-270m")):
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "HOPPATCH_REDIS_URL": settings.redis_url,
            "HOPPATCH_ARTIFACT_DIR": str(settings.artifact_dir),
            "HOPPATCH_ARTIFACT_URL": settings.artifact_url,
            "HOPPATCH_SERVED_MODELS": ",".join(settings.served_models),
            "HOPPATCH_MODEL_ROOTS": os.pathsep.join(map(str, settings.model_roots)),
            "HOPPATCH_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "HOPPATCH_WORKER_METRICS_PORT": str(self.metrics_port),
        }
        self.log = log.open("ab")
        command = [sys.executable, "-m", "hoppatch.cli", "worker", *args]
        self.proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture
def service(redis_url, redis_client, tmp_path, request, monkeypatch):
    """The API in process; with parameter "s3", its artifacts (and the worker's) go to the test S3 server."""
    artifact_url = ""
    if getattr(request, "param", "local") == "s3":
        for name, value in request.getfixturevalue("s3_env").items():
            monkeypatch.setenv(name, value)  # the worker process inherits them too
        artifact_url = f"s3://{S3_BUCKET}/whole-path"
    settings = Settings(
        redis_url=redis_url, artifact_dir=tmp_path / "artifacts", artifact_url=artifact_url, auth=False,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
    )
    with TestClient(app=create_app(settings), timeout=30) as client:
        yield settings, client


@pytest.fixture
def worker(service, tmp_path):
    settings, client = service
    w = WorkerProcess(settings, tmp_path / "worker.log")
    _until(lambda: client.get("/readyz").status_code == 200, 300, "the worker never became ready", w)
    yield w
    w.stop()


def _until(condition, timeout: float, message: str, worker: WorkerProcess | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    log = Path(worker.log.name).read_text()[-3000:] if worker else ""
    pytest.fail(f"{message}\n{log}")


def _job(client, job_id):
    return client.get(f"/v1/jobs/{job_id}").json()


def _sample(metrics_text: str, series: str) -> float:
    """The value of one series in a Prometheus text page (0 when absent)."""
    for line in metrics_text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


SUBMITTED = 'hoppatch_api_jobs_submitted_total{model="builtin:gemma-3-270m"}'


@pytest.mark.parametrize("service", ["local", "s3"], indirect=True)
def test_submit_to_artifacts_and_metrics(service, worker):
    settings, client = service
    submitted_before = _sample(client.get("/metrics").text, SUBMITTED)  # the counter lives as long as the process
    job = client.post("/v1/jobs", json=job_body(preamble=PREAMBLE)).json()  # one example: the README's test runs all three
    done = _until(lambda: (j := _job(client, job["id"]))["status"] in ("succeeded", "failed") and j, 600, "job did not end", worker)
    assert done["status"] == "succeeded", done["error"]
    summary = done["result"]["summary"]
    assert summary["patched"] >= 1 and summary["correction_rate"] is not None
    artifacts = client.get(done["urls"]["artifacts"]).json()["data"]
    assert (settings.artifact_dir / done["id"]).is_dir() is (not settings.artifact_url)  # on S3, nothing local
    names = {a["name"] for a in artifacts}
    assert {"delta.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.json", "report.html"} <= names
    assert any(n.startswith("report/") and n.endswith(".png") for n in names)
    page = client.get(f"{done['urls']['artifacts']}/report.html")
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["x-content-type-options"] == "nosniff" and 'id="verdict"' in page.text
    for artifact in artifacts:
        response = client.get(f"{done['urls']['artifacts']}/{artifact['name']}")
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
        assert response.headers["etag"].strip('"') == artifact["sha256"]
    delta_url = f"{done['urls']['artifacts']}/delta.safetensors"
    sha = next(a["sha256"] for a in artifacts if a["name"] == "delta.safetensors")
    other = next(a["sha256"] for a in artifacts if a["name"] == "metrics.json")
    assert client.get(delta_url, headers={"If-None-Match": f'"{other}"'}).status_code == 200  # another file's tag
    assert client.get(delta_url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    assert client.get(done["urls"]["metrics"]).json()["summary"]["patched"] == summary["patched"]
    statuses = [e["data"]["status"] for e in client.get(done["urls"]["events"]).json()["data"] if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert _sample(client.get("/metrics").text, SUBMITTED) == submitted_before + 1
    worker_metrics = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics").text
    assert 'hoppatch_worker_jobs_total{outcome="succeeded"} 1.0' in worker_metrics
    assert 'hoppatch_worker_stage_seconds_count{stage="edit"} 1.0' in worker_metrics


def test_cancel_running_job_within_5_seconds(service, worker):
    settings, client = service
    job = client.post("/v1/jobs", json=job_body(preamble=PREAMBLE, examples=shipped_examples())).json()
    _until(lambda: _job(client, job["id"])["status"] == "running", 120, "job never ran", worker)
    requested = time.monotonic()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] in ("cancelling", "cancelled")
    _until(lambda: _job(client, job["id"])["status"] == "cancelled", 5, "not cancelled within 5 s", worker)
    assert time.monotonic() - requested <= 5.5


def test_killed_worker_fails_its_job_and_a_new_worker_takes_over(service, worker, tmp_path):
    settings, client = service
    job = client.post("/v1/jobs", json=job_body(preamble=PREAMBLE, examples=shipped_examples())).json()
    _until(lambda: _job(client, job["id"])["status"] == "running", 120, "job never ran", worker)
    worker.stop(signal.SIGKILL)
    killed = time.monotonic()
    failed = _until(lambda: (j := _job(client, job["id"]))["status"] == "failed" and j, HEARTBEAT_TIMEOUT + 10, "job not reaped")
    assert failed["error"]["code"] == "worker_lost"
    assert time.monotonic() - killed <= HEARTBEAT_TIMEOUT + 10
    replacement = WorkerProcess(settings, tmp_path / "worker2.log")
    try:
        second = client.post("/v1/jobs", json=job_body(preamble=PREAMBLE, examples=shipped_examples()[:1])).json()
        _until(lambda: _job(client, second["id"])["status"] in ("running", "succeeded", "failed"), 300, "new worker took no job", replacement)
    finally:
        replacement.stop()


def test_each_job_lands_on_the_worker_that_has_its_model_warm(redis_url, redis_client, tmp_path):
    """Two served models (two tiny local ones of different families), one worker group each: every job runs
    on its model's worker, and neither worker loads a model after its start (cache hits only)."""
    models = []
    for family in ("llama", "qwen2"):
        lm = tiny_model(family)
        models.append(str(tmp_path / "models" / f"tiny-{family}"))
        lm.model.save_pretrained(models[-1])
        lm.tokenizer.save_pretrained(models[-1])
    settings = Settings(
        redis_url=redis_url, artifact_dir=tmp_path / "artifacts", auth=False, heartbeat_timeout=HEARTBEAT_TIMEOUT,
        model_roots=(tmp_path / "models",), served_models=tuple(models),
    )
    with TestClient(app=create_app(settings), timeout=30) as client:
        workers = {model: WorkerProcess(settings, tmp_path / f"{Path(model).name}.log", ("--models", model)) for model in models}
        try:
            _until(lambda: all(m["workers"] == 1 for m in client.get("/readyz").json().get("models", {}).values()), 300,
                   "the two worker groups never came up", workers[models[0]])
            jobs = [
                (model, client.post("/v1/jobs", json=job_body(model=model, preamble=PREAMBLE)).json()["id"])
                for model in (*models, *models)
            ]
            for model, job_id in jobs:
                done = _until(lambda: (j := _job(client, job_id))["status"] in ("succeeded", "failed") and j, 600, "job did not end", workers[model])
                assert done["worker"].endswith(f"-{workers[model].proc.pid}"), (model, done["worker"])
            for worker in workers.values():
                page = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics").text
                assert _sample(page, 'hoppatch_worker_model_cache_total{result="miss"}') == 1  # its start only
                assert _sample(page, 'hoppatch_worker_model_cache_total{result="hit"}') == 2  # both its jobs
        finally:
            for worker in workers.values():
                worker.stop()
