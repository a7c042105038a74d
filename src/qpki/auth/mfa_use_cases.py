"""Two-factor use cases: enrolment, verification, backup codes, disabling, admin reset.

Each public method is one transaction with its audit record inside it. The TOTP replay guard
and the backup-code compare-and-swap are single conditional UPDATEs, so they hold across
processes and machines.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.auth import errors
from qpki.auth.errors import (
    AccountLocked,
    AccountThrottled,
    MFAError,
    NotFound,
    PermissionDenied,
    SecretUnavailable,
    ValidationFailed,
)
from qpki.auth.mfa import BackupCodeEntry, CodeKind, SecretDecryptionError
from qpki.auth.models import MFASetupSession, User
from qpki.auth.service_base import ServiceBase
from qpki.db.base import utcnow

log = logging.getLogger(__name__)

SETUP_LIFETIME = timedelta(minutes=15)
LOW_BACKUP_CODES = 3


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
class MFAResult:
    """After the second-factor step."""

    success: bool
    message: str
    token: str | None = None
    method: str | None = None
    backup_codes_remaining: int | None = None
    retry_at: datetime | None = None
    locked: bool = False


class MFAUseCases(ServiceBase):
    """Two-factor authentication: the seed's API (``verify_mfa_code``) and everything around it."""

    def start_mfa_setup(self, user_id: int, *, now: datetime | None = None) -> SetupInfo:
        """Begin enrolment: a new secret waits (encrypted, 15 minutes) for a confirming code."""
        now = now or utcnow()
        secret = self.mfa.generate_secret()
        with self.db.transaction() as s:
            user = self._load(s, user_id)
            s.execute(
                MFASetupSession.__table__.delete().where(
                    or_(MFASetupSession.expires_at <= now, MFASetupSession.user_id == user_id)
                )
            )
            expires = now + SETUP_LIFETIME
            s.add(
                MFASetupSession(
                    id=secrets.token_urlsafe(24),
                    user_id=user_id,
                    secret=self.mfa.encrypt(secret, now),
                    created_at=now,
                    expires_at=expires,
                )
            )
            self._audit_own(
                s,
                AuditEvent.MFA_SETUP_STARTED,
                user,
                details={"replaces_existing": user.two_factor_enabled},
            )
            username = user.username
        return self._setup_info(secret, username, expires)

    def get_pending_setup(self, user_id: int, *, now: datetime | None = None) -> SetupInfo | None:
        """The enrolment still waiting for its code (to show the same QR again), if any."""
        now = now or utcnow()
        with self.db.transaction(write=False) as s:
            pending = s.scalar(select(MFASetupSession).where(MFASetupSession.user_id == user_id))
            user = s.get(User, user_id)
            if pending is None or user is None or pending.expires_at <= now:
                return None
            token, expires, username = pending.secret, pending.expires_at, user.username
        return self._setup_info(self._decrypt(token, user_id), username, expires)

    def confirm_mfa_setup(
        self, user_id: int, code: str, *, now: datetime | None = None
    ) -> list[str]:
        """Enable 2FA with a valid code from the new app; returns the 8 backup codes, once.

        Raises MFAError "Setup session expired" past 15 minutes (or with no setup started) and
        "Invalid verification code" for a wrong code; nothing changes in either case.
        """
        now = now or utcnow()
        with self.db.transaction() as s:
            user = self._load(s, user_id)
            state = self.throttle.state(s, user.username_key)
        self._check_throttle(state, now)
        with self.db.transaction() as s:
            user = self._load(s, user_id)
            pending = s.scalar(select(MFASetupSession).where(MFASetupSession.user_id == user_id))
            if pending is None or pending.expires_at <= now:
                if pending is not None:
                    s.delete(pending)
                raise MFAError(errors.SETUP_EXPIRED)
            secret = self._decrypt(pending.secret, user_id)
            step = self.mfa.verify_totp(secret, code, at=now)
            if step is None:
                self._count_failure(
                    s,
                    user,
                    now,
                    AuditEvent.MFA_VERIFY_FAILURE,
                    {"reason": "invalid", "stage": "setup"},
                )
                raise MFAError(errors.INVALID_CODE)
            codes = self.mfa.generate_backup_codes()
            was_enabled = user.two_factor_enabled
            user.totp_secret = self.mfa.encrypt(secret, now)
            user.backup_codes = self.mfa.encrypt_backup_entries(self.mfa.hash_backup_codes(codes))
            user.backup_codes_version += 1
            user.totp_last_step = step  # the confirming code cannot be replayed to log in
            user.two_factor_enabled = True
            user.mfa_enabled_at = now
            s.delete(pending)
            self.throttle.reset(s, user.username_key)
            self._audit_own(
                s,
                AuditEvent.MFA_ENABLED,
                user,
                details={"method": "totp", "codes_issued": len(codes), "replaced": was_enabled},
            )
        return codes

    def verify_mfa_code(
        self, user_id: int, code: str, *, now: datetime | None = None
    ) -> tuple[bool, str]:
        """Check a TOTP or backup code for a user: ``(success, message)`` as in the seed API.

        Messages: "Invalid verification code", "MFA not enabled", "Backup code already used",
        the throttling and lock messages, and on success "Verification successful" or
        "Backup code accepted. N backup codes remaining."
        """
        result = self._verify(user_id, code, now=now or utcnow())
        return result.success, result.message

    def complete_mfa_login(
        self,
        pending_token: str,
        code: str,
        *,
        ip: str = "",
        user_agent: str = "",
        now: datetime | None = None,
    ) -> MFAResult:
        """The second step of a web login: on success a new session replaces the pending one."""
        now = now or utcnow()
        with self.db.transaction() as s:
            pending = self.sessions.resolve(s, pending_token, now)
        if pending is None or pending.row.mfa_passed:
            return MFAResult(False, "Your sign-in has expired. Please sign in again.")
        result = self._verify(pending.user.id, code, now=now)
        if not result.success:
            return result
        with self.db.transaction() as s:
            row = self.sessions.find(s, pending_token)
            if row is None or row.ended_at is not None:  # ended concurrently (logout)
                return MFAResult(False, "Your sign-in has expired. Please sign in again.")
            self.sessions.end(s, row, "mfa_completed", now)
            user = self._load(s, pending.user.id)
            token = self._open_full_session(s, user, now, ip, user_agent, method=result.method)
        return MFAResult(
            True,
            result.message,
            token=token,
            method=result.method,
            backup_codes_remaining=result.backup_codes_remaining,
        )

    def _verify(self, user_id: int, code: str, *, now: datetime) -> MFAResult:
        with self.db.transaction(write=False) as s:
            user = s.get(User, user_id)
            state = self.throttle.state(s, user.username_key) if user else None
        if user is None or not user.two_factor_enabled:
            return MFAResult(False, errors.MFA_NOT_ENABLED)
        try:
            self._check_throttle(state, now)  # before any decryption or hashing
        except (AccountThrottled, AccountLocked) as exc:
            with self.db.transaction() as s:
                self._audit_own(
                    s,
                    AuditEvent.MFA_VERIFY_FAILURE,
                    user,
                    Outcome.FAILURE,
                    details={"reason": "locked"},
                )
            return MFAResult(
                False,
                exc.message,
                retry_at=getattr(exc, "retry_at", None),
                locked=isinstance(exc, AccountLocked),
            )
        kind = self.mfa.classify_code(code or "")
        with self.db.transaction() as s:
            user = self._load(s, user_id)
            try:
                if kind is CodeKind.TOTP:
                    outcome = self._check_totp(s, user, code, now)
                elif kind is CodeKind.BACKUP:
                    outcome = self._check_backup(s, user, code, now)
                else:
                    outcome = ("invalid", None)
            except SecretUnavailable as exc:
                self._audit_own(
                    s,
                    AuditEvent.MFA_VERIFY_FAILURE,
                    user,
                    Outcome.FAILURE,
                    details={"reason": "undecryptable"},
                )
                return MFAResult(False, exc.message)
            reason, remaining = outcome
            method = kind.value
            if reason == "ok":
                self.throttle.reset(s, user.username_key)
                self._audit_own(
                    s,
                    AuditEvent.MFA_VERIFY_SUCCESS,
                    user,
                    details={"method": method},
                )
                if kind is CodeKind.BACKUP:
                    self._audit_own(
                        s,
                        AuditEvent.BACKUP_CODE_USED,
                        user,
                        details={"remaining": remaining},
                    )
                    plural = "" if remaining == 1 else "s"
                    message = f"Backup code accepted. {remaining} backup code{plural} remaining."
                    return MFAResult(True, message, method=method, backup_codes_remaining=remaining)
                return MFAResult(True, "Verification successful", method=method)
            self._count_failure(
                s, user, now, AuditEvent.MFA_VERIFY_FAILURE, {"reason": reason, "method": method}
            )
            if reason == "replay":
                log.warning("replayed TOTP code refused for user id=%s", user.id)
            if reason == "already_used":
                return MFAResult(False, errors.BACKUP_CODE_USED, method=method)
            return MFAResult(False, errors.INVALID_CODE, method=method)

    def _check_totp(self, s: Session, user: User, code: str, now: datetime) -> tuple[str, None]:
        secret = self._decrypt(user.totp_secret, user.id)
        step = self.mfa.verify_totp(secret, code, at=now)
        if step is None:
            return "invalid", None
        # The replay guard: one atomic conditional UPDATE, so it holds across processes.
        guarded = s.execute(
            update(User)
            .where(User.id == user.id)
            .where(or_(User.totp_last_step.is_(None), User.totp_last_step < step))
            .values(totp_last_step=step)
            .execution_options(synchronize_session=False)
        )
        return ("ok", None) if guarded.rowcount == 1 else ("replay", None)

    def _check_backup(
        self, s: Session, user: User, code: str, now: datetime
    ) -> tuple[str, int | None]:
        for _attempt in range(5):
            version = user.backup_codes_version
            entries = self._backup_entries(user)
            index = self.mfa.match_backup_code(entries, code)
            if index is None:
                return "invalid", None
            if entries[index].used_at is not None:
                return "already_used", None
            entries[index].used_at = now.isoformat()
            blob = self.mfa.encrypt_backup_entries(entries)
            # Compare-and-swap on the version: two concurrent uses of one code → one success.
            swapped = s.execute(
                update(User)
                .where(User.id == user.id, User.backup_codes_version == version)
                .values(backup_codes=blob, backup_codes_version=version + 1)
                .execution_options(synchronize_session=False)
            )
            if swapped.rowcount == 1:
                return "ok", sum(1 for e in entries if e.used_at is None)
            s.expire(user)
        raise RuntimeError("backup code state kept changing under us; giving up")

    def get_backup_codes_info(self, user_id: int) -> BackupCodesInfo:
        """Remaining backup codes. Raises SecretUnavailable rather than ever reporting zero."""
        user = self.get_user(user_id=user_id)
        if user is None:
            raise NotFound("User not found.")
        if not user.two_factor_enabled:
            raise MFAError(errors.MFA_NOT_ENABLED)
        entries = self._backup_entries(user)
        return BackupCodesInfo(
            total=len(entries), remaining=sum(1 for e in entries if not e.used_at)
        )

    def regenerate_backup_codes(
        self,
        user_id: int,
        password: str,
        code: str | None = None,
        *,
        mfa_verified_at: datetime | None = None,
        keep_session_token: str | None = None,
        now: datetime | None = None,
    ) -> list[str]:
        """Replace every backup code (the old ones stop working); returns the new ones once."""
        now = now or utcnow()
        user = self._reauthenticate(
            user_id, password, code, mfa_verified_at, now, AuditEvent.BACKUP_CODES_REGENERATED
        )
        if not user.two_factor_enabled:
            raise MFAError(errors.MFA_NOT_ENABLED)
        codes = self.mfa.generate_backup_codes()
        blob = self.mfa.encrypt_backup_entries(self.mfa.hash_backup_codes(codes))
        with self.db.transaction() as s:
            row = self._load(s, user_id)
            row.backup_codes = blob
            row.backup_codes_version += 1
            ended = self.sessions.end_all(
                s, user_id, "backup_codes_regenerated", now, keep_token=keep_session_token
            )
            self._audit_own(
                s,
                AuditEvent.BACKUP_CODES_REGENERATED,
                row,
                details={"codes_issued": len(codes), "sessions_ended": ended},
            )
        return codes

    def disable_mfa(
        self,
        user_id: int,
        password: str,
        code: str | None = None,
        *,
        mfa_verified_at: datetime | None = None,
        keep_session_token: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """Turn one's own 2FA off after re-entering the password (and a code unless fresh)."""
        now = now or utcnow()
        user = self._reauthenticate(
            user_id, password, code, mfa_verified_at, now, AuditEvent.MFA_DISABLED
        )
        if not user.two_factor_enabled:
            raise MFAError(errors.MFA_NOT_ENABLED)
        with self.db.transaction() as s:
            row = self._load(s, user_id)
            self._clear_mfa(s, row)
            ended = self.sessions.end_all(
                s, user_id, "mfa_disabled", now, keep_token=keep_session_token
            )
            self._audit_own(
                s,
                AuditEvent.MFA_DISABLED,
                row,
                details={"sessions_ended": ended},
            )

    def admin_disable_mfa(
        self,
        admin_id: int | None,
        user_id: int,
        reason: str,
        *,
        actor_name: str = "",
        now: datetime | None = None,
    ) -> None:
        """Emergency reset by an administrator (or the CLI, ``admin_id=None``): needs a reason.

        Deletes the secret and the backup codes (never reveals or sets a new one) and ends all
        of the user's sessions; the user enrols again after an identity check.
        """
        now = now or utcnow()
        reason = (reason or "").strip()
        if not reason:
            raise ValidationFailed("A reason is required to reset two-factor authentication.")
        if len(reason) > 500:
            raise ValidationFailed("The reason must be at most 500 characters.")
        actor = None
        if admin_id is not None:
            actor = self.get_user(user_id=admin_id)
            if actor is None or not actor.is_active or not actor.is_admin:
                with self.db.transaction() as s:  # the denial is recorded, and committed
                    self.audit.record(
                        s,
                        AuditEvent.ACCESS_DENIED,
                        Outcome.FAILURE,
                        **self._actor(actor),
                        target_user_id=user_id,
                        details={"action": "mfa_admin_disable"},
                    )
                raise PermissionDenied("Only administrators can reset two-factor authentication.")
        with self.db.transaction() as s:
            user = self._load(s, user_id)
            if not user.two_factor_enabled:
                raise MFAError(errors.MFA_NOT_ENABLED)
            self._clear_mfa(s, user)
            ended = self.sessions.end_all(s, user.id, "mfa_admin_reset", now)
            self.audit.record(
                s,
                AuditEvent.MFA_ADMIN_DISABLED,
                **self._actor(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={"reason": reason, "sessions_ended": ended},
            )

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

    def _backup_entries(self, user: User) -> list[BackupCodeEntry]:
        if not user.backup_codes:
            if user.two_factor_enabled:
                log.error("user id=%s has 2FA on but no backup codes stored", user.id)
                raise SecretUnavailable()
            return []
        try:
            return self.mfa.decrypt_backup_entries(user.backup_codes)
        except SecretDecryptionError:
            log.error(
                "backup codes of user id=%s cannot be decrypted (wrong key or tampering); refused",
                user.id,
            )
            raise SecretUnavailable() from None

    def _decrypt(self, token: str | None, user_id: int) -> str:
        if not token:
            log.error("user id=%s has 2FA on but no TOTP secret stored", user_id)
            raise SecretUnavailable()
        try:
            return self.mfa.decrypt(token)
        except SecretDecryptionError:
            log.error(
                "TOTP secret of user id=%s cannot be decrypted (wrong key or tampering); refused",
                user_id,
            )
            raise SecretUnavailable() from None

    @staticmethod
    def _clear_mfa(s: Session, user: User) -> None:
        user.two_factor_enabled = False
        user.totp_secret = None
        user.backup_codes = None
        user.backup_codes_version += 1
        user.mfa_enabled_at = None
        s.execute(MFASetupSession.__table__.delete().where(MFASetupSession.user_id == user.id))
