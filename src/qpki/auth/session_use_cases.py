"""Session use cases: resolving the cookie's session, logout, listing and ending sessions,
housekeeping, and the user's recent security events."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import or_, update

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.models import AuditEventRecord
from qpki.auth.models import LoginThrottle, MFASetupSession, User, UserSession
from qpki.auth.service_base import ServiceBase
from qpki.db.base import utcnow


class SessionUseCases(ServiceBase):
    """Server-side login sessions, as the user and the web layer see them."""

    def resolve_session(
        self, token: str, *, now: datetime | None = None
    ) -> tuple[User, UserSession] | None:
        """The user and session row for a cookie token, if the session is live."""
        now = now or utcnow()
        with self.db.transaction() as s:
            resolved = self.sessions.resolve(s, token, now)
            return (resolved.user, resolved.row) if resolved else None

    def logout(self, token: str, *, now: datetime | None = None) -> None:
        """End the session; the same cookie is refused from now on."""
        now = now or utcnow()
        with self.db.transaction() as s:
            row = self.sessions.find(s, token)
            if row is None or row.ended_at is not None:
                return
            self.sessions.end(s, row, "logout", now)
            user = s.get(User, row.user_id)
            self.audit.record(
                s,
                AuditEvent.LOGOUT,
                **self._actor(user),
                target_user_id=row.user_id,
                target_name=user.username if user else "",
            )

    def list_sessions(self, user_id: int, *, now: datetime | None = None) -> list[UserSession]:
        with self.db.transaction(write=False) as s:
            return self.sessions.live_for_user(s, user_id, now or utcnow())

    def end_session(self, user_id: int, session_id: int, *, now: datetime | None = None) -> bool:
        """End one of the user's own sessions (a session of someone else is not found)."""
        now = now or utcnow()
        with self.db.transaction() as s:
            row = s.get(UserSession, session_id)
            if row is None or row.user_id != user_id or row.ended_at is not None:
                return False
            self.sessions.end(s, row, "signed_out_remotely", now)
            user = s.get(User, user_id)
            self.audit.record(
                s,
                AuditEvent.SESSION_ENDED,
                **self._actor(user),
                target_user_id=user_id,
                target_name=user.username if user else "",
                details={"session_id": session_id},
            )
            return True

    def end_other_sessions(
        self, user_id: int, keep_token: str, *, now: datetime | None = None
    ) -> int:
        now = now or utcnow()
        with self.db.transaction() as s:
            ended = self.sessions.end_all(
                s, user_id, "signed_out_remotely", now, keep_token=keep_token
            )
            user = s.get(User, user_id)
            self.audit.record(
                s,
                AuditEvent.SESSION_ENDED,
                **self._actor(user),
                target_user_id=user_id,
                target_name=user.username if user else "",
                details={"sessions_ended": ended, "scope": "all_others"},
            )
            return ended

    def cleanup(self, *, now: datetime | None = None, keep_days: int = 30) -> dict[str, int]:
        """Delete expired setup sessions, old ended sessions and stale throttle rows."""
        now = now or utcnow()
        horizon = now - timedelta(days=keep_days)
        with self.db.transaction() as s:
            setups = s.execute(
                MFASetupSession.__table__.delete().where(MFASetupSession.expires_at <= now)
            ).rowcount
            s.execute(
                update(UserSession)
                .where(UserSession.ended_at.is_(None), UserSession.expires_at <= now)
                .values(ended_at=now, end_reason="expired")
            )
            sessions = s.execute(
                UserSession.__table__.delete().where(UserSession.ended_at < horizon)
            ).rowcount
            throttles = s.execute(
                LoginThrottle.__table__.delete().where(
                    LoginThrottle.locked_at.is_(None),
                    or_(
                        LoginThrottle.last_failure_at.is_(None),
                        LoginThrottle.last_failure_at < now - timedelta(days=1),
                    ),
                )
            ).rowcount
        return {
            "setup_sessions": int(setups or 0),
            "user_sessions": int(sessions or 0),
            "throttle_rows": int(throttles or 0),
        }

    def record_access_denied(self, user: User, *, required_roles: tuple[str, ...]) -> None:
        """Audit a signed-in user turned away from a page their role does not open."""
        with self.db.transaction() as s:
            self.audit.record(
                s,
                AuditEvent.ACCESS_DENIED,
                Outcome.FAILURE,
                **self._actor(user),
                details={"required": list(required_roles)},
            )

    def recent_security_events(self, user_id: int, limit: int = 10) -> list[AuditEventRecord]:
        with self.db.transaction(write=False) as s:
            return self.audit.query(s, user_id=user_id, limit=limit).events
