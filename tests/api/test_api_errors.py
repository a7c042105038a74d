"""Errors are RFC 9457 problem documents with stable types: wrong content type 415, bad JSON
400, unknown fields 400, wrong method 405, unknown path 404 — never a 500 or a trace; no
cookie is read or set, no CORS header is sent, no secret is taken from the URL."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from api_helpers import bearer, problem
from flask import Flask
from flask.testing import FlaskClient


@pytest.fixture
def key(make_key: Callable[..., str]) -> dict[str, str]:
    return bearer(make_key())


@pytest.mark.parametrize(
    "content_type,data",
    [
        ("application/x-www-form-urlencoded", "username=a&code=1"),
        ("text/plain", '{"username": "a", "code": "1"}'),
        ("multipart/form-data; boundary=x", "--x--"),
        (None, '{"username": "a", "code": "1"}'),
    ],
)
def test_a_body_that_is_not_json_gets_415(
    api: FlaskClient, key: dict[str, str], content_type: str | None, data: str
) -> None:
    headers = {**key, **({"Content-Type": content_type} if content_type else {})}
    r = api.post("/api/v1/verify", data=data, headers=headers)
    assert r.status_code == 415
    assert problem(r)["type"] == "urn:qpki:problem:unsupported-media-type"


@pytest.mark.parametrize("data", ["{", '{"username": "a",}', "\xff\xfe", "'x'"])
def test_malformed_json_gets_400_bad_json(api: FlaskClient, key: dict[str, str], data: str) -> None:
    r = api.post(
        "/api/v1/verify", data=data.encode("latin-1"), content_type="application/json", headers=key
    )
    assert r.status_code == 400
    assert problem(r)["type"] == "urn:qpki:problem:bad-json"


@pytest.mark.parametrize(
    "body",
    ['["a"]', '"text"', "42", '{"username": "a", "code": "1", "admin": true}', '{"username": 5}'],
)
def test_other_shapes_and_unknown_fields_get_400(
    api: FlaskClient, key: dict[str, str], body: str
) -> None:
    r = api.post("/api/v1/verify", data=body, content_type="application/json", headers=key)
    assert r.status_code == 400
    assert problem(r)["type"] == "urn:qpki:problem:invalid-request"
    assert "123456" not in r.get_data(as_text=True)


def test_validation_errors_never_echo_the_submitted_values(
    api: FlaskClient, key: dict[str, str]
) -> None:
    r = api.post("/api/v1/verify", json={"username": "a", "code": "9" * 65}, headers=key)
    assert r.status_code == 400
    assert "9" * 65 not in r.get_data(as_text=True)


def test_bodyless_operations_take_no_fields(
    api_app: Flask, api: FlaskClient, key: dict[str, str]
) -> None:
    from helpers import create_user

    user = create_user(api_app, "erin")
    path = f"/api/v1/users/{user.id}/unlock"
    assert api.post(path, headers=key).status_code == 200
    assert api.post(path, json={}, headers=key).status_code == 200
    r = api.post(path, json={"force": True}, headers=key)
    assert r.status_code == 400 and problem(r)["type"] == "urn:qpki:problem:invalid-request"
    assert api.post(path, data="x=1", headers=key).status_code == 415


@pytest.mark.parametrize(
    "method,path",
    [("GET", "/api/v1/verify"), ("DELETE", "/api/v1/users"), ("PUT", "/api/v1/audit/chain")],
)
def test_a_wrong_method_gets_405_with_allow(
    api: FlaskClient, key: dict[str, str], method: str, path: str
) -> None:
    r = api.open(path, method=method, headers=key)
    assert r.status_code == 405
    assert problem(r)["type"] == "urn:qpki:problem:method-not-allowed"
    assert r.headers["Allow"]


def test_unknown_paths_and_ids_get_404_problems(api: FlaskClient, key: dict[str, str]) -> None:
    for path in ("/api/v1/nothing", "/api/v1/users/0", "/api/v1/users/" + "9" * 25):
        r = api.get(path, headers=key)
        assert r.status_code == 404, path
        assert problem(r)["type"] == "urn:qpki:problem:not-found"


def test_too_large_a_body_gets_413(api: FlaskClient, key: dict[str, str]) -> None:
    big = '{"username": "a", "code": "' + "1" * 2_000_000 + '"}'
    r = api.post("/api/v1/verify", data=big, content_type="application/json", headers=key)
    assert r.status_code == 413
    assert problem(r)["type"] == "urn:qpki:problem:payload-too-large"


def test_an_unexpected_failure_is_a_500_problem_without_a_trace(
    api_app: Flask, api: FlaskClient, key: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from qpki.auth.services.audit_trail import AuditTrailService

    def broken(_self: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(AuditTrailService, "verify", broken)
    r = api.get("/api/v1/audit/chain", headers=key)
    assert r.status_code == 500
    assert problem(r)["type"] == "urn:qpki:problem:internal"
    assert "secret internal detail" not in r.get_data(as_text=True)
    assert "Traceback" not in r.get_data(as_text=True)


def test_no_cors_headers_and_no_cookies(api: FlaskClient, key: dict[str, str]) -> None:
    origin = {"Origin": "https://evil.example"}
    preflight = api.open(
        "/api/v1/verify",
        method="OPTIONS",
        headers={**origin, "Access-Control-Request-Method": "POST"},
    )
    r = api.post(
        "/api/v1/verify", json={"username": "a", "code": "123456"}, headers={**key, **origin}
    )
    for response in (preflight, r):
        names = [name.lower() for name, _value in response.headers.items()]
        assert not any(n.startswith("access-control-") for n in names)
        assert "Set-Cookie" not in response.headers


def test_the_web_pages_keep_their_html_errors(api: FlaskClient) -> None:
    """Problem documents are for /api/ paths only."""
    r = api.get("/no-such-page")
    assert r.status_code == 404 and r.mimetype == "text/html"


def test_a_key_in_the_url_is_not_accepted(api: FlaskClient, make_key: Callable[..., str]) -> None:
    secret = make_key("users:read")
    for query in ({"key": secret}, {"api_key": secret}, {"access_token": secret}):
        assert api.get("/api/v1/users", query_string=query).status_code == 401


def test_the_api_needs_no_csrf_token_where_the_pages_do(make_app: Callable[..., Flask]) -> None:
    """Bearer keys are not sent by browsers on their own, so the blueprint is CSRF-exempt."""
    from qpki.api import api_keys_of

    app = make_app(csrf_enabled=True)
    key = api_keys_of(app).create("csrf", "verify", actor_name="test").secret
    client = app.test_client()
    r = client.post("/api/v1/verify", json={"username": "x", "code": "1"}, headers=bearer(key))
    assert r.status_code == 200
    page = client.post("/auth/login", data={"username": "x", "password": "y"})
    assert page.status_code == 400  # the pages still demand their token
