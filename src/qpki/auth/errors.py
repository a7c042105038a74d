"""Failure families of the service layer. ``message`` is what a user may be shown.

Messages are chosen here, in the service layer, never built from exception text of a library,
so nothing internal leaks to a page.
"""

from __future__ import annotations

from datetime import datetime

from qpki.errors import QPKIError

INVALID_CREDENTIALS = "Invalid username or password"
INVALID_CODE = "Invalid verification code"
SETUP_EXPIRED = "Setup session expired"
MFA_NOT_ENABLED = "MFA not enabled"
BACKUP_CODE_USED = "Backup code already used"
LOCKED = (
    "This account is locked after too many failed attempts. "
    "Contact your administrator to unlock it."
)
# A pending (password-only) sign-in lives Settings.pending_mfa_seconds: 300 s.
SIGNIN_EXPIRED = "Sign-in timed out after 5 minutes. Please sign in again."
# A right TOTP code whose time step was already used (the replay guard). Said only after the
# password step or to a signed-in user, so it reveals nothing to a stranger.
CODE_JUST_USED = "That code was just used. Wait for the next code in your app."
ADMIN_NEEDS_2FA = (
    "Turn on two-factor authentication for your own account before acting on other accounts."
)
SECRET_UNREADABLE = (
    "Your two-factor settings cannot be read right now, so this sign-in was refused. "
    "Contact your administrator."
)


class AuthError(QPKIError):
    """Base of every expected failure; carries a user-facing message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidCredentials(AuthError):
    """Unknown user, wrong password or inactive account: one message for all three."""

    def __init__(self) -> None:
        super().__init__(INVALID_CREDENTIALS)


class AccountThrottled(AuthError):
    """Too many consecutive failures: the next attempt must wait until ``retry_at``."""

    def __init__(self, message: str, retry_at: datetime) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class AccountLocked(AuthError):
    """The hard lock after 100 consecutive failures; only an administrator can lift it."""

    def __init__(self) -> None:
        super().__init__(LOCKED)


class ValidationFailed(AuthError):
    """Input that breaks a rule (password policy, username format, missing reason).

    ``fields`` names the problem of each input where the rule is about one (``username``,
    ``email``, ``role``, ``password``), so a form can show each next to its field; ``message``
    joins them all.
    """

    def __init__(self, message: str, *, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.fields = dict(fields or {})


class NotFound(AuthError):
    """The user or object does not exist."""


class PermissionDenied(AuthError):
    """The actor may not do this."""


class MFAError(AuthError):
    """A second-factor step failed (wrong code, expired setup, not enabled)."""


class SecretUnavailable(AuthError):
    """Stored 2FA data could not be decrypted (wrong key or tampering). Fails closed."""

    def __init__(self) -> None:
        super().__init__(SECRET_UNREADABLE)
