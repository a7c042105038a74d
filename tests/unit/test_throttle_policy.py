"""The pure back-off policy of qpki.auth.throttle (SECURITY_CHECKLIST §2.2, §2.3)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpki.auth.throttle import (
    HARD_LOCK_FAILURES,
    MAX_DELAY,
    delay_after,
    humanise,
    is_hard_locked,
    next_allowed,
)

FAST = settings(max_examples=50, deadline=None)
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("failures", [-1, 0, 1, 2, 3, 4])
def test_first_failures_are_free(failures: int) -> None:
    assert delay_after(failures) == timedelta(0)
    assert next_allowed(failures, NOW) is None


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(5, 30), (6, 60), (7, 120), (8, 240), (9, 480), (10, 900), (11, 900), (50, 900)],
)
def test_delay_doubles_then_caps(failures: int, seconds: int) -> None:
    assert delay_after(failures) == timedelta(seconds=seconds)
    assert next_allowed(failures, NOW) == NOW + timedelta(seconds=seconds)


def test_cap_is_fifteen_minutes() -> None:
    assert timedelta(minutes=15) == MAX_DELAY
    assert delay_after(HARD_LOCK_FAILURES) == MAX_DELAY
    assert delay_after(10**9) == MAX_DELAY  # no overflow for absurd counts


def test_delay_is_monotonic_and_never_above_cap() -> None:
    delays = [delay_after(n) for n in range(0, 500)]
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert max(delays) == MAX_DELAY


@FAST
@given(st.integers(min_value=-(10**6), max_value=10**12))
def test_delay_bounds(failures: int) -> None:
    delay = delay_after(failures)
    assert timedelta(0) <= delay <= MAX_DELAY
    assert (delay > timedelta(0)) == (failures >= 5)


def test_hard_lock_at_100() -> None:
    assert HARD_LOCK_FAILURES == 100
    assert is_hard_locked(99) is False
    assert is_hard_locked(100) is True
    assert is_hard_locked(101) is True
    assert is_hard_locked(0) is False


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(seconds=1), "1 second"),
        (timedelta(seconds=0), "1 second"),
        (timedelta(milliseconds=200), "1 second"),
        (timedelta(seconds=2), "2 seconds"),
        (timedelta(seconds=29.5), "30 seconds"),
        (timedelta(seconds=30), "30 seconds"),
        (timedelta(seconds=60), "60 seconds"),
        (timedelta(seconds=89), "89 seconds"),
        (timedelta(seconds=90), "2 minutes"),
        (timedelta(seconds=120), "2 minutes"),
        (timedelta(seconds=121), "3 minutes"),
        (timedelta(minutes=15), "15 minutes"),
    ],
)
def test_humanise(delta: timedelta, text: str) -> None:
    assert humanise(delta) == text


def test_humanise_policy_steps() -> None:
    assert [humanise(delay_after(n)) for n in range(5, 12)] == [
        "30 seconds",
        "60 seconds",
        "2 minutes",
        "4 minutes",
        "8 minutes",
        "15 minutes",
        "15 minutes",
    ]


@FAST
@given(st.floats(min_value=0.001, max_value=3600, allow_nan=False))
def test_humanise_does_not_understate_the_wait(seconds: float) -> None:
    number, unit = humanise(timedelta(seconds=seconds)).split()
    shown = int(number) * (60 if unit == "minutes" else 1)
    assert unit in {"second", "seconds", "minutes"}
    # Rounded up (to within the 1 ms the implementation allows), never down.
    assert shown > seconds - 0.001
    assert shown < seconds + 61
