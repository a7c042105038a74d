"""AuthManager use cases against a real database: SQLite and PostgreSQL (db_url fixture)."""

from __future__ import annotations

from datetime import timedelta

import pyotp
import pytest
from flask import Flask
from sqlalchemy import select, text

from helpers import PASSWORD, create_user, enable_mfa, oathtool_code
from qpki.audit.context import request_context
from qpki.audit.models import AuditEventRecord
from qpki.auth.auth_manager import AuthManager
from qpki.auth.errors import (
    AccountLocked,
    AccountThrottled,
    InvalidCredentials,
    MFAError,
    PermissionDenied,
    SecretUnavailable,
    ValidationFailed,
)
from qpki.auth.models import MFASetupSession, User, UserSession
from qpki.db.base import utcnow


def manager(app: Flask) -> AuthManager:
    return app.auth_manager  # type: ignore[attr-defined,no-any-return]


def events(app: Flask, name: str) -> list[AuditEventRecord]:
    with manager(app).db.transaction(write=False) as s:
        return list(s.scalars(select(AuditEventRecord).where(AuditEventRecord.event == name)))


# -- users and passwords -------------------------------------------------------------------------
def test_create_and_get_user_case_insensitive(any_app: Flask) -> None:
    user = create_user(any_app, "Alice", "operator")
    found = manager(any_app).get_user(username="aLiCe")
    assert found is not None and found.id == user.id and found.role == "operator"
    assert manager(any_app).get_user(email="ALICE@example.org").id == user.id
    with pytest.raises(ValidationFailed, match="already exists"):
        create_user(any_app, "ALICE")


def test_password_is_stored_as_argon2id(any_app: Flask) -> None:
    user = create_user(any_app, "bob")
    with manager(any_app).db.transaction(write=False) as s:
        stored = s.scalar(select(User.password_hash).where(User.id == user.id))
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


@pytest.mark.parametrize(
    "password, message",
    [("short pass", "at least 12"), ("password1234", "too common"), ("alice-the-user", "same as")],
)
def test_password_rules(app: Flask, password: str, message: str) -> None:
    with pytest.raises(ValidationFailed, match=message):
        manager(app).create_user("alice-the-user", password)
    assert manager(app).get_user(username="alice-the-user") is None


def test_invalid_usernames_refused(app: Flask) -> None:
    for bad in ["ab", "with space", "colon:name", "x" * 65, "new\nline", ""]:
        with pytest.raises(ValidationFailed):
            manager(app).create_user(bad, PASSWORD)
    assert manager(app).count_users() == 0


def test_authenticate_uniform_failures(any_app: Flask) -> None:
    create_user(any_app, "carol")
    inactive = create_user(any_app, "dave")
    manager(any_app).set_active(None, inactive.id, False)
    messages = []
    for username, password in [
        ("nobody", PASSWORD),
        ("carol", "wrong password!!"),
        ("dave", PASSWORD),
    ]:
        with pytest.raises(InvalidCredentials) as exc:
            manager(any_app).authenticate(username, password)
        messages.append(exc.value.message)
    assert messages == ["Invalid username or password"] * 3
    reasons = sorted(e.details for e in events(any_app, "login_failure"))
    assert len(reasons) == 3 and all(PASSWORD not in r for r in reasons)


def test_unknown_user_costs_a_hash(app: Flask) -> None:
    calls: list[str] = []
    real = manager(app).passwords.hasher

    class Spy:
        def verify(self, stored: str, password: str) -> bool:
            calls.append(stored)
            return real.verify(stored, password)

    manager(app).passwords.hasher = Spy()  # type: ignore[assignment]
    with pytest.raises(InvalidCredentials):
        manager(app).authenticate("ghost", PASSWORD)
    assert len(calls) == 1 and calls[0].startswith("$argon2id$")


def test_rehash_on_login_when_parameters_change(app: Flask) -> None:
    from argon2 import PasswordHasher

    user = create_user(app, "erin")
    stronger = PasswordHasher(time_cost=2, memory_cost=8192, parallelism=1)
    manager(app).passwords.hasher = stronger
    manager(app).authenticate("erin", PASSWORD)
    stored = manager(app).get_user(user_id=user.id).password_hash
    assert "t=2" in stored and not stronger.check_needs_rehash(stored)


# -- account throttling ---------------------------------------------------------------------------
def test_backoff_after_five_failures_then_bounded(any_app: Flask) -> None:
    create_user(any_app, "frank")
    now = utcnow()
    for _ in range(5):
        with pytest.raises(InvalidCredentials):
            manager(any_app).authenticate("frank", "wrong password!!", now=now)
    with pytest.raises(AccountThrottled) as exc:
        manager(any_app).authenticate("frank", PASSWORD, now=now + timedelta(seconds=5))
    assert "Try again in" in exc.value.message
    assert exc.value.retry_at == now + timedelta(seconds=30)
    # after the wait the right password works and resets the count
    user = manager(any_app).authenticate("frank", PASSWORD, now=now + timedelta(seconds=31))
    assert user.username == "frank"
    assert manager(any_app).list_users()[0].failures == 5  # password-only success for non-2FA...
    manager(any_app).login("frank", PASSWORD, now=now + timedelta(seconds=32))
    assert manager(any_app).list_users()[0].failures == 0


def test_unknown_names_throttle_like_real_ones(app: Flask) -> None:
    now = utcnow()
    for _ in range(5):
        with pytest.raises(InvalidCredentials):
            manager(app).authenticate("no-such-user", "whatever password", now=now)
    with pytest.raises(AccountThrottled, match="Try again in 30 seconds"):
        manager(app).authenticate("no-such-user", "whatever password", now=now)


def test_hard_lock_after_100_failures_until_unlocked(app: Flask) -> None:
    user = create_user(app, "grace")
    secret, _ = enable_mfa(app, user.id)
    start = utcnow()
    now = start
    for _ in range(100):
        ok, _msg = manager(app).verify_mfa_code(user.id, "000000", now=now)
        assert not ok
        now += timedelta(minutes=16)  # always past the back-off
    right = pyotp.TOTP(secret).at(now)
    ok, message = manager(app).verify_mfa_code(user.id, right, now=now)
    assert not ok and "locked" in message
    with pytest.raises(AccountLocked):
        manager(app).authenticate("grace", PASSWORD, now=now)
    assert [r.locked for r in manager(app).list_users()] == [True]
    assert len(events(app, "account_locked")) == 1
    assert manager(app).unlock_user(None, user.id, actor_name="cli")
    ok, _ = manager(app).verify_mfa_code(user.id, right, now=now)
    assert ok


# -- enrolment -----------------------------------------------------------------------------------
def test_setup_needs_valid_code_within_15_minutes(any_app: Flask) -> None:
    user = create_user(any_app, "heidi")
    now = utcnow()
    setup = manager(any_app).start_mfa_setup(user.id, now=now)
    assert len(setup.secret) == 32 and setup.provisioning_uri.startswith(
        "otpauth://totp/qPKI:heidi?"
    )
    with pytest.raises(MFAError, match="Invalid verification code"):
        manager(any_app).confirm_mfa_setup(
            user.id, "123456" if pyotp.TOTP(setup.secret).at(now) != "123456" else "654321", now=now
        )
    assert not manager(any_app).get_user(user_id=user.id).two_factor_enabled
    late = now + timedelta(minutes=15, seconds=1)
    with pytest.raises(MFAError, match="Setup session expired"):
        manager(any_app).confirm_mfa_setup(user.id, pyotp.TOTP(setup.secret).at(late), now=late)
    fresh = manager(any_app).get_user(user_id=user.id)
    assert not fresh.two_factor_enabled and fresh.totp_secret is None


def test_setup_stores_only_encrypted_data_and_one_pending_row(any_app: Flask) -> None:
    user = create_user(any_app, "ivan")
    manager(any_app).start_mfa_setup(user.id)
    setup = manager(any_app).start_mfa_setup(user.id)  # replaces the first
    with manager(any_app).db.transaction(write=False) as s:
        rows = list(s.scalars(select(MFASetupSession)))
    assert len(rows) == 1 and setup.secret not in rows[0].secret
    codes = manager(any_app).confirm_mfa_setup(user.id, oathtool_code(setup.secret))
    assert len(codes) == 8 and len(set(codes)) == 8
    stored = manager(any_app).get_user(user_id=user.id)
    assert stored.two_factor_enabled
    assert setup.secret not in stored.totp_secret and stored.totp_secret.startswith("gAAAAA")
    assert all(
        c not in stored.backup_codes and c.replace("-", "") not in stored.backup_codes
        for c in codes
    )
    with manager(any_app).db.transaction(write=False) as s:
        assert s.scalar(select(MFASetupSession).where(MFASetupSession.user_id == user.id)) is None
    names = [e.event for e in events(any_app, "mfa_enabled")]
    assert names == ["mfa_enabled"]


def test_expired_setup_rows_are_removed(any_app: Flask) -> None:
    a, b = create_user(any_app, "judy"), create_user(any_app, "karl")
    old = utcnow() - timedelta(hours=1)
    manager(any_app).start_mfa_setup(a.id, now=old)
    manager(any_app).start_mfa_setup(b.id)  # deletes expired rows of everyone
    with manager(any_app).db.transaction(write=False) as s:
        assert [r.user_id for r in s.scalars(select(MFASetupSession))] == [b.id]
    manager(any_app).start_mfa_setup(a.id, now=old)
    assert manager(any_app).cleanup()["setup_sessions"] == 1


# -- verification -------------------------------------------------------------------------------
def test_verify_totp_once_and_not_older_steps(any_app: Flask) -> None:
    user = create_user(any_app, "lena")
    secret, _ = enable_mfa(any_app, user.id)
    now = utcnow() + timedelta(minutes=1)
    code = pyotp.TOTP(secret).at(now)
    assert manager(any_app).verify_mfa_code(user.id, code, now=now) == (
        True,
        "Verification successful",
    )
    assert manager(any_app).verify_mfa_code(user.id, code, now=now) == (
        False,
        "Invalid verification code",  # the seed API keeps its message,
    )
    older = pyotp.TOTP(secret).at(now - timedelta(seconds=30))
    assert manager(any_app).verify_mfa_code(user.id, older, now=now)[0] is False
    reasons = [e.details for e in events(any_app, "mfa_verify_failure")]
    assert any('"replay"' in r for r in reasons)
    later = now + timedelta(seconds=30)
    assert manager(any_app).verify_mfa_code(user.id, pyotp.TOTP(secret).at(later), now=later)[0]


def test_verify_window_is_plus_minus_one_step(app: Flask) -> None:
    user = create_user(app, "mona")
    secret, _ = enable_mfa(app, user.id)
    base = utcnow() + timedelta(minutes=5)
    totp = pyotp.TOTP(secret)
    assert not manager(app).verify_mfa_code(
        user.id, totp.at(base - timedelta(seconds=60)), now=base
    )[0]
    assert not manager(app).verify_mfa_code(
        user.id, totp.at(base + timedelta(seconds=60)), now=base
    )[0]
    assert manager(app).verify_mfa_code(user.id, totp.at(base + timedelta(seconds=30)), now=base)[0]


def test_backup_codes_single_use_and_formats(any_app: Flask) -> None:
    user = create_user(any_app, "nina")
    _, codes = enable_mfa(any_app, user.id)
    variants = [codes[0], codes[1].lower(), codes[2].replace("-", ""), codes[3].replace("-", " ")]
    for i, variant in enumerate(variants):
        ok, message = manager(any_app).verify_mfa_code(user.id, variant)
        assert ok, message
        assert message == f"Backup code accepted. {7 - i} backup codes remaining." or (
            7 - i == 1 and message.endswith("1 backup code remaining.")
        )
    assert manager(any_app).verify_mfa_code(user.id, codes[0]) == (
        False,
        "Backup code already used",
    )
    assert manager(any_app).get_backup_codes_info(user.id).remaining == 4
    assert manager(any_app).verify_mfa_code(user.id, "ZZZZ-ZZZZ") == (
        False,
        "Invalid verification code",
    )
    assert len(events(any_app, "backup_code_used")) == 4


def test_mfa_not_enabled_message(app: Flask) -> None:
    user = create_user(app, "omar")
    assert manager(app).verify_mfa_code(user.id, "123456") == (False, "MFA not enabled")
    assert manager(app).verify_mfa_code(9999, "123456") == (False, "MFA not enabled")


def test_regenerate_invalidates_old_codes(any_app: Flask) -> None:
    user = create_user(any_app, "pia")
    _secret, old = enable_mfa(any_app, user.id)
    with pytest.raises(ValidationFailed):
        manager(any_app).regenerate_backup_codes(
            user.id, "not my password!", mfa_verified_at=utcnow()
        )
    with pytest.raises(ValidationFailed, match="verification code"):
        manager(any_app).regenerate_backup_codes(user.id, PASSWORD)  # not fresh: code required
    new = manager(any_app).regenerate_backup_codes(user.id, PASSWORD, mfa_verified_at=utcnow())
    assert set(new).isdisjoint(old)
    assert manager(any_app).verify_mfa_code(user.id, old[0]) == (False, "Invalid verification code")
    assert manager(any_app).verify_mfa_code(user.id, new[0])[0]
    assert len(events(any_app, "backup_codes_regenerated")) >= 1


def test_disable_needs_password_and_clears_everything(any_app: Flask) -> None:
    user = create_user(any_app, "quinn")
    secret, _ = enable_mfa(any_app, user.id)
    with pytest.raises(ValidationFailed):
        manager(any_app).disable_mfa(user.id, "wrong password!!", mfa_verified_at=utcnow())
    assert manager(any_app).get_user(user_id=user.id).two_factor_enabled
    code = pyotp.TOTP(secret).at(utcnow() + timedelta(seconds=30))
    manager(any_app).disable_mfa(user.id, PASSWORD, code)
    stored = manager(any_app).get_user(user_id=user.id)
    assert (
        not stored.two_factor_enabled and stored.totp_secret is None and stored.backup_codes is None
    )
    assert [e.outcome for e in events(any_app, "mfa_disabled")] == ["success"]
    # the wrong password is a failed step-up: audited, and counted on the throttle
    (refused,) = events(any_app, "reauth_failure")
    assert refused.outcome == "failure" and "bad_password" in refused.details


def test_admin_disable_requires_admin_and_reason(any_app: Flask) -> None:
    admin = create_user(any_app, "root-admin", "admin")
    enable_mfa(any_app, admin.id)  # an administrator acts on other accounts only with 2FA
    viewer = create_user(any_app, "viewer1")
    target = create_user(any_app, "rosa")
    enable_mfa(any_app, target.id)
    token = manager(any_app).login("rosa", PASSWORD).token
    with pytest.raises(PermissionDenied):
        manager(any_app).admin_disable_mfa(viewer.id, target.id, "lost phone")
    with pytest.raises(ValidationFailed):
        manager(any_app).admin_disable_mfa(admin.id, target.id, "   ")
    assert manager(any_app).get_user(user_id=target.id).two_factor_enabled
    with request_context(ip="10.1.2.3", user_agent="test"):
        manager(any_app).admin_disable_mfa(admin.id, target.id, "lost phone, ID checked")
    assert not manager(any_app).get_user(user_id=target.id).two_factor_enabled
    assert manager(any_app).resolve_session(token) is None
    (event,) = events(any_app, "mfa_admin_disabled")
    assert event.actor_name == "root-admin" and event.target_name == "rosa"
    assert "lost phone, ID checked" in event.details and event.ip == "10.1.2.3"
    assert len(events(any_app, "access_denied")) == 1


def test_get_user_usable_after_session_closes(any_app: Flask) -> None:
    user = create_user(any_app, "sam")
    fetched = manager(any_app).get_user(user_id=user.id)
    assert fetched.two_factor_enabled is False and fetched.username == "sam"


# -- sessions ------------------------------------------------------------------------------------
def test_login_sessions_pending_then_full(any_app: Flask) -> None:
    user = create_user(any_app, "tina")
    secret, _ = enable_mfa(any_app, user.id)
    result = manager(any_app).login("tina", PASSWORD)
    assert result.mfa_required
    user_row = manager(any_app).resolve_session(result.token)
    assert user_row is not None and user_row[1].mfa_passed is False
    code = pyotp.TOTP(secret).at(utcnow() + timedelta(seconds=30))
    done = manager(any_app).complete_mfa_login(result.token, code)
    assert done.success and done.token and done.token != result.token
    assert manager(any_app).resolve_session(result.token) is None  # pending token is dead
    assert manager(any_app).resolve_session(done.token)[1].mfa_passed is True
    again = manager(any_app).complete_mfa_login(result.token, code)
    assert not again.success


def test_pending_login_expires_after_five_minutes(app: Flask) -> None:
    user = create_user(app, "uma")
    secret, _ = enable_mfa(app, user.id)
    start = utcnow()
    result = manager(app).login("uma", PASSWORD, now=start)
    late = start + timedelta(minutes=5, seconds=1)
    done = manager(app).complete_mfa_login(result.token, pyotp.TOTP(secret).at(late), now=late)
    assert not done.success and "timed out" in done.message


def test_idle_and_absolute_timeouts(app: Flask) -> None:
    create_user(app, "vic")
    start = utcnow()
    token = manager(app).login("vic", PASSWORD, now=start).token
    assert manager(app).resolve_session(token, now=start + timedelta(minutes=29)) is not None
    assert manager(app).resolve_session(token, now=start + timedelta(minutes=58)) is not None
    assert manager(app).resolve_session(token, now=start + timedelta(minutes=89)) is None  # idle
    token2 = manager(app).login("vic", PASSWORD, now=start).token
    t = start
    for _ in range(24 * 2):  # active every 25 minutes, still ends at 12 hours
        t += timedelta(minutes=25)
        alive = manager(app).resolve_session(token2, now=t)
        if t - start >= timedelta(hours=12):
            assert alive is None
            break
        assert alive is not None


def test_password_change_ends_other_sessions(any_app: Flask) -> None:
    create_user(any_app, "walt")
    keep = manager(any_app).login("walt", PASSWORD).token
    other = manager(any_app).login("walt", PASSWORD).token
    user = manager(any_app).get_user(username="walt")
    renewed = manager(any_app).change_password(
        user.id, PASSWORD, "another long passphrase", keep_session_token=keep
    )
    # The browser that changed the password stays signed in under a new session id.
    assert renewed is not None and renewed != keep
    assert manager(any_app).resolve_session(renewed) is not None
    assert manager(any_app).resolve_session(keep) is None
    assert manager(any_app).resolve_session(other) is None
    with pytest.raises(InvalidCredentials):
        manager(any_app).authenticate("walt", PASSWORD)


def test_undecryptable_secret_refuses_login_but_never_disables(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    user = create_user(app, "xena")
    other = create_user(app, "yuri")
    secret, codes = enable_mfa(app, user.id)
    _, other_codes = enable_mfa(app, other.id)
    with app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        token = conn.execute(
            text("SELECT totp_secret FROM users WHERE id=:i"), {"i": user.id}
        ).scalar_one()
        broken = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
        conn.execute(
            text("UPDATE users SET totp_secret=:t, backup_codes=:t WHERE id=:i"),
            {"t": broken, "i": user.id},
        )
    ok, message = manager(app).verify_mfa_code(user.id, pyotp.TOTP(secret).now())
    assert not ok and "cannot be read" in message
    ok, message = manager(app).verify_mfa_code(user.id, codes[0])
    assert not ok and "cannot be read" in message
    with pytest.raises(SecretUnavailable):
        manager(app).get_backup_codes_info(user.id)
    assert manager(app).get_user(user_id=user.id).two_factor_enabled
    assert "cannot be decrypted" in caplog.text
    assert manager(app).verify_mfa_code(other.id, other_codes[0])[0]  # others unaffected


def test_audit_chain_verifies_and_detects_edit(any_app: Flask) -> None:
    user = create_user(any_app, "zoe")
    enable_mfa(any_app, user.id)
    manager(any_app).login("zoe", PASSWORD)
    with manager(any_app).db.transaction(write=False) as s:
        result = manager(any_app).audit.verify(s)
        ids = [r.id for r in s.scalars(select(AuditEventRecord).order_by(AuditEventRecord.id))]
    assert result.ok and result.checked == len(ids) >= 4
    victim = ids[len(ids) // 2]
    with any_app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("UPDATE audit_events SET outcome='failure' WHERE id=:i"), {"i": victim})
    with manager(any_app).db.transaction(write=False) as s:
        broken = manager(any_app).audit.verify(s)
    assert not broken.ok and broken.broken_id == victim


def test_session_rows_store_only_token_digests(app: Flask) -> None:
    create_user(app, "abe")
    token = manager(app).login("abe", PASSWORD).token
    with manager(app).db.transaction(write=False) as s:
        stored = [r.token_hash for r in s.scalars(select(UserSession))]
    assert token not in stored and len(stored[0]) == 64
