"""Hostile input on every route: never a 500, never exception text, no 2FA state change.

Hypothesis generates long strings, unicode, NUL bytes and control characters, repeated and
missing fields, and odd content types; each example is sent to every route of the app, as an
anonymous client and as a signed-in user with 2FA, whose security state must not move.
"""

from __future__ import annotations

import re

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from helpers import create_user, enroll, login

NASTY = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=31), max_size=40),
    st.sampled_from(
        [
            "\x00",
            "' OR 1=1 --",
            "<script>alert(1)</script>",
            "ＡＢＣＤ-ＥＦＧＨ",
            "１２３４５６",
            "%00",
            "../../etc/passwd",
            "A" * 5000,
            "١٢٣٤٥٦",
            "\ud7ff",
        ]
    ),
)
FIELDS = [
    "username",
    "password",
    "code",
    "next",
    "reason",
    "role",
    "email",
    "csrf_token",
    "current_password",
    "new_password",
    "confirm_password",
    "confirm",
    "mfa",
    "q",
    "event",
    "user",
    "before",
    "since",
    "until",
    "outcome",
]
FORM = st.dictionaries(st.sampled_from(FIELDS), st.lists(NASTY, min_size=1, max_size=3), max_size=6)
CONTENT_TYPES = st.sampled_from(
    [None, "application/json", "text/plain", "multipart/form-data; boundary=x", "application/xml"]
)


def _routes(app: Flask) -> list[tuple[str, str]]:
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<int:\w+>", "2", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((method, path))
    return out


@pytest.fixture
def victim(make_app):  # type: ignore[no-untyped-def]
    app = make_app()
    create_user(app, "admin", "admin")
    create_user(app, "victim")
    client = app.test_client()
    assert login(client, "victim").status_code == 302
    enroll(client)
    return app, client


def _state(app: Flask) -> tuple[object, ...]:
    user = app.auth_manager.get_user(username="victim")  # type: ignore[attr-defined]
    return (
        user.two_factor_enabled,
        user.totp_secret,
        user.backup_codes,
        user.password_hash,
        user.role,
        user.is_active,
    )


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(form=FORM, content_type=CONTENT_TYPES, data=st.data())
def test_hostile_input_never_breaks_anything(victim, form, content_type, data) -> None:  # type: ignore[no-untyped-def]
    app, signed_in = victim
    before = _state(app)
    anonymous = app.test_client()
    method, path = data.draw(st.sampled_from(_routes(app)))
    for client in (anonymous, signed_in):
        kwargs: dict[str, object] = {}
        if method == "GET":
            kwargs["query_string"] = [(k, v) for k, vs in form.items() for v in vs]
        elif content_type is None:
            kwargs["data"] = MultiDict([(k, v) for k, vs in form.items() for v in vs])
        else:
            kwargs["data"] = repr(form).encode("utf-8", "surrogatepass")
            kwargs["content_type"] = content_type
        response = client.open(path, method=method, **kwargs)  # type: ignore[arg-type]
        body = response.get_data(as_text=True)
        assert response.status_code < 500, (method, path, response.status_code)
        assert "Traceback" not in body and 'File "' not in body
        assert not re.search(r"\b[A-Z]\w+(Error|Exception)\b", body), body[:500]
    if path.startswith("/auth/"):  # the victim's own routes: garbage must not change 2FA state
        assert _state(app) == before, (method, path, form)


def test_oversized_body_is_refused_cleanly(app: Flask) -> None:
    response = app.test_client().post("/auth/login", data={"username": "x" * 200_000})
    assert response.status_code == 413 and "Traceback" not in response.get_data(as_text=True)


def test_submitted_codes_are_never_echoed_back(app: Flask) -> None:
    """A wrong or reused code typed at the verify page is not sent back in the HTML."""
    create_user(app, "echo")
    client = app.test_client()
    assert login(client, "echo").status_code == 302
    _secret, codes = enroll(client)
    client.post("/auth/logout", data={})
    login(client, "echo")
    for typed in ("999999", "ZZZZ-ZZZZ", "1" * 40):
        response = client.post("/auth/mfa/verify", data={"code": typed})
        assert response.status_code in (200, 400) and typed not in response.get_data(as_text=True)
    assert client.post("/auth/mfa/verify", data={"code": codes[0]}).status_code == 302
    client.post("/auth/logout", data={})
    login(client, "echo")
    body = client.post("/auth/mfa/verify", data={"code": codes[0]}).get_data(as_text=True)
    assert "Backup code already used" in body and codes[0] not in body
