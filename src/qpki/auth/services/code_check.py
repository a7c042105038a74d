"""Checking a submitted TOTP or backup code inside the caller's write transaction.

The checks are cheap (a Fernet decryption, an HMAC per time step, a few PBKDF2 rounds for
backup codes), so the reservation, the check, the replay guard and the audit record all fit
in one transaction: the attempt is counted before it is checked and its outcome commits with
it, whatever happens after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, or_, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth import errors
from qpki.auth.errors import SecretUnavailable
from qpki.auth.mfa import BackupCodeEntry, CodeKind, MFAManager, SecretDecryptionError
from qpki.auth.models import User
from qpki.auth.services.common import ThrottleGate, audit_own, refusal_for
from qpki.db.base import affected_rows, table_of
from qpki.mail.alerts import Alert
from qpki.mail.notifier import Notifier

log = logging.getLogger(__name__)

LOW_BACKUP_CODES = 3
# Built once: every TOTP check runs it (Core on the transaction's connection). A step is
# accepted only if it is later than the last one accepted for the user.
_USERS = table_of(User)
_REPLAY_GUARD = (
    update(_USERS)
    .where(
        _USERS.c.id == bindparam("uid"),
        or_(_USERS.c.totp_last_step.is_(None), _USERS.c.totp_last_step < bindparam("step")),
    )
    .values(totp_last_step=bindparam("step"))
)
# How many times a backup-code compare-and-swap is retried when another use raced it.
BACKUP_CAS_ATTEMPTS = 5


@dataclass(frozen=True)
class CodeOutcome:
    """The verdict on one submitted code. ``message`` is what the user may be shown."""

    success: bool
    message: str
    method: str | None = None
    backup_codes_remaining: int | None = None
    retry_at: datetime | None = None
    locked: bool = False


def decrypt_secret(mfa: MFAManager, token: str | None, user_id: int) -> str:
    """The plaintext TOTP secret, or SecretUnavailable (fail closed, logged once)."""
    if not token:
        log.error("user id=%s has 2FA on but no TOTP secret stored", user_id)
        raise SecretUnavailable()
    try:
        return mfa.decrypt(token)
    except SecretDecryptionError:
        log.error(
            "TOTP secret of user id=%s cannot be decrypted (wrong key or tampering); refused",
            user_id,
        )
        raise SecretUnavailable() from None


def backup_entries(mfa: MFAManager, user: User) -> list[BackupCodeEntry]:
    """The user's backup-code entries; SecretUnavailable rather than ever reporting none."""
    if not user.backup_codes:
        if user.two_factor_enabled:
            log.error("user id=%s has 2FA on but no backup codes stored", user.id)
            raise SecretUnavailable()
        return []
    try:
        return mfa.decrypt_backup_entries(user.backup_codes)
    except SecretDecryptionError:
        log.error(
            "backup codes of user id=%s cannot be decrypted (wrong key or tampering); refused",
            user.id,
        )
        raise SecretUnavailable() from None


class CodeChecker:
    """Verify a code for a user: reserve the attempt, check, guard against reuse, audit."""

    def __init__(
        self, mfa: MFAManager, audit: AuditLog, gate: ThrottleGate, notifier: Notifier
    ) -> None:
        self.mfa = mfa
        self.audit = audit
        self.gate = gate
        self.notifier = notifier

    def check(
        self,
        s: Session,
        user: User,
        code: str,
        now: datetime,
        *,
        throttle_key: str,
        allow_backup: bool = True,
        actor_name: str | None = None,
    ) -> CodeOutcome:
        """One attempt, counted before it is checked; the caller's transaction commits it.

        ``actor_name`` names who asked when it was not the user themself (a service key of
        the JSON API, ``api:<name>``); the user stays the target of the audit records.
        """
        if not user.two_factor_enabled:
            return CodeOutcome(False, errors.MFA_NOT_ENABLED)
        reservation = self.gate.reserve(s, throttle_key, now, user=user, typed_name=user.username)
        if not reservation.granted:
            refusal = refusal_for(reservation.state, now)
            self._fail(s, user, now, {"reason": "throttled"}, actor_name)
            return CodeOutcome(
                False, refusal.message, retry_at=refusal.retry_at, locked=refusal.locked
            )
        failures = reservation.state.failures
        kind = self.mfa.classify_code(code or "")
        if kind is CodeKind.BACKUP and not allow_backup:
            kind = CodeKind.INVALID
        try:
            if kind is CodeKind.TOTP:
                reason, remaining = self._check_totp(s, user, code, now), None
            elif kind is CodeKind.BACKUP:
                reason, remaining = self._check_backup(s, user, code, now)
            else:
                reason, remaining = "invalid", None
        except SecretUnavailable as exc:
            self._fail(s, user, now, {"reason": "undecryptable", "failures": failures}, actor_name)
            return CodeOutcome(False, exc.message)
        method = kind.value
        if reason != "ok":
            if reason == "replay":
                log.warning("replayed TOTP code refused for user id=%s", user.id)
            self._fail(
                s, user, now, {"reason": reason, "method": method, "failures": failures}, actor_name
            )
            # The password was right (or the user is signed in): tell the owner, at most
            # once per window (the Notifier's rule; the throttle row lock keeps it exact).
            self.notifier.security_alert(s, user, Alert.WRONG_SECOND_FACTOR, at=now)
            message = {
                "already_used": errors.BACKUP_CODE_USED,
                "replay": errors.CODE_JUST_USED,
            }.get(reason, errors.INVALID_CODE)
            return CodeOutcome(False, message, method=method)
        # A success is settled by the caller (it clears the count once: a sign-in when it
        # opens the session, a verification or step-up when it is done).
        self._record(
            s,
            AuditEvent.MFA_VERIFY_SUCCESS,
            user,
            Outcome.SUCCESS,
            now,
            {"method": method},
            actor_name,
        )
        if kind is CodeKind.BACKUP:
            self._record(
                s,
                AuditEvent.BACKUP_CODE_USED,
                user,
                Outcome.SUCCESS,
                now,
                {"remaining": remaining},
                actor_name,
            )
            self.notifier.security_alert(
                s, user, Alert.BACKUP_CODE_USED, at=now, remaining=remaining
            )
            plural = "" if remaining == 1 else "s"
            return CodeOutcome(
                True,
                f"Backup code accepted. {remaining} backup code{plural} remaining.",
                method=method,
                backup_codes_remaining=remaining,
            )
        return CodeOutcome(True, "Verification successful", method=method)

    def _fail(
        self,
        s: Session,
        user: User,
        now: datetime,
        details: dict[str, object],
        actor_name: str | None = None,
    ) -> None:
        self._record(
            s, AuditEvent.MFA_VERIFY_FAILURE, user, Outcome.FAILURE, now, details, actor_name
        )

    def _record(
        self,
        s: Session,
        event: AuditEvent,
        user: User,
        outcome: Outcome,
        now: datetime,
        details: dict[str, object],
        actor_name: str | None,
    ) -> None:
        """Audit an attempt: by the user themself, or by ``actor_name`` on their behalf."""
        if actor_name is None:
            audit_own(self.audit, s, event, user, outcome, at=now, details=details)
            return
        self.audit.record(
            s,
            event,
            outcome,
            actor_id=None,
            actor_name=actor_name[:64],
            target_user_id=user.id,
            target_name=user.username,
            details=details,
            at=now,
        )

    def _check_totp(self, s: Session, user: User, code: str, now: datetime) -> str:
        if user.totp_secret is None and user.two_factor_enabled:
            return "invalid"  # security keys only: there is no app whose code could match
        secret = decrypt_secret(self.mfa, user.totp_secret, user.id)
        step = self.mfa.verify_totp(secret, code, at=now)
        if step is None:
            return "invalid"
        # The replay guard: one atomic conditional UPDATE, so it holds across processes.
        guarded = s.connection().execute(_REPLAY_GUARD, {"uid": user.id, "step": step})
        if affected_rows(guarded) != 1:
            return "replay"
        set_committed_value(user, "totp_last_step", step)  # as the row now is; nothing to flush
        return "ok"

    def _check_backup(
        self, s: Session, user: User, code: str, now: datetime
    ) -> tuple[str, int | None]:
        for _attempt in range(BACKUP_CAS_ATTEMPTS):
            version = user.backup_codes_version
            entries = backup_entries(self.mfa, user)
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
            if affected_rows(swapped) == 1:
                return "ok", sum(1 for e in entries if e.used_at is None)
            s.refresh(user)
        raise RuntimeError("backup code state kept changing under us; giving up")
