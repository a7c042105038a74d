"""Step-up ("sudo mode"): one mechanism for every sensitive action (checklist §12.4).

A session is *fresh* when it proved the password and a second factor within the window
(``QPKI_REAUTH_MINUTES``, default 10): at sign-in with both factors, or at ``/auth/reauth``.
A user without a second factor re-enters the password. With a window of 0 every sensitive
action asks again: a re-authentication then serves exactly one action.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth.models import User, UserSession
from qpki.auth.passwords import Passwords
from qpki.auth.services.admin_rule import admin_denial
from qpki.auth.services.code_check import CodeChecker
from qpki.auth.services.common import Client, ThrottleGate, audit_own, load_user, refusal_for
from qpki.auth.services.devices import KnownDevices
from qpki.auth.services.policy import PolicyService
from qpki.auth.sessions import token_digest
from qpki.clock import Clock
from qpki.db.manager import DatabaseManager

DEFAULT_WINDOW = timedelta(minutes=10)
# With a window of 0, how long a re-authentication waits for the one action it serves.
SINGLE_USE_GRACE = timedelta(minutes=2)


@dataclass(frozen=True)
class StepUpOutcome:
    """``reason`` on failure: "throttled", "password", "code_missing", "code", "session"."""

    success: bool
    message: str = ""
    retry_at: datetime | None = None
    locked: bool = False
    reason: str = ""


class StepUpService:
    """Decides whether a session may do a sensitive action now, and re-authenticates it."""

    def __init__(
        self,
        db: DatabaseManager,
        audit: AuditLog,
        clock: Clock,
        passwords: Passwords,
        gate: ThrottleGate,
        checker: CodeChecker,
        devices: KnownDevices,
        policy: PolicyService,
        *,
        window: timedelta = DEFAULT_WINDOW,
    ) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.passwords = passwords
        self.gate = gate
        self.checker = checker
        self.devices = devices
        self.policy = policy
        self.window = window

    @property
    def single_use(self) -> bool:
        return self.window <= timedelta(0)

    def is_fresh(self, row: UserSession | None, now: datetime | None = None) -> bool:
        """Whether ``row`` re-authenticated recently enough for a sensitive action."""
        if row is None or row.reauth_at is None:
            return False
        age = (now or self.clock()) - row.reauth_at
        if self.single_use:
            # "Always ask": only an explicit re-authentication counts, not the sign-in.
            return row.reauth_at > row.created_at and age <= SINGLE_USE_GRACE
        return age <= self.window

    def needs_code(self, user: User, row: UserSession | None) -> bool:
        """Whether an inline step-up form must also ask for a current code. A user whose only
        second factors are security keys has no code to type: a stale session of theirs is
        sent to the reauth page, where the key proves it."""
        return (
            bool(user.two_factor_enabled)
            and user.totp_secret is not None
            and not self.is_fresh(row)
        )

    def consume(self, token: str) -> None:
        """With a window of 0, a re-authentication serves one action only."""
        if not self.single_use:
            return
        with self.db.transaction() as s:
            s.execute(
                update(UserSession)
                .where(UserSession.token_hash == token_digest(token))
                .values(reauth_at=None)
            )

    def admin_may_act(self, actor: User) -> str | None:
        """Why ``actor`` may not act on other accounts (no 2FA of their own), or ``None``."""
        with self.db.transaction(write=False) as s:
            return admin_denial(s, actor, None)

    def reauthenticate(
        self,
        token: str,
        password: str,
        code: str | None,
        *,
        client: Client | None = None,
        always_ask_code: bool = False,
        now: datetime | None = None,
    ) -> StepUpOutcome:
        """Re-authenticate the session of ``token`` (the reauth page or an inline form).

        The code may be left out of an inline form while the session is fresh; the reauth
        page always asks for it (``always_ask_code``).
        """
        now = now or self.clock()
        with self.db.transaction(write=False) as s:
            row = s.scalar(select(UserSession).where(UserSession.token_hash == token_digest(token)))
        if row is None or row.ended_at is not None or not row.mfa_passed:
            return StepUpOutcome(
                False, "Your session has ended. Please sign in again.", reason="session"
            )
        return self.prove(
            row.user_id,
            password,
            code,
            code_required=always_ask_code or not self.is_fresh(row, now),
            client=client,
            session_id=row.id,
            now=now,
        )

    def prove(
        self,
        user_id: int,
        password: str,
        code: str | None,
        *,
        code_required: bool,
        client: Client | None = None,
        session_id: int | None = None,
        now: datetime | None = None,
    ) -> StepUpOutcome:
        """Prove it is still the user: the password, and a second factor when they have one
        and ``code_required``; marks session ``session_id`` re-authenticated on success.

        Both checks are counted on the account's throttle before they are made, like a
        sign-in. A backup code is not accepted here: a user who signed in with one is
        already fresh, and a step-up must not spend the codes kept for a lost phone.
        """
        client = client or Client()
        now = now or self.clock()
        with self.db.transaction() as s:
            user = load_user(s, user_id)
            key = self.devices.throttle_key(s, user, user.username_key, client.device_token)
            reservation = self.gate.reserve(s, key, now, user=user, typed_name=user.username)
            if not reservation.granted:
                refusal = refusal_for(reservation.state, now)
                self._failure(s, user, now, "throttled")
        if not reservation.granted:
            return StepUpOutcome(
                False, refusal.message, refusal.retry_at, refusal.locked, reason="throttled"
            )
        password_ok = self.passwords.verify(user.password_hash, password)
        with self.db.transaction() as s:
            if not password_ok:
                self._failure(s, user, now, "bad_password", reservation.state.failures)
                return StepUpOutcome(False, "Password is incorrect.", reason="password")
            self.gate.store.refund(s, key)
            user = load_user(s, user_id)
            if user.two_factor_enabled and code_required:
                if self.policy.key_required_in(s, user):
                    # A role that requires a phishing-resistant factor takes no app code
                    # here either (§12.5): the security-key button confirms instead.
                    return StepUpOutcome(
                        False,
                        "Your role requires a passkey or security key: use it to confirm.",
                        reason="code",
                    )
                if not code:
                    return StepUpOutcome(
                        False,
                        "Enter a current verification code from your app."
                        if user.totp_secret is not None
                        else "Use your security key to confirm it is you.",
                        reason="code_missing",
                    )
                outcome = self.checker.check(
                    s, user, code, now, throttle_key=key, allow_backup=False
                )  # a wrong code after the right password: the checker alerts the owner
                if not outcome.success:
                    return StepUpOutcome(
                        False, outcome.message, outcome.retry_at, outcome.locked, reason="code"
                    )
                self.gate.store.reset(s, key)
            if session_id is not None:
                s.execute(
                    update(UserSession).where(UserSession.id == session_id).values(reauth_at=now)
                )
            audit_own(self.audit, s, AuditEvent.REAUTHENTICATED, user, at=now)
        return StepUpOutcome(True)

    def _failure(
        self, s: Session, user: User, now: datetime, reason: str, failures: int | None = None
    ) -> None:
        details: dict[str, object] = {"reason": reason}
        if failures is not None:
            details["failures"] = failures
        audit_own(
            self.audit,
            s,
            AuditEvent.REAUTH_FAILURE,
            user,
            Outcome.FAILURE,
            at=now,
            details=details,
        )
