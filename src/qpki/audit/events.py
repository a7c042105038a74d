"""Every audit event name, in one place, so the trail is searchable and typo-free."""

from __future__ import annotations

import enum


class AuditEvent(enum.StrEnum):
    """Names stored in ``audit_events.event``."""

    LOGIN_SUCCESS = "login_success"
    LOGIN_FAILURE = "login_failure"
    LOGIN_PASSWORD_ACCEPTED = "login_password_accepted"  # password done, second factor pending
    LOGOUT = "logout"
    SESSION_ENDED = "session_ended"
    SESSION_EXPIRED = "session_expired"
    USER_CREATED = "user_created"
    USER_CHANGED = "user_changed"
    USER_DEACTIVATED = "user_deactivated"
    USER_REACTIVATED = "user_reactivated"
    PASSWORD_CHANGED = "password_changed"
    PASSWORD_RESET = "password_reset"
    ACCOUNT_THROTTLED = "account_throttled"
    ACCOUNT_LOCKED = "account_locked"
    ACCOUNT_UNLOCKED = "account_unlocked"
    ACCESS_DENIED = "access_denied"
    MFA_SETUP_STARTED = "mfa_setup_started"
    MFA_ENABLED = "mfa_enabled"
    MFA_DISABLED = "mfa_disabled"
    MFA_ADMIN_DISABLED = "mfa_admin_disabled"
    MFA_VERIFY_SUCCESS = "mfa_verify_success"
    MFA_VERIFY_FAILURE = "mfa_verify_failure"
    BACKUP_CODES_REGENERATED = "backup_codes_regenerated"
    BACKUP_CODE_USED = "backup_code_used"
    KEYS_ROTATED = "keys_rotated"
    AUDIT_CHAIN_SEALED = "audit_chain_sealed"  # migration 0003 sealed the old chain
    REAUTHENTICATED = "reauthenticated"  # step-up ("sudo mode") passed
    REAUTH_FAILURE = "reauth_failure"
    # Self-service by mail (qpki.auth.services.password_reset)
    PASSWORD_RESET_REQUESTED = "password_reset_requested"  # a link mailed (or why not)
    PASSWORD_RESET_COMPLETED = "password_reset_completed"  # a new password set through a link
    PASSWORD_RESET_REJECTED = "password_reset_rejected"  # expired, used or voided link
    EMAIL_CHANGE_REQUESTED = "email_change_requested"  # a confirmation mailed to the new address
    EMAIL_CHANGED = "email_changed"
    EMAIL_CHANGE_REJECTED = "email_change_rejected"


class Outcome(enum.StrEnum):
    """Whether the audited action happened."""

    SUCCESS = "success"
    FAILURE = "failure"
