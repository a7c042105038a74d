"""Small rules shared by several services: who did it (audit actor), loading a user, and the
throttle gate that reserves an attempt before any secret is checked.

These are functions and one small class, composed into services — not a base class — so a
service sees only the collaborators it is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth.errors import AccountLocked, AccountThrottled, AuthError, NotFound
from qpki.auth.models import User
from qpki.auth.throttle import HARD_LOCK_FAILURES, ThrottleState, humanise
from qpki.auth.throttle_store import AccountThrottle, Reservation
from qpki.mail.alerts import Alert
from qpki.mail.notifier import Notifier

log = logging.getLogger(__name__)


def actor_fields(actor: User | None, name: str = "") -> dict[str, Any]:
    """Audit columns for who acted: a user, or a named non-user actor such as ``cli``."""
    if actor is None:
        return {"actor_id": None, "actor_name": name}
    return {"actor_id": actor.id, "actor_name": actor.username}


def audit_own(
    audit: AuditLog,
    s: Session,
    event: AuditEvent,
    user: User,
    outcome: Outcome = Outcome.SUCCESS,
    *,
    at: datetime,
    details: dict[str, Any] | None = None,
) -> None:
    """Audit something a user did to their own account (actor and target are the user)."""
    audit.record(
        s,
        event,
        outcome,
        actor_id=user.id,
        actor_name=user.username,
        target_user_id=user.id,
        target_name=user.username,
        details=details,
        at=at,
    )


def load_user(s: Session, user_id: int) -> User:
    user = s.get(User, user_id)
    if user is None:
        raise NotFound("User not found.")
    return user


@dataclass(frozen=True)
class Refusal:
    """Why an attempt was not even checked: the message, and when to come back."""

    message: str
    retry_at: datetime | None
    locked: bool


def refusal_for(state: ThrottleState, now: datetime) -> Refusal:
    from qpki.auth import errors

    if state.locked:
        return Refusal(errors.LOCKED, None, True)
    until = state.blocked_until(now) or now
    return Refusal(f"Too many failed attempts. Try again in {humanise(until - now)}.", until, False)


def refusal_error(refusal: Refusal) -> AuthError:
    """The exception of the raising APIs for a refused attempt (raised after the commit)."""
    if refusal.locked:
        return AccountLocked()
    return AccountThrottled(refusal.message, refusal.retry_at or datetime.now(UTC))


class ThrottleGate:
    """Reserve-then-verify over :class:`AccountThrottle`, with the audit of its transitions."""

    def __init__(self, store: AccountThrottle, audit: AuditLog, notifier: Notifier) -> None:
        self.store = store
        self.audit = audit
        self.notifier = notifier

    def reserve(
        self,
        s: Session,
        key: str,
        now: datetime,
        *,
        user: User | None,
        typed_name: str,
    ) -> Reservation:
        """Count this attempt before it is checked; audit a lock or back-off it starts."""
        reservation = self.store.reserve(s, key, now)
        state = reservation.state
        target_user_id = user.id if user else None
        if reservation.hard_locked_now and state.failures == HARD_LOCK_FAILURES:
            log.warning("account %r locked after %d failures", typed_name[:64], state.failures)
            self.audit.record(
                s,
                AuditEvent.ACCOUNT_LOCKED,
                Outcome.FAILURE,
                target_user_id=target_user_id,
                target_name=typed_name[:64],
                details={"failures": state.failures},
                at=now,
            )
            if user is not None:
                self.notifier.security_alert(s, user, Alert.ACCOUNT_LOCKED, at=now)
        elif reservation.back_off_started:
            assert state.retry_at is not None
            self.audit.record(
                s,
                AuditEvent.ACCOUNT_THROTTLED,
                Outcome.FAILURE,
                target_user_id=target_user_id,
                target_name=typed_name[:64],
                details={"failures": state.failures, "retry_at": state.retry_at.isoformat()},
                at=now,
            )
        return reservation


@dataclass(frozen=True)
class Client:
    """Who is asking, as the web layer saw it: address, browser, and its device cookie."""

    ip: str = ""
    user_agent: str = ""
    device_token: str | None = None
