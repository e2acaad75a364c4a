"""Quotas and key limits: 429 (with Retry-After where waiting helps) or 403, and a refused request stores nothing."""

import asyncio
import dataclasses

import httpx
import pytest
from litestar.testing import TestClient

from hoppatch.routing import SHARED_QUEUE, rq_queue_key
from hoppatch.service.app import create_app
from hoppatch.service.auth import create_key, list_keys, revoke_keys

from .conftest import job_body, stored_keys


def _client(settings, **limits):
    return TestClient(app=create_app(dataclasses.replace(settings, **limits)))


def _post(client, key, body=None, **headers):
    return client.post("/v1/jobs", json=body or job_body(), headers={"X-API-Key": key, **headers})


def _problem(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


def test_a_tenant_at_its_active_limit_gets_429_and_others_do_not(settings, key, other_key, redis_client):
    with _client(settings, tenant_max_active=2, tenant_rate=0) as client:
        assert [_post(client, key).status_code for _ in range(2)] == [202, 202]
        before = stored_keys(redis_client)
        refused = _post(client, key)
        assert _problem(refused, 429)["detail"].startswith("tenant 'team-a' has 2 jobs")
        assert int(refused.headers["Retry-After"]) > 0
        assert stored_keys(redis_client) == before and redis_client.llen(rq_queue_key(SHARED_QUEUE)) == 2
        assert _post(client, other_key).status_code == 202
        job_id = client.get("/v1/jobs", headers={"X-API-Key": key}).json()["data"][0]["id"]
        client.post(f"/v1/jobs/{job_id}/cancel", headers={"X-API-Key": key})
        assert _post(client, key).status_code == 202  # an ended job frees its place


def test_the_submission_rate_is_a_token_bucket_per_tenant(settings, key, other_key):
    with _client(settings, tenant_rate=0.5, tenant_burst=3, tenant_max_active=0) as client:
        assert [_post(client, key).status_code for _ in range(3)] == [202] * 3
        refused = _post(client, key)
        assert _problem(refused, 429)["detail"] == "tenant 'team-a' submits faster than 0.5 jobs/s"
        assert 1 <= int(refused.headers["Retry-After"]) <= 2
        assert _post(client, other_key).status_code == 202


def test_the_queue_cap_holds_for_all_tenants_together(settings, key, other_key):
    with _client(settings, queue_cap=2, tenant_rate=0) as client:
        assert _post(client, key).status_code == 202 and _post(client, other_key).status_code == 202
        assert "cap" in _problem(_post(client, other_key), 429)["detail"]


def test_a_budget_over_the_keys_ceiling_is_refused(settings, redis_client):
    _, short = create_key(redis_client, "team-c", max_seconds=60)
    with _client(settings) as client:
        body = job_body(budget={"max_seconds": 120})
        problem = _problem(_post(client, short, body), 429)
        assert problem["errors"] == [{"pointer": "/budget/max_seconds", "detail": problem["detail"]}]
        assert _post(client, short, job_body(budget={"max_seconds": 60})).status_code == 202


def test_a_key_limited_to_models_is_refused_others_with_403(settings, redis_client):
    _, narrow = create_key(redis_client, "team-c", models=("builtin:smollm2-135m",))
    with _client(settings) as client:
        problem = _problem(_post(client, narrow), 403)
        assert problem["detail"] == "this API key may patch only: builtin:smollm2-135m"
        assert _post(client, narrow, job_body(model="builtin:smollm2-135m")).status_code == 202


def test_keys_are_listed_and_revoked_by_id_or_tenant(redis_client):
    a1, _ = create_key(redis_client, "team-a")
    a2, _ = create_key(redis_client, "team-a", models=("builtin:gemma-3-270m",))
    b1, plaintext = create_key(redis_client, "team-b")
    assert [k.id for k in list_keys(redis_client, "team-a")] == [a1.id, a2.id]
    assert list_keys(redis_client, "team-a")[1].models == ("builtin:gemma-3-270m",)
    assert revoke_keys(redis_client, key_id=a1.id) == [a1]
    assert revoke_keys(redis_client, tenant="team-a") == [a2]
    assert revoke_keys(redis_client, key=plaintext) == [b1]
    assert list_keys(redis_client) == [] and redis_client.keys("hoppatch:apikey:*") == []


def test_identical_concurrent_requests_make_one_job(settings, key, redis_client):
    app = create_app(dataclasses.replace(settings, tenant_rate=0))

    async def race():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            headers = {"X-API-Key": key, "Idempotency-Key": "deploy-42"}
            return await asyncio.gather(*[client.post("/v1/jobs", json=job_body(), headers=headers) for _ in range(8)])

    responses = asyncio.run(race())
    assert [r.status_code for r in responses] == [202] * 8
    assert len({r.json()["id"] for r in responses}) == 1
    assert redis_client.llen(rq_queue_key(SHARED_QUEUE)) == 1


@pytest.mark.parametrize("last_event_id", ["0-0-0", "abc", "1-", "71295237627355060231-116"])
def test_a_malformed_last_event_id_is_a_400(client, key, last_event_id):
    job_id = _post(client, key).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/events/stream", headers={"X-API-Key": key, "Last-Event-ID": last_event_id})
    assert _problem(response, 400)["errors"][0]["pointer"] == "/last_event_id"


def test_event_streams_are_capped_per_tenant(settings, key, other_key):
    with _client(settings, streams_per_tenant=1) as client:
        job_id = _post(client, key).json()["id"]
        client.app.state.streams.by_tenant["team-a"] = 1  # one stream already open on this process
        refused = client.get(f"/v1/jobs/{job_id}/events/stream", headers={"X-API-Key": key})
        assert "event streams open" in _problem(refused, 429)["detail"]
        other_job = _post(client, other_key).json()["id"]
        client.post(f"/v1/jobs/{other_job}/cancel", headers={"X-API-Key": other_key})
        with client.stream("GET", f"/v1/jobs/{other_job}/events/stream", headers={"X-API-Key": other_key}) as stream:
            assert stream.status_code == 200 and "event: done" in stream.read().decode()
        assert "team-b" not in client.app.state.streams.by_tenant  # counted while open, released at the end


def test_the_metrics_model_label_is_bounded(client, key, settings):
    models = settings.model_roots[0] / "private-model"
    models.mkdir(parents=True)
    assert _post(client, key, job_body(model=str(models))).status_code == 202
    scrape = client.get("/metrics").text
    assert 'hoppatch_api_jobs_submitted_total{model="other"}' in scrape
    assert "private-model" not in scrape


def test_without_redis_the_api_answers_503_with_retry_after(settings, key):
    from tests.conftest import free_port

    unreachable = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(app=create_app(unreachable)) as client:
        for response in (_post(client, key), client.get("/v1/jobs", headers={"X-API-Key": key})):
            assert _problem(response, 503)["title"] == "The service cannot reach its job store"
            assert response.headers["Retry-After"] == "5"
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503


def test_a_job_that_has_not_succeeded_has_no_metrics_yet(client, key):
    job_id = _post(client, key).json()["id"]
    problem = _problem(client.get(f"/v1/jobs/{job_id}/metrics", headers={"X-API-Key": key}), 409)
    assert problem["detail"].startswith(f"job {job_id} is queued")
