"""Web hardening: CSRF, cookie flags, security headers, error pages, request size, rate limits
and the per-account back-off."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from helpers import (
    PASSWORD,
    create_user,
    enable_mfa,
    location_path,
    login,
    main_text,
    next_step_code,
    optional_2fa_for_admins,
    page,
)
from qpki.auth.models import UserSession
from qpki.web.limits import LOGIN_LIMIT


@pytest.fixture
def csrf_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(csrf_enabled=True)


# -- helpers local to this module -----------------------------------------------------------------


def csrf_token(client: FlaskClient, url: str, form_action: str | None = None) -> str:
    """The token a browser would send: scraped from the form on the page at ``url``."""
    response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    soup = page(response)
    scope = soup.find("form", action=form_action) if form_action else soup
    assert scope is not None, (url, form_action)
    field = scope.find("input", attrs={"name": "csrf_token"})
    assert field is not None and field.get("value"), url
    return field["value"]


def mfa_enabled(app: Flask, user_id: int) -> bool:
    user = app.auth_manager.get_user(user_id=user_id)  # type: ignore[attr-defined]
    assert user is not None
    return bool(user.two_factor_enabled)


def session_rows(app: Flask) -> int:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return int(s.scalar(select(func.count(UserSession.id))) or 0)


def csrf_login(client: FlaskClient, username: str, secret: str | None = None) -> None:
    """Log in the way a browser does on a CSRF-protected app (with the second factor)."""
    token = csrf_token(client, "/auth/login")
    response = login(client, username, csrf_token=token)
    assert response.status_code == 302, main_text(response)
    if secret is not None:
        assert location_path(response) == "/auth/mfa/verify"
        token = csrf_token(client, "/auth/mfa/verify")
        done = client.post(
            "/auth/mfa/verify", data={"code": next_step_code(secret), "csrf_token": token}
        )
        assert done.status_code == 302, main_text(done)
    assert client.get("/auth/profile").status_code == 200


# -- CSRF -----------------------------------------------------------------------------------------
def test_login_without_csrf_token_is_refused(csrf_app: Flask) -> None:
    create_user(csrf_app, "alice")
    client = csrf_app.test_client()
    response = login(client, "alice")
    assert response.status_code == 400
    assert session_rows(csrf_app) == 0
    assert client.get("/").status_code == 302

    forged = login(client, "alice", csrf_token="not-a-real-token")
    assert forged.status_code == 400
    assert session_rows(csrf_app) == 0

    token = csrf_token(client, "/auth/login")
    ok = login(client, "alice", csrf_token=token)
    assert ok.status_code == 302
    assert location_path(ok) == "/"
    assert client.get("/").status_code == 200


def test_csrf_token_of_another_session_is_refused(csrf_app: Flask) -> None:
    create_user(csrf_app, "alice")
    attacker = csrf_app.test_client()
    stolen = csrf_token(attacker, "/auth/login")
    victim = csrf_app.test_client()
    victim.get("/auth/login")  # the victim has a session of their own
    assert login(victim, "alice", csrf_token=stolen).status_code == 400
    assert session_rows(csrf_app) == 0


def test_logout_without_csrf_token_is_refused(csrf_app: Flask) -> None:
    create_user(csrf_app, "alice")
    client = csrf_app.test_client()
    csrf_login(client, "alice")
    assert client.post("/auth/logout").status_code == 400
    assert client.get("/").status_code == 200  # still logged in
    token = csrf_token(client, "/")
    assert client.post("/auth/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/").status_code == 302


def test_self_2fa_disable_without_csrf_token_is_refused(csrf_app: Flask) -> None:
    user = create_user(csrf_app, "alice")
    secret, _codes = enable_mfa(csrf_app, user.id)
    client = csrf_app.test_client()
    csrf_login(client, "alice", secret)

    refused = client.post("/auth/mfa/disable", data={"password": PASSWORD})
    assert refused.status_code == 400
    assert mfa_enabled(csrf_app, user.id)

    token = csrf_token(client, "/auth/profile", "/auth/mfa/disable")
    done = client.post("/auth/mfa/disable", data={"password": PASSWORD, "csrf_token": token})
    assert done.status_code == 302
    assert not mfa_enabled(csrf_app, user.id)


def test_admin_2fa_reset_without_csrf_token_is_refused(csrf_app: Flask) -> None:
    root = create_user(csrf_app, "root-admin", role="admin")
    admin_secret, _ = enable_mfa(csrf_app, root.id)
    target = create_user(csrf_app, "tina")
    enable_mfa(csrf_app, target.id)
    admin = csrf_app.test_client()
    csrf_login(admin, "root-admin", admin_secret)
    url = f"/admin/users/{target.id}/mfa/disable"

    refused = admin.post(url, data={"reason": "lost phone", "confirm": "y"})
    assert refused.status_code == 400
    assert mfa_enabled(csrf_app, target.id)

    token = csrf_token(admin, f"/admin/users/{target.id}", url)
    done = admin.post(url, data={"reason": "lost phone", "confirm": "y", "csrf_token": token})
    assert done.status_code == 302
    assert not mfa_enabled(csrf_app, target.id)


def test_every_post_form_carries_a_csrf_token(csrf_app: Flask) -> None:
    optional_2fa_for_admins(csrf_app)
    create_user(csrf_app, "root-admin", role="admin")
    target = create_user(csrf_app, "tina")
    enable_mfa(csrf_app, target.id)
    client = csrf_app.test_client()
    csrf_login(client, "root-admin")
    for url in ("/", "/auth/profile", "/auth/mfa/setup", f"/admin/users/{target.id}"):
        forms = page(client.get(url)).find_all("form", method=re.compile("post", re.I))
        assert forms, url
        for form in forms:
            assert form.find("input", attrs={"name": "csrf_token"}) is not None, (url, form)


# -- cookies --------------------------------------------------------------------------------------
def _session_set_cookie(response: TestResponse, name: str) -> str:
    headers = [h for h in response.headers.getlist("Set-Cookie") if h.startswith(f"{name}=")]
    assert headers, response.headers.getlist("Set-Cookie")
    return headers[-1]


def _attributes(header: str) -> dict[str, str]:
    parts = [p.strip() for p in header.split(";")[1:]]
    return {p.split("=", 1)[0].lower(): (p.split("=", 1)[1] if "=" in p else "") for p in parts}


def test_session_cookie_is_httponly_and_samesite_lax(app: Flask, client: FlaskClient) -> None:
    create_user(app, "alice")
    response = login(client, "alice")
    assert app.config["SESSION_COOKIE_NAME"] == "qpki_session"
    attrs = _attributes(_session_set_cookie(response, "qpki_session"))
    assert "httponly" in attrs
    assert attrs.get("samesite", "").lower() == "lax"
    assert attrs.get("path") == "/"


def test_https_cookie_is_host_prefixed_and_secure(make_app: Callable[..., Flask]) -> None:
    app = make_app(https=True)
    create_user(app, "alice")
    client = app.test_client()
    response = client.post(
        "/auth/login",
        data={"username": "alice", "password": PASSWORD},
        base_url="https://localhost",
    )
    assert response.status_code == 302
    attrs = _attributes(_session_set_cookie(response, "__Host-qpki_session"))
    assert "secure" in attrs
    assert "httponly" in attrs
    assert attrs.get("path") == "/"
    assert "domain" not in attrs  # required for the __Host- prefix
    assert attrs.get("samesite", "").lower() == "lax"
    assert "max-age=" in response.headers.get("Strict-Transport-Security", "")
    home = client.get("/", base_url="https://localhost")
    assert home.status_code == 200
    assert "max-age=" in home.headers.get("Strict-Transport-Security", "")
    assert "max-age=" in client.get("/auth/login").headers.get("Strict-Transport-Security", "")


# -- headers --------------------------------------------------------------------------------------
def _csp(response: TestResponse) -> dict[str, list[str]]:
    header = response.headers.get("Content-Security-Policy", "")
    assert header, "no Content-Security-Policy"
    directives = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def _check_headers(response: TestResponse, what: str) -> None:
    csp = _csp(response)
    assert csp.get("frame-ancestors") == ["'none'"], what
    scripts = csp.get("script-src", csp.get("default-src"))
    assert scripts, what
    assert "'unsafe-inline'" not in scripts and "'unsafe-eval'" not in scripts, what
    assert response.headers.get("X-Content-Type-Options") == "nosniff", what
    assert response.headers.get("Referrer-Policy"), what


ANON_PATHS = ["/auth/login", "/", "/auth/mfa/verify", "/no-such-page", "/auth/logout"]
USER_PATHS = ["/", "/auth/profile", "/auth/mfa/setup", "/admin/users", "/admin/audit"]


def test_security_headers_on_every_page(app: Flask, client: FlaskClient) -> None:
    optional_2fa_for_admins(app)
    create_user(app, "root-admin", role="admin")
    for path in ANON_PATHS:
        _check_headers(client.get(path), f"anonymous {path}")
    _check_headers(login(client, "root-admin", "a wrong passphrase"), "failed login")
    response = login(client, "root-admin")
    _check_headers(response, "login redirect")
    for path in USER_PATHS:
        response = client.get(path)
        assert response.status_code == 200, path
        _check_headers(response, path)
    _check_headers(client.get("/admin/audit.csv"), "csv")


# -- error pages ----------------------------------------------------------------------------------
def test_unknown_path_gets_the_404_page(client: FlaskClient) -> None:
    response = client.get("/no/such/page")
    assert response.status_code == 404
    assert response.mimetype == "text/html"
    assert "Page not found" in main_text(response)
    assert "Traceback" not in response.get_data(as_text=True)


def test_wrong_method_gets_the_405_page(client: FlaskClient) -> None:
    response = client.get("/auth/logout")
    assert response.status_code == 405
    assert "Method not allowed" in main_text(response)


def test_unexpected_error_shows_no_internals(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    app.add_url_rule("/boom", "boom", view_func=lambda: 1 / 0)
    response = app.test_client().get("/boom")
    assert response.status_code == 500
    body = response.get_data(as_text=True)
    for leak in ("Traceback", "ZeroDivisionError", "division by zero", "lambda", 'File "'):
        assert leak not in body, leak
    assert "Something went wrong" in main_text(response)
    _check_headers(response, "500 page")


def test_oversized_request_is_refused_with_413(app: Flask, csrf_app: Flask) -> None:
    payload = {"username": "alice", "password": "x" * (1024 * 1024)}
    for which in (app, csrf_app):
        response = which.test_client().post("/auth/login", data=payload)
        assert response.status_code == 413
        assert "Request too large" in main_text(response)


# -- rate limits and back-off ---------------------------------------------------------------------
def test_per_address_rate_limit_on_login(make_app: Callable[..., Flask]) -> None:
    app = make_app(rate_limits_enabled=True)
    client = app.test_client()
    statuses = []
    limited: TestResponse | None = None
    allowed = int(LOGIN_LIMIT.split()[0])
    for i in range(allowed + 1):
        # A different name each time: the per-account back-off never triggers.
        response = login(client, f"someone-{i}", "a wrong passphrase")
        statuses.append(response.status_code)
        if response.status_code == 429:
            limited = response
            break
        assert "Invalid username or password" in main_text(response), i
    assert limited is not None, statuses
    assert len(statuses) == allowed + 1, statuses
    retry = limited.headers.get("Retry-After", "")
    assert retry.isdigit() and int(retry) > 0, limited.headers
    assert "Try again in" not in main_text(limited)  # the account throttle did not answer
    assert "Invalid username or password" not in main_text(limited)


def _attempts(app: Flask, username: str, right_password: str) -> TestResponse:
    for i in range(5):
        response = login(app.test_client(), username, f"wrong passphrase number {i}")
        assert response.status_code == 200, (username, i, response.status_code)
        assert "Invalid username or password" in main_text(response)
    return login(app.test_client(), username, right_password)


def test_account_back_off_after_five_failures(app: Flask) -> None:
    create_user(app, "alice")
    calls = []
    passwords = app.auth_manager.passwords  # type: ignore[attr-defined]
    original = passwords.verify

    def counting(*args: object, **kwargs: object) -> bool:
        calls.append(1)
        return original(*args, **kwargs)

    passwords.verify = counting
    sixth = _attempts(app, "alice", PASSWORD)
    assert sixth.status_code == 429
    assert "Try again in" in main_text(sixth)
    retry = sixth.headers.get("Retry-After", "")
    assert retry.isdigit() and 0 < int(retry) <= 30
    assert len(calls) == 5, "the throttled attempt must be refused before hashing"
    client = app.test_client()
    assert login(client, "alice").status_code == 429
    assert client.get("/").status_code == 302

    ghost = _attempts(app, "ghost-who-does-not-exist", "any passphrase at all")
    assert ghost.status_code == sixth.status_code
    assert ghost.headers.get("Retry-After", "").isdigit()

    def shape(response: TestResponse) -> str:
        return re.sub(r"\d+", "N", main_text(response))

    assert shape(ghost) == shape(sixth)
    assert "Try again in" in main_text(ghost)
