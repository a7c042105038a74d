"""AuthManager: the service API for accounts, passwords, two-factor authentication and sessions.

Every public method is one use case and runs in one database transaction, with its audit
record written inside that same transaction, so a change and its audit entry commit together
or not at all. Password hashing (deliberately slow) runs outside write transactions so that
SQLite writers are not held up by it.

User-facing messages come from :mod:`qpki.auth.errors`; nothing here imports Flask.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.audit.models import AuditEventRecord
from qpki.auth import errors
from qpki.auth.errors import (
    AccountLocked,
    AccountThrottled,
    InvalidCredentials,
    MFAError,
    NotFound,
    PermissionDenied,
    SecretUnavailable,
    ValidationFailed,
)
from qpki.auth.mfa import BackupCodeEntry, CodeKind, MFAManager, SecretDecryptionError
from qpki.auth.models import LoginThrottle, MFASetupSession, Role, User, UserSession
from qpki.auth.passwords import PasswordPolicyError, Passwords, check_password_policy
from qpki.auth.sessions import SessionPolicy, SessionStore
from qpki.auth.throttle import AccountThrottle, ThrottleState, account_key, humanise
from qpki.db.base import utcnow
from qpki.db.manager import DatabaseManager

log = logging.getLogger(__name__)

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{2,63}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{1,60}$")
SETUP_LIFETIME = timedelta(minutes=15)
REAUTH_FRESHNESS = timedelta(minutes=10)
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
class LoginResult:
    """After the password step: a session token, and whether the second factor is still due."""

    user: User
    token: str
    mfa_required: bool


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


@dataclass(frozen=True)
class UserSummary:
    """A row of the admin user list."""

    user: User
    locked: bool
    throttled_until: datetime | None
    failures: int


class AuthManager:
    """The one place where authentication rules live."""

    def __init__(
        self,
        db: DatabaseManager,
        mfa: MFAManager,
        *,
        passwords: Passwords | None = None,
        audit: AuditLog | None = None,
        session_policy: SessionPolicy | None = None,
    ) -> None:
        self.db = db
        self.mfa = mfa
        self.passwords = passwords or Passwords()
        self.audit = audit or AuditLog()
        self.sessions = SessionStore(session_policy or SessionPolicy())
        self.throttle = AccountThrottle()

    # == users ===================================================================================
    def create_user(
        self,
        username: str,
        password: str,
        email: str = "",
        role: str = Role.VIEWER.value,
        *,
        actor: User | None = None,
        actor_name: str = "",
        must_change_password: bool = False,
    ) -> User:
        """A new active user. Raises ValidationFailed for a bad name, email, role or password."""
        username = username.strip()
        if not USERNAME_RE.match(username):
            raise ValidationFailed(
                "Username must be 3-64 characters: letters, digits, '.', '_', '-' or '@', "
                "starting with a letter or digit."
            )
        email = email.strip()
        if email and not EMAIL_RE.match(email):
            raise ValidationFailed("Email address is not valid.")
        if role not in {r.value for r in Role}:
            raise ValidationFailed("Role must be admin, operator or viewer.")
        self._check_policy(password, username)
        password_hash = self.passwords.hash(password)
        with self.db.transaction() as s:
            key = account_key(username)
            if s.scalar(select(User.id).where(User.username_key == key)) is not None:
                raise ValidationFailed("A user with this username already exists.")
            user = User(
                username=username,
                username_key=key,
                email=email,
                password_hash=password_hash,
                role=role,
                is_active=True,
                must_change_password=must_change_password,
                created_at=utcnow(),
            )
            s.add(user)
            s.flush()
            self.audit.record(
                s,
                AuditEvent.USER_CREATED,
                **self._actor(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={"role": role},
            )
            return user

    def get_user(
        self, user_id: int | None = None, username: str | None = None, email: str | None = None
    ) -> User | None:
        """Find a user by id, username (case-insensitive) or email; usable after it returns."""
        with self.db.transaction(write=False) as s:
            stmt = select(User)
            if user_id is not None:
                stmt = stmt.where(User.id == user_id)
            elif username is not None:
                stmt = stmt.where(User.username_key == account_key(username))
            elif email is not None:
                stmt = stmt.where(func.lower(User.email) == email.strip().lower())
            else:
                raise ValueError("get_user needs user_id, username or email")
            return s.scalars(stmt.limit(1)).first()

    def list_users(
        self,
        *,
        mfa: bool | None = None,
        search: str = "",
        after: str | None = None,
        limit: int | None = None,
        user_id: int | None = None,
    ) -> list[UserSummary]:
        """Users with their 2FA and lock state, by username; keyset-paginated with ``after``."""
        with self.db.transaction(write=False) as s:
            stmt = (
                select(User, LoginThrottle)
                .outerjoin(LoginThrottle, LoginThrottle.key == User.username_key)
                .order_by(User.username_key)
            )
            if user_id is not None:
                stmt = stmt.where(User.id == user_id)
            if mfa is not None:
                stmt = stmt.where(User.two_factor_enabled.is_(mfa))
            if search:
                pattern = f"%{search.strip().casefold()}%"
                stmt = stmt.where(
                    or_(User.username_key.like(pattern), func.lower(User.email).like(pattern))
                )
            if after:
                stmt = stmt.where(User.username_key > after)
            if limit is not None:
                stmt = stmt.limit(limit)
            now = utcnow()
            return [
                UserSummary(
                    user=user,
                    locked=bool(t and t.locked_at),
                    throttled_until=t.next_allowed_at
                    if t and t.next_allowed_at and t.next_allowed_at > now
                    else None,
                    failures=t.failures if t else 0,
                )
                for user, t in s.execute(stmt).all()
            ]

    def set_role(self, actor: User, user_id: int, role: str) -> User:
        """Change a user's role (admins only; an admin cannot demote themself)."""
        self._require_admin(actor)
        if role not in {r.value for r in Role}:
            raise ValidationFailed("Role must be admin, operator or viewer.")
        if actor.id == user_id and role != Role.ADMIN.value:
            raise ValidationFailed("You cannot remove your own admin role.")
        with self.db.transaction() as s:
            user = self._load(s, user_id)
            old = user.role
            user.role = role
            self.audit.record(
                s,
                AuditEvent.USER_CHANGED,
                **self._actor(actor),
                target_user_id=user.id,
                target_name=user.username,
                details={"role": {"from": old, "to": role}},
            )
            return user

    def set_active(
        self, actor: User | None, user_id: int, active: bool, *, actor_name: str = ""
    ) -> User:
        """Deactivate (ending every session) or reactivate a user."""
        if actor is not None:
            self._require_admin(actor)
            if actor.id == user_id and not active:
                raise ValidationFailed("You cannot deactivate your own account.")
        now = utcnow()
        with self.db.transaction() as s:
            user = self._load(s, user_id)
            user.is_active = active
            ended = 0 if active else self.sessions.end_all(s, user.id, "deactivated", now)
            self.audit.record(
                s,
                AuditEvent.USER_REACTIVATED if active else AuditEvent.USER_DEACTIVATED,
                **self._actor(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={"sessions_ended": ended},
            )
            return user

    # == passwords ===============================================================================
    def authenticate(self, username: str, password: str, *, now: datetime | None = None) -> User:
        """Check a username and password (the first factor).

        Raises InvalidCredentials for an unknown user, a wrong password or an inactive account
        alike (one message, one status, one argon2 computation), and AccountThrottled /
        AccountLocked when the account name has failed too often. Throttling is keyed by the
        typed name, so unknown names behave exactly like real ones.
        """
        now = now or utcnow()
        key = account_key(username)
        with self.db.transaction(write=False) as s:
            self._check_throttle(self.throttle.state(s, key), now)
            user = s.scalar(select(User).where(User.username_key == key))
        ok = self.passwords.verify(user.password_hash if user else None, password)
        if not (ok and user is not None and user.is_active):
            reason = "unknown_user" if user is None else "bad_password" if not ok else "inactive"
            with self.db.transaction() as s:
                state = self.throttle.record_failure(s, key, now)
                self.audit.record(
                    s,
                    AuditEvent.LOGIN_FAILURE,
                    Outcome.FAILURE,
                    target_user_id=user.id if user else None,
                    target_name=username[:64],
                    details={"reason": reason, "failures": state.failures},
                )
                self._audit_throttle_transition(s, state, user, username)
            raise InvalidCredentials()
        if self.passwords.needs_rehash(user.password_hash):
            new_hash = self.passwords.hash(password)
            with self.db.transaction() as s:
                s.execute(update(User).where(User.id == user.id).values(password_hash=new_hash))
            user.password_hash = new_hash
        return user

    def login(
        self,
        username: str,
        password: str,
        *,
        ip: str = "",
        user_agent: str = "",
        now: datetime | None = None,
    ) -> LoginResult:
        """The password step of a web login: a full session, or a pending one if 2FA is on."""
        now = now or utcnow()
        user = self.authenticate(username, password, now=now)
        with self.db.transaction() as s:
            if user.two_factor_enabled:
                token = self.sessions.create(
                    s, user.id, mfa_passed=False, now=now, ip=ip, user_agent=user_agent
                )
                self.audit.record(
                    s,
                    AuditEvent.LOGIN_PASSWORD_ACCEPTED,
                    target_user_id=user.id,
                    actor_id=user.id,
                    actor_name=user.username,
                    target_name=user.username,
                )
                return LoginResult(user=user, token=token, mfa_required=True)
            token = self._open_full_session(s, user, now, ip, user_agent, method="password")
            return LoginResult(user=user, token=token, mfa_required=False)

    def change_password(
        self,
        user_id: int,
        current_password: str,
        new_password: str,
        *,
        keep_session_token: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """Change one's own password; ends every other session of the user."""
        now = now or utcnow()
        user = self.get_user(user_id=user_id)
        if user is None:
            raise NotFound("User not found.")
        if not self.passwords.verify(user.password_hash, current_password):
            with self.db.transaction() as s:
                self.audit.record(
                    s,
                    AuditEvent.PASSWORD_CHANGED,
                    Outcome.FAILURE,
                    **self._actor(user),
                    target_user_id=user.id,
                    target_name=user.username,
                    details={"reason": "bad_password"},
                )
            raise ValidationFailed("Current password is incorrect.")
        if new_password == current_password:
            raise ValidationFailed("The new password must differ from the current one.")
        self._check_policy(new_password, user.username)
        new_hash = self.passwords.hash(new_password)
        with self.db.transaction() as s:
            row = self._load(s, user_id)
            row.password_hash = new_hash
            row.must_change_password = False
            row.password_changed_at = now
            keep = self.sessions.find(s, keep_session_token) if keep_session_token else None
            ended = self.sessions.end_all(
                s, user_id, "password_changed", now, keep_id=keep.id if keep else None
            )
            self.audit.record(
                s,
                AuditEvent.PASSWORD_CHANGED,
                **self._actor(row),
                target_user_id=row.id,
                target_name=row.username,
                details={"sessions_ended": ended},
            )

    @staticmethod
    def generate_temporary_password() -> str:
        """A random temporary password (~108 bits) that passes the password rules."""
        return "-".join(secrets.token_urlsafe(6) for _ in range(3))

    def admin_reset_password(
        self, actor: User | None, user_id: int, *, actor_name: str = ""
    ) -> str:
        """Give the user a temporary password (returned once) they must change at next login."""
        if actor is not None:
            self._require_admin(actor)
        temporary = self.generate_temporary_password()
        new_hash = self.passwords.hash(temporary)
        now = utcnow()
        with self.db.transaction() as s:
            user = self._load(s, user_id)
            user.password_hash = new_hash
            user.must_change_password = True
            user.password_changed_at = now
            ended = self.sessions.end_all(s, user.id, "password_reset", now)
            self.audit.record(
                s,
                AuditEvent.PASSWORD_RESET,
                **self._actor(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={"sessions_ended": ended},
            )
        return temporary

    def unlock_user(self, actor: User | None, user_id: int, *, actor_name: str = "") -> bool:
        """Lift the lock or back-off on an account; True if it was locked or throttled."""
        if actor is not None:
            self._require_admin(actor)
        with self.db.transaction() as s:
            user = self._load(s, user_id)
            lifted = self.throttle.unlock(s, user.username_key)
            self.audit.record(
                s,
                AuditEvent.ACCOUNT_UNLOCKED,
                **self._actor(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={"was_locked": lifted},
            )
            return lifted

    # == two-factor: enrolment ===================================================================
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
            self.audit.record(
                s,
                AuditEvent.MFA_SETUP_STARTED,
                **self._actor(user),
                target_user_id=user.id,
                target_name=user.username,
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
                failure = self.throttle.record_failure(s, user.username_key, now)
                self.audit.record(
                    s,
                    AuditEvent.MFA_VERIFY_FAILURE,
                    Outcome.FAILURE,
                    **self._actor(user),
                    target_user_id=user.id,
                    target_name=user.username,
                    details={"reason": "invalid", "stage": "setup", "failures": failure.failures},
                )
                self._audit_throttle_transition(s, failure, user, user.username)
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
            self.audit.record(
                s,
                AuditEvent.MFA_ENABLED,
                **self._actor(user),
                target_user_id=user.id,
                target_name=user.username,
                details={"method": "totp", "codes_issued": len(codes), "replaced": was_enabled},
            )
        return codes

    # == two-factor: verification ================================================================
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
                self.audit.record(
                    s,
                    AuditEvent.MFA_VERIFY_FAILURE,
                    Outcome.FAILURE,
                    **self._actor(user),
                    target_user_id=user.id,
                    target_name=user.username,
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
                self.audit.record(
                    s,
                    AuditEvent.MFA_VERIFY_FAILURE,
                    Outcome.FAILURE,
                    **self._actor(user),
                    target_user_id=user.id,
                    target_name=user.username,
                    details={"reason": "undecryptable"},
                )
                return MFAResult(False, exc.message)
            reason, remaining = outcome
            method = kind.value
            if reason == "ok":
                self.throttle.reset(s, user.username_key)
                self.audit.record(
                    s,
                    AuditEvent.MFA_VERIFY_SUCCESS,
                    **self._actor(user),
                    target_user_id=user.id,
                    target_name=user.username,
                    details={"method": method},
                )
                if kind is CodeKind.BACKUP:
                    self.audit.record(
                        s,
                        AuditEvent.BACKUP_CODE_USED,
                        **self._actor(user),
                        target_user_id=user.id,
                        target_name=user.username,
                        details={"remaining": remaining},
                    )
                    plural = "" if remaining == 1 else "s"
                    message = f"Backup code accepted. {remaining} backup code{plural} remaining."
                    return MFAResult(True, message, method=method, backup_codes_remaining=remaining)
                return MFAResult(True, "Verification successful", method=method)
            failure = self.throttle.record_failure(s, user.username_key, now)
            self.audit.record(
                s,
                AuditEvent.MFA_VERIFY_FAILURE,
                Outcome.FAILURE,
                **self._actor(user),
                target_user_id=user.id,
                target_name=user.username,
                details={"reason": reason, "method": method, "failures": failure.failures},
            )
            if reason == "replay":
                log.warning("replayed TOTP code refused for user id=%s", user.id)
            self._audit_throttle_transition(s, failure, user, user.username)
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

    # == two-factor: management ==================================================================
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
            keep = self.sessions.find(s, keep_session_token) if keep_session_token else None
            ended = self.sessions.end_all(
                s, user_id, "backup_codes_regenerated", now, keep_id=keep.id if keep else None
            )
            self.audit.record(
                s,
                AuditEvent.BACKUP_CODES_REGENERATED,
                **self._actor(row),
                target_user_id=row.id,
                target_name=row.username,
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
            keep = self.sessions.find(s, keep_session_token) if keep_session_token else None
            ended = self.sessions.end_all(
                s, user_id, "mfa_disabled", now, keep_id=keep.id if keep else None
            )
            self.audit.record(
                s,
                AuditEvent.MFA_DISABLED,
                **self._actor(row),
                target_user_id=row.id,
                target_name=row.username,
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

    # == sessions ================================================================================
    def resolve_session(
        self, token: str, *, now: datetime | None = None
    ) -> tuple[User, UserSession] | None:
        """The user and session row for a cookie token, if the session is live."""
        now = now or utcnow()
        with self.db.transaction() as s:
            resolved = self.sessions.resolve(s, token, now)
            return (resolved.user, resolved.row) if resolved else None

    def logout(self, token: str, *, now: datetime | None = None) -> None:
        """End the session; the same cookie is refused from now on."""
        now = now or utcnow()
        with self.db.transaction() as s:
            row = self.sessions.find(s, token)
            if row is None or row.ended_at is not None:
                return
            self.sessions.end(s, row, "logout", now)
            user = s.get(User, row.user_id)
            self.audit.record(
                s,
                AuditEvent.LOGOUT,
                **self._actor(user),
                target_user_id=row.user_id,
                target_name=user.username if user else "",
            )

    def list_sessions(self, user_id: int, *, now: datetime | None = None) -> list[UserSession]:
        with self.db.transaction(write=False) as s:
            return self.sessions.live_for_user(s, user_id, now or utcnow())

    def end_session(self, user_id: int, session_id: int, *, now: datetime | None = None) -> bool:
        """End one of the user's own sessions (a session of someone else is not found)."""
        now = now or utcnow()
        with self.db.transaction() as s:
            row = s.get(UserSession, session_id)
            if row is None or row.user_id != user_id or row.ended_at is not None:
                return False
            self.sessions.end(s, row, "signed_out_remotely", now)
            user = s.get(User, user_id)
            self.audit.record(
                s,
                AuditEvent.SESSION_ENDED,
                **self._actor(user),
                target_user_id=user_id,
                target_name=user.username if user else "",
                details={"session_id": session_id},
            )
            return True

    def end_other_sessions(
        self, user_id: int, keep_token: str, *, now: datetime | None = None
    ) -> int:
        now = now or utcnow()
        with self.db.transaction() as s:
            keep = self.sessions.find(s, keep_token)
            ended = self.sessions.end_all(
                s, user_id, "signed_out_remotely", now, keep_id=keep.id if keep else None
            )
            user = s.get(User, user_id)
            self.audit.record(
                s,
                AuditEvent.SESSION_ENDED,
                **self._actor(user),
                target_user_id=user_id,
                target_name=user.username if user else "",
                details={"sessions_ended": ended, "scope": "all_others"},
            )
            return ended

    # == housekeeping and reading ================================================================
    def cleanup(self, *, now: datetime | None = None, keep_days: int = 30) -> dict[str, int]:
        """Delete expired setup sessions, old ended sessions and stale throttle rows."""
        now = now or utcnow()
        horizon = now - timedelta(days=keep_days)
        with self.db.transaction() as s:
            setups = s.execute(
                MFASetupSession.__table__.delete().where(MFASetupSession.expires_at <= now)
            ).rowcount
            s.execute(
                update(UserSession)
                .where(UserSession.ended_at.is_(None), UserSession.expires_at <= now)
                .values(ended_at=now, end_reason="expired")
            )
            sessions = s.execute(
                UserSession.__table__.delete().where(UserSession.ended_at < horizon)
            ).rowcount
            throttles = s.execute(
                LoginThrottle.__table__.delete().where(
                    LoginThrottle.locked_at.is_(None),
                    or_(
                        LoginThrottle.last_failure_at.is_(None),
                        LoginThrottle.last_failure_at < now - timedelta(days=1),
                    ),
                )
            ).rowcount
        return {
            "setup_sessions": int(setups or 0),
            "user_sessions": int(sessions or 0),
            "throttle_rows": int(throttles or 0),
        }

    def recent_security_events(self, user_id: int, limit: int = 10) -> list[AuditEventRecord]:
        with self.db.transaction(write=False) as s:
            return self.audit.query(s, user_id=user_id, limit=limit).events

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

    def count_users(self) -> int:
        with self.db.transaction(write=False) as s:
            return int(s.scalar(select(func.count(User.id))) or 0)

    # == helpers =================================================================================
    def _setup_info(self, secret: str, username: str, expires: datetime) -> SetupInfo:
        uri = self.mfa.provisioning_uri(secret, username)
        return SetupInfo(
            secret=secret,
            secret_display=self.mfa.format_secret(secret),
            provisioning_uri=uri,
            qr_png=self.mfa.qr_png(uri),
            expires_at=expires,
        )

    def _open_full_session(
        self, s: Session, user: User, now: datetime, ip: str, user_agent: str, *, method: str | None
    ) -> str:
        token = self.sessions.create(
            s, user.id, mfa_passed=True, now=now, ip=ip, user_agent=user_agent
        )
        s.execute(update(User).where(User.id == user.id).values(last_login_at=now))
        self.throttle.reset(s, user.username_key)
        self.audit.record(
            s,
            AuditEvent.LOGIN_SUCCESS,
            **self._actor(user),
            target_user_id=user.id,
            target_name=user.username,
            details={"second_factor": method or "none"},
        )
        return token

    def _reauthenticate(
        self,
        user_id: int,
        password: str,
        code: str | None,
        mfa_verified_at: datetime | None,
        now: datetime,
        event: AuditEvent,
    ) -> User:
        """Step-up for sensitive changes: the password, and a current code when 2FA is on
        unless the second factor was passed within the last few minutes in this session."""
        user = self.get_user(user_id=user_id)
        if user is None:
            raise NotFound("User not found.")
        with self.db.transaction(write=False) as s:
            self._check_throttle(self.throttle.state(s, user.username_key), now)
        if not self.passwords.verify(user.password_hash, password):
            with self.db.transaction() as s:
                failure = self.throttle.record_failure(s, user.username_key, now)
                self.audit.record(
                    s,
                    event,
                    Outcome.FAILURE,
                    **self._actor(user),
                    target_user_id=user.id,
                    target_name=user.username,
                    details={"reason": "bad_password", "failures": failure.failures},
                )
                self._audit_throttle_transition(s, failure, user, user.username)
            raise ValidationFailed("Password is incorrect.")
        if user.two_factor_enabled and (
            code or self.step_up_needs_code(user, mfa_verified_at, now=now)
        ):
            if not code:
                raise ValidationFailed("Enter a current verification code from your app.")
            ok, message = self.verify_mfa_code(user_id, code, now=now)
            if not ok:
                raise MFAError(message)
        return user

    @staticmethod
    def step_up_needs_code(
        user: User, mfa_verified_at: datetime | None, *, now: datetime | None = None
    ) -> bool:
        """Whether a sensitive change must also take a current code: 2FA is on and the
        second factor was not passed within the last REAUTH_FRESHNESS."""
        now = now or utcnow()
        fresh = mfa_verified_at is not None and now - mfa_verified_at <= REAUTH_FRESHNESS
        return bool(user.two_factor_enabled) and not fresh

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

    @staticmethod
    def _check_throttle(state: ThrottleState | None, now: datetime) -> None:
        if state is None:
            return
        if state.locked:
            raise AccountLocked()
        until = state.blocked_until(now)
        if until is not None:
            raise AccountThrottled(
                f"Too many failed attempts. Try again in {humanise(until - now)}.", until
            )

    def _audit_throttle_transition(
        self, s: Session, state: ThrottleState, user: User | None, typed_name: str
    ) -> None:
        if state.locked and state.failures == 100:
            log.warning("account %r locked after %d failures", typed_name[:64], state.failures)
            self.audit.record(
                s,
                AuditEvent.ACCOUNT_LOCKED,
                Outcome.FAILURE,
                target_user_id=user.id if user else None,
                target_name=typed_name[:64],
                details={"failures": state.failures},
            )
        elif state.retry_at is not None:
            self.audit.record(
                s,
                AuditEvent.ACCOUNT_THROTTLED,
                Outcome.FAILURE,
                target_user_id=user.id if user else None,
                target_name=typed_name[:64],
                details={"failures": state.failures, "retry_at": state.retry_at.isoformat()},
            )

    @staticmethod
    def _load(s: Session, user_id: int) -> User:
        user = s.get(User, user_id)
        if user is None:
            raise NotFound("User not found.")
        return user

    @staticmethod
    def _actor(actor: User | None, name: str = "") -> dict[str, object]:
        if actor is None:
            return {"actor_id": None, "actor_name": name}
        return {"actor_id": actor.id, "actor_name": actor.username}

    def _require_admin(self, actor: User) -> None:
        if not actor.is_admin or not actor.is_active:
            raise PermissionDenied("Only administrators can do this.")

    def _check_policy(self, password: str, username: str) -> None:
        try:
            check_password_policy(password, username)
        except PasswordPolicyError as exc:
            raise ValidationFailed(str(exc)) from None
