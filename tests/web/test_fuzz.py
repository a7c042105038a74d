"""Hostile input on every route: never a 500, never exception text, no 2FA state change.

Hypothesis generates long strings, unicode, NUL bytes and control characters, repeated and
missing fields, and odd content types; each example is sent to every route of the app, as an
anonymous client and as a signed-in user with 2FA, whose security state must not move.

A second sweep goes after the values that reach the database or a parser: every route of
``app.url_map`` (nothing hard-coded, so a new route is covered the day it is added) with ids too
large for a 64-bit integer, negative and non-ASCII digits in every path argument, odd numbers
and dates in every query parameter the code reads (found in the source), and odd ``Range``
headers — as an anonymous client and as a signed-in administrator. No answer may be a 5xx.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict
from werkzeug.routing import Rule

import qpki
from helpers import create_user, enable_mfa, login, login_with_mfa, next_step_code

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


# <converter(args):name> or <name> in a rule; werkzeug's own syntax.
_ARGUMENT = re.compile(r"<(?:(?P<converter>\w+)(?:\([^)]*\))?:)?(?P<name>\w+)>")


def _fill(rule: Rule, value_for: Callable[[str], str]) -> str:
    """The rule's path with each argument replaced by ``value_for(converter name)``."""
    return _ARGUMENT.sub(lambda m: value_for(m.group("converter") or "default"), rule.rule)


def _methods(rule: Rule) -> list[str]:
    return sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})


def _routes(app: Flask) -> list[tuple[str, str]]:
    plain = {"int": "2", "default": "x", "string": "x", "path": "x"}
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = _fill(rule, plain.__getitem__)
        for method in _methods(rule):
            out.append((method, path))
    return out


@pytest.fixture
def victim(make_app):  # type: ignore[no-untyped-def]
    app = make_app()
    create_user(app, "admin", "admin")
    secret, _codes = enable_mfa(app, create_user(app, "victim").id)
    client = app.test_client()
    assert login_with_mfa(client, "victim", next_step_code(secret)).status_code == 302
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
    _secret, codes = enable_mfa(app, create_user(app, "echo").id)
    client = app.test_client()
    assert login(client, "echo").status_code == 302  # the verify page is next
    for typed in ("999999", "ZZZZ-ZZZZ", "1" * 40):
        response = client.post("/auth/mfa/verify", data={"code": typed})
        assert response.status_code in (200, 400) and typed not in response.get_data(as_text=True)
    assert client.post("/auth/mfa/verify", data={"code": codes[0]}).status_code == 302
    client.post("/auth/logout", data={})
    login(client, "echo")
    body = client.post("/auth/mfa/verify", data={"code": codes[0]}).get_data(as_text=True)
    assert "Backup code already used" in body and codes[0] not in body


# -- odd ids, numbers, dates and ranges on every route ------------------------------------------
ODD_PATH_VALUES = {
    "int": [
        "0",
        "1",
        str(2**31),
        str(2**63 - 1),
        str(2**63),
        str(2**64),
        str(2**70),
        "9" * 400,
        "-1",
        "-" + str(2**70),
        "1.5",
        "1e9",
        "0x10",
        "00000000000000000000001",
        "１",  # fullwidth digit
        "٣",  # Arabic-Indic digit
    ],
    "default": ["x", "A" * 300, "%00", "%ff", "..%2F..%2Fetc%2Fpasswd", str(2**70), "-1"],
    "path": ["style.css", "../../etc/passwd", "%00", "A" * 300, "style.css/" + "x" * 50],
}
ODD_PATH_VALUES["string"] = ODD_PATH_VALUES["default"]
ODD_QUERY_VALUES = [
    "",
    "0",
    "-1",
    str(2**31),
    str(2**63),
    str(2**70),
    "9" * 400,
    "-" + "9" * 400,
    "1e309",
    "nan",
    "inf",
    "9999-12-31",
    "0001-01-01",
    "10000-01-01",
    "2024-02-30",
    "1970-01-01T00:00:00+99:99",
    "\x00",
    "%",
    "true",
]
ODD_HEADERS = [
    {"Range": "bytes=999999-"},
    {"Range": "bytes=5-1"},
    {"Range": "bytes=0-0,1-1,2-2,3-3,4-4,5-5,6-6,7-7,8-8,9-9"},
    {"Range": "furlongs=0-1"},
    {"If-Modified-Since": "yesterday"},
    {"If-Range": '"nope"'},
    {"Accept": "*/*;q=nan"},
]


def _query_names() -> list[str]:
    """Every parameter name the code reads with ``args.get("…")`` / ``args["…"]``."""
    source = Path(qpki.__file__).parent
    read = re.compile(r"\bargs(?:\.get(?:list)?\(|\[)\s*[\"'](\w+)[\"']")
    names = {m for f in source.rglob("*.py") for m in read.findall(f.read_text("utf-8"))}
    assert {"q", "next"} <= names, "the source scan found no query parameters; fix the pattern"
    return sorted(names)


# A well-formed value for each converter, for the arguments a request is not varying.
PLAIN = {"int": "1", "default": "x", "string": "x", "path": "style.css"}


def _odd_paths(rule: Rule) -> list[str]:
    """The rule's path once per odd value of each kind of argument (the others plain)."""
    kinds = {m.group("converter") or "default" for m in _ARGUMENT.finditer(rule.rule)}
    unknown = kinds - set(ODD_PATH_VALUES)
    assert not unknown, f"{rule.rule}: give the sweep odd values for converter(s) {unknown}"
    if not kinds:
        return [rule.rule]
    return [
        _fill(rule, lambda k, kind=kind, value=value: value if k == kind else PLAIN[k])
        for kind in sorted(kinds)
        for value in ODD_PATH_VALUES[kind]
    ]


def _requests(app: Flask) -> Iterator[tuple[str, str, str, dict[str, object], bool]]:
    """(rule, method, path, client.open kwargs, also anonymously?) derived from the URL map.

    One parameter at a time is sent as the administrator only: anonymous requests stop at the
    sign-in redirect, which the all-parameters-at-once requests already show.
    """
    names = _query_names()
    every_name = sorted(set(names) | set(FIELDS))
    for rule in app.url_map.iter_rules():
        base = _fill(rule, PLAIN.__getitem__)
        for method in _methods(rule):
            for path in _odd_paths(rule):
                yield rule.rule, method, path, {}, True
            if method != "GET":
                continue
            for value in ODD_QUERY_VALUES:
                yield (
                    rule.rule,
                    method,
                    base,
                    {"query_string": [(n, value) for n in every_name]},
                    True,
                )
            for name in names:
                for value in ODD_QUERY_VALUES:
                    yield rule.rule, method, base, {"query_string": {name: value}}, False
            for headers in ODD_HEADERS:
                yield rule.rule, method, base, {"headers": headers}, True


@pytest.fixture
def admin_client(make_app: Callable[..., Flask]) -> tuple[Flask, Callable[[], FlaskClient]]:
    app = make_app()
    # "someone" is user 1, the id the sweep's plain and odd values name; the administrator
    # (user 2) is never the target, so resets and deactivations cannot lock the sweep out.
    assert create_user(app, "someone").id == 1
    assert create_user(app, "admin", "admin").id == 2

    def signed_in() -> FlaskClient:
        client = app.test_client()
        assert login(client, "admin").status_code == 302
        return client

    return app, signed_in


def test_odd_ids_numbers_dates_and_ranges_never_give_a_server_error(
    admin_client: tuple[Flask, Callable[[], FlaskClient]],
) -> None:
    """Oversized ids once reached SQLite (OverflowError) and unlisted statuses became 500.

    Every request is sent anonymously and as an administrator; each route and method gets a
    freshly signed-in administrator, so a logout or self-deactivation does not hide later ones.
    All failures are collected, so one run names every broken route and value.
    """
    app, signed_in = admin_client
    anonymous = app.test_client()
    admin = signed_in()
    failures: dict[str, list[str]] = {}
    sent = 0
    current = ("", "")
    for rule, method, path, kwargs, also_anonymous in _requests(app):
        if (rule, method) != current:
            admin, current = signed_in(), (rule, method)
        clients = [("admin", admin)] + ([("anonymous", anonymous)] if also_anonymous else [])
        for who, client in clients:
            response = client.open(path, method=method, **kwargs)  # type: ignore[arg-type]
            sent += 1
            body = response.get_data(as_text=True)
            if response.status_code >= 500 or "Traceback" in body:
                failures.setdefault(f"{method} {rule}", []).append(
                    f"{who} {path[:60]} {kwargs!r:.100} -> {response.status_code}"
                )
    assert sent > 1000, sent  # the sweep really covered the map
    report = [
        f"{route}: {len(cases)} failed, e.g.\n    " + "\n    ".join(cases[:3])
        for route, cases in failures.items()
    ]
    assert not failures, "server errors on these routes:\n" + "\n".join(report)


def test_unlisted_http_statuses_keep_their_status_and_headers(app: Flask) -> None:
    client = app.test_client()
    past_end = client.get("/static/style.css", headers={"Range": "bytes=999999-"})
    assert past_end.status_code == 416
    assert past_end.headers["Content-Range"].startswith("bytes */")
    assert "Range not satisfiable" in past_end.get_data(as_text=True)
    wrong_method = client.delete("/auth/login")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["Allow"]
