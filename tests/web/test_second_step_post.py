"""Submitting the code (POST /auth/mfa/verify) on a cookie the password step marked pending:
the second step claims the pending row in its own transaction instead of reading it first
(issue 15). Every answer a read would have given still comes out: signed in, wrong code with
the page drawn again, timed out (saying so), used already, cancelled, or a full session."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from flask import Flask
from sqlalchemy import event

from helpers import (
    create_user,
    enable_mfa,
    login,
    main_text,
    oathtool_code,
)
from qpki.auth import errors
from qpki.clock import SteppedClock

T0 = datetime(2026, 6, 1, 12, 0, 10, tzinfo=UTC)


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock(T0)


@pytest.fixture
def app(make_app: Callable[..., Flask], clock: SteppedClock) -> Flask:
    return make_app(clock=clock)


def _alice(app: Flask, clock: SteppedClock) -> str:
    user = create_user(app, "alice")
    secret, _codes = enable_mfa(app, user.id, at=clock())
    clock.advance(seconds=30)  # the enrolment code's step is spent
    return secret


def _begins(app: Flask) -> list[str]:
    seen: list[str] = []

    def _log(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.startswith("BEGIN"):
            seen.append(statement)

    event.listen(app.db_manager.engine, "before_cursor_execute", _log)  # type: ignore[attr-defined]
    return seen


def test_the_password_step_marks_the_cookie_pending(app: Flask, clock: SteppedClock) -> None:
    _alice(app, clock)
    client = app.test_client()
    assert login(client, "alice").headers["Location"].endswith("/auth/mfa/verify")
    with client.session_transaction() as cookie:
        assert cookie["pending_user"] == "alice"
        assert cookie["pending_until"] == pytest.approx(T0.timestamp() + 30 + 300)


def test_a_right_code_signs_in_with_one_write_transaction(app: Flask, clock: SteppedClock) -> None:
    secret = _alice(app, clock)
    client = app.test_client()
    login(client, "alice")
    begins = _begins(app)
    done = client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
    assert done.status_code == 302 and done.headers["Location"].endswith("/")
    assert begins == ["BEGIN IMMEDIATE"], begins
    with client.session_transaction() as cookie:
        assert "pending_user" not in cookie  # a full session: the marker is gone
    assert client.get("/").status_code == 200


def test_a_wrong_code_draws_the_page_again_and_the_right_one_then_works(
    app: Flask, clock: SteppedClock
) -> None:
    secret = _alice(app, clock)
    client = app.test_client()
    login(client, "alice")
    wrong = client.post("/auth/mfa/verify", data={"code": "000000"})
    assert wrong.status_code == 200
    text = main_text(wrong)
    assert errors.INVALID_CODE in text and "alice" in text
    assert (
        client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
        .headers["Location"]
        .endswith("/")
    )


def test_a_code_after_the_timeout_says_the_sign_in_timed_out(
    app: Flask, clock: SteppedClock
) -> None:
    secret = _alice(app, clock)
    client = app.test_client()
    login(client, "alice")
    clock.advance(minutes=5, seconds=1)
    gone = client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
    assert gone.status_code == 302 and gone.headers["Location"].endswith("/auth/login")
    with client.session_transaction() as kept:
        assert kept.get("signin_username") == "alice" and "sid" not in kept
    assert errors.SIGNIN_EXPIRED in main_text(client.get("/auth/login"))


def test_a_pending_sign_in_is_used_once(app: Flask, clock: SteppedClock) -> None:
    secret = _alice(app, clock)
    client = app.test_client()
    login(client, "alice")
    cookie = client.get_cookie("qpki_session")
    assert cookie is not None
    assert (
        client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
        .headers["Location"]
        .endswith("/")
    )
    clock.advance(seconds=30)
    again = app.test_client()
    again.set_cookie("qpki_session", cookie.value)
    reused = again.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
    assert reused.status_code == 302 and reused.headers["Location"].endswith("/auth/login")
    landed = main_text(again.get("/auth/login"))
    assert "Please sign in first" in landed and errors.SIGNIN_EXPIRED not in landed


def test_a_sign_in_cancelled_by_deactivation_is_not_called_timed_out(
    app: Flask, clock: SteppedClock
) -> None:
    secret = _alice(app, clock)
    client = app.test_client()
    login(client, "alice")
    user = app.auth_manager.get_user(username="alice")  # type: ignore[attr-defined]
    app.auth_manager.set_active(None, user.id, False)  # type: ignore[attr-defined]
    refused = client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
    assert refused.status_code == 302 and refused.headers["Location"].endswith("/auth/login")
    assert errors.SIGNIN_EXPIRED not in main_text(client.get("/auth/login"))


def test_a_full_session_marked_pending_is_only_sent_home(app: Flask, clock: SteppedClock) -> None:
    """The marker only ever makes a request anonymous: on a full session it changes nothing
    but the answer to a code nobody needed (home), and the session stays signed in."""
    secret = _alice(app, clock)
    client = app.test_client()
    login(client, "alice")
    client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
    with client.session_transaction() as cookie:
        cookie["pending_user"] = "alice"
    clock.advance(seconds=30)
    home = client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
    assert home.status_code == 302 and home.headers["Location"].endswith("/")
    assert client.get("/auth/profile").status_code == 200
