"""The per-account back-off policy, as pure arithmetic (the service layer stores the state).

After ``FREE_FAILURES`` consecutive failures each further attempt must wait: 30 s, 1 min,
2 min, … doubling, capped at 15 minutes, so an attacker who knows a username can slow its owner
down but never lock them out for good. After ``HARD_LOCK_FAILURES`` consecutive failures the
account is locked until an administrator (or ``qpki users unlock``) releases it; that lock is
visible in the admin user list and audited. A success resets the count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

FREE_FAILURES = 5
BASE_DELAY = timedelta(seconds=30)
MAX_DELAY = timedelta(minutes=15)
HARD_LOCK_FAILURES = 100


def delay_after(failures: int) -> timedelta:
    """How long to wait after ``failures`` consecutive failures (zero while under the limit)."""
    if failures < FREE_FAILURES:
        return timedelta(0)
    exponent = min(failures - FREE_FAILURES, 10)
    return min(BASE_DELAY * (2**exponent), MAX_DELAY)


def next_allowed(failures: int, now: datetime) -> datetime | None:
    """When the next attempt may be made, or ``None`` if it may be made at once."""
    delay = delay_after(failures)
    return now + delay if delay else None


def is_hard_locked(failures: int) -> bool:
    return failures >= HARD_LOCK_FAILURES


def humanise(delta: timedelta) -> str:
    """'30 seconds', '2 minutes' — for the message the user sees."""
    seconds = max(1, int(delta.total_seconds() + 0.999))
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = (seconds + 59) // 60
    return f"{minutes} minutes"


@dataclass(frozen=True)
class ThrottleState:
    """What the account's throttle says right now."""

    failures: int
    retry_at: datetime | None
    locked: bool

    def blocked_until(self, now: datetime) -> datetime | None:
        return self.retry_at if self.retry_at and self.retry_at > now else None


def account_key(username: str) -> str:
    """The throttle key of a typed username: case-folded and trimmed like ``username_key``."""
    return username.strip().casefold()[:64]
