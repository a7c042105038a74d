"""Every security alert, queued in a transaction by the Notifier and delivered to a real SMTP
server: asserted by recipient, subject and content, and for the absence of any secret."""

from __future__ import annotations

import re
from datetime import timedelta
from html import unescape
from typing import Any

import pytest
from flask import Flask
from mail_helpers import FIREFOX, parts
from sqlalchemy import func, select

from harness.services import SmtpSink
from helpers import PASSWORD, create_user, oathtool_code
from qpki.auth.models import User
from qpki.clock import SteppedClock
from qpki.mail import Alert
from qpki.mail.models import OutboxMessage
from qpki.mail.setup import MailComponents

SUBJECTS = {
    Alert.PASSWORD_CHANGED: "qPKI: Your password was changed",
    Alert.PASSWORD_RESET: "qPKI: Your password was reset",
    Alert.EMAIL_CHANGED: "qPKI: The email address of your account was changed",
    Alert.MFA_ENABLED: "qPKI: Two-factor authentication was turned on",
    Alert.MFA_DISABLED: "qPKI: Two-factor authentication was turned off",
    Alert.AUTHENTICATOR_ADDED: "qPKI: A sign-in method was added to your account",
    Alert.AUTHENTICATOR_REMOVED: "qPKI: A sign-in method was removed from your account",
    Alert.BACKUP_CODES_REGENERATED: "qPKI: New backup codes were made",
    Alert.BACKUP_CODE_USED: "qPKI: A backup code was used to sign in",
    Alert.NEW_DEVICE_SIGN_IN: "qPKI: New sign-in to your account",
    Alert.WRONG_SECOND_FACTOR: "qPKI: Someone entered your password with a wrong code",
    Alert.ACCOUNT_LOCKED: "qPKI: Your account was locked",
}
EXTRA: dict[Alert, dict[str, Any]] = {
    Alert.EMAIL_CHANGED: {"new_email": "alice@new.example.org", "to_address": "old@example.org"},
    Alert.MFA_DISABLED: {"admin_name": "boss"},
    Alert.AUTHENTICATOR_ADDED: {"device_name": "YubiKey 5C"},
    Alert.AUTHENTICATOR_REMOVED: {"device_name": "YubiKey 5C"},
    Alert.BACKUP_CODE_USED: {"remaining": 6},
}
# One sentence per alert that must be in it (what happened, with its particulars).
SAYS = {
    Alert.EMAIL_CHANGED: "was changed from this address to alice@new.example.org",
    Alert.MFA_DISABLED: "The administrator boss turned off two-factor authentication",
    Alert.AUTHENTICATOR_ADDED: '"YubiKey 5C" was added',
    Alert.AUTHENTICATOR_REMOVED: '"YubiKey 5C" was removed',
    Alert.BACKUP_CODE_USED: "You have 6 backup codes left.",
    Alert.WRONG_SECOND_FACTOR: "with the right password, then gave a wrong verification code",
    Alert.ACCOUNT_LOCKED: "was locked after too many failed sign-in attempts",
}


def _user(app: Flask, user_id: int) -> User:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        user = s.get(User, user_id)
        assert user is not None
        return user


@pytest.fixture
def alice(mail_app: Flask, clock: SteppedClock) -> tuple[User, str, list[str]]:
    """A user with 2FA on: her password, TOTP secret and backup codes must never be mailed."""
    created = create_user(mail_app, "alice")
    manager = mail_app.auth_manager  # type: ignore[attr-defined]
    setup = manager.start_mfa_setup(created.id)
    codes = manager.confirm_mfa_setup(created.id, oathtool_code(setup.secret, at=clock()))
    secret = setup.secret
    return _user(mail_app, created.id), secret, codes


@pytest.mark.parametrize("alert", list(Alert))
def test_each_alert_is_delivered_with_when_where_and_advice_and_no_secret(
    alert: Alert,
    mail_app: Flask,
    mail: MailComponents,
    sink: SmtpSink,
    clock: SteppedClock,
    alice: tuple[User, str, list[str]],
) -> None:
    user, secret, codes = alice
    # Enabling 2FA above may have queued its own alert through the services; start clean.
    mail.sender.deliver_due()
    sink.messages.clear()
    sink.envelopes.clear()
    with mail_app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        row = mail.notifier.security_alert(
            s,
            s.get(User, user.id),
            alert,
            at=clock(),
            ip="198.51.100.23",
            user_agent=FIREFOX,
            **EXTRA.get(alert, {}),
        )
        assert row is not None
    assert mail.sender.deliver_due().sent == 1
    [message] = sink.wait_for(1)
    recipient = EXTRA.get(alert, {}).get("to_address", "alice@example.org")
    assert message["To"] == recipient
    assert sink.envelopes[0][1] == [recipient]
    assert message["Subject"] == SUBJECTS[alert]
    assert message["Auto-Submitted"] == "auto-generated"
    text, html = parts(message)
    for part in (text, html):
        assert "Hello alice" in part
        assert "Monday 30 November 2026 at 12:00 UTC" in part
        assert "198.51.100.23, Firefox 121 on Linux" in part
        assert "If " in part and ("not you" in part or "did not" in part or "not yours" in part)
        if alert in SAYS:
            assert SAYS[alert] in unescape(part).replace("\r\n", " ")
        for forbidden in (
            PASSWORD,
            user.password_hash,
            secret,
            *codes,
            *(c.replace("-", "") for c in codes),
        ):
            assert forbidden not in part
        assert not re.search(r"\b\d{6}\b", part), "a code-like number is in the mail"
        assert "/auth/password/reset/" not in part
    # The stored content is emptied once delivered.
    with mail_app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        assert s.get(OutboxMessage, row.id).context == "{}"  # type: ignore[union-attr]


def test_a_rolled_back_change_sends_no_mail(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink
) -> None:
    user = create_user(mail_app, "bob")
    with pytest.raises(RuntimeError), mail_app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        mail.notifier.security_alert(s, s.get(User, user.id), Alert.PASSWORD_CHANGED)
        raise RuntimeError("the change failed after the mail was queued")
    assert mail.sender.deliver_due().sent == 0
    assert mail.sender.status().pending == 0
    assert sink.messages == []


def test_wrong_second_factor_is_mailed_at_most_once_per_15_minutes(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, clock: SteppedClock
) -> None:
    user = create_user(mail_app, "carol")
    queued = []
    start = clock()
    for minutes in (0, 5, 14, 16, 20, 32):
        clock.set(start + timedelta(minutes=minutes))
        with mail_app.db_manager.transaction() as s:  # type: ignore[attr-defined]
            row = mail.notifier.security_alert(s, s.get(User, user.id), Alert.WRONG_SECOND_FACTOR)
            queued.append(row is not None)
    assert queued == [True, False, False, True, False, True]
    assert mail.sender.deliver_due().sent == 3
    assert len(sink.wait_for(3)) == 3


def test_other_alerts_are_never_rate_limited(
    mail_app: Flask, mail: MailComponents, clock: SteppedClock
) -> None:
    user = create_user(mail_app, "dave")
    with mail_app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        for _ in range(3):
            assert mail.notifier.security_alert(s, s.get(User, user.id), Alert.PASSWORD_CHANGED)
        assert s.scalar(select(func.count()).select_from(OutboxMessage)) == 3


def test_a_mail_may_not_carry_a_secret(mail_app: Flask, mail: MailComponents) -> None:
    user = create_user(mail_app, "erin")
    with mail_app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        target = s.get(User, user.id)
        for key in ("code", "password", "secret", "token", "backup_codes", "reason"):
            with pytest.raises(ValueError, match="must not carry secrets"):
                mail.notifier.queue(s, target, Alert.PASSWORD_CHANGED, **{key: "x"})
        with pytest.raises(ValueError, match="only link mails may carry a link"):
            mail.notifier.queue(s, target, Alert.PASSWORD_CHANGED, link="https://x/y")
        with pytest.raises(ValueError, match="remaining"):
            mail.notifier.security_alert(s, target, Alert.BACKUP_CODE_USED)
        assert s.scalar(select(func.count()).select_from(OutboxMessage)) == 0


def test_an_account_without_an_address_gets_nothing_and_the_change_still_commits(
    mail_app: Flask, mail: MailComponents
) -> None:
    user = mail_app.auth_manager.create_user("frank", PASSWORD, "", "viewer")  # type: ignore[attr-defined]
    with mail_app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        assert mail.notifier.security_alert(s, s.get(User, user.id), Alert.PASSWORD_CHANGED) is None
    assert mail.sender.status().pending == 0
