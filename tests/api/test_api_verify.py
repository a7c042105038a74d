"""POST /api/v1/verify: the web's rules exactly — single use, shared throttle, audit by key."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from api_helpers import audit_rows, bearer, problem
from flask import Flask
from flask.testing import FlaskClient

from helpers import create_user, enable_mfa, login, oathtool_code, text_of
from qpki.app import create_app
from qpki.auth import errors
from qpki.auth.models import User
from qpki.clock import SteppedClock
from qpki.config import Settings
from qpki.web.services import services_of


def _mfa_user(app: Flask, clock: SteppedClock, name: str = "alice") -> tuple[User, str, list[str]]:
    user = create_user(app, name)
    secret, codes = enable_mfa(app, user.id, at=clock())
    clock.advance(seconds=30)  # the enrolment code's step is used up
    return user, secret, codes


def _verify(api: FlaskClient, key: str, username: str, code: str) -> object:
    return api.post(
        "/api/v1/verify", json={"username": username, "code": code}, headers=bearer(key)
    )


def test_a_right_totp_code_is_accepted_once_and_audited_with_the_key_as_actor(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    user, secret, _ = _mfa_user(api_app, clock)
    key = make_key("verify", name="billing")
    code = oathtool_code(secret, clock())
    first = _verify(api, key, "alice", code)
    assert first.status_code == 200
    assert first.get_json() == {
        "result": "accept",
        "message": "Verification successful",
        "method": "totp",
    }
    again = _verify(api, key, "alice", code)
    assert again.status_code == 200
    assert again.get_json()["result"] == "reject"
    assert again.get_json()["message"] == errors.CODE_JUST_USED
    success = audit_rows(api_app, "mfa_verify_success")[-1]
    assert (success.actor_id, success.actor_name) == (None, "api:billing")
    assert (success.target_user_id, success.target_name) == (user.id, "alice")
    failure = audit_rows(api_app, "mfa_verify_failure")[-1]
    assert failure.actor_name == "api:billing" and '"replay"' in failure.details


def test_a_backup_code_is_accepted_once_with_the_count_left(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    _mfa_user(api_app, clock)
    _user, _secret, codes = _mfa_user(api_app, clock, "bob")
    key = make_key("verify")
    first = _verify(api, key, "bob", codes[0])
    assert first.get_json() == {
        "result": "accept",
        "message": "Backup code accepted. 7 backup codes remaining.",
        "method": "backup_code",
        "backup_codes_remaining": 7,
    }
    second = _verify(api, key, "bob", codes[0]).get_json()
    assert second["result"] == "reject" and second["message"] == "Backup code already used"


def test_unknown_users_users_without_2fa_and_deactivated_users_are_rejected(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    key = make_key("verify")
    create_user(api_app, "no2fa")
    user, secret, _ = _mfa_user(api_app, clock, "gone")
    api_app.auth_manager.set_active(None, user.id, False, actor_name="test")  # type: ignore[attr-defined]
    assert _verify(api, key, "nobody", "123456").get_json() == {
        "result": "reject",
        "message": "Unknown user",
    }
    assert _verify(api, key, "no2fa", "123456").get_json()["message"] == "MFA not enabled"
    gone = _verify(api, key, "gone", oathtool_code(secret, clock())).get_json()
    assert gone == {"result": "reject", "message": "Account is deactivated"}


def test_the_throttle_answers_429_with_retry_after(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    _, secret, _ = _mfa_user(api_app, clock)
    key = make_key("verify")
    statuses = []
    for _ in range(8):
        statuses.append(_verify(api, key, "alice", "000000").status_code)
    assert statuses[:5] == [200] * 5
    throttled = _verify(api, key, "alice", oathtool_code(secret, clock()))
    assert throttled.status_code == 429
    body = problem(throttled)
    assert body["type"] == "urn:qpki:problem:throttled"
    assert int(throttled.headers["Retry-After"]) == body["retry_after"] >= 1
    assert "Too many failed attempts" in body["detail"]


def test_web_and_api_share_the_replay_guard_both_ways(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    """A code used to sign in on the web is refused by the API, and the other way round."""
    _, secret, _ = _mfa_user(api_app, clock)
    key = make_key("verify")
    web = api_app.test_client()
    code = oathtool_code(secret, clock())
    assert login(web, "alice").status_code == 302
    assert web.post("/auth/mfa/verify", data={"code": code}).status_code == 302
    assert _verify(api, key, "alice", code).get_json()["result"] == "reject"

    clock.advance(seconds=30)
    code = oathtool_code(secret, clock())
    assert _verify(api, key, "alice", code).get_json()["result"] == "accept"
    other = api_app.test_client()
    assert login(other, "alice").status_code == 302
    refused = other.post("/auth/mfa/verify", data={"code": code})
    assert refused.status_code != 302
    assert errors.CODE_JUST_USED in text_of(refused)


def test_web_and_api_share_the_account_throttle(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    """Failures on the sign-in page count against the API's attempts for that account."""
    _, secret, _ = _mfa_user(api_app, clock)
    key = make_key("verify")
    web = api_app.test_client()
    assert login(web, "alice").status_code == 302
    for _ in range(5):
        web.post("/auth/mfa/verify", data={"code": "000000"})
    refused = _verify(api, key, "alice", oathtool_code(secret, clock()))
    assert refused.status_code == 429
    assert problem(refused)["type"] == "urn:qpki:problem:throttled"


def test_an_enrolment_overdue_user_gets_403_and_no_code_is_checked(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    user, secret, _ = _mfa_user(api_app, clock)
    policy = services_of(api_app).policy
    policy.set_policy("viewer", actor=None, require_phishing_resistant=True, grace_hours=0)
    policy.status(user, now=clock())  # the first sign-in under the policy starts the grace
    clock.advance(seconds=1)
    checked = ("mfa_verify_success", "mfa_verify_failure")
    before = sum(len(audit_rows(api_app, event)) for event in checked)
    key = make_key("verify")
    refused = _verify(api, key, "alice", oathtool_code(secret, clock()))
    assert refused.status_code == 403
    body = problem(refused)
    assert body["type"] == "urn:qpki:problem:enrolment-overdue"
    assert "key" in body["detail"]
    after = sum(len(audit_rows(api_app, event)) for event in checked)
    assert after == before, "an overdue user's code is not checked at all"
    # Back under an optional policy, the same code is checked (and accepted).
    policy.set_policy("viewer", actor=None, require_phishing_resistant=False)
    accepted = _verify(api, key, "alice", oathtool_code(secret, clock()))
    assert accepted.status_code == 200 and accepted.get_json()["result"] == "accept"


# -- the same code from two processes x 100 threads: exactly one accept ---------------------------
def _process(settings: Settings, key: str, code: str, start: object, out: object) -> None:
    app = create_app(settings)
    client_of = app.test_client
    barrier = threading.Barrier(100)
    results: list[int] = []
    lock = threading.Lock()

    def attempt() -> None:
        client = client_of()
        barrier.wait()
        r = client.post(
            "/api/v1/verify", json={"username": "racer", "code": code}, headers=bearer(key)
        )
        accepted = r.status_code == 200 and r.get_json()["result"] == "accept"
        with lock:
            results.append(1 if accepted else 0 if r.status_code in (200, 429, 423) else -1)

    start.wait()  # type: ignore[attr-defined]
    threads = [threading.Thread(target=attempt) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    out.put(results)  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["totp", "backup_code"])
def test_one_code_200_concurrent_api_requests_from_two_processes_one_accept(
    make_settings: Callable[..., Settings], db_url: str, kind: str
) -> None:
    settings = make_settings(db_url)
    app = create_app(settings)
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    user = create_user(app, "racer")
    secret, codes = enable_mfa(app, user.id)
    from qpki.api import api_keys_of

    key = api_keys_of(app).create("racer-svc", ["verify"], actor_name="test").secret
    import pyotp

    from qpki.db.base import utcnow

    code = (
        codes[0]
        if kind == "backup_code"
        else pyotp.TOTP(secret).at(utcnow() + timedelta(seconds=30))
    )
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_process, args=(settings, key, code, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    results = [r for _ in procs for r in out.get(timeout=300)]
    for p in procs:
        p.join(60)
    assert len(results) == 200
    assert -1 not in results  # every answer was a verdict, a throttle or a lock: no 5xx
    assert sum(results) == 1
    app.db_manager.dispose()  # type: ignore[attr-defined]
