"""The rules of "2FA required" policies, as pure functions of their inputs and the time.

Nothing here reads the database or the clock: :class:`qpki.auth.services.policy.PolicyService`
loads the facts (the role's policy, whether the user has a factor, when their grace began) and
asks these functions what follows. Kept apart so the rules can be tested on any instant.

The model is GitLab's, made stricter where it was weak:
- a grace period starts the first time a member signs in under the policy and never restarts
  (turning the policy off and on, or a role change, keeps the original start);
- when several rules apply, the shortest grace wins (an administrator's reset of a member
  under the policy is a rule of grace 0: enrol at the next sign-in, no new grace);
- after the deadline only enrolment, sign-out and static assets remain reachable.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

MAX_GRACE_HOURS = 24 * 365
MAX_REMEMBER_DAYS = 365


class ComplianceState(enum.StrEnum):
    """Where a user stands with their role's policy."""

    NOT_REQUIRED = "not_required"  # the role does not require a second factor
    COMPLIANT = "compliant"  # required, and the user has what is required
    WAITING = "waiting"  # required; the grace starts at the user's next sign-in
    IN_GRACE = "in_grace"  # required; may still go on until the deadline
    OVERDUE = "overdue"  # required; only enrolment is open


@dataclass(frozen=True)
class Rule:
    """One reason a user must have a second factor, and the grace it allows."""

    name: str
    grace: timedelta


@dataclass(frozen=True)
class Status:
    """The outcome for one user at one instant; ``deadline`` while a grace applies."""

    state: ComplianceState
    deadline: datetime | None = None
    requires_phishing_resistant: bool = False
    rules: tuple[str, ...] = ()  # the names of the rules that apply

    @property
    def overdue(self) -> bool:
        return self.state is ComplianceState.OVERDUE

    @property
    def in_grace(self) -> bool:
        return self.state is ComplianceState.IN_GRACE


def grace_start(existing: datetime | None, now: datetime) -> datetime:
    """When the grace began: the first recorded start is kept forever (no restart)."""
    return existing if existing is not None else now


def shortest_grace(rules: Iterable[Rule]) -> timedelta | None:
    """The grace that applies when several rules do: the shortest. ``None`` for no rule."""
    graces = [rule.grace for rule in rules]
    if not graces:
        return None
    return max(timedelta(0), min(graces))


def deadline(started_at: datetime, rules: Iterable[Rule]) -> datetime | None:
    """The end of the grace begun at ``started_at`` under ``rules`` (``None``: no rule)."""
    grace = shortest_grace(rules)
    return None if grace is None else started_at + grace


def evaluate(
    *,
    rules: Iterable[Rule],
    compliant: bool,
    grace_started_at: datetime | None,
    now: datetime,
    requires_phishing_resistant: bool = False,
) -> Status:
    """Where a user stands: ``rules`` that apply to them, whether they already meet them,
    and when their grace began (``None``: they have not signed in under the policy yet)."""
    rules = list(rules)
    if not rules:
        return Status(ComplianceState.NOT_REQUIRED)
    names = tuple(rule.name for rule in rules)
    if compliant:
        return Status(ComplianceState.COMPLIANT, None, requires_phishing_resistant, names)
    if grace_started_at is None:
        return Status(ComplianceState.WAITING, None, requires_phishing_resistant, names)
    end = deadline(grace_started_at, rules)
    assert end is not None
    state = ComplianceState.IN_GRACE if now < end else ComplianceState.OVERDUE
    return Status(state, end, requires_phishing_resistant, names)


def validate_grace_hours(hours: int) -> str | None:
    """Why ``hours`` is not a usable grace, or ``None``."""
    if hours < 0 or hours > MAX_GRACE_HOURS:
        return f"The grace period must be between 0 and {MAX_GRACE_HOURS} hours."
    return None


def validate_remember_days(days: int) -> str | None:
    """Why ``days`` is not a usable remembered-device lifetime (0 = not allowed), or ``None``."""
    if days < 0 or days > MAX_REMEMBER_DAYS:
        return f"Remembered devices must last between 0 (not allowed) and {MAX_REMEMBER_DAYS} days."
    return None


def self_lockout(
    *, actor_role: str, role: str, requires_second_factor: bool, actor_compliant: bool
) -> bool:
    """Whether an administrator's change would require of their own role what they lack."""
    return actor_role == role and requires_second_factor and not actor_compliant
