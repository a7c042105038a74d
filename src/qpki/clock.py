"""Time as a dependency: services take a clock instead of calling ``datetime.now``.

A clock is any callable returning an aware UTC datetime. Production uses :func:`system_clock`;
tests pass a :class:`SteppedClock` and move it, so no test sleeps to dodge a TOTP step edge
and none patches a module's notion of "now".
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """The wall clock, as an aware UTC datetime."""
    return datetime.now(UTC)


class SteppedClock:
    """A clock that only moves when told to (tests, benchmarks, simulations)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        """Move forward by ``timedelta(**delta)``; returns the new time."""
        self.now = self.now + timedelta(**delta)
        return self.now

    def set(self, moment: datetime) -> None:
        if moment.tzinfo is None:
            raise ValueError("SteppedClock needs an aware datetime")
        self.now = moment
