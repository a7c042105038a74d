"""Hand a finished message to the world: an SMTP relay, or .eml files for a developer.

smtplib and email from the standard library: they speak every form QPKI_SMTP_URL allows
(plain, STARTTLS, implicit TLS, AUTH) and need no dependency. TLS always verifies the relay's
certificate against the system's trust store (ssl.create_default_context).
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Protocol

from qpki.config import write_private_file
from qpki.errors import QPKIError
from qpki.mail.render import RenderedMail
from qpki.mail.smtp_url import SmtpSecurity, SmtpTarget

log = logging.getLogger(__name__)


class DeliveryError(QPKIError):
    """The message could not be handed over; it stays in the outbox and is retried."""


class Transport(Protocol):
    """Where delivered mail goes."""

    def send(self, message: EmailMessage) -> None:
        """Hand over ``message`` or raise DeliveryError."""

    def describe(self) -> str:
        """For log lines and ``qpki mail status``; never holds a password."""


def build_message(
    mail: RenderedMail, *, sender: str, recipient: str, at: datetime, outbox_id: int
) -> EmailMessage:
    """A multipart/alternative message: the text part first, then the HTML part."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = mail.subject
    message["Date"] = format_datetime(at)
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    message["Message-ID"] = make_msgid(idstring=f"qpki-{outbox_id}", domain=domain)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies, please
    # Plain 7-bit text when it can be (a developer reading an .eml sees the link whole);
    # quoted-printable otherwise.
    plain = mail.text.isascii() and all(len(line) < 990 for line in mail.text.splitlines())
    message.set_content(mail.text, cte="7bit" if plain else "quoted-printable")
    message.add_alternative(mail.html, subtype="html")
    return message


class SmtpTransport:
    """One connection per message to the relay named by QPKI_SMTP_URL."""

    def __init__(self, target: SmtpTarget, *, timeout: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout

    def describe(self) -> str:
        return f"SMTP relay {self.target.describe()}"

    def send(self, message: EmailMessage) -> None:
        target = self.target
        context = ssl.create_default_context()
        try:
            if target.security is SmtpSecurity.TLS:
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    target.host, target.port, timeout=self.timeout, context=context
                )
            else:
                client = smtplib.SMTP(target.host, target.port, timeout=self.timeout)
            with client:
                if target.security is SmtpSecurity.STARTTLS:
                    client.starttls(context=context)
                if target.username:
                    client.login(target.username, target.password or "")
                refused = client.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(_describe_error(exc)) from exc
        if refused:
            raise DeliveryError(f"recipient refused: {sorted(refused)}")


def _describe_error(exc: BaseException) -> str:
    """A short reason for the outbox's last_error (SMTP replies hold no credentials)."""
    if isinstance(exc, smtplib.SMTPResponseException):
        raw = exc.smtp_error
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return f"{type(exc).__name__}: {exc.smtp_code} {text}"[:500]
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return f"recipient refused: {sorted(exc.recipients)}"[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


class EmlDirectoryTransport:
    """Without QPKI_SMTP_URL: each mail becomes ``<dir>/<id>-<kind>.eml`` (mode 0600)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def describe(self) -> str:
        return f".eml files in {self.directory}"

    def send(self, message: EmailMessage) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            msgid = str(message["Message-ID"]).strip("<>").split("@")[0]
            path = self.directory / f"{msgid}.eml"
            write_private_file(path, message.as_bytes())
        except OSError as exc:
            raise DeliveryError(f"cannot write to {self.directory}: {exc.strerror or exc}") from exc
        log.info("mail to %s written to %s", message["To"], path)
