"""The job API over a real Redis: create, idempotency, paging, tenants, cancel of a queued job."""

import gc
import json

from litestar.testing import TestClient
from prometheus_client import REGISTRY

from hoppatch.routing import SHARED_QUEUE, rq_queue_key
from hoppatch.service import app as app_module, auth, jobs, trust
from hoppatch.service.app import create_app
from hoppatch.service.auth import create_key, revoke_keys

from .conftest import EXAMPLES_FILE, job_body


def _queue_length(redis_client) -> int:
    return redis_client.llen(rq_queue_key(SHARED_QUEUE))


def test_create_returns_202_location_and_queues(client, key, redis_client):
    response = client.post("/v1/jobs", json=job_body(), headers={"X-API-Key": key})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["num_examples"] == 1
    assert _queue_length(redis_client) == 1
    got = client.get(job["urls"]["self"], headers={"X-API-Key": key}).json()
    assert got["id"] == job["id"]
    events = client.get(job["urls"]["events"], headers={"X-API-Key": key}).json()["data"]
    assert events[0]["type"] == "status" and events[0]["data"]["status"] == "queued"


def test_the_examples_file_document_is_accepted_as_it_is(client, key, redis_client):
    """The README posts examples/gemma-3-270m.json, a hoppatch.examples/v1 document, as `examples`."""
    document = json.loads(EXAMPLES_FILE.read_text())
    response = client.post("/v1/jobs", json=job_body(examples=document), headers={"X-API-Key": key})
    assert response.status_code == 202, response.text
    assert response.json()["num_examples"] == len(document["examples"])
    assert _queue_length(redis_client) == 1


def test_no_key_or_unknown_key_is_401(client):
    for headers in ({}, {"X-API-Key": "hp_nope"}):
        response = client.get("/v1/jobs", headers=headers)
        assert response.status_code == 401
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"].endswith("/unauthorized")


def test_a_revoked_key_is_trusted_for_the_cache_time_then_refused(client, redis_client, monkeypatch):
    record, key = create_key(redis_client, "team-a")
    assert client.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 200
    assert revoke_keys(redis_client, key_id=record.id) == [record]
    assert client.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 200
    later = trust._clock() + auth.KEY_CACHE_SECONDS
    monkeypatch.setattr(trust, "_clock", lambda: later)
    assert client.get("/v1/jobs", headers={"X-API-Key": key}).status_code == 401


def test_idempotency_key(client, key, redis_client):
    headers = {"X-API-Key": key, "Idempotency-Key": "deploy-42"}
    first = client.post("/v1/jobs", json=job_body(), headers=headers).json()
    again = client.post("/v1/jobs", json=job_body(), headers=headers).json()
    assert again["id"] == first["id"]
    assert _queue_length(redis_client) == 1
    other = client.post("/v1/jobs", json=job_body(budget={"max_layers": 2}), headers=headers)
    assert other.status_code == 422
    assert other.json()["type"].endswith("/idempotency-key-reused")
    assert _queue_length(redis_client) == 1


def test_cursor_paging_newest_first_and_status_filter(client, key):
    headers = {"X-API-Key": key}
    ids = [client.post("/v1/jobs", json=job_body(), headers=headers).json()["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=headers).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert seen == list(reversed(ids))
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers)
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}, headers=headers).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]


def test_tenants_see_only_their_jobs(client, key, other_key):
    job = client.post("/v1/jobs", json=job_body(), headers={"X-API-Key": key}).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers={"X-API-Key": other_key}).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers={"X-API-Key": other_key}).status_code == 404
    assert client.get("/v1/jobs", headers={"X-API-Key": other_key}).json()["data"] == []


def test_cancel_queued_job_at_once_and_again_is_idempotent(client, key, redis_client):
    headers = {"X-API-Key": key}
    job = client.post("/v1/jobs", json=job_body(), headers=headers).json()
    cancelled = client.post(job["urls"]["cancel"], headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert _queue_length(redis_client) == 0
    assert client.post(job["urls"]["cancel"], headers=headers).json()["status"] == "cancelled"


def test_open_endpoints(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["workers"] == 0  # no worker in this test
    assert "hoppatch_queue_depth" in client.get("/metrics").text


def _requests(method: str, path: str, status: str) -> float:
    labels = {"method": method, "path": path, "status_code": status, "app_name": "hoppatch"}
    return REGISTRY.get_sample_value("hoppatch_api_requests_total", labels) or 0.0


def test_requests_are_counted_by_route_template_and_status_and_scrapes_are_not(client, key):
    headers = {"X-API-Key": key}
    before = {
        "created": _requests("POST", "/v1/jobs", "202"),
        "missing": _requests("GET", "/v1/jobs/{job_id}", "404"),
        "unauthenticated": _requests("GET", "/v1/jobs/{job_id}", "401"),
    }
    client.post("/v1/jobs", json=job_body(), headers=headers)
    for job_id in ("job_a", "job_b"):
        client.get(f"/v1/jobs/{job_id}", headers=headers)
    client.get("/v1/jobs/job_a")
    scrape = client.get("/metrics").text
    assert _requests("POST", "/v1/jobs", "202") - before["created"] == 1
    assert _requests("GET", "/v1/jobs/{job_id}", "404") - before["missing"] == 2
    assert _requests("GET", "/v1/jobs/{job_id}", "401") - before["unauthenticated"] == 1
    assert 'path="/metrics"' not in scrape
    assert REGISTRY.get_sample_value("hoppatch_api_request_duration_seconds_count", {"method": "POST", "path": "/v1/jobs", "status_code": "202", "app_name": "hoppatch"}) >= 1


def test_event_stream_ends_after_the_terminal_event_and_resumes(client, key):
    headers = {"X-API-Key": key}
    job = client.post("/v1/jobs", json=job_body(), headers=headers).json()
    client.post(job["urls"]["cancel"], headers=headers)
    events = client.get(job["urls"]["events"], headers=headers).json()["data"]
    assert [e["data"]["status"] for e in events] == ["queued", "cancelled"]
    stream = client.get(job["urls"]["stream"], headers=headers)
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.text.count("event: status") == 2 and "event: done" in stream.text
    resumed = client.get(job["urls"]["stream"], headers={**headers, "Last-Event-ID": events[0]["id"]}).text
    assert resumed.count("event: status") == 1 and f"id: {events[1]['id']}" in resumed


def test_base_patches_must_be_succeeded_jobs_of_the_tenant_and_model(client, key, other_key, redis_client):
    from hoppatch.jobs import JobResult, JobStatus, JobStore

    headers = {"X-API-Key": key}
    store = JobStore(redis_client)
    mine = client.post("/v1/jobs", json=job_body(), headers=headers).json()["id"]
    theirs = client.post("/v1/jobs", json=job_body(), headers={"X-API-Key": other_key}).json()["id"]
    smol = client.post("/v1/jobs", json=job_body(model="builtin:smollm2-135m"), headers=headers).json()["id"]
    cases = [
        ("job_" + "0" * 24, "no such job"), (theirs, "no such job"), (mine, "is queued"),
    ]
    for job_id, detail in cases:
        response = client.post("/v1/jobs", json=job_body(base_patches=[job_id]), headers=headers)
        assert response.status_code == 422 and detail in response.json()["detail"], response.text
        assert response.json()["errors"][0]["pointer"] == "/base_patches/0"
    for job_id in (mine, smol):
        store.heartbeat(job_id, timeout=30)  # as a worker does, so the app's reaper leaves the job alone
        store.transition(job_id, JobStatus.RUNNING, {JobStatus.QUEUED})
        store.transition(job_id, JobStatus.SUCCEEDED, {JobStatus.RUNNING}, result=JobResult([], {}))
    wrong_model = client.post("/v1/jobs", json=job_body(base_patches=[mine, smol]), headers=headers)
    assert wrong_model.status_code == 422 and wrong_model.json()["errors"][0]["pointer"] == "/base_patches/1"
    repeated = client.post("/v1/jobs", json=job_body(base_patches=[mine, mine]), headers=headers)
    assert repeated.status_code == 422 and repeated.json()["errors"][0]["pointer"] == "/base_patches"
    stacked = client.post("/v1/jobs", json=job_body(base_patches=[mine]), headers=headers)
    assert stacked.status_code == 202
    assert json.loads(redis_client.get(f"hoppatch:job:{stacked.json()['id']}:spec"))["base_patches"] == [mine]


def test_a_model_directory_is_trusted_for_the_cache_time_then_checked_again(client, key, settings, tmp_path, monkeypatch):
    """The door check of a directory resolves it on disk once per `MODEL_TRUST_SECONDS`: a link retargeted
    outside the model roots is refused once that time has passed."""
    root = settings.model_roots[0]
    (root / "real").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    link = root / "current"
    link.symlink_to(root / "real")
    body = job_body(model=str(link))
    assert client.post("/v1/jobs", json=body, headers={"X-API-Key": key}).status_code == 202
    link.unlink()
    link.symlink_to(tmp_path / "elsewhere")
    assert client.post("/v1/jobs", json=body, headers={"X-API-Key": key}).status_code == 202
    later = trust._clock() + jobs.MODEL_TRUST_SECONDS
    monkeypatch.setattr(trust, "_clock", lambda: later)
    refused = client.post("/v1/jobs", json=body, headers={"X-API-Key": key})
    assert refused.status_code == 422 and "outside the configured model roots" in refused.json()["detail"]


def test_a_refused_model_reference_is_not_remembered(client, key, settings):
    root = settings.model_roots[0]
    body = job_body(model=str(root / "later"))
    link = root / "later"
    root.mkdir(parents=True, exist_ok=True)
    link.symlink_to("/etc")
    assert client.post("/v1/jobs", json=body, headers={"X-API-Key": key}).status_code == 422
    link.unlink()
    link.mkdir()
    assert client.post("/v1/jobs", json=body, headers={"X-API-Key": key}).status_code == 202


def test_the_api_process_freezes_its_startup_objects_while_it_serves_and_collects_young_objects_less_often(settings):
    thresholds = gc.get_threshold()
    try:
        with TestClient(app=create_app(settings)) as client:
            assert client.get("/healthz").status_code == 200
            assert gc.get_threshold() == app_module.GC_THRESHOLDS
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
