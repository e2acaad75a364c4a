"""Bad input: a 4xx problem+json that points at the field, and nothing stored or queued."""

import pytest

from hoppatch.routing import SHARED_QUEUE, rq_queue_key

from .conftest import job_body, stored_keys


def _nothing_stored(redis_client, keys_before: set[bytes]) -> bool:
    return redis_client.llen(rq_queue_key(SHARED_QUEUE)) == 0 and stored_keys(redis_client) == keys_before


CASES = [
    ("malformed json", b"{not json", 400, None),
    ("wrong type", job_body(budget={"max_layers": "four"}), 400, "/budget/max_layers"),
    ("empty examples", job_body(examples=[]), 400, "/examples"),
    ("too many examples", "too-many", 422, "/examples"),
    ("budget out of range", job_body(budget={"max_layers": 99}), 400, "/budget/max_layers"),
    ("unknown field", job_body(colour="blue"), 400, None),
    ("repeated example ids", job_body(examples=job_body()["examples"] * 2), 422, "/examples"),
    ("repeated layers", job_body(layers=[3, 3]), 422, "/layers"),
    ("negative layer", job_body(layers=[1, -1]), 400, "/layers/1"),
    ("empty paraphrase", job_body(examples=[{**job_body()["examples"][0], "paraphrases": [""]}]), 400, "/examples/0/paraphrases/0"),
    ("blank answer", job_body(examples=[{**job_body()["examples"][0], "answer": "  "}]), 400, "/examples/0/answer"),
    ("no body", b"", 400, ""),
    ("budget over the tenant's ceiling", job_body(budget={"max_seconds": 7000}), 429, "/budget/max_seconds"),
    ("unknown examples schema", job_body(examples={"schema": "hoppatch.examples/v9", "examples": job_body()["examples"]}), 400, None),
    ("unknown builtin", job_body(model="builtin:gpt-9"), 422, "/model"),
    ("path traversal", job_body(model="../../etc"), 422, "/model"),
    ("absolute path outside roots", job_body(model="/etc"), 422, "/model"),
    ("not a model reference", job_body(model="rm -rf /"), 422, "/model"),
    ("home of an unknown user", job_body(model="~nobody-here-at-all/models/x"), 422, "/model"),
    ("a NUL in the model reference", job_body(model="models/a\x00b"), 400, "/model"),
    ("huge body", "huge", 413, None),
]


@pytest.mark.parametrize(("name", "body", "status", "pointer"), CASES, ids=[c[0] for c in CASES])
def test_rejected_with_problem_json(client, key, redis_client, name, body, status, pointer):
    if body == "too-many":
        one = job_body()["examples"][0]
        body = job_body(examples=[{**one, "id": f"case-{i}"} for i in range(65)])
    if body == "huge":
        body = b"x" * (3 * 1024 * 1024)
    before = stored_keys(redis_client)
    headers = {"X-API-Key": key, "content-type": "application/json"}
    if isinstance(body, bytes):
        response = client.post("/v1/jobs", content=body, headers=headers)
    else:
        response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status and problem["type"].startswith("https://") and problem["detail"]
    if pointer:
        assert any(e["pointer"] == pointer for e in problem["errors"]), problem
    assert _nothing_stored(redis_client, before)
