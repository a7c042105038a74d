"""Passkeys and security keys: registered credentials, each user's handle, pending ceremonies.

A credential row holds only public data (the public key, its counter, its transports); losing
the database to an attacker reveals no secret. Ceremony challenges live here rather than in a
cookie or a process, so any worker or instance can finish a ceremony another one began, and a
challenge is claimed by one conditional DELETE, so it is used at most once.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from qpki.db.base import Base, BigId, UTCDateTime, utcnow


class WebAuthnCredential(Base):
    """One registered passkey or security key of a user, named by its owner."""

    __tablename__ = "webauthn_credentials"
    __table_args__ = (
        UniqueConstraint("user_id", "name", name="uq_webauthn_credentials_user_name"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # base64url of the credential id (at most 1023 bytes, so at most 1364 characters).
    credential_id: Mapped[str] = mapped_column(String(1400), unique=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary())
    sign_count: Mapped[int] = mapped_column(BigInteger, default=0)
    transports: Mapped[str] = mapped_column(String(200), default="")  # comma-separated
    aaguid: Mapped[str] = mapped_column(String(36), default="")
    backup_eligible: Mapped[bool] = mapped_column(Boolean, default=False)
    backed_up: Mapped[bool] = mapped_column(Boolean, default=False)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebAuthnUserHandle(Base):
    """The stable random 64-byte id authenticators know the user by (never the database id or
    the username, which would leak through a passkey)."""

    __tablename__ = "webauthn_user_handles"

    user_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    handle: Mapped[bytes] = mapped_column(LargeBinary(64), unique=True)


class WebAuthnChallenge(Base):
    """A ceremony in progress: its challenge, what it is for, and whom it is bound to.

    ``binding_hash`` is the SHA-256 of the session token (full or pending) that began it, or of
    a random value kept in the signed cookie for a passwordless sign-in; finishing requires the
    same binding. ``payload`` holds what the ceremony carries (the new key's name).
    """

    __tablename__ = "webauthn_challenges"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    challenge: Mapped[str] = mapped_column(String(64), unique=True)  # base64url
    purpose: Mapped[str] = mapped_column(String(16))
    binding_hash: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True
    )
    payload: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
