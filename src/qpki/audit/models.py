"""The audit trail table. Rows are only ever inserted; the keyed chain makes edits visible.

The indexes serve the queries the application runs (see ``AuditLog.query``): every page is
newest first by ``id``, so each filter column is indexed together with ``id`` and a page is
read straight off the index instead of sorting the matching rows.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from qpki.db.base import Base, BigId, UTCDateTime, utcnow


class AuditEventRecord(Base):
    """One audited event. ``details`` is JSON and never holds a secret or a code.

    ``seq`` is the event's position in the chain (1, 2, 3, ...). It is sealed into ``hash``,
    so the chain head kept outside the database (count and last hash) tells how many events
    are missing when rows are deleted from the end.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        # The per-user query (a user's own security events, the admin filter by user) asks for
        # target_user_id = ? OR actor_id = ?, newest first: one index per side.
        Index("ix_audit_events_target_user_id_id", "target_user_id", "id"),
        Index("ix_audit_events_actor_id_id", "actor_id", "id"),
        Index("ix_audit_events_event_id", "event", "id"),
        Index("ix_audit_events_outcome_id", "outcome", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(48))
    outcome: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor_name: Mapped[str] = mapped_column(String(64), default="")
    target_user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    target_name: Mapped[str] = mapped_column(String(64), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(256), default="")
    details: Mapped[str] = mapped_column(Text, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
