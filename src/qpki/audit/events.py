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
    # Passkeys and security keys (qpki.auth.services.webauthn). Sign-in and step-up with a
    # key are recorded as LOGIN_*, MFA_VERIFY_* and REAUTH* events with method "webauthn".
    WEBAUTHN_REGISTERED = "webauthn_registered"
    WEBAUTHN_REGISTRATION_FAILURE = "webauthn_registration_failure"
    WEBAUTHN_RENAMED = "webauthn_renamed"
    WEBAUTHN_REMOVED = "webauthn_removed"
    WEBAUTHN_ADMIN_REMOVED = "webauthn_admin_removed"
    WEBAUTHN_CLONE_SUSPECTED = "webauthn_clone_suspected"  # a counter that did not increase
    # Service keys of the JSON API (qpki.auth.services.api_keys)
    API_KEY_CREATED = "api_key_created"
    API_KEY_REVOKED = "api_key_revoked"
    # Policies and remembered devices (qpki.auth.services.policy, .remembered_devices)
    POLICY_CHANGED = "policy_changed"
    POLICY_GRACE_STARTED = "policy_grace_started"
    NEW_DEVICE_SIGN_IN = "new_device_sign_in"
    REMEMBERED_DEVICE_ADDED = "remembered_device_added"
    REMEMBERED_DEVICE_REVOKED = "remembered_device_revoked"
    REMEMBERED_DEVICE_REUSED = "remembered_device_reused"  # a stale token: theft signal


class Outcome(enum.StrEnum):
    """Whether the audited action happened."""

    SUCCESS = "success"
    FAILURE = "failure"
