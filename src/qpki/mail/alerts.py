"""Every mail qPKI sends, by kind. Security alerts (checklist §12.8) are always sent; the two
link mails carry the only token a mail may hold.

The template of a kind is ``templates/mail/<kind>.txt``; it defines the blocks ``subject``,
``summary`` and ``advice`` which the shared layouts turn into the text and HTML parts.
"""

from __future__ import annotations

import enum
from datetime import timedelta


class Alert(enum.StrEnum):
    """Security alerts, sent to the account's address when something changes on it."""

    PASSWORD_CHANGED = "password_changed"
    PASSWORD_RESET = "password_reset"  # by a mailed link, or by an admin (admin_name)
    EMAIL_CHANGED = "email_changed"  # sent to the OLD address
    MFA_ENABLED = "mfa_enabled"  # admin_name when an administrator did it
    MFA_DISABLED = "mfa_disabled"  # admin_name when an administrator did it (never the reason)
    AUTHENTICATOR_ADDED = "authenticator_added"  # device_name: the key or app
    AUTHENTICATOR_REMOVED = "authenticator_removed"
    BACKUP_CODES_REGENERATED = "backup_codes_regenerated"
    BACKUP_CODE_USED = "backup_code_used"  # remaining: codes left
    NEW_DEVICE_SIGN_IN = "new_device_sign_in"
    WRONG_SECOND_FACTOR = "wrong_second_factor"  # after a right password; rate-limited
    ACCOUNT_LOCKED = "account_locked"


class LinkMail(enum.StrEnum):
    """Mails that carry a single-use link (the only secret a mail may hold)."""

    PASSWORD_RESET_LINK = "password_reset_link"
    EMAIL_CHANGE_CONFIRM = "email_change_confirm"


MailKind = Alert | LinkMail

# At most one mail of these kinds per account in the window: a password guesser who has the
# password must not be able to flood the owner's mailbox, but the owner still hears of it.
ALERT_WINDOWS: dict[Alert, timedelta] = {Alert.WRONG_SECOND_FACTOR: timedelta(minutes=15)}


def kind_from_name(name: str) -> MailKind:
    """The kind stored in ``outbox.kind``; ValueError for an unknown name."""
    for enum_type in (Alert, LinkMail):
        try:
            return enum_type(name)
        except ValueError:
            continue
    raise ValueError(f"unknown mail kind {name!r}")
