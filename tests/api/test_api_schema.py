"""The OpenAPI document: valid OpenAPI 3.1, and the API keeps to it under schemathesis
(in-process over WSGI, rate limits off): no 5xx, every response as documented."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from api_helpers import bearer
from flask import Flask
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from helpers import create_user, enable_mfa
from qpki.clock import SteppedClock

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]


def test_the_document_is_valid_openapi_3_1_and_covers_every_operation(api_app: Flask) -> None:
    doc = api_app.test_client().get("/api/v1/openapi.json").get_json()
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    assert doc["openapi"] == "3.1.0"
    operations = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert operations == {
        ("POST", "/api/v1/verify"),
        ("GET", "/api/v1/users"),
        ("POST", "/api/v1/users"),
        ("GET", "/api/v1/users/{user_id}"),
        ("POST", "/api/v1/users/{user_id}/role"),
        ("POST", "/api/v1/users/{user_id}/deactivate"),
        ("POST", "/api/v1/users/{user_id}/reactivate"),
        ("POST", "/api/v1/users/{user_id}/unlock"),
        ("POST", "/api/v1/users/{user_id}/mfa/reset"),
        ("GET", "/api/v1/audit/events"),
        ("GET", "/api/v1/audit/chain"),
    }
    assert doc["components"]["securitySchemes"]["serviceKey"]["scheme"] == "bearer"
    errors = doc["paths"]["/api/v1/verify"]["post"]["responses"]["429"]["content"]
    assert list(errors) == ["application/problem+json"]


def test_the_validator_catches_a_broken_document(api_app: Flask) -> None:
    """The check above can fail: a document without its info section is refused."""
    doc = dict(api_app.test_client().get("/api/v1/openapi.json").get_json())
    del doc["info"]
    with pytest.raises(OpenAPIValidationError):
        validate(doc)


def test_the_reference_page_is_rendered_here_from_the_document_without_a_cdn(
    api_app: Flask,
) -> None:
    r = api_app.test_client().get("/api/v1/docs")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert "POST /api/v1/verify" in html and "urn:qpki:problem:throttled" in html
    assert "http://" not in html and "https://" not in html  # nothing loaded from elsewhere


@pytest.fixture
def api_schema(api_app: Flask, clock: SteppedClock) -> schemathesis.BaseSchema:
    user = create_user(api_app, "alice")
    enable_mfa(api_app, user.id, at=clock())
    create_user(api_app, "bob", role="operator")
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", api_app)


@pytest.fixture
def schema_key(make_key: Callable[..., str]) -> str:
    return make_key()  # every scope: the run reaches every operation


@pytest.mark.slow
def test_the_api_keeps_to_its_document(
    api_schema: schemathesis.BaseSchema, schema_key: str
) -> None:
    """Each operation, 40 valid and 40 invalid generated requests. (schemathesis' pytest
    plugin is not used: its ``from_fixture`` breaks on pytest 9; hypothesis drives each
    operation's strategy here instead.)"""
    checked = []
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
            def run(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=bearer(schema_key), checks=CHECKS)

            run()
            checked.append((operation.label, mode))
    assert len(checked) == 22
