"""openapi.yaml matches the app; schemathesis finds no server error and no response outside the schema."""

from pathlib import Path

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings

from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from hoppatch.service.app import create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
"""No server error, and every response declared and shaped as the schema says. Schema-valid bodies may still
be refused (422 for a model no worker has), so positive-data acceptance is not among them."""
OPENAPI_FILE = Path(__file__).resolve().parents[2] / "openapi.yaml"


def test_openapi_yaml_matches_the_app(client):
    served = yaml.safe_load(client.get("/schema/openapi.yaml").text)
    committed = yaml.safe_load(OPENAPI_FILE.read_text())
    assert served == committed, "openapi.yaml is stale: run `make openapi`"


@pytest.fixture
def api_schema(settings, key):
    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", app)
    return schema, key


def test_schemathesis_over_every_route(api_schema):
    schema, key = api_schema
    failures = []
    for operation in schema.get_all_operations():
        op = operation.ok()
        # /readyz answers a documented 503 here: the test runs no worker
        checks = CHECKS[1:] if op.path == "/readyz" else CHECKS

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def check(case):
            case.call_and_validate(headers={"X-API-Key": key}, checks=checks)

        try:
            check()
        except Exception as exc:  # collect every route's failure, not only the first
            failures.append(f"{op.method.upper()} {op.path}: {exc}")
    assert not failures, "\n\n".join(failures)
