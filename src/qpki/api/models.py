"""Service keys of the JSON API: who may call ``/api/v1`` and with which scopes.

Only a keyed hash of each key is stored (see :mod:`qpki.auth.services.api_keys`); the key
itself is shown once when it is created. Revoked keys stay as records (the audit trail names
them), so a name is never reused.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from qpki.db.base import Base, BigId, UTCDateTime


class ApiKey(Base):
    """One service key. ``scopes`` is a space-separated list (see ``SCOPES``)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # The visible start of the key (``qpki_`` and 8 characters), to recognise it in a list.
    prefix: Mapped[str] = mapped_column(String(16))
    # HMAC-SHA256 of the whole key under the server's key-hashing key, hex.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(64), default="")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    @property
    def scope_list(self) -> list[str]:
        return self.scopes.split()
