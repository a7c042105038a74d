"""WebAuthnService on a real database (SQLite and PostgreSQL) with real authenticator data.

Covers checklist §9.2 (challenges: random, single use, bound to the session, expiring),
§9.3 (registration needs step-up and mails), §12.1 (counter, lookup by id, user handle),
§12.2 (passwordless needs a discoverable credential with UV) and §12.3 (the credential must be
the session user's), plus "2FA on" = at least one factor, and the admin paths.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pyotp
import pytest
from flask import Flask
from sqlalchemy import func, select

from helpers import PASSWORD, create_user, enable_mfa
from qpki.audit.events import AuditEvent
from qpki.audit.models import AuditEventRecord
from qpki.auth.models import User, UserSession
from qpki.auth.services import Services
from qpki.auth.services.webauthn import MAX_KEYS, CeremonyRefused
from qpki.auth.sessions import token_digest
from qpki.auth.webauthn_models import WebAuthnChallenge, WebAuthnCredential, WebAuthnUserHandle
from qpki.clock import SteppedClock
from qpki.mail.models import OutboxMessage
from qpki.web.services import services_of
from webauthn_softkey import SoftKey, b64

START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock(START)


@pytest.fixture
def app(make_app: Callable[..., Flask], db_url: str, clock: SteppedClock) -> Flask:
    return make_app(db_url, clock=clock)


def svc(app: Flask) -> Services:
    return services_of(app)


def fresh_session(app: Flask, user: User) -> str:
    """A signed-in session that just proved the password (and a code if 2FA is on)."""
    result = svc(app).signin.login(user.username, PASSWORD)
    assert not result.mfa_required
    assert svc(app).step_up.reauthenticate(result.token, PASSWORD, None).success
    return result.token


def register(app: Flask, token: str, key: SoftKey, name: str = "My key") -> Any:
    options = svc(app).webauthn.begin_registration(token, name)
    return svc(app).webauthn.finish_registration(token, key.create(options))


def events(app: Flask, event: AuditEvent) -> list[SimpleNamespace]:
    """The recorded events of one kind, oldest first, with their details parsed."""
    with svc(app).db.transaction(write=False) as s:
        rows = s.scalars(
            select(AuditEventRecord)
            .where(AuditEventRecord.event == event)
            .order_by(AuditEventRecord.id)
        )
        return [
            SimpleNamespace(actor_name=r.actor_name, details=json.loads(r.details)) for r in rows
        ]


def count(app: Flask, model: Any) -> int:
    with svc(app).db.transaction(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def mails(app: Flask, kind: str) -> int:
    with svc(app).db.transaction(write=False) as s:
        return int(
            s.scalar(select(func.count(OutboxMessage.id)).where(OutboxMessage.kind == kind)) or 0
        )


def pending_login(app: Flask, username: str) -> str:
    result = svc(app).signin.login(username, PASSWORD)
    assert result.mfa_required
    return result.token


# -- registering ---------------------------------------------------------------------------------
def test_first_key_turns_2fa_on_with_backup_codes_audit_and_mail(app: Flask) -> None:
    user = create_user(app, "alice")
    token = fresh_session(app, user)
    other = svc(app).signin.login("alice", PASSWORD).token  # another browser
    done = register(app, token, SoftKey(backup_eligible=True, backed_up=True), "Phone")
    assert done.name == "Phone" and done.backup_codes and len(done.backup_codes) == 8
    with svc(app).db.transaction(write=False) as s:
        stored = s.get(User, user.id)
        assert stored is not None and stored.two_factor_enabled and stored.totp_secret is None
        key = s.scalar(select(WebAuthnCredential))
        assert key is not None and key.backed_up and key.backup_eligible and key.sign_count == 0
        assert key.aaguid == "f8a011f3-8c0a-4d15-8006-17111f9edc7d" and key.transports == "usb"
        handle = s.scalar(select(WebAuthnUserHandle.handle))
        assert handle is not None and len(handle) == 64
        ended = s.scalar(select(UserSession).where(UserSession.token_hash == token_digest(other)))
        assert ended is not None and ended.end_reason == "mfa_enabled"
        mine = s.scalar(select(UserSession).where(UserSession.token_hash == token_digest(token)))
        assert mine is not None and mine.ended_at is None
    assert [e.details["name"] for e in events(app, AuditEvent.WEBAUTHN_REGISTERED)] == ["Phone"]
    assert events(app, AuditEvent.MFA_ENABLED)[0].details["method"] == "webauthn"
    assert mails(app, "authenticator_added") == 1 and mails(app, "mfa_enabled") == 1
    assert count(app, WebAuthnChallenge) == 0  # the challenge was used up
    # A second key adds no new backup codes and leaves 2FA as it was.
    assert register(app, token, SoftKey(), "Spare").backup_codes is None
    assert svc(app).factors.backup_codes_info(user.id).remaining == 8


def test_registration_needs_step_up(app: Flask, clock: SteppedClock) -> None:
    user = create_user(app, "bob")
    token = svc(app).signin.login("bob", PASSWORD).token  # password-only sign-in: not fresh
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.begin_registration(token, "Key")
    assert caught.value.reason == "step_up"
    token = fresh_session(app, user)
    options = svc(app).webauthn.begin_registration(token, "Key")
    clock.advance(minutes=11)  # the step-up window (10 minutes) passed meanwhile
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_registration(token, SoftKey().create(options))
    assert caught.value.reason == "step_up" and count(app, WebAuthnCredential) == 0


def test_names_are_checked_unique_and_limited(app: Flask) -> None:
    user = create_user(app, "carol")
    token = fresh_session(app, user)
    for bad in ("", "   ", "x" * 65, "tab\there"):
        with pytest.raises(CeremonyRefused) as caught:
            svc(app).webauthn.begin_registration(token, bad)
        assert caught.value.reason == "invalid"
    register(app, token, SoftKey(), "YubiKey")
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.begin_registration(token, "yubikey")
    assert caught.value.reason == "duplicate"
    for n in range(1, MAX_KEYS):
        register(app, token, SoftKey(), f"Key {n}")
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.begin_registration(token, "One too many")
    assert caught.value.reason == "limit" and count(app, WebAuthnCredential) == MAX_KEYS


def test_a_key_cannot_be_registered_twice(app: Flask) -> None:
    user = create_user(app, "dave")
    token = fresh_session(app, user)
    key = SoftKey()
    register(app, token, key, "First")
    options = svc(app).webauthn.begin_registration(token, "Again")
    assert options["excludeCredentials"][0]["id"] == b64(key.credential_id)
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_registration(token, key.create(options))
    assert caught.value.reason == "duplicate" and count(app, WebAuthnCredential) == 1
    assert events(app, AuditEvent.WEBAUTHN_REGISTRATION_FAILURE)[0].details["reason"] == "duplicate"


@pytest.mark.parametrize(
    "fault",
    [
        {"origin": "https://evil.example"},
        {"rp_id": "evil.example"},
        {"up": False},
        {"challenge": b64(b"not the challenge we sent")},
    ],
)
def test_hostile_registration_stores_nothing_and_is_audited(
    app: Flask, fault: dict[str, Any]
) -> None:
    user = create_user(app, "erin")
    token = fresh_session(app, user)
    options = svc(app).webauthn.begin_registration(token, "Key")
    with pytest.raises(CeremonyRefused):
        svc(app).webauthn.finish_registration(token, SoftKey().create(options, **fault))
    assert count(app, WebAuthnCredential) == 0
    assert len(events(app, AuditEvent.WEBAUTHN_REGISTRATION_FAILURE)) == 1
    with svc(app).db.transaction(write=False) as s:
        assert not s.get(User, user.id).two_factor_enabled  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [None, "garbage", {"id": "x"}, {"response": {"clientDataJSON": 5}}])
def test_malformed_registration_is_refused(app: Flask, raw: object) -> None:
    user = create_user(app, "fay")
    token = fresh_session(app, user)
    svc(app).webauthn.begin_registration(token, "Key")
    with pytest.raises(CeremonyRefused):
        svc(app).webauthn.finish_registration(token, raw)
    assert count(app, WebAuthnCredential) == 0


# -- challenges (§9.2) ----------------------------------------------------------------------------
def test_challenge_is_single_use_bound_and_expires(app: Flask, clock: SteppedClock) -> None:
    user = create_user(app, "gus")
    token = fresh_session(app, user)
    key = SoftKey()
    register(app, token, key)
    # Used once: the same answer twice is refused the second time.
    pending = pending_login(app, "gus")
    options = svc(app).webauthn.begin_second_factor(pending)
    answer = key.get(options)
    assert svc(app).webauthn.finish_second_factor(pending, answer).token
    with pytest.raises(CeremonyRefused):
        svc(app).webauthn.finish_second_factor(pending, answer)
    # Bound to the pending sign-in that asked: another one cannot finish it.
    first, second = pending_login(app, "gus"), pending_login(app, "gus")
    options = svc(app).webauthn.begin_second_factor(first)
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_second_factor(second, key.get(options))
    assert caught.value.reason == "expired"
    # Expires after five minutes (the pending sign-in itself lives as long, so start again).
    pending = pending_login(app, "gus")
    options = svc(app).webauthn.begin_second_factor(pending)
    clock.advance(minutes=4, seconds=59)
    late = pending_login(app, "gus")
    late_options = svc(app).webauthn.begin_second_factor(late)
    clock.advance(seconds=2)
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_second_factor(pending, key.get(options))
    assert caught.value.reason in {"expired", "session"}
    assert svc(app).webauthn.finish_second_factor(late, key.get(late_options)).token
    with svc(app).db.transaction(write=False) as s:
        stored = list(s.scalars(select(WebAuthnChallenge.challenge)))
    assert all(len(c) >= 43 for c in stored)  # 32 random bytes, base64url


# -- the second factor ----------------------------------------------------------------------------
def test_key_as_second_factor_opens_a_full_session(app: Flask) -> None:
    user = create_user(app, "hana")
    key = SoftKey(uv=False, resident=False)
    register(app, fresh_session(app, user), key)
    pending = pending_login(app, "hana")
    options = svc(app).webauthn.begin_second_factor(pending)
    assert options["allowCredentials"][0]["id"] == b64(key.credential_id)
    done = svc(app).webauthn.finish_second_factor(pending, key.get(options))
    with svc(app).db.transaction(write=False) as s:
        row = s.scalar(
            select(UserSession).where(UserSession.token_hash == token_digest(done.token))
        )
        assert row is not None and row.mfa_passed and row.auth_method == "webauthn"
        old = s.scalar(select(UserSession).where(UserSession.token_hash == token_digest(pending)))
        assert old is not None and old.ended_at is not None
        cred = s.scalar(select(WebAuthnCredential))
        assert cred is not None and cred.sign_count == 1 and cred.last_used_at == START
    success = events(app, AuditEvent.LOGIN_SUCCESS)[-1]
    assert success.details["second_factor"] == "webauthn"


def test_another_users_key_is_refused_everywhere(app: Flask) -> None:
    """§12.3 / GHSA-f66q-9rf6-8795: a valid key of Mallory never signs in or steps up Alice."""
    alice, mallory = create_user(app, "alice"), create_user(app, "mallory")
    alice_key, mallory_key = SoftKey(), SoftKey()
    alice_token = fresh_session(app, alice)
    register(app, alice_token, alice_key)
    register(app, fresh_session(app, mallory), mallory_key)
    pending = pending_login(app, "alice")
    options = svc(app).webauthn.begin_second_factor(pending)
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_second_factor(pending, mallory_key.get(options))
    assert caught.value.reason == "foreign_key"
    # The pending sign-in was given back: Alice's own key still completes it.
    assert (
        svc(app)
        .webauthn.finish_second_factor(
            pending, alice_key.get(svc(app).webauthn.begin_second_factor(pending))
        )
        .token
    )
    options = svc(app).webauthn.begin_step_up(alice_token)
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_step_up(alice_token, mallory_key.get(options))
    assert caught.value.reason == "foreign_key"
    # Also with Alice's user handle forged onto Mallory's key.
    options = svc(app).webauthn.begin_step_up(alice_token)
    forged = mallory_key.get(options, user_handle=alice_key.user_handle)
    with pytest.raises(CeremonyRefused):
        svc(app).webauthn.finish_step_up(alice_token, forged)
    failures = [e.details["reason"] for e in events(app, AuditEvent.REAUTH_FAILURE)]
    assert failures == ["foreign_key", "foreign_key"]


def test_cloned_counter_is_refused_and_audited(app: Flask) -> None:
    user = create_user(app, "ivan")
    key = SoftKey()
    register(app, fresh_session(app, user), key)
    for _ in range(3):
        pending = pending_login(app, "ivan")
        svc(app).webauthn.finish_second_factor(
            pending, key.get(svc(app).webauthn.begin_second_factor(pending))
        )
    pending = pending_login(app, "ivan")
    options = svc(app).webauthn.begin_second_factor(pending)
    with pytest.raises(CeremonyRefused) as caught:  # a copy of the key that was used twice
        svc(app).webauthn.finish_second_factor(pending, key.get(options, counter=2))
    assert caught.value.reason == "clone"
    clone = events(app, AuditEvent.WEBAUTHN_CLONE_SUSPECTED)
    assert len(clone) == 1 and clone[0].details == {"name": "My key", "stored": 3, "received": 2}
    with svc(app).db.transaction(write=False) as s:
        assert s.scalar(select(WebAuthnCredential.sign_count)) == 3


def test_wrong_signature_is_refused_and_counted(app: Flask) -> None:
    user = create_user(app, "jane")
    key = SoftKey()
    register(app, fresh_session(app, user), key)
    pending = pending_login(app, "jane")
    options = svc(app).webauthn.begin_second_factor(pending)
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_second_factor(pending, key.get(options, tamper_signature=True))
    assert caught.value.reason == "signature"
    failure = events(app, AuditEvent.MFA_VERIFY_FAILURE)[-1]
    assert failure.details["method"] == "webauthn" and failure.details["failures"] == 1


# -- passwordless --------------------------------------------------------------------------------
def test_passwordless_with_a_verified_passkey(app: Flask) -> None:
    user = create_user(app, "kim")
    key = SoftKey(resident=True, uv=True)
    register(app, fresh_session(app, user), key)
    options = svc(app).webauthn.begin_passwordless("browser-binding")
    assert options["allowCredentials"] == [] and options["userVerification"] == "required"
    done = svc(app).webauthn.finish_passwordless("browser-binding", key.get(options))
    assert done.user_id == user.id
    with svc(app).db.transaction(write=False) as s:
        row = s.scalar(
            select(UserSession).where(UserSession.token_hash == token_digest(done.token))
        )
        assert row is not None and row.mfa_passed and row.auth_method == "webauthn"


@pytest.mark.parametrize(
    ("key_args", "get_args", "reason"),
    [
        ({"resident": True, "uv": True}, {"uv": False}, "user_verification"),
        ({"resident": False, "uv": True}, {}, "not_discoverable"),
        ({"resident": True, "uv": True}, {"user_handle": b"\x00" * 64}, "user_handle"),
    ],
)
def test_passwordless_needs_discoverable_credential_and_uv(
    app: Flask, key_args: dict[str, Any], get_args: dict[str, Any], reason: str
) -> None:
    user = create_user(app, "lee")
    key = SoftKey(**key_args)
    register(app, fresh_session(app, user), key)
    options = svc(app).webauthn.begin_passwordless("b")
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_passwordless("b", key.get(options, **get_args))
    assert caught.value.reason == reason
    assert events(app, AuditEvent.LOGIN_FAILURE)[-1].details["reason"] == reason


def test_passwordless_unknown_key_and_other_binding(app: Flask) -> None:
    user = create_user(app, "max")
    key = SoftKey()
    register(app, fresh_session(app, user), key)
    options = svc(app).webauthn.begin_passwordless("mine")
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_passwordless("someone else's", key.get(options))
    assert caught.value.reason == "expired"
    stranger = SoftKey()
    stranger.user_handle = b"\x01" * 64
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_passwordless("mine", stranger.get(options))
    assert caught.value.reason == "unknown_key"


# -- step-up ------------------------------------------------------------------------------------
def test_step_up_with_a_key(app: Flask, clock: SteppedClock) -> None:
    user = create_user(app, "nina")
    token = fresh_session(app, user)
    uv_key, up_key = SoftKey(uv=True), SoftKey(uv=False, resident=False)
    register(app, token, uv_key, "Passkey")
    register(app, token, up_key, "Plain key")
    clock.advance(minutes=30)
    token = (
        svc(app)
        .webauthn.finish_second_factor(
            pending := pending_login(app, "nina"),
            up_key.get(svc(app).webauthn.begin_second_factor(pending)),
        )
        .token
    )
    clock.advance(minutes=11)
    with svc(app).db.transaction(write=False) as s:
        row = s.scalar(select(UserSession).where(UserSession.token_hash == token_digest(token)))
        assert row is not None and not svc(app).step_up.is_fresh(row)
    # A key without user verification is not enough alone...
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_step_up(token, up_key.get(svc(app).webauthn.begin_step_up(token)))
    assert caught.value.reason == "user_verification"
    # ...but is with the password; a passkey with UV is enough alone.
    svc(app).webauthn.finish_step_up(
        token, up_key.get(svc(app).webauthn.begin_step_up(token)), password=PASSWORD
    )
    svc(app).webauthn.finish_step_up(token, uv_key.get(svc(app).webauthn.begin_step_up(token)))
    with svc(app).db.transaction(write=False) as s:
        row = s.scalar(select(UserSession).where(UserSession.token_hash == token_digest(token)))
        assert row is not None and svc(app).step_up.is_fresh(row)
    assert [e.details.get("method") for e in events(app, AuditEvent.REAUTHENTICATED)][-2:] == [
        "webauthn",
        "webauthn",
    ]
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.finish_step_up(
            token, up_key.get(svc(app).webauthn.begin_step_up(token)), password="wrong password"
        )
    assert caught.value.reason == "password"


# -- removing, 2FA state, admins -----------------------------------------------------------------
def test_removing_the_last_factor_needs_confirmation(app: Flask) -> None:
    user = create_user(app, "olga")
    token = fresh_session(app, user)
    register(app, token, SoftKey(), "Only key")
    key_id = svc(app).webauthn.keys_of(user.id)[0].id
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.remove(user.id, key_id)
    assert caught.value.reason == "confirm_last" and count(app, WebAuthnCredential) == 1
    removed = svc(app).webauthn.remove(user.id, key_id, confirm_last=True, keep_session_token=token)
    assert removed.two_factor_off
    with svc(app).db.transaction(write=False) as s:
        stored = s.get(User, user.id)
        assert stored is not None and not stored.two_factor_enabled and stored.backup_codes is None
    assert mails(app, "authenticator_removed") == 1 and mails(app, "mfa_disabled") == 1
    assert events(app, AuditEvent.WEBAUTHN_REMOVED)[0].details == {
        "name": "Only key",
        "last_factor": True,
    }


def test_key_next_to_totp_keeps_codes_and_removal_keeps_2fa(app: Flask) -> None:
    user = create_user(app, "pat")
    _secret, codes = enable_mfa(app, user.id, at=START)
    assert len(codes) == 8
    result = svc(app).signin.login("pat", PASSWORD)
    token = result.token
    with svc(app).db.transaction() as s:  # this session proved both factors just now
        s.execute(
            UserSession.__table__.update()
            .where(UserSession.token_hash == token_digest(token))
            .values(mfa_passed=True, reauth_at=START)
        )
    assert register(app, token, SoftKey(), "Key").backup_codes is None
    key_id = svc(app).webauthn.keys_of(user.id)[0].id
    assert not svc(app).webauthn.remove(user.id, key_id).two_factor_off
    with svc(app).db.transaction(write=False) as s:
        assert s.get(User, user.id).two_factor_enabled  # type: ignore[union-attr]


def test_admin_reset_and_admin_removal(app: Flask) -> None:
    admin = create_user(app, "root", role="admin")
    enable_mfa(app, admin.id, at=START)
    user = create_user(app, "quinn")
    token = fresh_session(app, user)
    register(app, token, SoftKey(), "Lost key")
    register(app, token, SoftKey(), "Kept key")
    lost = next(k for k in svc(app).webauthn.keys_of(user.id) if k.name == "Lost key")
    removed = svc(app).webauthn.admin_remove(admin, user.id, lost.id)
    assert removed.name == "Lost key" and not removed.two_factor_off
    assert [k.name for k in svc(app).webauthn.keys_of(user.id)] == ["Kept key"]
    assert events(app, AuditEvent.WEBAUTHN_ADMIN_REMOVED)[0].actor_name == "root"
    svc(app).factors.admin_disable(admin, user.id, "lost every device")
    assert count(app, WebAuthnCredential) == 0
    with svc(app).db.transaction(write=False) as s:
        assert not s.get(User, user.id).two_factor_enabled  # type: ignore[union-attr]


def test_renaming(app: Flask) -> None:
    user = create_user(app, "rita")
    token = fresh_session(app, user)
    register(app, token, SoftKey(), "A")
    register(app, token, SoftKey(), "B")
    a, b = svc(app).webauthn.keys_of(user.id)
    assert svc(app).webauthn.rename(user.id, a.id, "  Desk key ") == "Desk key"
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.rename(user.id, b.id, "desk KEY")
    assert caught.value.reason == "duplicate"
    other = create_user(app, "sam")
    with pytest.raises(CeremonyRefused) as caught:
        svc(app).webauthn.rename(other.id, a.id, "Mine now")
    assert caught.value.reason == "not_found"


# -- two instances ------------------------------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_ceremony_begun_on_one_instance_finishes_on_another(
    make_app: Callable[..., Flask], db_url: str, clock: SteppedClock
) -> None:
    """Two apps on one PostgreSQL database: challenges live in the database, not a process."""
    url = db_url
    one, two = make_app(url, clock=clock), make_app(url, clock=clock)
    user = create_user(one, "tess")
    key = SoftKey()
    token = fresh_session(one, user)
    options = svc(one).webauthn.begin_registration(token, "Key")
    svc(two).webauthn.finish_registration(token, key.create(options))
    pending = pending_login(two, "tess")
    options = svc(two).webauthn.begin_second_factor(pending)
    assert svc(one).webauthn.finish_second_factor(pending, key.get(options)).token
    options = svc(one).webauthn.begin_passwordless("binding")
    assert svc(two).webauthn.finish_passwordless("binding", key.get(options)).user_id == user.id


# -- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the service above runs on both
def test_cli_mfa_status_lists_keys(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    from click.testing import CliRunner

    from qpki.app import create_app
    from qpki.cli import main
    from qpki.config import Settings

    monkeypatch.setenv("QPKI_DATA_DIR", str(tmp_path / "cli-data"))
    monkeypatch.delenv("QPKI_DATABASE_URL", raising=False)
    monkeypatch.delenv("QPKI_MFA_KEY", raising=False)
    runner = CliRunner()
    assert runner.invoke(main, ["migrate"], catch_exceptions=False).exit_code == 0
    cli_app = create_app(Settings.from_env(argon2_profile="fast"))
    try:
        user = create_user(cli_app, "uma")
        register(
            cli_app,
            fresh_session(cli_app, user),
            SoftKey(backup_eligible=True, backed_up=True),
            "Phone passkey",
        )
    finally:
        cli_app.db_manager.dispose()  # type: ignore[attr-defined]
    result = runner.invoke(main, ["mfa", "status", "uma"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2FA enabled" in result.output and "authenticator app: no" in result.output
    assert "security keys: 1" in result.output
    assert re.search(r"Phone passkey: added .* last used never, synced passkey", result.output)


def test_a_key_role_member_confirms_step_up_with_the_key_not_an_app_code(
    app: Flask, clock: SteppedClock
) -> None:
    """§12.5: where the role requires a phishing-resistant factor, an app code is refused at
    step-up too, not only at sign-in (the key is the only second factor that counts)."""
    user = create_user(app, "kim")
    token = fresh_session(app, user)
    register(app, token, SoftKey())
    setup = svc(app).factors.start_setup(user.id)
    outcome = svc(app).factors.confirm_setup(
        user.id, pyotp.TOTP(setup.secret).at(clock()), keep_session_token=token
    )
    assert outcome.success
    svc(app).policy.set_policy("viewer", actor=None, require_phishing_resistant=True)
    clock.advance(minutes=30)
    code = pyotp.TOTP(setup.secret).at(clock())
    refused = svc(app).step_up.reauthenticate(token, PASSWORD, code, always_ask_code=True)
    assert not refused.success and "security key" in refused.message
    svc(app).policy.set_policy("viewer", actor=None, require_phishing_resistant=False)
    assert svc(app).step_up.reauthenticate(token, PASSWORD, code, always_ask_code=True).success
