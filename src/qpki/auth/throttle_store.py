"""The per-account throttle's state in the database: reserve an attempt, then settle it.

*Reserve, then verify*: before any password hash or code is checked, one write transaction
counts the attempt with a single conditional UPDATE that only succeeds while the key is not in
back-off and not locked. A burst of simultaneous guesses therefore gets at most the free
allowance checked, whatever the number of threads, workers or machines: each reservation sees
the count left by the previous one (SQLite serialises writers with ``BEGIN IMMEDIATE``,
PostgreSQL with the row lock the UPDATE takes). A success resets the count; a failure is
already counted, so an exception after the reservation can never erase the attempt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from qpki.auth.models import LoginThrottle
from qpki.auth.throttle import ThrottleState, is_hard_locked, next_allowed
from qpki.db.base import affected_rows


@dataclass(frozen=True)
class Reservation:
    """The answer to "may this attempt be checked?": granted, or refused with the state."""

    granted: bool
    state: ThrottleState

    @property
    def hard_locked_now(self) -> bool:
        """This very reservation reached the hard lock (audit it once)."""
        return self.granted and self.state.locked

    @property
    def back_off_started(self) -> bool:
        """This reservation opened a back-off window (audit the throttling once)."""
        return self.granted and self.state.retry_at is not None and not self.state.locked


class AccountThrottle:
    """Reads and updates ``login_throttle`` rows inside the caller's transaction."""

    def state(self, session: Session, key: str) -> ThrottleState:
        row = session.get(LoginThrottle, key)
        if row is None:
            return ThrottleState(0, None, False)
        return ThrottleState(row.failures, row.next_allowed_at, row.locked_at is not None)

    def _ensure_row(self, session: Session, key: str) -> None:
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

    def reserve(self, session: Session, key: str, now: datetime) -> Reservation:
        """Count one attempt if the key may make one now; otherwise refuse and count nothing.

        Must run in a write transaction that commits before the (slow) check it guards.
        """
        self._ensure_row(session, key)
        failures = session.execute(
            update(LoginThrottle)
            .where(
                LoginThrottle.key == key,
                LoginThrottle.locked_at.is_(None),
                or_(LoginThrottle.next_allowed_at.is_(None), LoginThrottle.next_allowed_at <= now),
            )
            .values(failures=LoginThrottle.failures + 1, last_failure_at=now)
            .returning(LoginThrottle.failures)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if failures is None:
            session.expire_all()
            return Reservation(False, self.state(session, key))
        retry_at = next_allowed(failures, now)
        locked = is_hard_locked(failures)
        changes: dict[str, object] = {"next_allowed_at": retry_at}
        if locked:
            changes["locked_at"] = now
        session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == key)
            .values(**changes)
            .execution_options(synchronize_session=False)
        )
        session.expire_all()
        return Reservation(True, ThrottleState(failures, retry_at, locked))

    def refund(self, session: Session, key: str) -> None:
        """Give back a reservation whose check passed but did not finish the sign-in (the
        password of a 2FA account): neutral, so a right password neither costs nor clears."""
        session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == key, LoginThrottle.failures > 0)
            .values(failures=LoginThrottle.failures - 1, next_allowed_at=None, locked_at=None)
            .execution_options(synchronize_session=False)
        )

    def reset(self, session: Session, key: str) -> None:
        """A success: forget the failures (the hard lock is only lifted by :meth:`unlock`)."""
        session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == key, LoginThrottle.locked_at.is_(None))
            .values(failures=0, next_allowed_at=None)
            .execution_options(synchronize_session=False)
        )

    def unlock(self, session: Session, keys: Iterable[str]) -> bool:
        """Lift hard locks and back-offs on ``keys``; True if there was anything to lift."""
        result = session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key.in_(list(keys)))
            .where(
                or_(
                    LoginThrottle.failures > 0,
                    LoginThrottle.locked_at.is_not(None),
                )
            )
            .values(failures=0, next_allowed_at=None, locked_at=None)
            .execution_options(synchronize_session=False)
        )
        return affected_rows(result) > 0

    def locked_keys(self, session: Session) -> set[str]:
        return set(
            session.scalars(select(LoginThrottle.key).where(LoginThrottle.locked_at.is_not(None)))
        )

    def throttled(self, session: Session, keys: Iterable[str], now: datetime) -> bool:
        """Whether any of ``keys`` is locked or in back-off right now."""
        return (
            session.scalar(
                select(LoginThrottle.key)
                .where(LoginThrottle.key.in_(list(keys)))
                .where(
                    or_(
                        LoginThrottle.locked_at.is_not(None),
                        and_(
                            LoginThrottle.next_allowed_at.is_not(None),
                            LoginThrottle.next_allowed_at > now,
                        ),
                    )
                )
                .limit(1)
            )
            is not None
        )
