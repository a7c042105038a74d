"""AuditLog: append events to a SHA-256 hash chain, query them, verify the chain.

Each row's ``hash`` is SHA-256 over the previous row's hash and the row's canonical JSON, so
changing, inserting or deleting a row in the middle breaks the chain at that point.
Writers serialise on the chain head: a transaction-scoped advisory lock on PostgreSQL, and
``BEGIN IMMEDIATE`` (see DatabaseManager) on SQLite.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, or_, select, text
from sqlalchemy.orm import Session

from qpki.audit.context import current_context
from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.models import AuditEventRecord
from qpki.db.base import utcnow

GENESIS = "0" * 64
_CHAIN_LOCK_ID = 0x71504B49  # "qPKI": the advisory lock that serialises chain writers
FORBIDDEN_DETAIL_KEYS = frozenset(
    {"password", "code", "secret", "totp_secret", "backup_code", "backup_codes", "token", "key"}
)
# What verify reads: every column canonical() hashes, plus the id and both hashes. Plain rows
# (attribute access by column name, like the ORM object) instead of ORM objects: no identity
# map or instrumentation per row, which is most of the time of a walk over a million events.
_CHAIN_COLUMNS = (
    AuditEventRecord.id,
    AuditEventRecord.occurred_at,
    AuditEventRecord.event,
    AuditEventRecord.outcome,
    AuditEventRecord.actor_id,
    AuditEventRecord.actor_name,
    AuditEventRecord.target_user_id,
    AuditEventRecord.target_name,
    AuditEventRecord.ip,
    AuditEventRecord.user_agent,
    AuditEventRecord.details,
    AuditEventRecord.prev_hash,
    AuditEventRecord.hash,
)


def canonical(record: AuditEventRecord) -> str:
    """The exact text hashed for a row: every column but id and the hashes, sorted keys."""
    payload = {
        "occurred_at": record.occurred_at.isoformat(),
        "event": record.event,
        "outcome": record.outcome,
        "actor_id": record.actor_id,
        "actor_name": record.actor_name,
        "target_user_id": record.target_user_id,
        "target_name": record.target_name,
        "ip": record.ip,
        "user_agent": record.user_agent,
        "details": record.details,
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def chain_hash(prev_hash: str, record: AuditEventRecord) -> str:
    """SHA-256 of the previous hash followed by the canonical row."""
    return hashlib.sha256((prev_hash + canonical(record)).encode()).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of walking the chain."""

    ok: bool
    checked: int
    broken_id: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class AuditPage:
    """One page of events, newest first, and the cursor for the next page."""

    events: list[AuditEventRecord]
    next_before_id: int | None


class AuditLog:
    """Append-only audit trail stored in ``audit_events``."""

    def record(
        self,
        session: Session,
        event: AuditEvent,
        outcome: Outcome = Outcome.SUCCESS,
        *,
        actor_id: int | None = None,
        actor_name: str = "",
        target_user_id: int | None = None,
        target_name: str = "",
        details: dict[str, Any] | None = None,
        at: datetime | None = None,
    ) -> AuditEventRecord:
        """Append one event inside the caller's transaction (so it commits with the change)."""
        details = details or {}
        leaked = FORBIDDEN_DETAIL_KEYS.intersection(k.lower() for k in details)
        if leaked:
            raise ValueError(f"audit details must not contain secrets: {sorted(leaked)}")
        ctx = current_context()
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CHAIN_LOCK_ID})
        prev = session.scalar(
            select(AuditEventRecord.hash).order_by(AuditEventRecord.id.desc()).limit(1)
        )
        record = AuditEventRecord(
            occurred_at=at or utcnow(),
            event=event.value,
            outcome=outcome.value,
            actor_id=actor_id,
            actor_name=(actor_name or "")[:64],
            target_user_id=target_user_id,
            target_name=(target_name or "")[:64],
            ip=ctx.ip[:64],
            user_agent=ctx.user_agent[:256],
            details=json.dumps(details, sort_keys=True, separators=(",", ":"), default=str),
            prev_hash=prev or GENESIS,
        )
        record.hash = chain_hash(record.prev_hash, record)
        session.add(record)
        session.flush()
        return record

    def query(
        self,
        session: Session,
        *,
        events: Iterable[str] | None = None,
        user_id: int | None = None,
        outcome: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> AuditPage:
        """Events matching every given filter, newest first, keyset-paginated by id."""
        limit = max(1, min(limit, 1000))
        stmt = select(AuditEventRecord)
        event_list = [e for e in (events or []) if e]
        if event_list:
            stmt = stmt.where(AuditEventRecord.event.in_(event_list))
        if user_id is not None:
            stmt = stmt.where(
                or_(
                    AuditEventRecord.target_user_id == user_id, AuditEventRecord.actor_id == user_id
                )
            )
        if outcome:
            stmt = stmt.where(AuditEventRecord.outcome == outcome)
        if since is not None:
            stmt = stmt.where(AuditEventRecord.occurred_at >= since)
        if until is not None:
            stmt = stmt.where(AuditEventRecord.occurred_at < until)
        if before_id is not None:
            stmt = stmt.where(AuditEventRecord.id < before_id)
        rows = list(session.scalars(stmt.order_by(AuditEventRecord.id.desc()).limit(limit + 1)))
        next_before = rows[limit - 1].id if len(rows) > limit else None
        return AuditPage(events=rows[:limit], next_before_id=next_before)

    def iter_all(self, session: Session, batch: int = 5000) -> Iterator[AuditEventRecord]:
        """Every event in chain order, read in batches so memory stays flat."""
        last_id = 0
        while True:
            rows = list(
                session.scalars(
                    select(AuditEventRecord)
                    .where(AuditEventRecord.id > last_id)
                    .order_by(AuditEventRecord.id)
                    .limit(batch)
                )
            )
            if not rows:
                return
            yield from rows
            last_id = rows[-1].id
            session.expunge_all()

    def _iter_chain_rows(self, session: Session, batch: int = 10000) -> Iterator[Row[Any]]:
        """Like :meth:`iter_all`, as plain rows of the hashed columns (Core, not the ORM)."""
        last_id = 0
        while True:
            rows = session.execute(
                select(*_CHAIN_COLUMNS)
                .where(AuditEventRecord.id > last_id)
                .order_by(AuditEventRecord.id)
                .limit(batch)
            ).all()
            if not rows:
                return
            yield from rows
            last_id = rows[-1].id

    def verify(self, session: Session) -> VerifyResult:
        """Walk the whole chain; report the first row whose link or content does not match."""
        prev = GENESIS
        checked = 0
        for row in self._iter_chain_rows(session):
            if row.prev_hash != prev:
                return VerifyResult(
                    False, checked, row.id, "prev_hash does not match the row before"
                )
            if chain_hash(prev, row) != row.hash:  # type: ignore[arg-type]
                return VerifyResult(False, checked, row.id, "content does not match its hash")
            prev = row.hash
            checked += 1
        return VerifyResult(True, checked)

    def count(self, session: Session) -> int:
        """How many events the trail holds."""
        return int(session.scalar(select(func.count(AuditEventRecord.id))) or 0)
