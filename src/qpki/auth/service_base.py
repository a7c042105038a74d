"""What every use case of the service layer stands on: collaborators and shared rules.

AuthManager is assembled from use-case classes — accounts and passwords (``auth_manager``),
two-factor authentication (``mfa_use_cases``), sessions (``session_use_cases``). This base
holds the collaborators they share and the rules used across them: throttling, step-up
re-authentication, opening a full session, the audit actor, loading a user.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth.errors import (
    AccountLocked,
    AccountThrottled,
    MFAError,
    NotFound,
    PermissionDenied,
    ValidationFailed,
)
from qpki.auth.mfa import MFAManager
from qpki.auth.models import User
from qpki.auth.passwords import PasswordPolicyError, Passwords, check_password_policy
from qpki.auth.sessions import SessionPolicy, SessionStore
from qpki.auth.throttle import AccountThrottle, ThrottleState, account_key, humanise
from qpki.db.base import utcnow
from qpki.db.manager import DatabaseManager

log = logging.getLogger(__name__)

REAUTH_FRESHNESS = timedelta(minutes=10)


@dataclass(frozen=True)
class LoginResult:
    """After the password step: a session token, and whether the second factor is still due."""

    user: User
    token: str
    mfa_required: bool


class ServiceBase:
    """Collaborators and shared rules of every use case (not used on its own)."""

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

    def _open_full_session(
        self, s: Session, user: User, now: datetime, ip: str, user_agent: str, *, method: str | None
    ) -> str:
        token = self.sessions.create(
            s, user.id, mfa_passed=True, now=now, ip=ip, user_agent=user_agent
        )
        s.execute(update(User).where(User.id == user.id).values(last_login_at=now))
        self.throttle.reset(s, user.username_key)
        self._audit_own(
            s,
            AuditEvent.LOGIN_SUCCESS,
            user,
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
                self._count_failure(s, user, now, event, {"reason": "bad_password"})
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

    def _count_failure(
        self, s: Session, user: User, now: datetime, event: AuditEvent, details: dict[str, object]
    ) -> ThrottleState:
        """A failed factor of a known user: count it for the back-off and audit it."""
        failure = self.throttle.record_failure(s, user.username_key, now)
        self._audit_own(
            s, event, user, Outcome.FAILURE, details={**details, "failures": failure.failures}
        )
        self._audit_throttle_transition(s, failure, user, user.username)
        return failure

    def _audit_own(
        self,
        s: Session,
        event: AuditEvent,
        user: User,
        outcome: Outcome = Outcome.SUCCESS,
        **fields: object,
    ) -> None:
        """Audit something a user did to their own account (actor and target are the user)."""
        self.audit.record(
            s,
            event,
            outcome,
            actor_id=user.id,
            actor_name=user.username,
            target_user_id=user.id,
            target_name=user.username,
            **fields,  # type: ignore[arg-type]
        )

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
