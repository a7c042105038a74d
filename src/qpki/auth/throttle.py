"""The per-account back-off policy, as pure arithmetic (the service layer stores the state).

After ``FREE_FAILURES`` consecutive failures each further attempt must wait: 30 s, 1 min,
2 min, … doubling, capped at 15 minutes, so an attacker who knows a username can slow its owner
down but never lock them out for good. After ``HARD_LOCK_FAILURES`` consecutive failures the
account is locked until an administrator (or ``qpki users unlock``) releases it; that lock is
visible in the admin user list and audited. A success resets the count.
"""

from __future__ import annotations

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


# -- state in the database ---------------------------------------------------------------------
# (imports kept below the pure policy so the arithmetic above reads on its own)
from dataclasses import dataclass  # noqa: E402

from sqlalchemy import insert, select, update  # noqa: E402
from sqlalchemy.dialects import postgresql, sqlite  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from qpki.auth.models import LoginThrottle  # noqa: E402


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


class AccountThrottle:
    """Reads and updates ``login_throttle`` rows inside the caller's transaction."""

    def state(self, session: Session, key: str) -> ThrottleState:
        row = session.get(LoginThrottle, key)
        if row is None:
            return ThrottleState(0, None, False)
        return ThrottleState(row.failures, row.next_allowed_at, row.locked_at is not None)

    def record_failure(self, session: Session, key: str, now: datetime) -> ThrottleState:
        """Count one failure atomically (safe across processes) and set the next wait."""
        dialect = session.get_bind().dialect.name
        values = {"key": key, "failures": 0}
        if dialect == "postgresql":
            session.execute(
                postgresql.insert(LoginThrottle).values(values).on_conflict_do_nothing()
            )
        elif dialect == "sqlite":
            session.execute(sqlite.insert(LoginThrottle).values(values).on_conflict_do_nothing())
        elif session.get(LoginThrottle, key) is None:  # pragma: no cover - other backends
            session.execute(insert(LoginThrottle).values(values))
        failures = session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == key)
            .values(failures=LoginThrottle.failures + 1, last_failure_at=now)
            .returning(LoginThrottle.failures)
        ).scalar_one()
        retry_at = next_allowed(failures, now)
        locked = is_hard_locked(failures)
        changes: dict[str, object] = {"next_allowed_at": retry_at}
        if locked:
            changes["locked_at"] = now
        session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == key, LoginThrottle.locked_at.is_(None))
            .values(**changes)
        )
        session.expire_all()
        return ThrottleState(failures, retry_at, locked)

    def reset(self, session: Session, key: str) -> None:
        """A success: forget the failures (the hard lock is only lifted by :meth:`unlock`)."""
        session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == key, LoginThrottle.locked_at.is_(None))
            .values(failures=0, next_allowed_at=None)
        )

    def unlock(self, session: Session, key: str) -> bool:
        """Lift a hard lock or back-off; True if there was anything to lift."""
        result = session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == key, LoginThrottle.failures > 0)
            .values(failures=0, next_allowed_at=None, locked_at=None)
        )
        return bool(result.rowcount)

    def locked_keys(self, session: Session) -> set[str]:
        return set(
            session.scalars(select(LoginThrottle.key).where(LoginThrottle.locked_at.is_not(None)))
        )
