"""Accounts and passwords: creating users, roles, (de)activation, password changes and
resets, unlocking. Administrator actions on other accounts need the administrator's own
second factor (see ``admin_rule``); a refusal is audited and committed before it is raised.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth.errors import (
    PermissionDenied,
    ValidationFailed,
)
from qpki.auth.models import LoginThrottle, Role, User
from qpki.auth.passwords import PasswordPolicyError, Passwords, check_password_policy
from qpki.auth.services import remembered_devices
from qpki.auth.services.admin_rule import refused_as_admin
from qpki.auth.services.common import (
    Client,
    ThrottleGate,
    actor_fields,
    audit_own,
    load_user,
    refusal_error,
    refusal_for,
)
from qpki.auth.services.devices import KnownDevices
from qpki.auth.sessions import SessionStore
from qpki.auth.throttle import account_key
from qpki.clock import Clock
from qpki.db.manager import DatabaseManager
from qpki.mail.alerts import Alert
from qpki.mail.notifier import Notifier

T = TypeVar("T")

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{2,63}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{1,60}$")
ROLES = frozenset(r.value for r in Role)
# Temporary passwords are read out over the phone: no look-alike characters (0/O, 1/l/I).
TEMPORARY_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
TEMPORARY_GROUPS = 4
TEMPORARY_GROUP_LENGTH = 5


@dataclass(frozen=True)
class UserSummary:
    """A row of the admin user list."""

    user: User
    locked: bool
    throttled_until: datetime | None
    failures: int


def check_policy(password: str, username: str) -> None:
    try:
        check_password_policy(password, username)
    except PasswordPolicyError as exc:
        raise ValidationFailed(str(exc)) from None


class AccountService:
    """Users, roles and passwords."""

    def __init__(
        self,
        db: DatabaseManager,
        audit: AuditLog,
        clock: Clock,
        passwords: Passwords,
        gate: ThrottleGate,
        sessions: SessionStore,
        devices: KnownDevices,
        notifier: Notifier,
    ) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.passwords = passwords
        self.gate = gate
        self.sessions = sessions
        self.devices = devices
        self.notifier = notifier

    # -- reading ------------------------------------------------------------------------------
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

    def count_users(self) -> int:
        with self.db.transaction(write=False) as s:
            return int(s.scalar(select(func.count(User.id))) or 0)

    def list_users(
        self,
        *,
        mfa: bool | None = None,
        role: str | None = None,
        search: str = "",
        after: str | None = None,
        limit: int | None = None,
        user_id: int | None = None,
        where: ColumnElement[bool] | None = None,
    ) -> list[UserSummary]:
        """Users with their 2FA and lock state, by username; keyset-paginated with ``after``.

        ``where`` is a further condition on ``User`` (the policy's compliance filter)."""
        now = self.clock()
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
            if role is not None:
                stmt = stmt.where(User.role == role)
            if where is not None:
                stmt = stmt.where(where)
            if search:
                pattern = f"%{search.strip().casefold()}%"
                stmt = stmt.where(
                    or_(User.username_key.like(pattern), func.lower(User.email).like(pattern))
                )
            if after:
                stmt = stmt.where(User.username_key > after)
            if limit is not None:
                stmt = stmt.limit(limit)
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

    # -- creating and administering -----------------------------------------------------------
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
        now = self.clock()
        username = username.strip()
        # Every problem at once, by field, so a form shows them all after one submit.
        problems: dict[str, str] = {}
        if not USERNAME_RE.match(username):
            problems["username"] = (
                "Username must be 3-64 characters: letters, digits, '.', '_', '-' or '@', "
                "starting with a letter or digit."
            )
        email = email.strip()
        if email and not EMAIL_RE.match(email):
            problems["email"] = "Email address is not valid."
        if role not in ROLES:
            problems["role"] = "Role must be admin, operator or viewer."
        try:
            check_policy(password, username)
        except ValidationFailed as exc:
            problems["password"] = exc.message
        if problems:
            raise ValidationFailed(" ".join(problems.values()), fields=problems)
        password_hash = self.passwords.hash(password)

        def create(s: Session) -> User:
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
                created_at=now,
            )
            s.add(user)
            s.flush()
            self.audit.record(
                s,
                AuditEvent.USER_CREATED,
                **actor_fields(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={"role": role},
                at=now,
            )
            return user

        return self._as_admin(actor, None, "create_user", now, create)

    def set_role(
        self, actor: User | None, user_id: int, role: str, *, actor_name: str = ""
    ) -> User:
        """Change a user's role (admins only; an admin cannot demote themself).

        ``actor=None`` is a non-user actor named by ``actor_name`` (the CLI, an API key)."""
        now = self.clock()
        if role not in ROLES:
            raise ValidationFailed("Role must be admin, operator or viewer.")
        if actor is not None and actor.id == user_id and role != Role.ADMIN.value:
            raise ValidationFailed("You cannot remove your own admin role.")

        def change(s: Session) -> User:
            user = load_user(s, user_id)
            old = user.role
            user.role = role
            self.audit.record(
                s,
                AuditEvent.USER_CHANGED,
                **actor_fields(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={"role": {"from": old, "to": role}},
                at=now,
            )
            return user

        return self._as_admin(actor, user_id, "set_role", now, change)

    def set_active(
        self, actor: User | None, user_id: int, active: bool, *, actor_name: str = ""
    ) -> User:
        """Deactivate (ending every session) or reactivate a user."""
        now = self.clock()
        if actor is not None and actor.id == user_id and not active:
            raise ValidationFailed("You cannot deactivate your own account.")

        def switch(s: Session) -> User:
            user = load_user(s, user_id)
            user.is_active = active
            ended = 0 if active else self.sessions.end_all(s, user.id, "deactivated", now)
            self.audit.record(
                s,
                AuditEvent.USER_REACTIVATED if active else AuditEvent.USER_DEACTIVATED,
                **actor_fields(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={"sessions_ended": ended},
                at=now,
            )
            return user

        return self._as_admin(actor, user_id, "set_active", now, switch)

    @staticmethod
    def generate_temporary_password() -> str:
        """A random temporary password (~114 bits) without look-alike characters."""
        return "-".join(
            "".join(secrets.choice(TEMPORARY_ALPHABET) for _ in range(TEMPORARY_GROUP_LENGTH))
            for _ in range(TEMPORARY_GROUPS)
        )

    def admin_reset_password(
        self, actor: User | None, user_id: int, *, actor_name: str = ""
    ) -> str:
        """Give the user a temporary password (returned once) they must change at next login."""
        now = self.clock()
        temporary = self.generate_temporary_password()
        new_hash = self.passwords.hash(temporary)

        def reset(s: Session) -> None:
            user = load_user(s, user_id)
            user.password_hash = new_hash
            user.must_change_password = True
            user.password_changed_at = now
            ended = self.sessions.end_all(s, user.id, "password_reset", now)
            self.audit.record(
                s,
                AuditEvent.PASSWORD_RESET,
                **actor_fields(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={
                    "sessions_ended": ended,
                    "remembered_devices_forgotten": remembered_devices.forget_all(s, user.id),
                },
                at=now,
            )
            self.notifier.security_alert(
                s,
                user,
                Alert.PASSWORD_RESET,
                at=now,
                admin_name=actor.username if actor is not None else actor_name or "cli",
            )

        self._as_admin(actor, user_id, "password_reset", now, reset)
        return temporary

    def unlock_user(self, actor: User | None, user_id: int, *, actor_name: str = "") -> bool:
        """Lift the lock or back-off on an account and its devices; True if there was any."""
        now = self.clock()

        def unlock(s: Session) -> bool:
            user = load_user(s, user_id)
            lifted = self.gate.store.unlock(s, self.devices.throttle_keys_of(s, user))
            self.audit.record(
                s,
                AuditEvent.ACCOUNT_UNLOCKED,
                **actor_fields(actor, actor_name),
                target_user_id=user.id,
                target_name=user.username,
                details={"was_locked": lifted},
                at=now,
            )
            return lifted

        return self._as_admin(actor, user_id, "unlock", now, unlock)

    def _as_admin(
        self,
        actor: User | None,
        target: int | None,
        action: str,
        now: datetime,
        work: Callable[[Session], T],
    ) -> T:
        """Run an administrator's use case in one transaction, or refuse it.

        A refusal (not an admin, or an admin without 2FA acting on another account) is
        audited in the transaction and raised only after it committed. ``actor=None`` is a
        non-user actor (the command line, an API key), already authorised by its own means.
        """
        with self.db.transaction() as s:
            denied = refused_as_admin(s, self.audit, actor, target, action, now)
            if denied is None:
                return work(s)
        raise PermissionDenied(denied)

    # -- one's own password -------------------------------------------------------------------
    def change_password(
        self,
        user_id: int,
        current_password: str,
        new_password: str,
        *,
        client: Client | None = None,
        current_token: str | None = None,
        now: datetime | None = None,
    ) -> str | None:
        """Change one's own password; every session ends, this browser gets a new one.

        The current password is counted on the account's throttle before it is checked (it
        is a password guess like any other). Returns the new session token when
        ``current_token`` named a live session.
        """
        client = client or Client()
        now = now or self.clock()
        with self.db.transaction() as s:
            user = load_user(s, user_id)
            key = self.devices.throttle_key(s, user, user.username_key, client.device_token)
            reservation = self.gate.reserve(s, key, now, user=user, typed_name=user.username)
            if not reservation.granted:
                refusal = refusal_for(reservation.state, now)
                audit_own(
                    self.audit,
                    s,
                    AuditEvent.PASSWORD_CHANGED,
                    user,
                    Outcome.FAILURE,
                    at=now,
                    details={"reason": "throttled"},
                )
        if not reservation.granted:
            raise refusal_error(refusal)
        if not self.passwords.verify(user.password_hash, current_password):
            with self.db.transaction() as s:
                audit_own(
                    self.audit,
                    s,
                    AuditEvent.PASSWORD_CHANGED,
                    user,
                    Outcome.FAILURE,
                    at=now,
                    details={"reason": "bad_password", "failures": reservation.state.failures},
                )
            raise ValidationFailed("Current password is incorrect.")
        problem = None
        if new_password == current_password:
            problem = "The new password must differ from the current one."
        else:
            try:
                check_policy(new_password, user.username)
            except ValidationFailed as exc:
                problem = exc.message
        if problem is not None:
            with self.db.transaction() as s:
                self.gate.store.refund(s, key)
            raise ValidationFailed(problem)
        new_hash = self.passwords.hash(new_password)
        with self.db.transaction() as s:
            self.gate.store.refund(s, key)
            row = load_user(s, user_id)
            row.password_hash = new_hash
            row.must_change_password = False
            row.password_changed_at = now
            old = self.sessions.find(s, current_token) if current_token else None
            ended = self.sessions.end_all(s, user_id, "password_changed", now)
            token = None
            if old is not None and old.mfa_passed:
                token = self.sessions.create(
                    s,
                    user_id,
                    mfa_passed=True,
                    now=now,
                    ip=client.ip,
                    user_agent=client.user_agent,
                    method=old.auth_method,
                )
                new_row = self.sessions.find(s, token)
                assert new_row is not None
                new_row.reauth_at = old.reauth_at
                new_row.created_at = old.created_at
                new_row.expires_at = old.expires_at
            audit_own(
                self.audit,
                s,
                AuditEvent.PASSWORD_CHANGED,
                row,
                at=now,
                details={
                    "sessions_ended": max(0, ended - (1 if token else 0)),
                    "remembered_devices_forgotten": remembered_devices.forget_all(s, user_id),
                },
            )
            self.notifier.security_alert(
                s,
                row,
                Alert.PASSWORD_CHANGED,
                at=now,
                ip=client.ip or None,
                user_agent=client.user_agent or None,
            )
        return token
