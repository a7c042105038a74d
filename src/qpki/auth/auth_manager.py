"""AuthManager: the service API for accounts, passwords, two-factor authentication and sessions.

Every public method is one use case and runs in one database transaction, with its audit
record written inside that same transaction, so a change and its audit entry commit together
or not at all. Password hashing (deliberately slow) runs outside write transactions so that
SQLite writers are not held up by it.

User-facing messages come from :mod:`qpki.auth.errors`; nothing here imports Flask.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, update

from qpki.audit.events import AuditEvent, Outcome
from qpki.auth.errors import (
    InvalidCredentials,
    NotFound,
    ValidationFailed,
)
from qpki.auth.mfa_use_cases import (
    LOW_BACKUP_CODES,
    SETUP_LIFETIME,
    BackupCodesInfo,
    MFAResult,
    MFAUseCases,
    SetupInfo,
)
from qpki.auth.models import LoginThrottle, Role, User
from qpki.auth.service_base import REAUTH_FRESHNESS, LoginResult
from qpki.auth.session_use_cases import SessionUseCases
from qpki.auth.throttle import account_key
from qpki.db.base import utcnow

__all__ = [
    "LOW_BACKUP_CODES",
    "REAUTH_FRESHNESS",
    "SETUP_LIFETIME",
    "AuthManager",
    "BackupCodesInfo",
    "LoginResult",
    "MFAResult",
    "SetupInfo",
    "UserSummary",
]


USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{2,63}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{1,60}$")


@dataclass(frozen=True)
class UserSummary:
    """A row of the admin user list."""

    user: User
    locked: bool
    throttled_until: datetime | None
    failures: int


class AuthManager(MFAUseCases, SessionUseCases):
    """The service API: accounts and passwords here; two-factor and session use cases inherited.

    Built once per application (``app.auth_manager``); see ServiceBase for its collaborators.
    """

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
                self._audit_own(
                    s,
                    AuditEvent.PASSWORD_CHANGED,
                    user,
                    Outcome.FAILURE,
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
            ended = self.sessions.end_all(
                s, user_id, "password_changed", now, keep_token=keep_session_token
            )
            self._audit_own(
                s,
                AuditEvent.PASSWORD_CHANGED,
                row,
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

    def count_users(self) -> int:
        with self.db.transaction(write=False) as s:
            return int(s.scalar(select(func.count(User.id))) or 0)
