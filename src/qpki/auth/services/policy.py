"""Per-role 2FA policies: what each role requires, who is compliant, in grace or overdue.

The rules themselves (grace start, shortest grace wins, deadline) are pure functions in
:mod:`qpki.auth.policy`; this service loads their inputs, starts a user's grace at their first
sign-in under a policy, and changes policies (an audited step-up action; the command line can
always change them, so no administrator is ever locked out for good).

"Has a phishing-resistant factor" is one SQL predicate (``security_key_clause``, by default: a
registered passkey or security key), so the per-user check, the compliance counts and the
user-list filter can never disagree.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    and_,
    bindparam,
    case,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
)
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth import policy as rules
from qpki.auth.errors import PermissionDenied, ValidationFailed
from qpki.auth.models import Role, User
from qpki.auth.policy import ComplianceState, Rule, Status
from qpki.auth.services import remembered_devices
from qpki.auth.services.common import actor_fields, audit_own
from qpki.auth.webauthn_models import WebAuthnCredential
from qpki.clock import Clock
from qpki.db.manager import DatabaseManager
from qpki.policy.models import PolicyGrace, RolePolicy

UserIdColumn = ColumnElement[int] | InstrumentedAttribute[int]
KeyClause = Callable[[UserIdColumn], ColumnElement[bool]]

# The method a password-only session carries when it came from a browser new to the account.
NEW_DEVICE_METHOD = "new_device"
OVERDUE_MESSAGE = (
    "Your role requires two-factor authentication and the grace period is over. "
    "Set it up to continue."
)
OVERDUE_KEY_MESSAGE = (
    "Your role requires a passkey or security key and the grace period is over. "
    "Register one to continue."
)
NEW_DEVICE_MESSAGE = (
    "You signed in from a new browser, and your role requires two-factor authentication "
    "on new browsers. Set it up to continue."
)


def has_webauthn_credential(user_id: UserIdColumn) -> ColumnElement[bool]:
    """A user has a phishing-resistant factor when a passkey or security key is registered."""
    return exists().where(WebAuthnCredential.user_id == user_id)


@dataclass(frozen=True)
class PolicyView:
    """One role's policy, detached from the database."""

    role: str
    require_2fa: bool
    grace_hours: int
    require_phishing_resistant: bool = False
    new_device_2fa: bool = False
    remember_days: int = 0
    updated_at: datetime | None = None
    updated_by: str = ""

    @property
    def requires_second_factor(self) -> bool:
        return self.require_2fa or self.require_phishing_resistant

    @property
    def grace(self) -> timedelta:
        return timedelta(hours=self.grace_hours)

    @property
    def remember_allowed_days(self) -> int:
        """Days a device may be remembered (0: never; never where a key is required)."""
        return 0 if self.require_phishing_resistant else self.remember_days

    def changes_from(self, old: PolicyView) -> dict[str, dict[str, object]]:
        fields = (
            "require_2fa",
            "grace_hours",
            "require_phishing_resistant",
            "new_device_2fa",
            "remember_days",
        )
        return {
            name: {"from": getattr(old, name), "to": getattr(self, name)}
            for name in fields
            if getattr(old, name) != getattr(self, name)
        }


# A fresh install: administrators enrol at their first sign-in (grace 0) and are never
# remembered; operators and viewers choose, and may be remembered for 30 days. Migration
# 0008 writes the same rows; these serve a role whose row is missing.
DEFAULT_POLICIES: dict[str, PolicyView] = {
    Role.ADMIN.value: PolicyView(Role.ADMIN.value, True, 0, remember_days=0),
    Role.OPERATOR.value: PolicyView(Role.OPERATOR.value, False, 72, remember_days=30),
    Role.VIEWER.value: PolicyView(Role.VIEWER.value, False, 72, remember_days=30),
}
ROLES = tuple(DEFAULT_POLICIES)
# Session.info key: the policies this transaction has read (sessions live one transaction).
_POLICIES_READ = "qpki_policies_read"
# Every sign-in reads its role's policy: built once, a plain row (Core), no ORM object.
_POLICY_OF_ROLE = select(RolePolicy.__table__).where(
    RolePolicy.__table__.c.role == bindparam("role")
)


def _view(row: RolePolicy | Row[Any]) -> PolicyView:
    return PolicyView(
        role=row.role,
        require_2fa=row.require_2fa,
        grace_hours=row.grace_hours,
        require_phishing_resistant=row.require_phishing_resistant,
        new_device_2fa=row.new_device_2fa,
        remember_days=row.remember_days,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
    )


@dataclass(frozen=True)
class GraceEntry:
    """A user in grace or overdue, for the compliance view."""

    username: str
    role: str
    deadline: datetime | None


@dataclass(frozen=True)
class RoleCompliance:
    """Counts per state for one role, and who is in grace (soonest deadline first)."""

    policy: PolicyView
    counts: dict[ComplianceState, int]
    in_grace: list[GraceEntry]
    overdue: list[GraceEntry]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class PolicyService:
    """Role policies, a user's standing under them, and the compliance view."""

    def __init__(
        self,
        db: DatabaseManager,
        audit: AuditLog,
        clock: Clock,
        *,
        security_key_clause: KeyClause = has_webauthn_credential,
    ) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.security_key_clause = security_key_clause

    # -- inside a caller's transaction ---------------------------------------------------------
    def all_in(self, s: Session) -> dict[str, PolicyView]:
        found = {row.role: _view(row) for row in s.scalars(select(RolePolicy))}
        return {role: found.get(role, default) for role, default in DEFAULT_POLICIES.items()}

    def policy_in(self, s: Session, role: str) -> PolicyView:
        """The role's policy as this transaction sees it, read once per transaction (a
        sign-in asks several times; the ORM's identity map keeps no row nobody holds)."""
        seen: dict[str, PolicyView] = s.info.setdefault(_POLICIES_READ, {})
        view = seen.get(role)
        if view is None:
            row = s.connection().execute(_POLICY_OF_ROLE, {"role": role}).first()
            view = _view(row) if row is not None else DEFAULT_POLICIES.get(role)
            view = view or PolicyView(role, False, 0)
            seen[role] = view
        return view

    def has_key_in(self, s: Session, user_id: int) -> bool:
        """Whether the user has a passkey or security key."""
        return bool(s.scalar(select(self.security_key_clause(literal(user_id)))))

    def _compliant(self, s: Session, user: User, policy: PolicyView) -> bool:
        if policy.require_phishing_resistant:
            return self.has_key_in(s, user.id)
        return bool(user.two_factor_enabled) or self.has_key_in(s, user.id)

    def _rules(
        self, policy: PolicyView, grace: PolicyGrace | None, session_method: str | None
    ) -> tuple[list[Rule], bool]:
        """The rules that apply, and whether they include the role's own (persistent) ones."""
        found: list[Rule] = []
        if policy.require_2fa:
            found.append(Rule("role", policy.grace))
        if policy.require_phishing_resistant:
            found.append(Rule("phishing_resistant", policy.grace))
        persistent = bool(found)
        if policy.new_device_2fa and session_method == NEW_DEVICE_METHOD:
            found.append(Rule("new_device", timedelta(0)))
        if found and grace is not None and grace.enrol_now:
            found.append(Rule("admin_reset", timedelta(0)))
        return found, persistent

    def status_in(
        self,
        s: Session,
        user: User,
        now: datetime,
        *,
        session_method: str | None = None,
        start_grace: bool = False,
    ) -> Status:
        """Where ``user`` stands now; with ``start_grace``, a first sign-in under the policy
        records the start of their grace (audited). Never restarts an existing one."""
        policy = self.policy_in(s, user.role)
        # Without a rule of the role's there is no grace to read (most sign-ins: no query).
        applies = (
            policy.require_2fa
            or policy.require_phishing_resistant
            or (policy.new_device_2fa and session_method == NEW_DEVICE_METHOD)
        )
        grace = s.get(PolicyGrace, user.id) if applies else None
        found, persistent = self._rules(policy, grace, session_method)
        compliant = self._compliant(s, user, policy) if found else True
        started = grace.started_at if grace is not None else None
        if found and not compliant and started is None:
            if persistent and start_grace:
                started = rules.grace_start(None, now)
                s.add(PolicyGrace(user_id=user.id, started_at=started, enrol_now=False))
                audit_own(
                    self.audit,
                    s,
                    AuditEvent.POLICY_GRACE_STARTED,
                    user,
                    at=now,
                    details={
                        "role": user.role,
                        "deadline": (started + policy.grace).isoformat(),
                    },
                )
            elif not persistent:
                started = now  # the new-device rule alone: no grace, nothing to remember
        return rules.evaluate(
            rules=found,
            compliant=compliant,
            grace_started_at=started,
            now=now,
            requires_phishing_resistant=policy.require_phishing_resistant,
        )

    def must_keep_factor_in(self, s: Session, user: User) -> bool:
        """Whether the user's role requires a second factor, so they may not remove their
        last one (turning 2FA off removes every factor: app, codes and keys)."""
        return self.policy_in(s, user.role).requires_second_factor

    def key_required_in(self, s: Session, user: User) -> bool:
        """Whether the user must use their passkey or security key rather than an app code:
        their role requires one and they have one (without one they are in grace, or
        overdue and sent to register one)."""
        policy = self.policy_in(s, user.role)
        return policy.require_phishing_resistant and self.has_key_in(s, user.id)

    def remember_days_in(self, s: Session, user: User) -> int:
        """How long this user's devices may be remembered now (0: not at all)."""
        return self.policy_in(s, user.role).remember_allowed_days

    def factor_required(self, user: User) -> bool:
        """Whether the user's role requires a second factor (the profile explains why 2FA
        cannot be turned off)."""
        with self.db.transaction(write=False) as s:
            return self.must_keep_factor_in(s, user)

    def remember_days_for(self, user_id: int) -> int:
        """How long this user's devices may be remembered (0: the box is not offered)."""
        with self.db.transaction(write=False) as s:
            user = s.get(User, user_id)
            return self.remember_days_in(s, user) if user is not None else 0

    def new_device_rule_in(self, s: Session, user: User) -> bool:
        return self.policy_in(s, user.role).new_device_2fa

    def enrol_at_next_sign_in(self, s: Session, user: User, now: datetime) -> bool:
        """After an administrator's reset: a user under the policy gets no new grace."""
        if not self.policy_in(s, user.role).requires_second_factor:
            return False
        grace = s.get(PolicyGrace, user.id)
        if grace is None:
            s.add(PolicyGrace(user_id=user.id, started_at=now, enrol_now=True))
        else:
            grace.enrol_now = True
        return True

    def enrolled_in(self, s: Session, user_id: int) -> None:
        """The user enrolled: a pending "enrol now" is fulfilled (the grace start stays)."""
        grace = s.get(PolicyGrace, user_id)
        if grace is not None:
            grace.enrol_now = False

    # -- use cases -----------------------------------------------------------------------------
    def policies(self) -> list[PolicyView]:
        with self.db.transaction(write=False) as s:
            return list(self.all_in(s).values())

    def policy(self, role: str) -> PolicyView:
        if role not in DEFAULT_POLICIES:
            raise ValidationFailed(self._bad_role(role))
        with self.db.transaction(write=False) as s:
            return self.policy_in(s, role)

    def status(
        self, user: User, *, session_method: str | None = None, now: datetime | None = None
    ) -> Status:
        """Where a signed-in user stands; starts their grace if this is their first sign-in
        under the policy. A read-only look first: only a grace start writes."""
        now = now or self.clock()
        with self.db.transaction(write=False) as s:
            current = self.status_in(s, user, now, session_method=session_method)
        if current.state is not ComplianceState.WAITING:
            return current
        with self.db.transaction() as s:
            return self.status_in(s, user, now, session_method=session_method, start_grace=True)

    def standing(
        self, user: User, *, session_method: str | None = None, now: datetime | None = None
    ) -> Status:
        """Where a user stands, without starting a grace (a read: the API, the admin view)."""
        now = now or self.clock()
        with self.db.transaction(write=False) as s:
            return self.status_in(s, user, now, session_method=session_method)

    def overdue(self, user: User, *, session_method: str | None = None) -> bool:
        """Whether ``user`` may reach nothing but enrolment (the JSON API answers 403)."""
        return self.status(user, session_method=session_method).overdue

    @staticmethod
    def overdue_message(status: Status) -> str:
        """Why the user must enrol now, in words."""
        if status.requires_phishing_resistant:
            return OVERDUE_KEY_MESSAGE
        if status.rules == ("new_device",):
            return NEW_DEVICE_MESSAGE
        return OVERDUE_MESSAGE

    def set_policy(
        self,
        role: str,
        *,
        actor: User | None,
        actor_name: str = "",
        require_2fa: bool | None = None,
        grace_hours: int | None = None,
        require_phishing_resistant: bool | None = None,
        new_device_2fa: bool | None = None,
        remember_days: int | None = None,
        now: datetime | None = None,
    ) -> PolicyView:
        """Change a role's policy (``None`` keeps a setting). The web calls this after
        step-up; ``actor=None`` is the command line, which may always change a policy.

        An administrator cannot require for their own role what they do not have themself.
        Remembered devices that the new policy no longer allows are forgotten.
        """
        from qpki.auth.services.admin_rule import admin_denial

        now = now or self.clock()
        if role not in DEFAULT_POLICIES:
            raise ValidationFailed(self._bad_role(role))
        problem = (grace_hours is not None and rules.validate_grace_hours(grace_hours)) or (
            remember_days is not None and rules.validate_remember_days(remember_days)
        )
        if problem:
            raise ValidationFailed(problem)
        denied: str | None = None
        with self.db.transaction() as s:
            old = self.policy_in(s, role)
            new = replace(
                old,
                require_2fa=old.require_2fa if require_2fa is None else require_2fa,
                grace_hours=old.grace_hours if grace_hours is None else grace_hours,
                require_phishing_resistant=old.require_phishing_resistant
                if require_phishing_resistant is None
                else require_phishing_resistant,
                new_device_2fa=old.new_device_2fa if new_device_2fa is None else new_device_2fa,
                remember_days=old.remember_days if remember_days is None else remember_days,
                updated_at=now,
                updated_by=(actor.username if actor is not None else actor_name or "cli")[:64],
            )
            if actor is not None:
                denied = admin_denial(s, actor, None)
                current = s.get(User, actor.id)
                if (
                    denied is None
                    and current is not None
                    and rules.self_lockout(
                        actor_role=current.role,
                        role=role,
                        requires_second_factor=new.requires_second_factor,
                        actor_compliant=self._compliant(s, current, new),
                    )
                ):
                    denied = (
                        "You cannot require a passkey or security key for your own role "
                        "before you have registered one yourself."
                        if new.require_phishing_resistant
                        else "You cannot require two-factor authentication for your own role "
                        "before you have turned it on yourself."
                    )
            changes = new.changes_from(old)
            if denied is not None:
                self.audit.record(
                    s,
                    AuditEvent.ACCESS_DENIED,
                    Outcome.FAILURE,
                    **actor_fields(actor),
                    details={"action": "set_policy", "role": role, "reason": denied},
                    at=now,
                )
            elif changes:
                s.info.pop(_POLICIES_READ, None)  # later reads in this transaction see the change
                row = s.get(RolePolicy, role)
                if row is None:
                    row = RolePolicy(role=role)
                    s.add(row)
                row.require_2fa = new.require_2fa
                row.grace_hours = new.grace_hours
                row.require_phishing_resistant = new.require_phishing_resistant
                row.new_device_2fa = new.new_device_2fa
                row.remember_days = new.remember_days
                row.updated_at = new.updated_at
                row.updated_by = new.updated_by
                forgotten = 0
                if new.remember_allowed_days == 0 and old.remember_allowed_days > 0:
                    members = list(s.scalars(select(User.id).where(User.role == role)))
                    forgotten = remembered_devices.forget_for_users(s, members)
                self.audit.record(
                    s,
                    AuditEvent.POLICY_CHANGED,
                    **actor_fields(actor, actor_name or "cli"),
                    details={
                        "role": role,
                        "changes": changes,
                        "remembered_devices_forgotten": forgotten,
                    },
                    at=now,
                )
            else:
                new = old
        if denied is not None:
            raise PermissionDenied(denied)
        return new

    # -- compliance ----------------------------------------------------------------------------
    def _has_factor(self, policy: PolicyView) -> ColumnElement[bool]:
        key = self.security_key_clause(User.id)
        if policy.require_phishing_resistant:
            return key
        return or_(User.two_factor_enabled.is_(True), key)

    def state_clause(
        self, state: ComplianceState, *, now: datetime | None = None
    ) -> ColumnElement[bool]:
        """A SQL condition on ``User`` for the users in ``state`` under the current policies
        (the role's own rules; the per-session new-device rule is not a standing state)."""
        now = now or self.clock()
        with self.db.transaction(write=False) as s:
            policies = self.all_in(s)
        return self._state_clause(policies, state, now)

    def _state_clause(
        self, policies: dict[str, PolicyView], state: ComplianceState, now: datetime
    ) -> ColumnElement[bool]:
        required = {r: p for r, p in policies.items() if p.requires_second_factor}
        grace = aliased(PolicyGrace)  # never correlated away by a query that joins the table
        if state is ComplianceState.NOT_REQUIRED:
            return User.role.not_in(list(required)) if required else User.id.is_not(None)
        parts: list[ColumnElement[bool]] = []
        for role, policy in required.items():
            member = User.role == role
            has = self._has_factor(policy)
            if state is ComplianceState.COMPLIANT:
                parts.append(and_(member, has))
                continue
            grace_row = exists().where(grace.user_id == User.id)
            cutoff = now - policy.grace
            if state is ComplianceState.WAITING:
                parts.append(and_(member, not_(has), not_(grace_row)))
            elif state is ComplianceState.IN_GRACE:
                parts.append(
                    and_(
                        member,
                        not_(has),
                        grace_row.where(grace.enrol_now.is_(False), grace.started_at > cutoff),
                    )
                )
            else:
                parts.append(
                    and_(
                        member,
                        not_(has),
                        grace_row.where(or_(grace.enrol_now.is_(True), grace.started_at <= cutoff)),
                    )
                )
        return or_(*parts) if parts else false()

    def _state_expression(
        self, policies: dict[str, PolicyView], now: datetime
    ) -> ColumnElement[str]:
        order = (
            ComplianceState.NOT_REQUIRED,
            ComplianceState.COMPLIANT,
            ComplianceState.OVERDUE,
            ComplianceState.IN_GRACE,
        )
        return case(
            *[(self._state_clause(policies, st, now), literal(st.value)) for st in order],
            else_=literal(ComplianceState.WAITING.value),
        )

    def compliance(self, *, now: datetime | None = None, listed: int = 50) -> list[RoleCompliance]:
        """Per role: active users by state, and who is in grace or overdue (first ``listed``)."""
        now = now or self.clock()
        with self.db.transaction(write=False) as s:
            policies = self.all_in(s)
            state = self._state_expression(policies, now).label("state")
            counted = s.execute(
                select(User.role, state, func.count(User.id))
                .where(User.is_active.is_(True))
                .group_by(User.role, state)
            ).all()
            result = []
            for role, policy in policies.items():
                counts = dict.fromkeys(ComplianceState, 0)
                for row_role, row_state, n in counted:
                    if row_role == role:
                        counts[ComplianceState(row_state)] += int(n)
                lists = {}
                for st in (ComplianceState.IN_GRACE, ComplianceState.OVERDUE):
                    rows = s.execute(
                        select(User.username, PolicyGrace.started_at, PolicyGrace.enrol_now)
                        .join(PolicyGrace, PolicyGrace.user_id == User.id)
                        .where(
                            User.is_active.is_(True),
                            User.role == role,
                            self._state_clause(policies, st, now),
                        )
                        .order_by(PolicyGrace.started_at, User.username_key)
                        .limit(listed)
                    ).all()
                    lists[st] = [
                        GraceEntry(
                            name,
                            role,
                            started if enrol_now else started + policy.grace,
                        )
                        for name, started, enrol_now in rows
                    ]
                result.append(
                    RoleCompliance(
                        policy,
                        counts,
                        lists[ComplianceState.IN_GRACE],
                        lists[ComplianceState.OVERDUE],
                    )
                )
            return result

    def compliance_csv(self, *, now: datetime | None = None) -> Iterator[str]:
        """Every active user's standing, as CSV lines (streamed; the header first)."""
        now = now or self.clock()
        yield _csv_line(["username", "email", "role", "state", "two_factor", "deadline_utc"])
        with self.db.transaction(write=False) as s:
            policies = self.all_in(s)
            state = self._state_expression(policies, now).label("state")
            rows = s.execute(
                select(
                    User.username,
                    User.email,
                    User.role,
                    state,
                    User.two_factor_enabled,
                    PolicyGrace.started_at,
                    PolicyGrace.enrol_now,
                )
                .outerjoin(PolicyGrace, PolicyGrace.user_id == User.id)
                .where(User.is_active.is_(True))
                .order_by(User.username_key)
                .execution_options(yield_per=500)
            )
            for name, email, role, st, two_factor, started, enrol_now in rows:
                deadline = ""
                if st in (ComplianceState.IN_GRACE.value, ComplianceState.OVERDUE.value):
                    policy = policies.get(role, DEFAULT_POLICIES[Role.VIEWER.value])
                    end = started if enrol_now else started + policy.grace
                    deadline = end.strftime("%Y-%m-%d %H:%M")
                yield _csv_line([name, email, role, st, "yes" if two_factor else "no", deadline])

    @staticmethod
    def _bad_role(role: str) -> str:
        return f"Unknown role {role[:32]!r}: use one of {', '.join(ROLES)}."


def _csv_line(values: list[str]) -> str:
    """One CSV line; a cell that a spreadsheet would run as a formula is quoted with '."""
    safe = ["'" + v if v[:1] in ("=", "+", "-", "@", "\t", "\r") else v for v in values]
    out = io.StringIO()
    csv.writer(out).writerow(safe)
    return out.getvalue()
