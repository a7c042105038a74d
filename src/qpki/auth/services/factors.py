"""Second factors: enrolling an authenticator, backup codes, turning 2FA off (own or admin).

Every public method is one use case: one write transaction with its audit record inside.
A wrong enrolment code is counted on the account's throttle and audited, and that record
commits — the outcome is returned, never raised out of the transaction.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth import errors
from qpki.auth.errors import MFAError, PermissionDenied, SecretUnavailable, ValidationFailed
from qpki.auth.mfa import MFAManager
from qpki.auth.models import MFASetupSession, User
from qpki.auth.services import remembered_devices
from qpki.auth.services.admin_rule import refused_as_admin
from qpki.auth.services.code_check import (
    LOW_BACKUP_CODES,
    backup_entries,
    decrypt_secret,
)
from qpki.auth.services.common import ThrottleGate, actor_fields, audit_own, load_user, refusal_for
from qpki.auth.sessions import SessionStore
from qpki.auth.webauthn_models import WebAuthnChallenge, WebAuthnCredential
from qpki.clock import Clock
from qpki.db.manager import DatabaseManager
from qpki.mail.alerts import Alert
from qpki.mail.notifier import Notifier

if TYPE_CHECKING:
    from qpki.auth.services.policy import PolicyService

log = logging.getLogger(__name__)
# Why a user may not turn off their last second factor (the profile page says so too).
FACTOR_REQUIRED = (
    "Your role requires two-factor authentication, so you cannot turn it off. "
    "If you lost your phone and backup codes, ask an administrator to reset it."
)

SETUP_LIFETIME = timedelta(minutes=15)
MAX_RESET_REASON = 500


@dataclass(frozen=True)
class SetupInfo:
    """What the enrolment page shows: the secret (grouped), URI and QR, and the deadline."""

    secret: str
    secret_display: str
    provisioning_uri: str
    qr_png: bytes
    expires_at: datetime


@dataclass(frozen=True)
class BackupCodesInfo:
    """How many backup codes a user has left."""

    total: int
    remaining: int

    @property
    def used(self) -> int:
        return self.total - self.remaining

    @property
    def low(self) -> bool:
        return self.remaining <= LOW_BACKUP_CODES


@dataclass(frozen=True)
class SetupOutcome:
    """After a confirming code: the new backup codes (shown once), or why not."""

    codes: list[str] | None
    message: str = ""
    expired: bool = False
    retry_at: datetime | None = None
    locked: bool = False

    @property
    def success(self) -> bool:
        return self.codes is not None


class FactorService:
    """TOTP enrolment, backup codes and disabling 2FA."""

    def __init__(
        self,
        db: DatabaseManager,
        audit: AuditLog,
        clock: Clock,
        mfa: MFAManager,
        gate: ThrottleGate,
        sessions: SessionStore,
        notifier: Notifier,
        *,
        setup_lifetime: timedelta = SETUP_LIFETIME,
        policy: PolicyService,
    ) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.mfa = mfa
        self.gate = gate
        self.sessions = sessions
        self.notifier = notifier
        self.setup_lifetime = setup_lifetime
        self.policy = policy

    # -- enrolment ----------------------------------------------------------------------------
    def start_setup(
        self, user_id: int, *, keep_session_token: str | None = None, now: datetime | None = None
    ) -> SetupInfo:
        """Begin enrolment: a new secret waits (encrypted) for a confirming code."""
        now = now or self.clock()
        secret = self.mfa.generate_secret()
        with self.db.transaction() as s:
            user = load_user(s, user_id)
            s.execute(
                delete(MFASetupSession).where(
                    or_(MFASetupSession.expires_at <= now, MFASetupSession.user_id == user_id)
                )
            )
            expires = now + self.setup_lifetime
            s.add(
                MFASetupSession(
                    id=secrets.token_urlsafe(24),
                    user_id=user_id,
                    secret=self.mfa.encrypt(secret, now),
                    created_at=now,
                    expires_at=expires,
                )
            )
            audit_own(
                self.audit,
                s,
                AuditEvent.MFA_SETUP_STARTED,
                user,
                at=now,
                details={"replaces_existing": user.two_factor_enabled},
            )
            username = user.username
        return self._setup_info(secret, username, expires)

    def pending_setup(self, user_id: int, *, now: datetime | None = None) -> SetupInfo | None:
        """The enrolment still waiting for its code (the same QR again), if any.

        A pending secret that cannot be decrypted (the key changed) is no setup at all: it is
        dropped, logged, and the page offers to start again instead of failing.
        """
        now = now or self.clock()
        with self.db.transaction(write=False) as s:
            pending = s.scalar(select(MFASetupSession).where(MFASetupSession.user_id == user_id))
            user = s.get(User, user_id)
            if pending is None or user is None or pending.expires_at <= now:
                return None
            token, expires, username = pending.secret, pending.expires_at, user.username
        try:
            secret = decrypt_secret(self.mfa, token, user_id)
        except SecretUnavailable:
            with self.db.transaction() as s:
                s.execute(delete(MFASetupSession).where(MFASetupSession.user_id == user_id))
            return None
        return self._setup_info(secret, username, expires)

    def confirm_setup(
        self,
        user_id: int,
        code: str,
        *,
        keep_session_token: str | None = None,
        throttle_key: str | None = None,
        now: datetime | None = None,
    ) -> SetupOutcome:
        """Enable (or replace) 2FA with a valid code from the new app; ends other sessions.

        Past the setup's lifetime (or with none started) the outcome is "expired" and the
        stale setup is deleted; a wrong code is counted and audited. Both commit.
        """
        now = now or self.clock()
        with self.db.transaction() as s:
            user = load_user(s, user_id)
            pending = s.scalar(select(MFASetupSession).where(MFASetupSession.user_id == user_id))
            if pending is None or pending.expires_at <= now:
                if pending is not None:
                    s.delete(pending)
                return SetupOutcome(None, errors.SETUP_EXPIRED, expired=True)
            key = throttle_key or user.username_key
            reservation = self.gate.reserve(s, key, now, user=user, typed_name=user.username)
            if not reservation.granted:
                refusal = refusal_for(reservation.state, now)
                self._setup_failure(s, user, now, "throttled")
                return SetupOutcome(
                    None, refusal.message, retry_at=refusal.retry_at, locked=refusal.locked
                )
            try:
                secret = decrypt_secret(self.mfa, pending.secret, user_id)
            except SecretUnavailable:
                s.delete(pending)
                self._setup_failure(s, user, now, "undecryptable")
                return SetupOutcome(None, errors.SETUP_EXPIRED, expired=True)
            step = self.mfa.verify_totp(secret, code, at=now)
            if step is None:
                self._setup_failure(s, user, now, "invalid", reservation.state.failures)
                return SetupOutcome(None, errors.INVALID_CODE)
            was_enabled = user.two_factor_enabled
            # Backup codes come with the first factor of either kind; reconfiguring the app,
            # or adding it next to a security key, keeps the codes the user already holds.
            codes = [] if was_enabled and user.backup_codes else issue_backup_codes(self.mfa, user)
            user.totp_secret = self.mfa.encrypt(secret, now)
            user.totp_last_step = step  # the confirming code cannot be replayed to sign in
            user.two_factor_enabled = True
            user.mfa_enabled_at = now
            s.delete(pending)
            self.gate.store.reset(s, key)
            ended = self.sessions.end_all(
                s, user.id, "mfa_enabled", now, keep_token=keep_session_token
            )
            self.policy.enrolled_in(s, user.id)
            audit_own(
                self.audit,
                s,
                AuditEvent.MFA_ENABLED,
                user,
                at=now,
                details={
                    "method": "totp",
                    "codes_issued": len(codes),
                    "replaced": was_enabled,
                    "sessions_ended": ended,
                    "remembered_devices_forgotten": remembered_devices.forget_all(s, user.id),
                },
            )
            self.notifier.security_alert(s, user, Alert.MFA_ENABLED, at=now)
        return SetupOutcome(codes)

    def _setup_failure(
        self, s: Session, user: User, now: datetime, reason: str, failures: int | None = None
    ) -> None:
        details: dict[str, object] = {"reason": reason, "stage": "setup"}
        if failures is not None:
            details["failures"] = failures
        audit_own(
            self.audit,
            s,
            AuditEvent.MFA_VERIFY_FAILURE,
            user,
            Outcome.FAILURE,
            at=now,
            details=details,
        )

    # -- backup codes -------------------------------------------------------------------------
    def backup_codes_info(self, user_id: int) -> BackupCodesInfo:
        """Remaining backup codes. Raises SecretUnavailable rather than ever reporting zero."""
        with self.db.transaction(write=False) as s:
            user = load_user(s, user_id)
        if not user.two_factor_enabled:
            raise MFAError(errors.MFA_NOT_ENABLED)
        entries = backup_entries(self.mfa, user)
        return BackupCodesInfo(
            total=len(entries), remaining=sum(1 for e in entries if not e.used_at)
        )

    def regenerate_backup_codes(
        self, user_id: int, *, keep_session_token: str | None = None, now: datetime | None = None
    ) -> list[str]:
        """Replace every backup code (the old ones stop working); the new ones, shown once.

        The caller has passed step-up (see StepUpService) before calling this.
        """
        now = now or self.clock()
        codes = self.mfa.generate_backup_codes()
        blob = self.mfa.encrypt_backup_entries(self.mfa.hash_backup_codes(codes))
        with self.db.transaction() as s:
            user = load_user(s, user_id)
            if not user.two_factor_enabled:
                raise MFAError(errors.MFA_NOT_ENABLED)
            user.backup_codes = blob
            user.backup_codes_version += 1
            ended = self.sessions.end_all(
                s, user_id, "backup_codes_regenerated", now, keep_token=keep_session_token
            )
            audit_own(
                self.audit,
                s,
                AuditEvent.BACKUP_CODES_REGENERATED,
                user,
                at=now,
                details={
                    "codes_issued": len(codes),
                    "sessions_ended": ended,
                    "remembered_devices_forgotten": remembered_devices.forget_all(s, user_id),
                },
            )
            self.notifier.security_alert(s, user, Alert.BACKUP_CODES_REGENERATED, at=now)
        return codes

    # -- turning 2FA off ----------------------------------------------------------------------
    def disable(
        self, user_id: int, *, keep_session_token: str | None = None, now: datetime | None = None
    ) -> None:
        """Turn one's own 2FA off (after step-up); ends the user's other sessions.

        Refused (audited, then PermissionDenied) when the user's role requires a second
        factor: a member cannot remove their last one (checklist §12.5).
        """
        now = now or self.clock()
        with self.db.transaction() as s:
            user = load_user(s, user_id)
            if not user.two_factor_enabled:
                raise MFAError(errors.MFA_NOT_ENABLED)
            required = self.policy.must_keep_factor_in(s, user)
            if required:
                audit_own(
                    self.audit,
                    s,
                    AuditEvent.MFA_DISABLED,
                    user,
                    Outcome.FAILURE,
                    at=now,
                    details={"reason": "required_by_policy", "role": user.role},
                )
        if required:
            raise PermissionDenied(FACTOR_REQUIRED)
        with self.db.transaction() as s:
            user = load_user(s, user_id)
            if not user.two_factor_enabled:
                raise MFAError(errors.MFA_NOT_ENABLED)
            if self.policy.must_keep_factor_in(s, user):  # the policy changed in between
                raise PermissionDenied(FACTOR_REQUIRED)
            clear_factors(s, user)
            ended = self.sessions.end_all(
                s, user_id, "mfa_disabled", now, keep_token=keep_session_token
            )
            audit_own(
                self.audit,
                s,
                AuditEvent.MFA_DISABLED,
                user,
                at=now,
                details={
                    "sessions_ended": ended,
                    "remembered_devices_forgotten": remembered_devices.forget_all(s, user_id),
                },
            )
            self.notifier.security_alert(s, user, Alert.MFA_DISABLED, at=now)

    def admin_disable(
        self,
        actor: User | None,
        user_id: int,
        reason: str,
        *,
        identity_confirmed: bool = True,
        actor_name: str = "",
        now: datetime | None = None,
    ) -> None:
        """Emergency reset by an administrator (or the CLI, ``actor=None``): needs a reason.

        Deletes the secret and the backup codes (never reveals or sets a new one) and ends all
        of the user's sessions; the user enrols again after an identity check.
        """
        now = now or self.clock()
        reason = (reason or "").strip()
        if not reason:
            raise ValidationFailed("A reason is required to reset two-factor authentication.")
        if len(reason) > MAX_RESET_REASON:
            raise ValidationFailed(f"The reason must be at most {MAX_RESET_REASON} characters.")
        if not identity_confirmed:
            raise ValidationFailed(
                "Confirm that you have verified this person's identity by other means."
            )
        with self.db.transaction() as s:
            denied = refused_as_admin(s, self.audit, actor, user_id, "mfa_admin_disable", now)
            if denied is None:
                user = load_user(s, user_id)
                if not user.two_factor_enabled:
                    raise MFAError(errors.MFA_NOT_ENABLED)
                clear_factors(s, user)
                ended = self.sessions.end_all(s, user.id, "mfa_admin_reset", now)
                self.audit.record(
                    s,
                    AuditEvent.MFA_ADMIN_DISABLED,
                    **actor_fields(actor, actor_name),
                    target_user_id=user.id,
                    target_name=user.username,
                    details={
                        "reason": reason,
                        "sessions_ended": ended,
                        "remembered_devices_forgotten": remembered_devices.forget_all(s, user.id),
                        # Under a 2FA policy: enrol at the next sign-in, no new grace.
                        "enrol_at_next_sign_in": self.policy.enrol_at_next_sign_in(s, user, now),
                    },
                    at=now,
                )
                self.notifier.security_alert(
                    s,
                    user,
                    Alert.MFA_DISABLED,
                    at=now,
                    admin_name=actor.username if actor is not None else actor_name or "cli",
                )
        if denied is not None:  # raised after the denial's record has committed
            raise PermissionDenied(denied)

    def has_encrypted_data(self) -> bool:
        """Whether any 2FA secret, setup or backup-code blob is stored (key loss would hurt)."""
        with self.db.transaction(write=False) as s:
            return bool(
                s.scalar(
                    select(func.count(User.id)).where(
                        or_(User.totp_secret.is_not(None), User.backup_codes.is_not(None))
                    )
                )
                or s.scalar(select(func.count(MFASetupSession.id)))
            )

    def _setup_info(self, secret: str, username: str, expires: datetime) -> SetupInfo:
        uri = self.mfa.provisioning_uri(secret, username)
        return SetupInfo(
            secret=secret,
            secret_display=self.mfa.format_secret(secret),
            provisioning_uri=uri,
            qr_png=self.mfa.qr_png(uri),
            expires_at=expires,
        )


def issue_backup_codes(mfa: MFAManager, user: User) -> list[str]:
    """A new set of backup codes for ``user`` (stored hashed and encrypted); the plain codes,
    to be shown once. The old set, if any, stops working."""
    codes = mfa.generate_backup_codes()
    user.backup_codes = mfa.encrypt_backup_entries(mfa.hash_backup_codes(codes))
    user.backup_codes_version += 1
    return codes


def clear_factors(s: Session, user: User) -> None:
    """Forget every second factor of ``user``: the app, the backup codes, every passkey and
    security key, and any enrolment or key ceremony in progress."""
    user.two_factor_enabled = False
    user.totp_secret = None
    user.backup_codes = None
    user.backup_codes_version += 1
    user.mfa_enabled_at = None
    s.execute(delete(MFASetupSession).where(MFASetupSession.user_id == user.id))
    s.execute(delete(WebAuthnCredential).where(WebAuthnCredential.user_id == user.id))
    s.execute(delete(WebAuthnChallenge).where(WebAuthnChallenge.user_id == user.id))
