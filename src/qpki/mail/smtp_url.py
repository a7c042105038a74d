"""QPKI_SMTP_URL parsing: ``smtp://``, ``smtp+starttls://`` and ``smtps://``, optional user and
password (URL-encoded, so ``@`` or ``:`` in a password are written ``%40``, ``%3A``).

Standard library only, so ``qpki.config`` can check the setting at start-up. Error messages
name the problem, never the password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import unquote, urlsplit

from qpki.errors import QPKIError


class SmtpUrlError(QPKIError, ValueError):
    """QPKI_SMTP_URL cannot be used; the message says why (and never holds the password)."""


class SmtpSecurity(StrEnum):
    """How the connection to the relay is protected."""

    NONE = "none"  # smtp:// - plain, for a relay on localhost or a private network
    STARTTLS = "starttls"  # smtp+starttls:// - upgrade with STARTTLS, refuse if not offered
    TLS = "tls"  # smtps:// - implicit TLS from the first byte


_SCHEMES = {
    "smtp": (SmtpSecurity.NONE, 25),
    "smtp+starttls": (SmtpSecurity.STARTTLS, 587),
    "smtps": (SmtpSecurity.TLS, 465),
}


@dataclass(frozen=True)
class SmtpTarget:
    """Where and how to hand mail over."""

    host: str
    port: int
    security: SmtpSecurity
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """For log lines: scheme, host and port, never the credentials."""
        return f"{self.security.value} {self.host}:{self.port}"


def parse_smtp_url(url: str) -> SmtpTarget:
    """Parse QPKI_SMTP_URL, e.g. ``smtp+starttls://user:p%40ss@mail.example.org:587``."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise SmtpUrlError(
            f"the scheme must be smtp://, smtp+starttls:// or smtps://, not {scheme or 'none'!r}"
        )
    security, default_port = _SCHEMES[scheme]
    if not parts.hostname:
        raise SmtpUrlError("no host name; write for example smtp://mail.example.org:25")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SmtpUrlError("only scheme, user, password, host and port are allowed")
    try:
        port = parts.port or default_port
    except ValueError:
        raise SmtpUrlError("the port is not a number between 1 and 65535") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is not None and not username:
        raise SmtpUrlError("a password is given without a user name")
    return SmtpTarget(parts.hostname, port, security, username, password)
