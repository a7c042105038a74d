"""Server-side login sessions.

The browser holds only a random 256-bit token (inside Flask's signed cookie); the database
holds its SHA-256 digest, so a database leak does not hand out live sessions and the raw token
never needs to be logged. Ending a row ends the session everywhere at once, across processes.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qpki.auth.models import User, UserSession
from qpki.db.base import affected_rows

LAST_SEEN_RESOLUTION = timedelta(seconds=60)
# Sign-in methods that proved a second factor (a password-only sign-in is not one).
SECOND_FACTOR_METHODS = frozenset({"totp", "backup_code", "webauthn"})


def token_digest(token: str) -> str:
    """What is stored for a session token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SessionPolicy:
    """How long sessions live (SP 800-63B rev 3 AAL2: 30 min idle, 12 h in all)."""

    idle: timedelta = timedelta(minutes=30)
    absolute: timedelta = timedelta(hours=12)
    pending: timedelta = timedelta(minutes=5)


@dataclass(frozen=True)
class ResolvedSession:
    """A live session and its user, detached from the database session."""

    row: UserSession
    user: User


class SessionStore:
    """Create, resolve and end rows of ``user_sessions`` in the caller's transaction."""

    def __init__(self, policy: SessionPolicy) -> None:
        self.policy = policy

    def create(
        self,
        session: Session,
        user_id: int,
        *,
        mfa_passed: bool,
        now: datetime,
        ip: str = "",
        user_agent: str = "",
        method: str = "",
    ) -> str:
        """A new session row; returns the raw token (shown to nobody but the cookie).

        ``method`` is how the sign-in was completed; a sign-in with both factors counts as a
        fresh re-authentication for step-up.
        """
        token = secrets.token_urlsafe(32)
        lifetime = self.policy.absolute if mfa_passed else self.policy.pending
        session.add(
            UserSession(
                token_hash=token_digest(token),
                user_id=user_id,
                mfa_passed=mfa_passed,
                created_at=now,
                last_seen_at=now,
                expires_at=now + lifetime,
                ip=ip[:64],
                user_agent=user_agent[:256],
                auth_method=method,
                reauth_at=now if method in SECOND_FACTOR_METHODS else None,
            )
        )
        session.flush()
        return token

    def find(self, session: Session, token: str) -> UserSession | None:
        """The row for ``token`` whether live or not."""
        return session.scalar(
            select(UserSession).where(UserSession.token_hash == token_digest(token))
        )

    def expiry_reason(self, row: UserSession, now: datetime) -> str | None:
        """Why the row is no longer usable, or ``None`` if it is live."""
        if row.ended_at is not None:
            return row.end_reason or "ended"
        if now >= row.expires_at:
            return "expired"
        if row.mfa_passed and now - row.last_seen_at >= self.policy.idle:
            return "idle"
        return None

    def resolve(self, session: Session, token: str, now: datetime) -> ResolvedSession | None:
        """The live session for ``token`` (touching last-seen), else ``None``.

        A row found expired is ended on the spot so that it shows as ended everywhere.
        """
        row = self.find(session, token)
        if row is None:
            return None
        reason = self.expiry_reason(row, now)
        if reason is None:
            user = session.get(User, row.user_id)
            if user is None or not user.is_active:
                reason = "user_inactive"
        if reason is not None:
            if row.ended_at is None:
                row.ended_at, row.end_reason = now, reason
            return None
        if now - row.last_seen_at >= LAST_SEEN_RESOLUTION:
            row.last_seen_at = now
        return ResolvedSession(row=row, user=user)  # type: ignore[arg-type]

    def claim_pending(self, session: Session, token: str, now: datetime) -> UserSession | None:
        """End a live pending session atomically, so exactly one second step can use it.

        One conditional UPDATE: of two requests racing on one pending sign-in, one gets the
        row and the other gets ``None`` before it spends anything. :meth:`release` undoes the
        claim (inside the same transaction) when the factor turns out wrong.
        """
        claimed = session.execute(
            update(UserSession)
            .where(
                UserSession.token_hash == token_digest(token),
                UserSession.ended_at.is_(None),
                UserSession.mfa_passed.is_(False),
                UserSession.expires_at > now,
            )
            .values(ended_at=now, end_reason="mfa_completed")
            .returning(UserSession.id)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        return session.get(UserSession, claimed) if claimed is not None else None

    def release(self, session: Session, row: UserSession) -> None:
        """Give back a claimed pending session (the factor was wrong; the user may retry)."""
        session.execute(
            update(UserSession)
            .where(UserSession.id == row.id)
            .values(ended_at=None, end_reason=None)
            .execution_options(synchronize_session=False)
        )

    def end(self, session: Session, row: UserSession, reason: str, now: datetime) -> None:
        if row.ended_at is None:
            row.ended_at, row.end_reason = now, reason

    def end_all(
        self,
        session: Session,
        user_id: int,
        reason: str,
        now: datetime,
        *,
        keep_token: str | None = None,
    ) -> int:
        """End every live session of the user except the one of ``keep_token``; how many ended."""
        stmt = update(UserSession).where(
            UserSession.user_id == user_id, UserSession.ended_at.is_(None)
        )
        if keep_token:
            stmt = stmt.where(UserSession.token_hash != token_digest(keep_token))
        result = session.execute(stmt.values(ended_at=now, end_reason=reason))
        return affected_rows(result)

    def live_for_user(self, session: Session, user_id: int, now: datetime) -> list[UserSession]:
        """The user's live, fully authenticated sessions, most recent first."""
        rows = session.scalars(
            select(UserSession)
            .where(
                UserSession.user_id == user_id,
                UserSession.ended_at.is_(None),
                UserSession.mfa_passed.is_(True),
                UserSession.expires_at > now,
                UserSession.last_seen_at > now - self.policy.idle,
            )
            .order_by(UserSession.last_seen_at.desc())
        )
        return list(rows)
