"""Model-aware routing at the API over a real Redis: with served models configured, each job waits in its
model's queue, a model nobody serves is refused with 422 (nothing stored), cancel takes a job out of its
queue, and /readyz and /metrics report each served model's queue and live workers."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
from litestar.testing import TestClient
from rq import Queue, Worker

from hoppatch.jobs import JobStore
from hoppatch.routing import Routes, model_queue, parse_models, rq_queue_key
from hoppatch.service.app import create_app
from hoppatch.service.metrics import QUEUE_STATS

from .conftest import job_body, stored_keys

GEMMA, SMOL = "builtin:gemma-3-270m", "builtin:smollm2-135m"


def _served(settings, models=(GEMMA, SMOL)):
    return replace(settings, served_models=models)


@pytest.fixture
def routed(settings):
    with TestClient(app=create_app(_served(settings))) as client:
        yield client


def test_each_job_waits_in_its_models_queue(routed, key, redis_client):
    headers = {"X-API-Key": key}
    for model in (GEMMA, SMOL, GEMMA):
        assert routed.post("/v1/jobs", json=job_body(model=model), headers=headers).status_code == 202
    assert redis_client.llen(rq_queue_key(model_queue(GEMMA))) == 2
    assert redis_client.llen(rq_queue_key(model_queue(SMOL))) == 1
    assert redis_client.llen(rq_queue_key("hoppatch")) == 0


def test_a_model_no_worker_group_serves_is_422_and_stores_nothing(settings, key, redis_client):
    with TestClient(app=create_app(_served(settings, (SMOL,)))) as client:
        before = stored_keys(redis_client)
        response = client.post("/v1/jobs", json=job_body(model=GEMMA), headers={"X-API-Key": key})
        assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"].endswith("model-not-served") and problem["errors"][0]["pointer"] == "/model"
        assert SMOL in problem["detail"] and GEMMA in problem["detail"]
        assert stored_keys(redis_client) == before


def test_cancel_takes_a_queued_job_out_of_its_models_queue(routed, key, redis_client):
    headers = {"X-API-Key": key}
    job = routed.post("/v1/jobs", json=job_body(model=SMOL), headers=headers).json()
    assert routed.post(job["urls"]["cancel"], headers=headers).json()["status"] == "cancelled"
    assert redis_client.llen(rq_queue_key(model_queue(SMOL))) == 0


def test_readyz_and_metrics_report_each_served_model(routed, settings, key, redis_client):
    routed.post("/v1/jobs", json=job_body(model=SMOL), headers={"X-API-Key": key})
    worker = Worker([Queue(model_queue(GEMMA), connection=redis_client)], connection=redis_client, name="routing-test")
    worker.register_birth()
    try:
        ready = routed.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers"] == 1
        assert ready.json()["models"] == {GEMMA: {"queued": 0, "workers": 1}, SMOL: {"queued": 1, "workers": 0}}
        queues = {label: Queue(name, connection=redis_client) for label, name in _served(settings).routes.queues().items()}
        QUEUE_STATS.refresh(JobStore(redis_client), queues)
        page = routed.get("/metrics").text  # refreshed above: the app's maintenance loop does it every few seconds
        assert f'hoppatch_queue_depth{{model="{SMOL}"}} 1.0' in page
        assert f'hoppatch_workers_live{{model="{GEMMA}"}} 1.0' in page and f'hoppatch_workers_live{{model="{SMOL}"}} 0.0' in page
    finally:
        worker.register_death()


def test_without_served_models_every_job_shares_one_queue():
    assert Routes().queue_for("anything/at/all") == "hoppatch" and Routes().queues() == {"any": "hoppatch"}
    routes = Routes(parse_models(f" {GEMMA}, ,{SMOL},{GEMMA}"))
    assert routes.served == (GEMMA, SMOL)
    assert routes.queue_for(SMOL) == model_queue(SMOL) and routes.queue_for("other") is None


def test_a_worker_refuses_models_the_api_would_not_route_to_it():
    env = {**os.environ, "HOPPATCH_SERVED_MODELS": SMOL}
    done = subprocess.run([sys.executable, "-m", "hoppatch.cli", "worker", "--models", f"{SMOL},{GEMMA}"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"hoppatch: --models {GEMMA}: not in HOPPATCH_SERVED_MODELS, so the API routes no job to its queue"
    )
