"""Per-role 2FA policies, per-user grace periods, and remembered devices.

A remembered device follows the series/token scheme of persistent sign-in cookies (Jaspan's
"improved persistent login cookie", which privacyIDEA 3.14 also uses for remembered second
factors): the cookie holds a public ``series`` and a secret token; we keep the series and the
token's SHA-256 digest. Every use replaces the token; a right series with a wrong token is an
old, copied cookie — the device is revoked.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from qpki.db.base import Base, BigId, UTCDateTime


class RolePolicy(Base):
    """What one role requires: a second factor (with a grace), a phishing-resistant one,
    2FA on a new device; and whether (and how long) devices may be remembered."""

    __tablename__ = "role_policies"

    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    require_2fa: Mapped[bool] = mapped_column(Boolean, default=False)
    grace_hours: Mapped[int] = mapped_column(Integer, default=0)
    require_phishing_resistant: Mapped[bool] = mapped_column(Boolean, default=False)
    new_device_2fa: Mapped[bool] = mapped_column(Boolean, default=False)
    remember_days: Mapped[int] = mapped_column(Integer, default=0)  # 0: not allowed
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_by: Mapped[str] = mapped_column(String(64), default="")


class PolicyGrace(Base):
    """When a user's grace began (their first sign-in under a policy); never restarted.

    ``enrol_now`` is set by an administrator's 2FA reset of a user under the policy: they
    enrol at the next sign-in, with no new grace.
    """

    __tablename__ = "policy_grace"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    enrol_now: Mapped[bool] = mapped_column(Boolean, default=False)


class RememberedDevice(Base):
    """A browser where the user asked not to be asked for a code for a while."""

    __tablename__ = "remembered_devices"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    series: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ip: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(256), default="")
