"""Account data: users, pending 2FA enrolments, live login sessions, per-account throttling.

Seed column names are kept (``totp_secret``, ``backup_codes``, ``two_factor_enabled``).
Secrets are stored only as Fernet tokens; session tokens only as SHA-256 digests.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from qpki.db.base import Base, BigId, UTCDateTime, utcnow


class Role(enum.StrEnum):
    """What a user may do: admins manage users; operators and viewers use the application."""

    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


class User(Base):
    """A person who logs in. Flask-Login reads the ``is_*`` properties and ``get_id``."""

    __tablename__ = "users"
    # The user list filtered by 2FA state is read in username order (keyset pagination).
    __table_args__ = (
        Index("ix_users_two_factor_enabled_username_key", "two_factor_enabled", "username_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    username_key: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str] = mapped_column(String(254), default="")
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default=Role.VIEWER.value)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    password_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    two_factor_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    totp_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    backup_codes: Mapped[str | None] = mapped_column(Text, nullable=True)
    backup_codes_version: Mapped[int] = mapped_column(Integer, default=0)
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    mfa_enabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    # Flask-Login protocol. ``is_active`` is a real column; the others follow from it.
    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def is_anonymous(self) -> bool:
        return False

    def get_id(self) -> str:
        return str(self.id)

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN.value


class MFASetupSession(Base):
    """A pending TOTP enrolment: the secret waits here, encrypted, until a code confirms it."""

    __tablename__ = "mfa_setup_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class UserSession(Base):
    """A server-side login session. The browser holds only a random token; we keep its hash.

    ``mfa_passed`` is False while the password is done but the second factor is not (the
    pending state): such a row opens nothing but the verify page and logout.
    """

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    mfa_passed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ip: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(256), default="")
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    end_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # When this session last proved both factors (sign-in or step-up); None = never.
    reauth_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # How the sign-in was completed: "password", "totp", "backup", "remembered_device"
    # (password plus a remembered device, no code), "new_device" (password only, from a
    # browser new to the account); "" while pending.
    auth_method: Mapped[str] = mapped_column(String(32), default="")


class LoginThrottle(Base):
    """Consecutive failures per account name, kept on the server across sessions and addresses.

    Keyed by the normalised username, so that unknown names are throttled exactly like real
    ones and the throttle reveals nothing about which accounts exist.
    """

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    next_allowed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    locked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class KnownDevice(Base):
    """A browser that once completed a sign-in for the account (OWASP's "device cookie").

    The browser keeps a random token in its own cookie; we keep its SHA-256 digest. Attempts
    from a known device are throttled under their own key, so a stranger hammering the
    username can lock the name for strangers but not its owner's own browsers.
    """

    __tablename__ = "known_devices"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    throttle_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ip: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(256), default="")
