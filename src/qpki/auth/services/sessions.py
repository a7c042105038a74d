"""Login sessions as the user and the web layer see them: resolving the cookie, signing out,
listing and ending sessions, housekeeping, and the user's recent security events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.audit.models import AuditEventRecord
from qpki.auth.models import LoginThrottle, MFASetupSession, User, UserSession
from qpki.auth.services import remembered_devices
from qpki.auth.services.common import actor_fields
from qpki.auth.sessions import SessionStore
from qpki.clock import Clock
from qpki.db.base import affected_rows
from qpki.db.manager import DatabaseManager

ENDED_SESSIONS_KEPT = timedelta(days=30)
STALE_THROTTLE_AFTER = timedelta(days=1)


@dataclass(frozen=True)
class AttackNotice:
    """Failed sign-in attempts against the account's name since the owner last signed in."""

    failures: int
    last_failure_at: datetime | None
    locked_for_strangers: bool


class SessionService:
    """Server-side login sessions."""

    def __init__(
        self, db: DatabaseManager, audit: AuditLog, clock: Clock, sessions: SessionStore
    ) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.sessions = sessions

    def resolve(
        self, token: str, *, now: datetime | None = None
    ) -> tuple[User, UserSession] | None:
        """The user and session row for a cookie token, if the session is live.

        Runs on every request, so it reads in a read transaction (on SQLite a deferred one,
        which never waits for or holds up a writer). A write follows only when due: ending a
        row found expired, or moving last-seen (at most once a minute per session), each a
        conditional UPDATE.
        """
        now = now or self.clock()
        with self.db.transaction(write=False) as s:
            found = self.sessions.look_up(s, token, now)
        if found is None:
            return None
        if found.needs_write:
            with self.db.transaction() as s:
                if found.end_reason is not None:
                    self.sessions.end_found(s, found, now)
                else:
                    self.sessions.touch(s, found, now)
        resolved = found.resolved
        return (resolved.user, resolved.row) if resolved else None

    def logout(self, token: str, *, now: datetime | None = None) -> None:
        """End the session; the same cookie is refused from now on."""
        now = now or self.clock()
        with self.db.transaction() as s:
            row = self.sessions.find(s, token)
            if row is None or row.ended_at is not None:
                return
            self.sessions.end(s, row, "logout", now)
            user = s.get(User, row.user_id)
            self.audit.record(
                s,
                AuditEvent.LOGOUT,
                **actor_fields(user),
                target_user_id=row.user_id,
                target_name=user.username if user else "",
                at=now,
            )

    def list_for_user(self, user_id: int, *, now: datetime | None = None) -> list[UserSession]:
        with self.db.transaction(write=False) as s:
            return self.sessions.live_for_user(s, user_id, now or self.clock())

    def end_one(self, user_id: int, session_id: int, *, now: datetime | None = None) -> bool:
        """End one of the user's own sessions (a session of someone else is not found)."""
        now = now or self.clock()
        with self.db.transaction() as s:
            row = s.get(UserSession, session_id)
            if row is None or row.user_id != user_id or row.ended_at is not None:
                return False
            self.sessions.end(s, row, "signed_out_remotely", now)
            user = s.get(User, user_id)
            self.audit.record(
                s,
                AuditEvent.SESSION_ENDED,
                **actor_fields(user),
                target_user_id=user_id,
                target_name=user.username if user else "",
                details={"session_id": session_id},
                at=now,
            )
            return True

    def end_others(self, user_id: int, keep_token: str, *, now: datetime | None = None) -> int:
        now = now or self.clock()
        with self.db.transaction() as s:
            ended = self.sessions.end_all(
                s, user_id, "signed_out_remotely", now, keep_token=keep_token
            )
            user = s.get(User, user_id)
            self.audit.record(
                s,
                AuditEvent.SESSION_ENDED,
                **actor_fields(user),
                target_user_id=user_id,
                target_name=user.username if user else "",
                details={
                    "sessions_ended": ended,
                    "scope": "all_others",
                    # "Sign out everywhere" also forgets every remembered device (§12.6).
                    "remembered_devices_forgotten": remembered_devices.forget_all(s, user_id),
                },
                at=now,
            )
            return ended

    def cleanup(
        self, *, now: datetime | None = None, keep: timedelta = ENDED_SESSIONS_KEPT
    ) -> dict[str, int]:
        """Delete expired setup sessions, old ended sessions and stale throttle rows."""
        now = now or self.clock()
        with self.db.transaction() as s:
            setups = affected_rows(
                s.execute(delete(MFASetupSession).where(MFASetupSession.expires_at <= now))
            )
            s.execute(
                update(UserSession)
                .where(UserSession.ended_at.is_(None), UserSession.expires_at <= now)
                .values(ended_at=now, end_reason="expired")
            )
            sessions = affected_rows(
                s.execute(delete(UserSession).where(UserSession.ended_at < now - keep))
            )
            throttles = affected_rows(
                s.execute(
                    delete(LoginThrottle).where(
                        LoginThrottle.locked_at.is_(None),
                        or_(
                            LoginThrottle.last_failure_at.is_(None),
                            LoginThrottle.last_failure_at < now - STALE_THROTTLE_AFTER,
                        ),
                    )
                )
            )
        return {
            "setup_sessions": setups,
            "user_sessions": sessions,
            "throttle_rows": throttles,
        }

    def record_access_denied(self, user: User, *, required_roles: tuple[str, ...]) -> None:
        """Audit a signed-in user turned away from a page their role does not open."""
        with self.db.transaction() as s:
            self.audit.record(
                s,
                AuditEvent.ACCESS_DENIED,
                Outcome.FAILURE,
                **actor_fields(user),
                details={"required": list(required_roles)},
                at=self.clock(),
            )

    def recent_security_events(self, user_id: int, limit: int = 10) -> list[AuditEventRecord]:
        with self.db.transaction(write=False) as s:
            return self.audit.query(s, user_id=user_id, limit=limit).events

    def attack_notice(self, user: User) -> AttackNotice | None:
        """Failed attempts on the account's name that the owner should know about."""
        with self.db.transaction(write=False) as s:
            row = s.scalar(select(LoginThrottle).where(LoginThrottle.key == user.username_key))
        if row is None or row.failures == 0:
            return None
        return AttackNotice(row.failures, row.last_failure_at, row.locked_at is not None)
