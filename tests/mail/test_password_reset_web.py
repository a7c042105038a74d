"""Forgot password, the reset link and the change of email address, through the Flask test
client, with every link taken from the mail a real SMTP server received."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from mail_helpers import BASE_URL, link_in, parts
from sqlalchemy import delete, select

from harness.services import SmtpSink
from helpers import PASSWORD, create_user, enable_mfa, login, oathtool_code, page, text_of
from qpki.audit.events import AuditEvent
from qpki.audit.models import AuditEventRecord
from qpki.auth.errors import PermissionDenied, ValidationFailed
from qpki.auth.models import User
from qpki.auth.services.password_reset import (
    FORGOT_ANSWER,
    LINK_EXPIRED,
    LINK_INVALID,
    LINK_SUPERSEDED,
    LINK_USED,
    PASSWORDS_DIFFER,
)
from qpki.clock import SteppedClock
from qpki.mail.models import MailedToken, OutboxMessage
from qpki.mail.setup import MailComponents

NEW_PASSWORD = "a brand new passphrase for alice"
RESET_PATH = "/auth/password/reset/"


class Alice:
    """alice, with 2FA on; ``code()`` gives a fresh TOTP code on the stepped clock."""

    def __init__(self, app: Flask, clock: SteppedClock) -> None:
        self.app, self.clock = app, clock
        self.id = create_user(app, "alice").id
        manager = app.auth_manager  # type: ignore[attr-defined]
        setup = manager.start_mfa_setup(self.id)
        manager.confirm_mfa_setup(self.id, oathtool_code(setup.secret, at=clock()))
        self.secret = setup.secret
        with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
            s.execute(delete(OutboxMessage))  # the enrolment alert is not what these tests see

    def code(self) -> str:
        self.clock.advance(seconds=30)  # a new TOTP step (the last one is spent)
        return oathtool_code(self.secret, at=self.clock())

    def signed_in(self) -> FlaskClient:
        client = self.app.test_client()
        assert login(client, "alice").headers["Location"].endswith("/auth/mfa/verify")
        done = client.post("/auth/mfa/verify", data={"code": self.code()})
        assert done.status_code == 302, text_of(done)
        assert client.get("/auth/profile").status_code == 200
        return client

    def password_hash(self) -> str:
        with self.app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
            user = s.get(User, self.id)
            assert user is not None
            return user.password_hash


@pytest.fixture
def alice(mail_app: Flask, clock: SteppedClock) -> Alice:
    return Alice(mail_app, clock)


def _ask_for_link(app: Flask, mail: MailComponents, sink: SmtpSink, login_as: str = "alice") -> str:
    before = len(sink.messages)
    answer = app.test_client().post("/auth/password/forgot", data={"login": login_as})
    assert answer.status_code == 200
    assert FORGOT_ANSWER in text_of(answer)
    mail.sender.deliver_due()
    message = sink.wait_for(before + 1)[-1]
    assert message["Subject"] == "qPKI: Reset your password"
    return link_in(message, RESET_PATH)


def _events(app: Flask, event: AuditEvent) -> list[AuditEventRecord]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return list(
            s.scalars(select(AuditEventRecord).where(AuditEventRecord.event == event.value))
        )


def test_login_page_links_to_forgot_password(client_factory: Callable[[], FlaskClient]) -> None:
    link = page(client_factory().get("/auth/login")).find(id="forgot-password")
    assert link is not None and link["href"] == "/auth/password/forgot"
    assert link.get_text(strip=True) == "Forgot your password?"


@pytest.fixture
def client_factory(mail_app: Flask) -> Callable[[], FlaskClient]:
    return mail_app.test_client


def test_the_reset_flow_ends_sessions_keeps_the_second_factor_and_alerts(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice
) -> None:
    other_session = alice.signed_in()
    form = mail_app.test_client().get("/auth/password/forgot")
    assert form.status_code == 200 and page(form).find("input", attrs={"name": "login"})

    path = _ask_for_link(mail_app, mail, sink)
    [message] = [m for m in sink.messages if m["Subject"] == "qPKI: Reset your password"]
    assert message["To"] == "alice@example.org"
    text, html = parts(message)
    assert f"{BASE_URL}{path}" in text and f'href="{BASE_URL}{path}"' in html
    token = path.rsplit("/", 1)[1]
    assert len(token) >= 43  # 256 bits, url-safe base64
    with mail_app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        stored = s.scalars(select(MailedToken)).one()
        assert token not in stored.token_hash  # only the digest is kept

    browser = mail_app.test_client()
    shown = browser.get(path)
    assert shown.status_code == 200 and "no-store" in shown.headers["Cache-Control"]
    assert shown.headers["Referrer-Policy"] in ("same-origin", "no-referrer")  # not to others
    done = browser.post(path, data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD})
    assert done.status_code == 302 and done.headers["Location"].endswith("/auth/login")

    # Every session ended; the old password is gone; the second factor is still asked.
    assert other_session.get("/auth/profile").status_code == 302
    assert "Invalid username or password" in text_of(login(mail_app.test_client(), "alice"))
    again = login(mail_app.test_client(), "alice", NEW_PASSWORD)
    assert again.status_code == 302 and again.headers["Location"].endswith("/auth/mfa/verify")

    # Audited, and the owner is told.
    [completed] = _events(mail_app, AuditEvent.PASSWORD_RESET_COMPLETED)
    assert completed.target_user_id == alice.id
    mail.sender.deliver_due()
    alert = sink.wait_for(2)[1]
    assert (
        alert["Subject"] == "qPKI: Your password was reset" and alert["To"] == "alice@example.org"
    )
    assert token not in parts(alert)[0]

    # The link is single-use.
    hash_now = alice.password_hash()
    reused = mail_app.test_client().post(
        path,
        data={
            "new_password": "yet another passphrase 42",
            "confirm_password": "yet another passphrase 42",
        },
    )
    assert reused.status_code == 400 and LINK_USED in text_of(reused)
    assert alice.password_hash() == hash_now


def test_unknown_accounts_get_the_same_answer_and_no_mail(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice
) -> None:
    answers = []
    for typed in ("nobody", "nobody@example.org", "alice", "ALICE@example.org"):
        response = mail_app.test_client().post("/auth/password/forgot", data={"login": typed})
        assert response.status_code == 200
        answers.append(page(response).find(id="forgot-answer").get_text(" ", strip=True))
    assert len(set(answers)) == 1
    mail.sender.deliver_due()
    messages = sink.wait_for(2)
    assert [m["To"] for m in messages] == ["alice@example.org", "alice@example.org"]
    results = [e.details for e in _events(mail_app, AuditEvent.PASSWORD_RESET_REQUESTED)]
    assert results.count('{"result":"no_account"}') == 2


def test_empty_login_is_a_clear_form_error(mail_app: Flask) -> None:
    response = mail_app.test_client().post("/auth/password/forgot", data={"login": "  "})
    assert response.status_code == 400
    assert "Enter your username or email address." in text_of(response)


def test_an_expired_link_says_so_and_changes_nothing(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice, clock: SteppedClock
) -> None:
    path = _ask_for_link(mail_app, mail, sink)
    clock.advance(minutes=29)
    assert mail_app.test_client().get(path).status_code == 200
    clock.advance(minutes=1)
    before = alice.password_hash()
    client = mail_app.test_client()
    shown = client.get(path)
    assert shown.status_code == 400 and LINK_EXPIRED in text_of(shown)
    posted = client.post(
        path, data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD}
    )
    assert posted.status_code == 400 and LINK_EXPIRED in text_of(posted)
    assert alice.password_hash() == before
    [rejected] = _events(mail_app, AuditEvent.PASSWORD_RESET_REJECTED)
    assert rejected.details == '{"reason":"expired"}'


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: t[:20],
        lambda t: t + "x" * 200,
        lambda t: "not-a-token",
    ],
)
def test_a_tampered_link_is_refused_and_changes_nothing(
    mail_app: Flask,
    mail: MailComponents,
    sink: SmtpSink,
    alice: Alice,
    tamper: Callable[[str], str],
) -> None:
    path = _ask_for_link(mail_app, mail, sink)
    bad = RESET_PATH + tamper(path.rsplit("/", 1)[1])
    before = alice.password_hash()
    for response in (
        mail_app.test_client().get(bad),
        mail_app.test_client().post(
            bad, data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD}
        ),
    ):
        assert response.status_code == 400 and LINK_INVALID in text_of(response)
    assert alice.password_hash() == before
    assert mail_app.test_client().get(path).status_code == 200  # the real link still works


def test_a_newer_request_voids_the_older_link(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice
) -> None:
    first = _ask_for_link(mail_app, mail, sink)
    second = _ask_for_link(mail_app, mail, sink)
    assert first != second
    old = mail_app.test_client().get(first)
    assert old.status_code == 400 and LINK_SUPERSEDED in text_of(old)
    done = mail_app.test_client().post(
        second, data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD}
    )
    assert done.status_code == 302


def test_mismatched_or_weak_passwords_are_explained_and_the_link_survives(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice
) -> None:
    path = _ask_for_link(mail_app, mail, sink)
    before = alice.password_hash()
    client = mail_app.test_client()
    differ = client.post(
        path, data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD + "!"}
    )
    assert differ.status_code == 400 and PASSWORDS_DIFFER in text_of(differ)
    weak = client.post(
        path, data={"new_password": "password1234", "confirm_password": "password1234"}
    )
    assert weak.status_code == 400 and "too common" in text_of(weak)
    same_as_name = client.post(path, data={"new_password": "short", "confirm_password": "short"})
    assert same_as_name.status_code == 400 and "at least 12 characters" in text_of(same_as_name)
    missing = client.post(path, data={"new_password": NEW_PASSWORD})
    assert missing.status_code == 400 and "Type the new password again." in text_of(missing)
    assert alice.password_hash() == before
    assert _events(mail_app, AuditEvent.PASSWORD_RESET_COMPLETED) == []
    ok = client.post(path, data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD})
    assert ok.status_code == 302


def test_requests_per_account_are_capped_silently(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice, clock: SteppedClock
) -> None:
    for _ in range(5):
        response = mail_app.test_client().post("/auth/password/forgot", data={"login": "alice"})
        assert response.status_code == 200 and FORGOT_ANSWER in text_of(response)
    mail.sender.deliver_due()
    assert len(sink.wait_for(3)) == 3
    results = [e.details for e in _events(mail_app, AuditEvent.PASSWORD_RESET_REQUESTED)]
    assert results.count('{"result":"throttled"}') == 2
    clock.advance(hours=1, seconds=1)
    _ask_for_link(mail_app, mail, sink)  # the next hour allows again


def test_requests_per_address_are_limited(
    make_mail_app: Callable[..., Flask], sink: SmtpSink
) -> None:
    app = make_mail_app(smtp_url=sink.url, rate_limits_enabled=True)
    create_user(app, "alice")
    client = app.test_client()
    codes = [
        client.post("/auth/password/forgot", data={"login": name}).status_code
        for name in ("alice", "nobody", "nobody2", "alice", "nobody3", "nobody4", "alice")
    ]
    assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]


def test_a_reset_succeeds_while_the_mail_server_is_down_and_its_alert_follows(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice, clock: SteppedClock
) -> None:
    path = _ask_for_link(mail_app, mail, sink)
    sink.stop()
    done = mail_app.test_client().post(
        path, data={"new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD}
    )
    assert done.status_code == 302
    assert mail.sender.deliver_due().retrying == 1
    sink.start()
    clock.advance(minutes=1)
    assert mail.sender.deliver_due().sent == 1
    assert sink.wait_for(2)[-1]["Subject"] == "qPKI: Your password was reset"


def test_an_administrator_can_send_a_reset_link(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice
) -> None:
    admin = create_user(mail_app, "root", role="admin")
    with pytest.raises(PermissionDenied, match="two-factor"):  # an admin without 2FA: no
        mail.password_reset.admin_send_reset_link(admin, alice.id)
    enable_mfa(mail_app, admin.id, at=mail.password_reset.clock())
    with mail_app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        s.execute(delete(OutboxMessage))  # the admin's own enrolment alert
    address = mail.password_reset.admin_send_reset_link(admin, alice.id)
    assert address == "alice@example.org"
    mail.sender.deliver_due()
    [message] = sink.wait_for(1)
    assert "The administrator root sent you a link" in parts(message)[0]
    path = link_in(message, RESET_PATH)
    assert mail_app.test_client().get(path).status_code == 200
    [event] = _events(mail_app, AuditEvent.PASSWORD_RESET_REQUESTED)
    assert event.actor_id == admin.id and '"by_admin":true' in event.details
    viewer = create_user(mail_app, "viewer")
    with pytest.raises(PermissionDenied):
        mail.password_reset.admin_send_reset_link(viewer, alice.id)
    nomail = mail_app.auth_manager.create_user("nomail", PASSWORD, "", "viewer")  # type: ignore[attr-defined]
    with pytest.raises(ValidationFailed, match="no email address"):
        mail.password_reset.admin_send_reset_link(admin, nomail.id)


# -- change of email address ---------------------------------------------------------------------
def test_changing_the_email_address_needs_step_up_and_confirmation_and_tells_the_old_one(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice, clock: SteppedClock
) -> None:
    client = alice.signed_in()
    shown = client.get("/auth/email")
    assert (
        shown.status_code == 200
        and page(shown).find(id="current-email").get_text() == "alice@example.org"
    )

    clock.advance(minutes=11)  # the sign-in is no longer fresh: step-up is due
    stale = client.post("/auth/email", data={"new_email": "alice@new.example.org"})
    assert stale.status_code == 302 and "/auth/reauth" in stale.headers["Location"]
    assert mail.sender.status().pending == 0

    bad = client.post(
        "/auth/email",
        data={"new_email": "not an address", "password": PASSWORD, "code": alice.code()},
    )
    assert bad.status_code == 400 and "Enter a valid email address" in text_of(bad)

    sent = client.post(
        "/auth/email",
        data={"new_email": "alice@new.example.org", "password": PASSWORD, "code": alice.code()},
    )
    assert sent.status_code == 302, text_of(sent)
    mail.sender.deliver_due()
    [confirm] = sink.wait_for(1)
    assert confirm["To"] == "alice@new.example.org"
    assert confirm["Subject"] == "qPKI: Confirm your new email address"
    path = link_in(confirm, "/auth/email/confirm/")
    with mail_app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        assert s.get(User, alice.id).email == "alice@example.org"  # type: ignore[union-attr]

    # Opening the link (as a mail scanner does) changes nothing; the button does.
    assert mail_app.test_client().get(path).status_code == 200
    with mail_app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        assert s.get(User, alice.id).email == "alice@example.org"  # type: ignore[union-attr]
    done = mail_app.test_client().post(path)
    assert done.status_code == 302
    with mail_app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        assert s.get(User, alice.id).email == "alice@new.example.org"  # type: ignore[union-attr]
    again = mail_app.test_client().post(path)
    assert again.status_code == 400 and LINK_USED in text_of(again)

    mail.sender.deliver_due()
    told = sink.wait_for(2)[1]
    assert told["To"] == "alice@example.org"
    assert told["Subject"] == "qPKI: The email address of your account was changed"
    assert "to alice@new.example.org" in parts(told)[0]
    assert [e.event for e in _events(mail_app, AuditEvent.EMAIL_CHANGED)] == ["email_changed"]


def test_an_email_change_voids_reset_links_sent_to_the_old_address(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, alice: Alice
) -> None:
    reset_path = _ask_for_link(mail_app, mail, sink)
    mail.email_change.request_change(alice.id, "alice@new.example.org")
    mail.sender.deliver_due()
    confirm_path = link_in(sink.wait_for(2)[1], "/auth/email/confirm/")
    assert mail_app.test_client().post(confirm_path).status_code == 302
    stale = mail_app.test_client().get(reset_path)
    assert stale.status_code == 400 and LINK_SUPERSEDED in text_of(stale)
