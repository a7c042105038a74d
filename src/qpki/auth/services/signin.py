"""Signing in: the password step, then the second step on the pending session.

The password step takes two short transactions around the deliberately slow argon2 check
(reserve the attempt, then settle it), so SQLite writers are never held up by hashing. The
second step is one transaction: claim the pending session, reserve the attempt, check the
code with its replay guard, open the full session and audit — all or nothing, with a failure
recorded and committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth import errors
from qpki.auth.errors import InvalidCredentials
from qpki.auth.models import User
from qpki.auth.passwords import Passwords
from qpki.auth.services import remembered_devices
from qpki.auth.services.code_check import CodeChecker, CodeOutcome
from qpki.auth.services.common import Client, ThrottleGate, audit_own, refusal_error, refusal_for
from qpki.auth.services.devices import KnownDevices
from qpki.auth.services.policy import NEW_DEVICE_METHOD, PolicyService
from qpki.auth.services.remembered_devices import DeviceCheck
from qpki.auth.sessions import SessionStore
from qpki.auth.throttle import account_key
from qpki.clock import Clock
from qpki.db.base import UTCDateTime, table_of
from qpki.db.manager import DatabaseManager
from qpki.mail.alerts import Alert
from qpki.mail.notifier import Notifier
from qpki.mail.useragent import describe_user_agent

# Why an app code is refused for a member of a role that requires a passkey or security key.
KEY_REQUIRED = (
    "Your role requires a passkey or security key: use your key to sign in "
    "(or a backup code if you lost it)."
)
# What the JSON API's verify answers for a deactivated account (the web never gets this far).
ACCOUNT_INACTIVE = "Account is deactivated"
# Built once: every completed sign-in runs it (Core on the transaction's connection).
_SIGNED_IN = (
    update(table_of(User))
    .where(table_of(User).c.id == bindparam("uid"))
    .values(last_login_at=bindparam("at", type_=UTCDateTime()))
)


@dataclass(frozen=True)
class PasswordCheck:
    """A right password: the user, and the throttle key the attempt was counted under."""

    user: User
    throttle_key: str


@dataclass(frozen=True)
class LoginResult:
    """After the password step: a session token, and whether the second factor is still due."""

    user: User
    token: str
    mfa_required: bool
    device_token: str | None = None
    # The rotated remembered-device cookie to set (the code was skipped), or whether the one
    # presented is dead and should be dropped from the browser.
    remember_cookie: str | None = None
    forget_remember_cookie: bool = False
    pending_until: datetime | None = None  # when a pending sign-in times out


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
    device_token: str | None = None
    remember_cookie: str | None = None  # set when the user asked to remember this device
    # The pending sign-in was not there to claim (timed out, ended, already used, or its
    # account deactivated): nothing was checked or counted.
    expired: bool = False


@dataclass(frozen=True)
class ServiceCheck:
    """What the JSON API's verify found: the code's verdict, or why no code was checked
    (an unknown user; a user whose role's policy says they must enrol first)."""

    outcome: CodeOutcome | None
    unknown_user: bool = False
    overdue: str | None = None  # why the user must enrol first, in words


# The user a service names (case-insensitive, like the sign-in form); built once.
_USER_BY_NAME = select(User).where(User.username_key == bindparam("name_key")).limit(1)


class SignInService:
    """The two steps of a web sign-in, and the password check they share with others."""

    def __init__(
        self,
        db: DatabaseManager,
        audit: AuditLog,
        clock: Clock,
        passwords: Passwords,
        gate: ThrottleGate,
        sessions: SessionStore,
        checker: CodeChecker,
        devices: KnownDevices,
        notifier: Notifier,
        *,
        policy: PolicyService,
    ) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.passwords = passwords
        self.gate = gate
        self.sessions = sessions
        self.checker = checker
        self.devices = devices
        self.notifier = notifier
        self.policy = policy

    def authenticate(
        self,
        username: str,
        password: str,
        *,
        client: Client | None = None,
        now: datetime | None = None,
    ) -> PasswordCheck:
        """Check a username and password (the first factor).

        Raises InvalidCredentials for an unknown user, a wrong password or an inactive account
        alike (one message, one argon2 computation), AccountThrottled / AccountLocked when the
        attempt may not be checked now. Every attempt is counted before the hash is computed;
        a right password leaves the count as it was (see ``finish_password``).
        """
        client = client or Client()
        now = now or self.clock()
        key = account_key(username)
        with self.db.transaction() as s:
            user = s.scalar(select(User).where(User.username_key == key))
            throttle_key = self.devices.throttle_key(s, user, key, client.device_token)
            reservation = self.gate.reserve(s, throttle_key, now, user=user, typed_name=username)
            if not reservation.granted:
                refusal = refusal_for(reservation.state, now)
                self.audit.record(
                    s,
                    AuditEvent.LOGIN_FAILURE,
                    Outcome.FAILURE,
                    target_user_id=user.id if user else None,
                    target_name=username[:64],
                    details={"reason": "locked" if refusal.locked else "throttled"},
                    at=now,
                )
        if not reservation.granted:
            raise refusal_error(refusal)
        ok = self.passwords.verify(user.password_hash if user else None, password)
        if not (ok and user is not None and user.is_active):
            reason = "unknown_user" if user is None else "bad_password" if not ok else "inactive"
            with self.db.transaction() as s:
                self.audit.record(
                    s,
                    AuditEvent.LOGIN_FAILURE,
                    Outcome.FAILURE,
                    target_user_id=user.id if user else None,
                    target_name=username[:64],
                    details={"reason": reason, "failures": reservation.state.failures},
                    at=now,
                )
            raise InvalidCredentials()
        if self.passwords.needs_rehash(user.password_hash):
            user.password_hash = self.passwords.hash(password)
            with self.db.transaction() as s:
                s.execute(
                    update(User).where(User.id == user.id).values(password_hash=user.password_hash)
                )
        return PasswordCheck(user, throttle_key)

    def check_password(
        self,
        username: str,
        password: str,
        *,
        client: Client | None = None,
        now: datetime | None = None,
    ) -> User:
        """A password check on its own (no session): counted, then refunded when right."""
        check = self.authenticate(username, password, client=client, now=now)
        with self.db.transaction() as s:
            self.gate.store.refund(s, check.throttle_key)
        return check.user

    def login(
        self,
        username: str,
        password: str,
        *,
        client: Client | None = None,
        replaces_token: str | None = None,
        remember_cookie: str | None = None,
        now: datetime | None = None,
    ) -> LoginResult:
        """The password step: a full session, or a pending one if 2FA is on.

        A session this browser already had (``replaces_token``) ends: signing in again never
        leaves the old session valid. With 2FA on, a valid remembered device
        (``remember_cookie``, where the role's policy allows it) opens the full session with
        the method "remembered_device" and a rotated cookie; a stale one is revoked.
        """
        client = client or Client()
        now = now or self.clock()
        check = self.authenticate(username, password, client=client, now=now)
        user, throttle_key = check.user, check.throttle_key
        with self.db.transaction() as s:
            if replaces_token:
                old = self.sessions.find(s, replaces_token)
                if old is not None:
                    self.sessions.end(s, old, "signed_in_again", now)
            forget_cookie = False
            if user.two_factor_enabled and remember_cookie:
                used = remembered_devices.use(
                    s,
                    self.audit,
                    user,
                    remember_cookie,
                    now,
                    allowed_days=self.policy.remember_days_in(s, user),
                    ip=client.ip,
                    user_agent=client.user_agent,
                )
                if used.check is DeviceCheck.VALID:
                    token, device_token = self.open_full_session(
                        s, user, now, client, method="remembered_device", throttle_key=throttle_key
                    )
                    return LoginResult(
                        user,
                        token,
                        mfa_required=False,
                        device_token=device_token,
                        remember_cookie=used.new_cookie,
                    )
                forget_cookie = used.check is not DeviceCheck.NOT_ALLOWED
            if user.two_factor_enabled:
                self.gate.store.refund(s, throttle_key)
                token = self.sessions.create(
                    s,
                    user.id,
                    mfa_passed=False,
                    now=now,
                    ip=client.ip,
                    user_agent=client.user_agent,
                )
                audit_own(self.audit, s, AuditEvent.LOGIN_PASSWORD_ACCEPTED, user, at=now)
                return LoginResult(
                    user=user,
                    token=token,
                    mfa_required=True,
                    forget_remember_cookie=forget_cookie,
                    pending_until=now + self.sessions.policy.pending,
                )
            token, device_token = self.open_full_session(
                s, user, now, client, method="password", throttle_key=throttle_key
            )
            return LoginResult(user, token, mfa_required=False, device_token=device_token)

    def complete_second_step(
        self,
        pending_token: str,
        code: str,
        *,
        client: Client | None = None,
        remember_device: bool = False,
        now: datetime | None = None,
    ) -> MFAResult:
        """The second step: on success a new session replaces the pending one.

        With ``remember_device`` (the box at the second step), and where the role's policy
        allows it, this browser is remembered: ``remember_cookie`` is its new cookie.
        """
        client = client or Client()
        now = now or self.clock()
        with self.db.transaction() as s:
            pending = self.sessions.claim_pending(s, pending_token, now)
            user = s.get(User, pending.user_id) if pending is not None else None
            if pending is None or user is None or not user.is_active:
                return MFAResult(False, errors.SIGNIN_EXPIRED, expired=True)
            throttle_key = self.devices.throttle_key(
                s, user, user.username_key, client.device_token
            )
            outcome = self.checker.check(s, user, code, now, throttle_key=throttle_key)
            if not outcome.success:
                self.sessions.release(s, pending)
                return MFAResult(
                    False,
                    outcome.message,
                    method=outcome.method,
                    retry_at=outcome.retry_at,
                    locked=outcome.locked,
                )
            if outcome.method == "totp" and self.policy.key_required_in(s, user):
                # A member of a phishing-resistant role who has a key signs in with it; an
                # app code could have been phished. (A backup code still lets them in, to
                # register a new key after losing theirs; the checker audits its use.)
                self.sessions.release(s, pending)
                audit_own(
                    self.audit,
                    s,
                    AuditEvent.MFA_VERIFY_FAILURE,
                    user,
                    Outcome.FAILURE,
                    at=now,
                    details={"reason": "key_required", "method": "totp"},
                )
                return MFAResult(False, KEY_REQUIRED, method=outcome.method)
            token, device_token = self.open_full_session(
                s, user, now, client, method=outcome.method, throttle_key=throttle_key
            )
            remember_cookie = (
                self.remember_device(s, user, now, client) if remember_device else None
            )
        return MFAResult(
            True,
            outcome.message,
            token=token,
            method=outcome.method,
            backup_codes_remaining=outcome.backup_codes_remaining,
            device_token=device_token,
            remember_cookie=remember_cookie,
        )

    def remember_device(self, s: Session, user: User, now: datetime, client: Client) -> str | None:
        """After a second factor: remember this browser if the role's policy allows it
        (audited); the cookie value, or ``None`` when not allowed."""
        days = self.policy.remember_days_in(s, user)
        if days <= 0:
            return None
        cookie = remembered_devices.issue(
            s, user, now, days, ip=client.ip, user_agent=client.user_agent
        )
        audit_own(
            self.audit,
            s,
            AuditEvent.REMEMBERED_DEVICE_ADDED,
            user,
            at=now,
            details={"days": days},
        )
        return cookie

    def verify_code(
        self,
        user_id: int,
        code: str,
        *,
        throttle_key: str | None = None,
        now: datetime | None = None,
    ) -> CodeOutcome:
        """Check a TOTP or backup code for a user, outside any sign-in (the seed's API): the
        same reservation, replay guard and audit as the second step."""
        now = now or self.clock()
        with self.db.transaction() as s:
            user = s.get(User, user_id)
            if user is None:
                return CodeOutcome(False, errors.MFA_NOT_ENABLED)
            return self._check_and_settle(s, user, code, now, throttle_key or user.username_key)

    def verify_for_service(
        self, username: str, code: str, *, actor_name: str, now: datetime | None = None
    ) -> ServiceCheck:
        """The JSON API's verify, in one transaction: find the user by name, refuse one whose
        role's policy is overdue (no code is checked) or who is deactivated, then check the
        code as :meth:`verify_code` does, with the service key as the audited actor."""
        now = now or self.clock()
        with self.db.transaction() as s:
            user = s.scalars(_USER_BY_NAME, {"name_key": account_key(username)}).first()
            if user is None:
                return ServiceCheck(None, unknown_user=True)
            status = self.policy.status_in(s, user, now)
            if status.overdue:
                return ServiceCheck(None, overdue=self.policy.overdue_message(status))
            if not user.is_active:
                return ServiceCheck(CodeOutcome(False, ACCOUNT_INACTIVE))
            return ServiceCheck(
                self._check_and_settle(s, user, code, now, user.username_key, actor_name)
            )

    def _check_and_settle(
        self,
        s: Session,
        user: User,
        code: str,
        now: datetime,
        throttle_key: str,
        actor_name: str | None = None,
    ) -> CodeOutcome:
        """One code outside a sign-in: checked, and a success clears the throttle count."""
        outcome = self.checker.check(
            s, user, code, now, throttle_key=throttle_key, actor_name=actor_name
        )
        if outcome.success:
            self.gate.store.reset(s, throttle_key)
        return outcome

    def open_full_session(
        self,
        s: Session,
        user: User,
        now: datetime,
        client: Client,
        *,
        method: str | None,
        throttle_key: str,
    ) -> tuple[str, str | None]:
        """A signed-in session; the browser becomes a known device. (token, new device token)

        A password-only sign-in from a browser new to an account that signed in before is
        marked "new_device" when the role's policy requires 2FA on new devices (the policy
        gate then sends the user to enrol). The first sign-in under a 2FA policy starts the
        user's grace period.
        """
        signed_in_before = user.last_login_at is not None
        method = method or "password"
        device = self.devices.find(s, user, client.device_token)
        new_device = signed_in_before and device is None
        if new_device and method == "password" and self.policy.new_device_rule_in(s, user):
            method = NEW_DEVICE_METHOD
        token = self.sessions.create(
            s,
            user.id,
            mfa_passed=True,
            now=now,
            ip=client.ip,
            user_agent=client.user_agent,
            method=method,
        )
        s.connection().execute(_SIGNED_IN, {"uid": user.id, "at": now})
        set_committed_value(user, "last_login_at", now)  # as the row now is; nothing to flush
        self.gate.store.reset(s, throttle_key)
        device_token = self.devices.remember(s, user, device, now, client.ip, client.user_agent)
        if device_token is not None and signed_in_before:
            audit_own(
                self.audit,
                s,
                AuditEvent.NEW_DEVICE_SIGN_IN,
                user,
                at=now,
                details={"browser": describe_user_agent(client.user_agent), "method": method},
            )
            self.notifier.security_alert(
                s,
                user,
                Alert.NEW_DEVICE_SIGN_IN,
                at=now,
                ip=client.ip or None,
                user_agent=client.user_agent or None,
            )
        self.policy.status_in(s, user, now, session_method=method, start_grace=True)
        audit_own(
            self.audit,
            s,
            AuditEvent.LOGIN_SUCCESS,
            user,
            at=now,
            details={"second_factor": method or "none", "new_device": device_token is not None},
        )
        return token, device_token
