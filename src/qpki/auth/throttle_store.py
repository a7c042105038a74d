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
from typing import Any

from sqlalchemy import BindParameter, and_, bindparam, insert, or_, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from qpki.auth.models import LoginThrottle
from qpki.auth.throttle import ThrottleState, is_hard_locked, next_allowed
from qpki.db.base import UTCDateTime, affected_rows, table_of

_THROTTLE = table_of(LoginThrottle)
_KEY: BindParameter[str] = bindparam("k")
_NOW = bindparam("at", type_=UTCDateTime())
# May an attempt be made now: not hard-locked and not inside a back-off window.
_MAY_TRY = and_(
    _THROTTLE.c.locked_at.is_(None),
    or_(_THROTTLE.c.next_allowed_at.is_(None), _THROTTLE.c.next_allowed_at <= _NOW),
)


def _reserve_upsert(dialect_insert: Any) -> Any:
    """Count one attempt in one statement: a first attempt inserts the row with 1, a later
    one adds 1 only while :data:`_MAY_TRY` holds; the new count comes back (no row: refused).
    Both PostgreSQL and SQLite (3.35+) take the row's write lock for it."""
    stmt = dialect_insert(_THROTTLE).values(key=_KEY, failures=1, last_failure_at=_NOW)
    return stmt.on_conflict_do_update(
        index_elements=[_THROTTLE.c.key],
        set_={"failures": _THROTTLE.c.failures + 1, "last_failure_at": _NOW},
        where=_MAY_TRY,
    ).returning(_THROTTLE.c.failures)


# Built once: the throttle runs on every sign-in and every code, and a statement built per
# call costs its construction and cache-key walk each time (these take parameters only).
_RESERVE: dict[str, Any] = {"sqlite": _reserve_upsert(sqlite.insert)}


def _reserve_statement(dialect: str) -> Any:
    """The reservation upsert of ``dialect`` (``None``: it has none). PostgreSQL's is built
    on first use: importing its dialect costs a SQLite deployment's workers about 2 MB."""
    if dialect == "postgresql" and dialect not in _RESERVE:
        from sqlalchemy.dialects import postgresql

        _RESERVE[dialect] = _reserve_upsert(postgresql.insert)
    return _RESERVE.get(dialect)


_RESERVE_OTHER = (
    update(_THROTTLE)
    .where(_THROTTLE.c.key == _KEY, _MAY_TRY)
    .values(failures=_THROTTLE.c.failures + 1, last_failure_at=_NOW)
    .returning(_THROTTLE.c.failures)
)
_INSERT_ZERO = insert(_THROTTLE).values(key=_KEY, failures=0)
_STATE = select(_THROTTLE.c.failures, _THROTTLE.c.next_allowed_at, _THROTTLE.c.locked_at).where(
    _THROTTLE.c.key == _KEY
)
_BACK_OFF = (
    update(_THROTTLE)
    .where(_THROTTLE.c.key == _KEY)
    .values(next_allowed_at=bindparam("retry", type_=UTCDateTime()))
)
_HARD_LOCK = (
    update(_THROTTLE)
    .where(_THROTTLE.c.key == _KEY)
    .values(next_allowed_at=bindparam("retry", type_=UTCDateTime()), locked_at=_NOW)
)
_RESET = (
    update(_THROTTLE)
    .where(_THROTTLE.c.key == _KEY, _THROTTLE.c.locked_at.is_(None))
    .values(failures=0, next_allowed_at=None)
)
_REFUND = (
    update(_THROTTLE)
    .where(_THROTTLE.c.key == _KEY, _THROTTLE.c.failures > 0)
    .values(failures=_THROTTLE.c.failures - 1, next_allowed_at=None, locked_at=None)
)


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
    """Reads and updates ``login_throttle`` rows inside the caller's transaction.

    Core statements on the transaction's connection: the rows are never loaded as ORM
    objects, so nothing in the session's identity map can go stale when they change.
    """

    def state(self, session: Session, key: str) -> ThrottleState:
        row = session.connection().execute(_STATE, {"k": key}).first()
        if row is None:
            return ThrottleState(0, None, False)
        return ThrottleState(row.failures, row.next_allowed_at, row.locked_at is not None)

    def reserve(self, session: Session, key: str, now: datetime) -> Reservation:
        """Count one attempt if the key may make one now; otherwise refuse and count nothing.

        Must run in a write transaction that commits before the (slow) check it guards. One
        statement in the common case; a second only when this attempt starts a back-off or
        the hard lock (below the free allowance there was none to clear: every path that
        lowers the count also clears the window).
        """
        conn = session.connection()
        params = {"k": key, "at": now}
        stmt = _reserve_statement(conn.dialect.name)
        if stmt is None:  # pragma: no cover - backends without an upsert
            if conn.execute(_STATE, params).first() is None:
                conn.execute(_INSERT_ZERO, params)
            stmt = _RESERVE_OTHER
        failures = conn.execute(stmt, params).scalar_one_or_none()
        if failures is None:
            return Reservation(False, self.state(session, key))
        retry_at = next_allowed(failures, now)
        locked = is_hard_locked(failures)
        if locked:
            conn.execute(_HARD_LOCK, {**params, "retry": retry_at})
        elif retry_at is not None:
            conn.execute(_BACK_OFF, {**params, "retry": retry_at})
        return Reservation(True, ThrottleState(failures, retry_at, locked))

    def refund(self, session: Session, key: str) -> None:
        """Give back a reservation whose check passed but did not finish the sign-in (the
        password of a 2FA account): neutral, so a right password neither costs nor clears."""
        session.connection().execute(_REFUND, {"k": key})

    def reset(self, session: Session, key: str) -> None:
        """A success: forget the failures (the hard lock is only lifted by :meth:`unlock`)."""
        session.connection().execute(_RESET, {"k": key})

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
