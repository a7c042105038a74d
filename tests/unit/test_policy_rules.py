"""The pure rules of 2FA policies (qpki.auth.policy) on an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from qpki.auth.policy import (
    MAX_GRACE_HOURS,
    ComplianceState,
    Rule,
    deadline,
    evaluate,
    grace_start,
    self_lockout,
    shortest_grace,
    validate_grace_hours,
    validate_remember_days,
)
from qpki.clock import SteppedClock

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
ROLE_72H = Rule("role", timedelta(hours=72))


def test_grace_starts_at_the_first_sign_in_and_never_restarts() -> None:
    clock = SteppedClock(T0)
    first = grace_start(None, clock())
    assert first == T0
    clock.advance(hours=50)
    assert grace_start(first, clock()) == T0  # a later sign-in keeps the first start
    clock.advance(days=400)
    assert grace_start(first, clock()) == T0


def test_the_shortest_grace_wins() -> None:
    rules = [ROLE_72H, Rule("phishing_resistant", timedelta(hours=24))]
    assert shortest_grace(rules) == timedelta(hours=24)
    assert deadline(T0, rules) == T0 + timedelta(hours=24)
    # An administrator's reset of a member under the policy: grace 0 wins over any other.
    with_reset = [*rules, Rule("admin_reset", timedelta(0))]
    assert deadline(T0, with_reset) == T0
    assert shortest_grace([]) is None and deadline(T0, []) is None


def test_in_grace_until_the_deadline_then_overdue() -> None:
    clock = SteppedClock(T0)
    status = evaluate(rules=[ROLE_72H], compliant=False, grace_started_at=T0, now=clock())
    assert status.state is ComplianceState.IN_GRACE and status.deadline == T0 + timedelta(hours=72)
    clock.advance(hours=72, seconds=-1)
    assert evaluate(rules=[ROLE_72H], compliant=False, grace_started_at=T0, now=clock()).in_grace
    clock.advance(seconds=1)
    status = evaluate(rules=[ROLE_72H], compliant=False, grace_started_at=T0, now=clock())
    assert status.overdue and status.deadline == clock()


def test_grace_zero_is_overdue_at_once() -> None:
    rules = [Rule("role", timedelta(0))]
    assert evaluate(rules=rules, compliant=False, grace_started_at=T0, now=T0).overdue


def test_compliant_not_required_and_waiting() -> None:
    assert (
        evaluate(rules=[], compliant=False, grace_started_at=None, now=T0).state
        is ComplianceState.NOT_REQUIRED
    )
    assert (
        evaluate(
            rules=[ROLE_72H], compliant=True, grace_started_at=T0, now=T0 + timedelta(days=9)
        ).state
        is ComplianceState.COMPLIANT
    )
    waiting = evaluate(rules=[ROLE_72H], compliant=False, grace_started_at=None, now=T0)
    assert waiting.state is ComplianceState.WAITING and waiting.deadline is None


@pytest.mark.parametrize("hours", [-1, MAX_GRACE_HOURS + 1])
def test_grace_out_of_range_is_refused(hours: int) -> None:
    assert validate_grace_hours(hours)
    assert validate_grace_hours(0) is None and validate_grace_hours(MAX_GRACE_HOURS) is None


def test_remember_days_range() -> None:
    assert validate_remember_days(-1) and validate_remember_days(366)
    assert validate_remember_days(0) is None and validate_remember_days(30) is None


def test_self_lockout() -> None:
    assert self_lockout(
        actor_role="admin", role="admin", requires_second_factor=True, actor_compliant=False
    )
    assert not self_lockout(
        actor_role="admin", role="admin", requires_second_factor=True, actor_compliant=True
    )
    assert not self_lockout(
        actor_role="admin", role="viewer", requires_second_factor=True, actor_compliant=False
    )
    assert not self_lockout(
        actor_role="admin", role="admin", requires_second_factor=False, actor_compliant=False
    )
