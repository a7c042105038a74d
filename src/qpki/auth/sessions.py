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

from sqlalchemy import BindParameter, bindparam, insert, select, update
from sqlalchemy.orm import Session

from qpki.auth.models import User, UserSession
from qpki.db.base import UTCDateTime, affected_rows, table_of

LAST_SEEN_RESOLUTION = timedelta(seconds=60)
# Every request runs this one: built once, executed with the digest as its parameter.
_LOOK_UP = (
    select(UserSession, User)
    .join(User, User.id == UserSession.user_id)
    .where(UserSession.token_hash == bindparam("token_hash"))
)
# The statements of the sign-in's hot path, built once and run as Core on the transaction's
# connection (parameters only: no construction or cache-key walk per call, no ORM flush).
_SESSIONS = table_of(UserSession)
_AT = bindparam("at", type_=UTCDateTime())
_ROW_ID: BindParameter[int] = bindparam("row_id")
_INSERT = insert(_SESSIONS)
_CLAIM = (
    update(_SESSIONS)
    .where(
        _SESSIONS.c.token_hash == bindparam("digest"),
        _SESSIONS.c.ended_at.is_(None),
        _SESSIONS.c.mfa_passed.is_(False),
        _SESSIONS.c.expires_at > _AT,
    )
    .values(ended_at=_AT, end_reason="mfa_completed")
    .returning(_SESSIONS.c.id, _SESSIONS.c.user_id)
)
_RELEASE = update(_SESSIONS).where(_SESSIONS.c.id == _ROW_ID).values(ended_at=None, end_reason=None)
_END_FOUND = (
    update(_SESSIONS)
    .where(_SESSIONS.c.id == _ROW_ID, _SESSIONS.c.ended_at.is_(None))
    .values(ended_at=_AT, end_reason=bindparam("reason"))
)
_TOUCH = (
    update(_SESSIONS)
    .where(
        _SESSIONS.c.id == _ROW_ID,
        _SESSIONS.c.ended_at.is_(None),
        _SESSIONS.c.last_seen_at < _AT,
    )
    .values(last_seen_at=_AT)
)
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
class ClaimedSession:
    """A pending session claimed by a second step: its row id and whose it is."""

    id: int
    user_id: int


@dataclass(frozen=True)
class ResolvedSession:
    """A live session and its user, detached from the database session."""

    row: UserSession
    user: User


@dataclass(frozen=True)
class SessionLookup:
    """What a read of a session token found (see :meth:`SessionStore.look_up`).

    ``live``: usable now. ``end_reason``: why a row not yet marked ended must be ended (the
    caller does that in a write transaction); ``None`` when it is live or already ended.
    ``touch_due``: a live row whose last-seen time is at least ``LAST_SEEN_RESOLUTION`` old.
    """

    row: UserSession
    user: User
    end_reason: str | None
    live: bool
    touch_due: bool

    @property
    def resolved(self) -> ResolvedSession | None:
        return ResolvedSession(row=self.row, user=self.user) if self.live else None

    @property
    def needs_write(self) -> bool:
        return self.end_reason is not None or self.touch_due


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
        session.connection().execute(
            _INSERT,
            {
                "token_hash": token_digest(token),
                "user_id": user_id,
                "mfa_passed": mfa_passed,
                "created_at": now,
                "last_seen_at": now,
                "expires_at": now + lifetime,
                "ip": ip[:64],
                "user_agent": user_agent[:256],
                "auth_method": method,
                "reauth_at": now if method in SECOND_FACTOR_METHODS else None,
                "ended_at": None,
                "end_reason": None,
            },
        )
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
        Needs a write transaction; :meth:`look_up` is the read-only half.
        """
        found = self.look_up(session, token, now)
        if found is None:
            return None
        if found.end_reason is not None:
            self.end_found(session, found, now)
            return None
        if found.touch_due:
            self.touch(session, found, now)
        return found.resolved

    def look_up(self, session: Session, token: str, now: datetime) -> SessionLookup | None:
        """Read-only: the row and user for ``token``, why it is no longer usable (if so) and
        whether its last-seen time is due to move. ``None`` when no row has this token.

        The row and the user come from one SELECT (a join), not a query and a ``get``.
        """
        found = session.execute(_LOOK_UP, {"token_hash": token_digest(token)}).first()
        if found is None:
            return None
        row, user = found
        reason = self.expiry_reason(row, now)
        if reason is None and not user.is_active:
            reason = "user_inactive"
        return SessionLookup(
            row=row,
            user=user,
            end_reason=reason if row.ended_at is None else None,
            live=reason is None,
            touch_due=reason is None and now - row.last_seen_at >= LAST_SEEN_RESOLUTION,
        )

    def end_found(self, session: Session, found: SessionLookup, now: datetime) -> None:
        """End a row :meth:`look_up` found unusable (a conditional UPDATE: a row ended
        meanwhile keeps its first reason)."""
        if found.end_reason is None:
            return
        session.connection().execute(
            _END_FOUND, {"row_id": found.row.id, "at": now, "reason": found.end_reason}
        )
        found.row.ended_at, found.row.end_reason = now, found.end_reason

    def touch(self, session: Session, found: SessionLookup, now: datetime) -> None:
        """Move last-seen forward (a conditional UPDATE: only a live row, only forward)."""
        session.connection().execute(_TOUCH, {"row_id": found.row.id, "at": now})
        found.row.last_seen_at = now

    def claim_pending(self, session: Session, token: str, now: datetime) -> ClaimedSession | None:
        """End a live pending session atomically, so exactly one second step can use it.

        One conditional UPDATE: of two requests racing on one pending sign-in, one gets the
        row and the other gets ``None`` before it spends anything. :meth:`release` undoes the
        claim (inside the same transaction) when the factor turns out wrong. The UPDATE
        returns the row's id and user (``RETURNING``), so no SELECT follows it.
        """
        row = (
            session.connection().execute(_CLAIM, {"digest": token_digest(token), "at": now}).first()
        )
        return ClaimedSession(id=row.id, user_id=row.user_id) if row is not None else None

    def release(self, session: Session, row: ClaimedSession) -> None:
        """Give back a claimed pending session (the factor was wrong; the user may retry)."""
        session.connection().execute(_RELEASE, {"row_id": row.id})

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
