"""Security events as the account page tells them: plain sentences from the reader's side.

The audit trail stores event names for machines and the admin page; a person reading their own
account wants "You reset 2FA for vera" or "2FA reset by root-admin", and no internal words
("password accepted") or a "success" badge after something that obviously happened.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpki.audit.models import AuditEventRecord
from qpki.mail.useragent import describe_user_agent

# What happened, said of the account it happened to. Events not listed fall back to their
# name with underscores as spaces.
_SAID: dict[str, str] = {
    "login_success": "Signed in",
    "login_failure": "Failed sign-in",
    "login_password_accepted": "Password correct, waiting for the second step",
    "logout": "Signed out",
    "session_ended": "Session ended",
    "session_expired": "Session expired",
    "user_created": "Account created",
    "user_changed": "Account changed",
    "user_deactivated": "Account deactivated",
    "user_reactivated": "Account reactivated",
    "password_changed": "Password changed",
    "password_reset": "Password reset",
    "account_throttled": "Sign-ins slowed down after failed attempts",
    "account_locked": "Sign-ins locked after repeated failures",
    "account_unlocked": "Sign-ins unlocked",
    "access_denied": "Page refused (not allowed for your role)",
    "mfa_setup_started": "Two-factor setup started",
    "mfa_enabled": "Two-factor authentication turned on",
    "mfa_disabled": "Two-factor authentication turned off",
    "mfa_admin_disabled": "Two-factor authentication reset",
    "mfa_verify_success": "Second step passed",
    "mfa_verify_failure": "Wrong code at the second step",
    "backup_codes_regenerated": "New backup codes made",
    "backup_code_used": "Backup code used",
    "reauthenticated": "Confirmed it was you",
    "reauth_failure": "Failed to confirm it was you",
    "password_reset_requested": "Password reset link requested",
    "password_reset_completed": "Password reset by email link",
    "email_change_requested": "Email change requested",
    "email_changed": "Email address changed",
    "webauthn_registered": "Security key added",
    "webauthn_renamed": "Security key renamed",
    "webauthn_removed": "Security key removed",
    "webauthn_admin_removed": "Security key removed",
    "webauthn_clone_suspected": "A security key that looks copied was refused",
    "new_device_sign_in": "Signed in from a new browser",
    "remembered_device_added": "Browser remembered for the second step",
    "remembered_device_revoked": "Remembered browser forgotten",
    "remembered_device_reused": "A copied remembered-browser cookie was refused",
}

# Actions an administrator does to someone else, said from the administrator's side.
_DONE_TO_OTHERS: dict[str, str] = {
    "mfa_admin_disabled": "You reset two-factor authentication for {target}",
    "password_reset": "You reset the password of {target}",
    "user_created": "You created the account {target}",
    "user_changed": "You changed the account {target}",
    "user_deactivated": "You deactivated {target}",
    "user_reactivated": "You reactivated {target}",
    "account_unlocked": "You unlocked {target}",
    "webauthn_admin_removed": "You removed a security key of {target}",
    "password_reset_requested": "You sent a password reset link to {target}",
}


@dataclass(frozen=True)
class EventLine:
    text: str
    failed: bool


def describe_event(event: AuditEventRecord, reader_id: int) -> EventLine:
    """One line of the reader's recent security events."""
    failed = event.outcome == "failure"
    other_target = event.target_user_id not in (None, reader_id)
    if event.actor_id == reader_id and other_target:
        template = _DONE_TO_OTHERS.get(event.event)
        if template:
            return EventLine(template.format(target=event.target_name or "another account"), failed)
    text = _SAID.get(event.event) or event.event.replace("_", " ").capitalize()
    if event.actor_id not in (None, reader_id) and event.actor_name:
        text = f"{text} by {event.actor_name}"
    elif event.actor_id is None and event.actor_name and event.target_user_id == reader_id:
        text = f"{text} by {event.actor_name}"  # the command line or an API key
    return EventLine(text, failed)


def device_in_words(user_agent: str | None) -> str:
    """ "Chrome on Linux" for a session's browser (the full string stays in a tooltip)."""
    if not user_agent:
        return "Unknown device"
    words = describe_user_agent(user_agent)
    return words[:1].upper() + words[1:]
