"""Pure parts of mail: the SMTP URL, the browser in words, rendering, back-off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from qpki.config import ConfigError, Settings
from qpki.mail.alerts import Alert, LinkMail, kind_from_name
from qpki.mail.outbox import MAX_DELAY, retry_delay
from qpki.mail.render import MailRenderer, when_in_words
from qpki.mail.smtp_url import SmtpSecurity, SmtpUrlError, parse_smtp_url
from qpki.mail.useragent import describe_user_agent

AT = datetime(2026, 12, 1, 9, 5, tzinfo=UTC)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)


@pytest.mark.parametrize(
    ("url", "host", "port", "security", "user", "password"),
    [
        ("smtp://relay.internal", "relay.internal", 25, SmtpSecurity.NONE, None, None),
        ("smtp://127.0.0.1:2525", "127.0.0.1", 2525, SmtpSecurity.NONE, None, None),
        (
            "smtp+starttls://qpki:p%40ss%3Aw0rd@mail.example.org:587",
            "mail.example.org",
            587,
            SmtpSecurity.STARTTLS,
            "qpki",
            "p@ss:w0rd",
        ),
        (
            "smtps://u%40example.org:pw@mail.example.org",
            "mail.example.org",
            465,
            SmtpSecurity.TLS,
            "u@example.org",
            "pw",
        ),
    ],
)
def test_smtp_url_forms(
    url: str, host: str, port: int, security: SmtpSecurity, user: str | None, password: str | None
) -> None:
    target = parse_smtp_url(url)
    assert (target.host, target.port, target.security) == (host, port, security)
    assert (target.username, target.password) == (user, password)
    assert "pw" not in repr(target) or password is None
    assert (password or "\0") not in target.describe()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://mail.example.org", "scheme"),
        ("smtp://", "no host"),
        ("smtp://mail.example.org:99999", "port"),
        ("smtp://:secret@mail.example.org", "without a user"),
        ("smtp://mail.example.org/path", "only scheme"),
    ],
)
def test_bad_smtp_urls_say_why_without_the_password(url: str, words: str) -> None:
    with pytest.raises(SmtpUrlError) as err:
        parse_smtp_url(url)
    assert words in str(err.value)
    assert "secret" not in str(err.value)


def test_settings_read_mail_variables(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {
        "QPKI_DATA_DIR": str(tmp_path),
        "QPKI_SMTP_URL": "smtp+starttls://u:pw@mail.example.org",
        "QPKI_MAIL_FROM": "qPKI <noreply@example.org>",
        "QPKI_BASE_URL": "https://qpki.example.org/",
    }
    settings = Settings.from_env(env)
    assert settings.smtp_url == env["QPKI_SMTP_URL"]
    assert settings.mail_from == "qPKI <noreply@example.org>"
    assert settings.base_url == "https://qpki.example.org"
    with pytest.raises(ConfigError, match="QPKI_SMTP_URL") as err:
        Settings.from_env({**env, "QPKI_SMTP_URL": "imap://u:topsecret@x"})
    assert "topsecret" not in str(err.value)
    with pytest.raises(ConfigError, match="QPKI_BASE_URL"):
        Settings.from_env({**env, "QPKI_BASE_URL": "javascript:alert(1)"})


def test_smtp_url_may_come_from_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "smtp-url"
    secret.write_text("smtps://u:pw@mail.example.org\n")
    settings = Settings.from_env(
        {"QPKI_DATA_DIR": str(tmp_path), "QPKI_SMTP_URL_FILE": str(secret)}
    )
    assert settings.smtp_url == "smtps://u:pw@mail.example.org"


@pytest.mark.parametrize(
    ("agent", "words"),
    [
        (CHROME, "Chrome 120 on Windows 10"),
        (IPHONE, "Mobile Safari 17 on iOS 17.1 (iPhone)"),
        (
            "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
            "Firefox 121 on Linux",
        ),
        ("curl/8.5.0", "curl 8"),
        ("", "an unknown browser"),
        ("qpki-cli", "the qpki command line"),
        ("visit http://evil.example now", "an unrecognised program"),
    ],
)
def test_browser_in_words(agent: str, words: str) -> None:
    assert describe_user_agent(agent) == words


def test_when_in_words() -> None:
    assert when_in_words(AT) == "Tuesday 1 December 2026 at 09:05 UTC"


def _context(kind: Alert | LinkMail) -> dict[str, object]:
    context: dict[str, object] = {
        "username": "alice",
        "at": AT.isoformat(),
        "ip": "203.0.113.7",
        "user_agent": CHROME,
        "admin_name": None,
        "device_name": None,
        "remaining": None,
        "new_email": None,
        "link": None,
    }
    if kind is Alert.BACKUP_CODE_USED:
        context["remaining"] = 4
    if kind is Alert.EMAIL_CHANGED:
        context["new_email"] = "alice@new.example.org"
    if isinstance(kind, LinkMail):
        context.update(link="https://qpki.example.org/auth/x/TOKEN", expires_minutes=30)
    return context


@pytest.mark.parametrize("kind", [*Alert, *LinkMail])
def test_every_kind_renders_text_and_html_saying_when_where_and_what_to_do(
    kind: Alert | LinkMail,
) -> None:
    mail = MailRenderer("qPKI").render(kind, _context(kind))
    assert mail.subject.startswith("qPKI: ")
    for part in (mail.text, mail.html):
        assert "alice" in part
        assert "Tuesday 1 December 2026 at 09:05 UTC" in part
        assert "203.0.113.7" in part
        assert "Chrome 120 on Windows 10" in part
        assert "If " in part  # the advice: "If this was not you ..." / "If you did not ..."
    assert mail.html.lstrip().startswith("<!DOCTYPE html>")
    if isinstance(kind, LinkMail):
        assert "https://qpki.example.org/auth/x/TOKEN" in mail.text
        assert 'href="https://qpki.example.org/auth/x/TOKEN"' in mail.html


def test_html_part_escapes_what_users_typed() -> None:
    context = _context(Alert.AUTHENTICATOR_ADDED)
    context["device_name"] = "<script>alert(1)</script>"
    mail = MailRenderer("qPKI").render(Alert.AUTHENTICATOR_ADDED, context)
    assert "<script>" not in mail.html
    assert "&lt;script&gt;" in mail.html


def test_admin_actions_name_the_admin() -> None:
    context = _context(Alert.MFA_DISABLED)
    context["admin_name"] = "root-admin"
    mail = MailRenderer("qPKI").render(Alert.MFA_DISABLED, context)
    assert "The administrator root-admin turned off two-factor authentication" in mail.text


def test_backup_code_used_says_how_many_are_left() -> None:
    context = _context(Alert.BACKUP_CODE_USED)
    for remaining, words in (
        (0, "no backup codes left"),
        (1, "1 backup code left"),
        (7, "7 backup codes left"),
    ):
        context["remaining"] = remaining
        assert words in MailRenderer("qPKI").render(Alert.BACKUP_CODE_USED, context).text


def test_kind_names_round_trip() -> None:
    for kind in [*Alert, *LinkMail]:
        assert kind_from_name(kind.value) is kind
    with pytest.raises(ValueError, match="unknown mail kind"):
        kind_from_name("nope")


def test_retry_delay_doubles_and_is_capped() -> None:
    assert [retry_delay(n).total_seconds() for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert retry_delay(50) == MAX_DELAY
    assert retry_delay(0) == timedelta(seconds=30)
