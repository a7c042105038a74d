"""Journey: a user who forgot the password resets it from the link a real SMTP server received,
in Chromium, against `qpki run` (whose background thread delivers the mail)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
from playwright.sync_api import expect

from harness.services import (
    LOOPBACK,
    AppServer,
    SmtpSink,
    app_server,
    free_port,
    smtp_sink,
    wait_until,
)

# As in conftest.ISOLATED_ENV: nothing is taken from the environment of the test run.
ISOLATED_ENV = {
    "QPKI_DATABASE_URL": "",
    "QPKI_REDIS_URL": "",
    "QPKI_SECRET_KEY": "",
    "QPKI_MFA_KEY": "",
    "QPKI_HTTPS": "0",
    "QPKI_PROXY_FIX": "0",
    "QPKI_ISSUER": "qPKI",
    "QPKI_RATE_LIMITS": "0",
}
USER_PASSWORD = "a long enough passphrase"


@dataclass
class MailLiveApp:
    """The running server (what :class:`Journey` uses) and an in-process app for seeding."""

    server: AppServer
    flask_app: Any

    @property
    def url(self) -> str:
        return self.server.url

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.server.log_text().splitlines()[-lines:])

    def create_user(self, username: str) -> tuple[str, str]:
        """A user with 2FA on; returns (username, TOTP secret)."""
        manager = self.flask_app.auth_manager
        user = manager.create_user(username, USER_PASSWORD, f"{username}@example.org", "viewer")
        setup = manager.start_mfa_setup(user.id)
        manager.confirm_mfa_setup(user.id, pyotp.TOTP(setup.secret).now())
        return username, setup.secret


pytestmark = pytest.mark.e2e

NEW_PASSWORD = "a fresh passphrase from the mail"


def _mail(sink: SmtpSink, subject: str, timeout: float = 20.0) -> Any:
    """The first received mail with ``subject`` (the app's thread sends it after the commit)."""
    found: list[Any] = []

    def arrived() -> bool:
        found[:] = [m for m in list(sink.messages) if m["Subject"] == subject]
        return bool(found)

    wait_until(arrived, timeout=timeout, what=f"a mail {subject!r}")
    return found[0]


@pytest.fixture
def mail_live(browser_tools: None, tmp_path: Path) -> Iterator[tuple[MailLiveApp, SmtpSink]]:
    with smtp_sink() as sink:
        port = free_port()
        data_dir = tmp_path / "data"
        env = {
            **ISOLATED_ENV,
            "QPKI_DATA_DIR": str(data_dir),
            "QPKI_SMTP_URL": sink.url,
            "QPKI_MAIL_FROM": "qPKI <noreply@example.org>",
            "QPKI_BASE_URL": f"http://{LOOPBACK}:{port}",
        }
        with app_server(env, port=port, log_dir=tmp_path / "logs") as server:
            from qpki.app import create_app
            from qpki.config import Settings

            flask_app = create_app(Settings.from_env(env, mail_worker=False))
            try:
                yield MailLiveApp(server, flask_app), sink
            finally:
                flask_app.db_manager.dispose()


def test_journey_forgot_password_by_mail(
    journey: Any, mail_live: tuple[MailLiveApp, SmtpSink]
) -> None:
    live, sink = mail_live
    username, secret = live.create_user("mallory-victim")
    j = journey("journey-mail-forgot-password", live)
    page = j.new_page()

    page.goto("/auth/login")
    j.step(page, "sign-in")
    page.get_by_role("link", name="Forgot your password?").click()
    expect(page).to_have_url(re.compile(r"/auth/password/forgot$"))
    j.step(page, "forgot-form")
    page.get_by_label("Username or email address").fill("mallory-victim@example.org")
    page.get_by_role("button", name="Send me a link").click()
    expect(page.locator("#forgot-answer")).to_contain_text("a link to choose a new password")
    j.step(page, "forgot-answer")

    message = _mail(sink, "qPKI: Reset your password")
    assert message["To"] == "mallory-victim@example.org"
    text = message.get_body(("plain",)).get_content()
    [link] = re.findall(rf"{re.escape(live.url)}/auth/password/reset/[A-Za-z0-9_\-]+", text)

    page.goto(link)
    j.step(page, "reset-form")
    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_label("Repeat new password").fill(NEW_PASSWORD + " typo")
    page.get_by_role("button", name="Set new password").click()
    expect(page.locator("main")).to_contain_text("The two passwords differ")
    j.step(page, "reset-mismatch")
    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_label("Repeat new password").fill(NEW_PASSWORD)
    page.get_by_role("button", name="Set new password").click()
    expect(page).to_have_url(re.compile(r"/auth/login$"))
    expect(page.locator("main")).to_contain_text("Your password has been changed")
    j.step(page, "reset-done")

    # The new password works, and the second factor is still asked for.
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(NEW_PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(re.compile(r"/auth/mfa/verify$"))
    j.step(page, "second-factor-still-asked")
    code = pyotp.TOTP(secret).at(datetime.now(UTC) + timedelta(seconds=30))
    page.get_by_label("Verification code").fill(code)
    page.get_by_role("button", name="Verify").click()
    expect(page).to_have_url(re.compile(rf"^{re.escape(live.url)}/$"))

    alert = _mail(sink, "qPKI: Your password was reset")
    assert alert["To"] == "mallory-victim@example.org"
    assert USER_PASSWORD not in alert.as_string() and NEW_PASSWORD not in alert.as_string()

    # The link was single-use.
    other = j.new_page()
    other.goto(link)
    expect(other.locator("#link-error")).to_contain_text("already been used")
    j.step(other, "link-used")
    j.finish()
