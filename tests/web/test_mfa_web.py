"""Two-factor authentication through the pages: enrolment, login challenge, backup codes,
regeneration, disabling, and the pending (password-only) state."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from werkzeug.test import TestResponse

from harness.services import require_component
from helpers import (
    PASSWORD,
    create_user,
    enroll,
    location_path,
    login,
    login_with_mfa,
    main_text,
    next_step_code,
    oathtool_code,
    page,
    text_of,
)
from qpki.audit.models import AuditEventRecord
from qpki.auth.models import MFASetupSession, User, UserSession
from qpki.clock import SteppedClock
from qpki.db.base import utcnow

INVALID_CODE = "Invalid verification code"
VERIFY = "/auth/mfa/verify"


# -- helpers local to this module -----------------------------------------------------------------


def mfa_enabled(app: Flask, user_id: int) -> bool:
    user = app.auth_manager.get_user(user_id=user_id)  # type: ignore[attr-defined]
    assert user is not None
    return bool(user.two_factor_enabled)


def audit_events(app: Flask, user_id: int, event: str) -> list[AuditEventRecord]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return list(
            s.scalars(
                select(AuditEventRecord)
                .where(AuditEventRecord.event == event)
                .where(AuditEventRecord.target_user_id == user_id)
                .order_by(AuditEventRecord.id)
            )
        )


def forget_last_step(app: Flask, user_id: int) -> None:
    """Let the next TOTP code through the replay guard (for tests not about replay)."""
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        s.execute(update(User).where(User.id == user_id).values(totp_last_step=None))


def wrong_code(secret: str) -> str:
    """A 6-digit code that is valid at none of the steps the server accepts now."""
    now = time.time()
    valid = {oathtool_code(secret, now + d) for d in (-60, -30, 0, 30, 60)}
    return next(
        c for c in ("000000", "111111", "222222", "333333", "444444", "555555") if c not in valid
    )


def cookie_value(app: Flask, client: FlaskClient) -> str | None:
    cookie = client.get_cookie(app.config["SESSION_COOKIE_NAME"])
    return cookie.value if cookie else None


def enrolled_user(
    app: Flask, username: str = "alice", role: str = "viewer"
) -> tuple[int, str, list[str]]:
    """A user with 2FA enabled through the pages; the enrolling session is logged out."""
    user = create_user(app, username, role=role)
    client = app.test_client()
    assert login(client, username).status_code == 302
    secret, codes = enroll(client)
    client.post("/auth/logout")
    return user.id, secret, codes


def password_step(client: FlaskClient, username: str, **extra: str) -> TestResponse:
    response = login(client, username, **extra)
    assert response.status_code == 302
    assert location_path(response) == VERIFY
    return response


def is_logged_in(client: FlaskClient) -> bool:
    response = client.get("/auth/profile")
    return response.status_code == 200


# -- enrolment ------------------------------------------------------------------------------------
def _zbarimg(png: bytes, tmp_path: Path) -> str:
    if shutil.which("zbarimg") is None:
        require_component("zbarimg", "`zbarimg` is not on PATH (Debian package zbar-tools)")
    image = tmp_path / "qr.png"
    image.write_bytes(png)
    out = subprocess.run(
        ["zbarimg", "--raw", "-q", str(image)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_full_enrolment_through_the_pages(app: Flask, client: FlaskClient, tmp_path: Path) -> None:
    user = create_user(app, "alice")
    login(client, "alice")

    setup = start_setup(client)
    assert setup.status_code == 200
    assert "no-store" in setup.headers.get("Cache-Control", "")
    soup = page(setup)
    secret_el = soup.find(id="mfa-secret")
    assert secret_el is not None
    shown = secret_el.get_text()
    secret = re.sub(r"\s+", "", shown)
    assert re.fullmatch(r"[A-Z2-7]{32}", secret), shown
    assert re.search(r"[A-Z2-7]{4} [A-Z2-7]{4}", shown), "the key is grouped in fours"

    img = soup.find("img", id="mfa-qr")
    assert img is not None
    src = img["src"]
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    png = base64.b64decode(src[len(prefix) :])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = _zbarimg(png, tmp_path)
    assert decoded == f"otpauth://totp/qPKI:alice?secret={secret}&issuer=qPKI"

    # A wrong code: refused with the spec's message, 2FA stays off.
    right = oathtool_code(secret)
    refused = client.post("/auth/mfa/setup", data={"code": wrong_code(secret)})
    assert INVALID_CODE in main_text(refused)
    assert not mfa_enabled(app, user.id)
    assert page(refused).find(id="backup-codes") is None

    # The right code (from oathtool, an independent authenticator) enables 2FA.
    done = client.post("/auth/mfa/setup", data={"code": right})
    assert done.status_code == 200
    assert "no-store" in done.headers.get("Cache-Control", "")
    items = page(done).select("#backup-codes .backup-code")
    assert len(items) == 8
    codes = [li.get_text(strip=True) for li in items]
    assert len(set(codes)) == 8
    for code in codes:
        assert re.fullmatch(r"[A-HJKMNP-Z2-9]{4}-[A-HJKMNP-Z2-9]{4}", code), code
    assert mfa_enabled(app, user.id)

    profile = client.get("/auth/profile")
    assert page(profile).find(id="mfa-status").get_text(strip=True) == "Enabled"
    assert audit_events(app, user.id, "mfa_setup_started")
    assert audit_events(app, user.id, "mfa_enabled")


def start_setup(client: FlaskClient) -> TestResponse:
    """Press "Start setup" (with the password: a step-up action) and open the setup page."""
    first = client.get("/auth/mfa/setup")
    assert first.status_code == 200 and page(first).find(id="mfa-secret") is None
    assert page(first).find(id="mfa-setup-start") is not None
    started = client.post("/auth/mfa/setup/start", data={"password": PASSWORD})
    assert location_path(started) == "/auth/mfa/setup"
    return client.get("/auth/mfa/setup")


def test_setup_page_get_changes_nothing(app: Flask, client: FlaskClient) -> None:
    """Reloading the setup page shows the same pending secret and writes no audit row."""
    create_user(app, "alice")
    login(client, "alice")
    shown = page(start_setup(client)).find(id="mfa-secret").get_text()
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        events_before = app.auth_manager.audit.count(s)  # type: ignore[attr-defined]
    for _ in range(5):
        again = client.get("/auth/mfa/setup")
        assert page(again).find(id="mfa-secret").get_text() == shown
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        assert app.auth_manager.audit.count(s) == events_before  # type: ignore[attr-defined]


def test_starting_a_setup_needs_the_password(app: Flask, client: FlaskClient) -> None:
    """A copied cookie of a user without 2FA cannot enrol the attacker's authenticator."""
    create_user(app, "alice")
    login(client, "alice")
    refused = client.post("/auth/mfa/setup/start", data={"password": "not the password!"})
    assert location_path(refused) == "/auth/mfa/setup"
    assert page(client.get("/auth/mfa/setup")).find(id="mfa-secret") is None
    bare = client.post("/auth/mfa/setup/start")
    assert location_path(bare) == "/auth/reauth"
    assert page(client.get("/auth/mfa/setup")).find(id="mfa-secret") is None


def test_enabling_2fa_ends_the_other_sessions(app: Flask, client: FlaskClient) -> None:
    create_user(app, "alice")
    other = app.test_client()
    login(other, "alice")
    assert other.get("/auth/profile").status_code == 200
    login(client, "alice")
    enroll(client)
    assert client.get("/auth/profile").status_code == 200
    assert location_path(other.get("/auth/profile")) == "/auth/login"


def test_profile_shows_disabled_before_enrolment(app: Flask, client: FlaskClient) -> None:
    create_user(app, "alice")
    login(client, "alice")
    profile = client.get("/auth/profile")
    assert page(profile).find(id="mfa-status").get_text(strip=True) == "Disabled"


def test_expired_setup_is_refused(app: Flask, client: FlaskClient) -> None:
    user = create_user(app, "alice")
    login(client, "alice")
    setup = start_setup(client)
    secret = re.sub(r"\s+", "", page(setup).find(id="mfa-secret").get_text())
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        row = s.scalar(select(MFASetupSession).where(MFASetupSession.user_id == user.id))
        assert row is not None
        row.expires_at = utcnow() - timedelta(minutes=1)

    response = client.post("/auth/mfa/setup", data={"code": oathtool_code(secret)})
    assert "Setup session expired" in main_text(response)
    assert page(response).find(id="backup-codes") is None
    assert not mfa_enabled(app, user.id)


def test_setup_is_not_restarted_once_enabled(app: Flask) -> None:
    user_id, secret, _codes = enrolled_user(app)
    client = app.test_client()
    assert login_with_mfa(client, "alice", next_step_code(secret)).status_code == 302
    # With 2FA on, the page offers to reconfigure the app (issue 11), starting nothing on GET.
    response = client.get("/auth/mfa/setup")
    assert response.status_code == 200 and page(response).find(id="mfa-secret") is None
    assert mfa_enabled(app, user_id)
    # The enrolled secret still works: nothing was replaced by visiting the page.
    forget_last_step(app, user_id)
    assert login_with_mfa(app.test_client(), "alice", oathtool_code(secret)).status_code == 302


# -- login with a TOTP code -----------------------------------------------------------------------
def test_totp_login_replaces_the_session(app: Flask) -> None:
    user_id, secret, _codes = enrolled_user(app)
    client = app.test_client()
    password_step(client, "alice")
    pending_cookie = cookie_value(app, client)
    assert pending_cookie

    response = client.post(VERIFY, data={"code": next_step_code(secret)})
    assert response.status_code == 302
    assert location_path(response) == "/"
    assert cookie_value(app, client) not in (None, pending_cookie)
    home = client.get("/")
    assert home.status_code == 200
    assert "alice" in main_text(home)
    success = audit_events(app, user_id, "mfa_verify_success")
    assert success and '"totp"' in success[-1].details


def test_pending_state_opens_nothing_but_verify(app: Flask) -> None:
    enrolled_user(app, role="admin")
    client = app.test_client()
    password_step(client, "alice")
    for path in ("/", "/auth/profile", "/admin/users", "/admin/audit", "/auth/mfa/setup"):
        response = client.get(path)
        assert response.status_code == 302, path
        assert location_path(response) == VERIFY, path
    blocked = client.post("/auth/mfa/backup-codes/regenerate", data={"password": PASSWORD})
    assert blocked.status_code == 302
    assert location_path(blocked) in (VERIFY, "/auth/login")
    assert client.get(VERIFY).status_code == 200


def test_wrong_code_keeps_the_login_pending(app: Flask) -> None:
    _uid, secret, _codes = enrolled_user(app)
    client = app.test_client()
    password_step(client, "alice")
    right = next_step_code(secret)
    response = client.post(VERIFY, data={"code": wrong_code(secret)})
    assert INVALID_CODE in main_text(response)
    assert not is_logged_in(client)
    assert client.post(VERIFY, data={"code": right}).status_code == 302
    assert is_logged_in(client)


def test_replayed_totp_code_is_refused(app: Flask) -> None:
    user_id, secret, _codes = enrolled_user(app)
    code = next_step_code(secret)
    first = app.test_client()
    assert login_with_mfa(first, "alice", code).status_code == 302
    assert is_logged_in(first)

    second = app.test_client()
    replay = login_with_mfa(second, "alice", code)
    assert "That code was just used. Wait for the next code in your app." in main_text(replay)
    assert not is_logged_in(second)
    failures = audit_events(app, user_id, "mfa_verify_failure")
    assert failures and '"replay"' in failures[-1].details


def test_code_from_two_steps_ago_is_refused_one_step_ago_accepted(
    make_app: Callable[..., Flask],
) -> None:
    """The ±1 step window, on an app whose clock the test holds still: 10 s into a step, so
    "two steps ago" cannot slide to "one step ago" while the test runs."""
    clock = SteppedClock(datetime(2026, 6, 1, 12, 0, 10, tzinfo=UTC))
    app = make_app(clock=clock)
    user = create_user(app, "alice")
    enrolling = app.test_client()
    assert login(enrolling, "alice").status_code == 302
    secret, _codes = enroll(enrolling, at=clock.now)
    clock.advance(seconds=60)  # past the confirming code's step
    client = app.test_client()
    old = login_with_mfa(client, "alice", oathtool_code(secret, clock.now - timedelta(seconds=60)))
    assert INVALID_CODE in main_text(old)
    assert not is_logged_in(client)
    previous = client.post(
        VERIFY, data={"code": oathtool_code(secret, clock.now - timedelta(seconds=30))}
    )
    assert previous.status_code == 302
    assert is_logged_in(client)
    assert user.id


def test_next_from_the_password_step_is_honoured_after_2fa(app: Flask) -> None:
    _uid, secret, _codes = enrolled_user(app)
    client = app.test_client()
    password_step(client, "alice", next="/auth/mfa/backup-codes")
    response = client.post(VERIFY, data={"code": next_step_code(secret)})
    assert response.status_code == 302
    assert location_path(response) == "/auth/mfa/backup-codes"


def test_totp_code_typed_as_apps_show_it_is_accepted(app: Flask) -> None:
    """Authenticator apps display "123 456"; the product classifies that as a TOTP code."""
    _uid, secret, _codes = enrolled_user(app)
    client = app.test_client()
    code = next_step_code(secret)
    response = login_with_mfa(client, "alice", f"{code[:3]} {code[3:]}")
    assert response.status_code == 302, main_text(response)
    assert is_logged_in(client)


def test_evil_next_is_dropped_after_2fa(app: Flask) -> None:
    _uid, secret, _codes = enrolled_user(app)
    client = app.test_client()
    password_step(client, "alice", next="//evil.example/x")
    response = client.post(VERIFY, data={"code": next_step_code(secret)})
    assert location_path(response) == "/"


# -- backup codes ---------------------------------------------------------------------------------
def _variants(code: str, index: int) -> str:
    """The same backup code typed in different ways."""
    plain = code.replace("-", "")
    forms = [
        code.lower(),
        plain,
        f"{plain[:4]} {plain[4:]}",
        plain.lower(),
        f"  {code}  ",
        code,
        f"{code[:2]} {code[2:]}".lower(),
        " ".join(plain),
    ]
    return forms[index % len(forms)]


def test_each_backup_code_works_exactly_once(app: Flask) -> None:
    user_id, _secret, codes = enrolled_user(app)
    for index, code in enumerate(codes):
        client = app.test_client()
        response = login_with_mfa(client, "alice", _variants(code, index))
        assert response.status_code == 302, (index, main_text(response))
        shown = text_of(client.get(response.headers["Location"]))
        remaining = 7 - index
        noun = "code" if remaining == 1 else "codes"
        assert f"{remaining} backup {noun} remaining" in shown, shown
        assert is_logged_in(client)
        if index == 4:  # three left: the codes page shows the count
            codes_page = client.get("/auth/mfa/backup-codes")
            assert codes_page.status_code == 200
            count = page(codes_page).find(id="backup-codes-remaining")
            assert count is not None and count.get_text(strip=True) == "3"

    used = audit_events(app, user_id, "backup_code_used")
    assert len(used) == 8
    assert '"remaining":0' in used[-1].details

    for index, code in enumerate(codes[:3]):
        client = app.test_client()
        reuse = login_with_mfa(client, "alice", _variants(code, index + 1))
        assert "Backup code already used" in main_text(reuse)
        assert not is_logged_in(client)


def test_backup_code_login_with_few_left_prompts_to_regenerate(app: Flask) -> None:
    _uid, _secret, codes = enrolled_user(app)
    for code in codes[:4]:
        assert login_with_mfa(app.test_client(), "alice", code).status_code == 302
    client = app.test_client()
    response = login_with_mfa(client, "alice", codes[4])
    assert response.status_code == 302
    assert location_path(response) == "/auth/mfa/backup-codes"
    shown = client.get("/auth/mfa/backup-codes")
    assert page(shown).find(id="backup-codes-remaining").get_text(strip=True) == "3"
    assert "3 backup codes remaining" in main_text(shown)
    assert page(shown).find("form", action="/auth/mfa/backup-codes/regenerate") is not None


def _regenerate_form_data(client: FlaskClient, secret: str) -> dict[str, str]:
    form_page = client.get("/auth/mfa/backup-codes")
    assert form_page.status_code == 200
    data = {"password": PASSWORD}
    form = page(form_page).find("form", action="/auth/mfa/backup-codes/regenerate")
    assert form is not None
    if form.find("input", attrs={"name": "code"}) is not None:
        data["code"] = next_step_code(secret)
    return data


def test_regenerate_replaces_every_code(app: Flask) -> None:
    user_id, secret, old_codes = enrolled_user(app)
    client = app.test_client()
    assert login_with_mfa(client, "alice", old_codes[0]).status_code == 302
    before = page(client.get("/auth/mfa/backup-codes")).find(id="backup-codes-remaining")
    assert before.get_text(strip=True) == "7"

    wrong = client.post(
        "/auth/mfa/backup-codes/regenerate", data={"password": "not my passphrase at all"}
    )
    assert page(wrong).find(id="backup-codes") is None
    assert login_with_mfa(app.test_client(), "alice", old_codes[1]).status_code == 302

    response = client.post(
        "/auth/mfa/backup-codes/regenerate", data=_regenerate_form_data(client, secret)
    )
    assert response.status_code == 200, main_text(response)
    assert "no-store" in response.headers.get("Cache-Control", "")
    new_codes = [
        li.get_text(strip=True) for li in page(response).select("#backup-codes .backup-code")
    ]
    assert len(new_codes) == 8
    assert not set(new_codes) & set(old_codes)
    after = page(client.get("/auth/mfa/backup-codes")).find(id="backup-codes-remaining")
    assert after.get_text(strip=True) == "8"
    assert audit_events(app, user_id, "backup_codes_regenerated")

    for old in (old_codes[2], old_codes[7], old_codes[0]):
        other = app.test_client()
        refused = login_with_mfa(other, "alice", old)
        assert INVALID_CODE in main_text(refused)
        assert not is_logged_in(other)
    fresh = app.test_client()
    assert login_with_mfa(fresh, "alice", new_codes[3]).status_code == 302
    assert is_logged_in(fresh)


# -- disabling ------------------------------------------------------------------------------------
def test_disable_needs_the_right_password(app: Flask) -> None:
    user_id, secret, _codes = enrolled_user(app)
    client = app.test_client()
    assert login_with_mfa(client, "alice", next_step_code(secret)).status_code == 302

    refused = client.post(
        "/auth/mfa/disable", data={"password": "not my passphrase at all"}, follow_redirects=True
    )
    assert "Password is incorrect" in main_text(refused)
    assert mfa_enabled(app, user_id)
    assert not audit_events(app, user_id, "mfa_disabled") or all(
        e.outcome == "failure" for e in audit_events(app, user_id, "mfa_disabled")
    )

    done = client.post("/auth/mfa/disable", data={"password": PASSWORD})
    assert done.status_code == 302
    assert not mfa_enabled(app, user_id)
    assert any(e.outcome == "success" for e in audit_events(app, user_id, "mfa_disabled"))
    assert page(client.get("/auth/profile")).find(id="mfa-status").get_text(strip=True) == (
        "Disabled"
    )

    after = app.test_client()
    response = login(after, "alice")
    assert response.status_code == 302
    assert location_path(response) == "/"
    assert is_logged_in(after)


def test_disable_ends_other_sessions(app: Flask) -> None:
    _uid, secret, codes = enrolled_user(app)
    other = app.test_client()
    assert login_with_mfa(other, "alice", codes[0]).status_code == 302
    client = app.test_client()
    assert login_with_mfa(client, "alice", next_step_code(secret)).status_code == 302
    assert client.post("/auth/mfa/disable", data={"password": PASSWORD}).status_code == 302
    assert is_logged_in(client)
    assert not is_logged_in(other)


# -- forged, replayed and stale pending state -----------------------------------------------------
def test_copied_pending_cookie_is_useless_after_the_login_completed(app: Flask) -> None:
    _uid, secret, _codes = enrolled_user(app)
    name = app.config["SESSION_COOKIE_NAME"]
    victim = app.test_client()
    password_step(victim, "alice")
    stolen = cookie_value(app, victim)
    assert stolen

    assert victim.post(VERIFY, data={"code": next_step_code(secret)}).status_code == 302
    assert is_logged_in(victim)

    attacker = app.test_client()
    attacker.set_cookie(name, stolen)
    for path in ("/", "/auth/profile"):
        response = attacker.get(path)
        assert response.status_code == 302
        assert location_path(response) == "/auth/login"
    attacker.set_cookie(name, stolen)
    verify = attacker.get(VERIFY)
    assert verify.status_code == 302
    assert location_path(verify) == "/auth/login"
    attacker.set_cookie(name, stolen)
    forget_last_step(app, _uid)
    attempt = attacker.post(VERIFY, data={"code": oathtool_code(secret)})
    assert attempt.status_code == 302
    assert location_path(attempt) == "/auth/login"
    assert not is_logged_in(attacker)


def test_pending_login_expires_after_five_minutes(app: Flask) -> None:
    user_id, secret, _codes = enrolled_user(app)
    client = app.test_client()
    password_step(client, "alice")
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        s.execute(
            update(UserSession)
            .where(UserSession.user_id == user_id, UserSession.mfa_passed.is_(False))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    response = client.post(VERIFY, data={"code": next_step_code(secret)})
    assert response.status_code == 302
    assert location_path(response) == "/auth/login"
    assert not is_logged_in(client)
    assert client.get("/").status_code == 302
    assert location_path(client.get("/")) == "/auth/login"


def test_pending_row_lifetime_is_five_minutes(app: Flask) -> None:
    user_id, _secret, _codes = enrolled_user(app)
    password_step(app.test_client(), "alice")
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        row = s.scalar(
            select(UserSession).where(
                UserSession.user_id == user_id, UserSession.mfa_passed.is_(False)
            )
        )
        assert row is not None
        assert row.expires_at - row.created_at <= timedelta(minutes=5)


def test_made_up_session_id_opens_nothing(app: Flask) -> None:
    _uid, secret, _codes = enrolled_user(app)
    client = app.test_client()
    with client.session_transaction() as s:
        s["sid"] = "forged"
    for path in ("/", "/auth/profile", VERIFY):
        response = client.get(path)
        assert response.status_code == 302, path
        assert location_path(response) == "/auth/login", path
        with client.session_transaction() as s:
            s["sid"] = "forged"
    attempt = client.post(VERIFY, data={"code": next_step_code(secret)})
    assert attempt.status_code == 302
    assert location_path(attempt) == "/auth/login"
    assert not is_logged_in(client)


def test_verify_page_without_pending_login_sends_to_login(app: Flask, client: FlaskClient) -> None:
    response = client.get(VERIFY)
    assert response.status_code == 302
    assert location_path(response) == "/auth/login"
    posted = client.post(VERIFY, data={"code": "123456"})
    assert posted.status_code == 302
    assert location_path(posted) == "/auth/login"


def test_logout_from_pending_state_ends_it(app: Flask) -> None:
    _uid, secret, _codes = enrolled_user(app)
    client = app.test_client()
    password_step(client, "alice")
    pending = cookie_value(app, client)
    assert client.post("/auth/logout").status_code == 302
    client.set_cookie(app.config["SESSION_COOKIE_NAME"], pending or "")
    response = client.post(VERIFY, data={"code": next_step_code(secret)})
    assert response.status_code == 302
    assert location_path(response) == "/auth/login"
    assert not is_logged_in(client)


@pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdefghij", "ZZZZ-ZZZZ"])
def test_malformed_codes_are_refused(app: Flask, code: str) -> None:
    _enrolled = enrolled_user(app)
    client = app.test_client()
    password_step(client, "alice")
    response = client.post(VERIFY, data={"code": code})
    assert response.status_code != 302
    assert not is_logged_in(client)


def test_stale_login_must_add_a_code_for_sensitive_changes(app: Flask) -> None:
    user_id, secret, codes = enrolled_user(app)
    client = app.test_client()
    assert login_with_mfa(client, "alice", codes[0]).status_code == 302
    fresh_form = page(client.get("/auth/mfa/backup-codes"))
    assert fresh_form.find("input", attrs={"name": "code"}) is None  # fresh: password only
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        s.execute(
            update(UserSession)
            .where(UserSession.user_id == user_id, UserSession.ended_at.is_(None))
            .values(reauth_at=utcnow() - timedelta(minutes=11))
        )
    stale_form = page(client.get("/auth/mfa/backup-codes"))
    assert stale_form.find("input", attrs={"name": "code"}) is not None
    assert page(client.get("/auth/profile")).find("input", attrs={"name": "code"}) is not None

    url = "/auth/mfa/backup-codes/regenerate"
    no_code = client.post(url, data={"password": PASSWORD}, follow_redirects=True)
    assert page(no_code).find(id="backup-codes") is None
    assert "verification code" in main_text(no_code)
    refused = client.post(url, data={"password": PASSWORD, "code": wrong_code(secret)})
    assert page(refused).find(id="backup-codes") is None
    disable = client.post("/auth/mfa/disable", data={"password": PASSWORD})
    assert disable.status_code == 302
    assert mfa_enabled(app, user_id)

    done = client.post(url, data={"password": PASSWORD, "code": next_step_code(secret)})
    assert done.status_code == 200
    assert len(page(done).select("#backup-codes .backup-code")) == 8
