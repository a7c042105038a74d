"""AuditLog: append events to a keyed chain, query them, verify the chain against its head.

Each row's ``hash`` is HMAC-SHA256, under the audit key, over the previous row's hash and the
row's canonical JSON including its position ``seq`` (see :mod:`qpki.audit.chain`). Changing,
inserting or deleting a row in the middle breaks the chain at that point, and nobody without
the key can recompute it. After each commit that added events the head (count and last hash)
is stored outside the database (:mod:`qpki.audit.head`), so deleting events from the end, or
all of them, is found too.

Writers serialise on the chain head: a transaction-scoped advisory lock on PostgreSQL, and
``BEGIN IMMEDIATE`` (see DatabaseManager) on SQLite.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, event, func, insert, or_, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from qpki.audit.chain import GENESIS, ChainHead, seal
from qpki.audit.context import current_context
from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.head import HeadStore, HeadStoreError
from qpki.audit.models import AuditEventRecord
from qpki.db.base import utcnow
from qpki.db.manager import after_release

log = logging.getLogger(__name__)

_CHAIN_LOCK_ID = 0x71504B49  # "qPKI": the advisory lock that serialises chain writers
_PENDING_HEAD = "qpki_audit_pending_head"  # Session.info key: the head to store after commit
# Session.info key: (seq, hash) of the chain's last event as this transaction left it. Only
# set while the transaction holds the chain (BEGIN IMMEDIATE on SQLite, the advisory lock on
# PostgreSQL), so the next event of the same transaction links to it without reading the
# tail again; dropped at every commit or rollback.
_CHAIN_TAIL = "qpki_audit_chain_tail"
FORBIDDEN_DETAIL_KEYS = frozenset(
    {"password", "code", "secret", "totp_secret", "backup_code", "backup_codes", "token", "key"}
)
# What verify reads: every column the seal covers, plus the id and both hashes. Plain rows
# (attribute access by column name, like the ORM object) instead of ORM objects: no identity
# map or instrumentation per row, which is most of the time of a walk over a million events.
_CHAIN_COLUMNS: tuple[Any, ...] = (
    AuditEventRecord.id,
    AuditEventRecord.seq,
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
# Built once: the two statements every audited use case runs (a statement built per call
# costs its construction and cache-key walk each time; these are parameters only).
_CHAIN_TAIL_QUERY = (
    select(AuditEventRecord.seq, AuditEventRecord.hash)
    .order_by(AuditEventRecord.id.desc())
    .limit(1)
)
_INSERT_EVENT = insert(AuditEventRecord).returning(AuditEventRecord.id)
_CHAIN_LOCK = text("SELECT pg_advisory_xact_lock(:k)")
# The AuditLog of each engine, for migrations that must seal with the application's key.
_BY_ENGINE: weakref.WeakKeyDictionary[Engine, AuditLog] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of walking the chain and comparing its end with the stored head.

    ``broken_id`` names the first event that fails; ``missing`` counts events deleted from the
    end (the head says the chain was longer). ``ok`` is False on any problem.
    """

    ok: bool
    checked: int
    broken_id: int | None = None
    reason: str = ""
    missing: int = 0


@dataclass(frozen=True)
class AuditPage:
    """One page of events, newest first, and the cursor for the next page."""

    events: list[AuditEventRecord]
    next_before_id: int | None


def audit_log_for(engine: Engine) -> AuditLog | None:
    """The AuditLog attached to ``engine`` by the application (see :meth:`AuditLog.attach`)."""
    return _BY_ENGINE.get(engine)


@event.listens_for(Session, "after_commit")
def _store_pending_head(session: Session) -> None:
    """Move the head forward once the events it covers are committed (never before).

    A failure here cannot undo the commit; it is logged, and the head merely lags, which
    ``verify`` tolerates (events after the head still have to verify under the key).
    """
    pending = session.info.pop(_PENDING_HEAD, None)
    if pending is None:
        return
    audit, seq, last_hash = pending

    def store() -> None:
        try:
            audit.head.advance(audit.sealed_head(seq, last_hash))
        except (HeadStoreError, OSError) as exc:
            log.error("audit chain head not stored in %s: %s", audit.head.description, exc)

    # Outside the SQLite write turn when the transaction is the DatabaseManager's: a head
    # only moves forward, so two writers storing theirs in either order leave the newest.
    if not after_release(session, store):
        store()


@event.listens_for(Session, "after_commit")
def _forget_chain_tail(session: Session) -> None:
    session.info.pop(_CHAIN_TAIL, None)


@event.listens_for(Session, "after_rollback")
def _drop_pending_head(session: Session) -> None:
    """Any rollback, a savepoint's included (it fires for those too): the tail may name an
    event that is gone."""
    session.info.pop(_PENDING_HEAD, None)
    session.info.pop(_CHAIN_TAIL, None)


class AuditLog:
    """Append-only audit trail stored in ``audit_events``, sealed with ``key``.

    ``key`` is the audit key (kept outside the database, see :mod:`qpki.audit.keys`);
    ``head`` keeps the chain head outside the database.
    """

    def __init__(self, key: bytes, head: HeadStore) -> None:
        if len(key) < 32:
            raise ValueError("the audit key must be at least 32 bytes")
        self._key = key
        self.head = head

    def attach(self, engine: Engine) -> None:
        """Let migrations on ``engine`` seal with this key and store the head here."""
        _BY_ENGINE[engine] = self

    def seal(self, prev_hash: str, record: Any) -> str:
        """The seal of ``record`` after ``prev_hash`` under this log's key."""
        return seal(self._key, prev_hash, record)

    def sealed_head(self, seq: int, last_hash: str) -> ChainHead:
        """A head for position ``seq`` ending in ``last_hash``, MAC-ed with this log's key."""
        return ChainHead.sealed(self._key, seq, last_hash)

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
        """Append one event inside the caller's transaction (so it commits with the change).

        ``at`` is the use case's time (its injected clock); the wall clock when not given.
        The head is stored after the transaction commits, never before.
        """
        details = details or {}
        leaked = FORBIDDEN_DETAIL_KEYS.intersection(k.lower() for k in details)
        if leaked:
            raise ValueError(f"audit details must not contain secrets: {sorted(leaked)}")
        if at is not None and at.tzinfo is None:
            raise ValueError("audit times must be aware UTC datetimes")
        ctx = current_context()
        tail: tuple[int, str] | None = session.info.get(_CHAIN_TAIL)
        conn = session.connection()
        if tail is None:
            if conn.dialect.name == "postgresql":
                conn.execute(_CHAIN_LOCK, {"k": _CHAIN_LOCK_ID})
            prev = conn.execute(_CHAIN_TAIL_QUERY).first()
            tail = (int(prev.seq), str(prev.hash)) if prev else (0, GENESIS)
        values: dict[str, Any] = {
            "seq": tail[0] + 1,
            "occurred_at": at or utcnow(),
            "event": event.value,
            "outcome": outcome.value,
            "actor_id": actor_id,
            "actor_name": (actor_name or "")[:64],
            "target_user_id": target_user_id,
            "target_name": (target_name or "")[:64],
            "ip": ctx.ip[:64],
            "user_agent": ctx.user_agent[:256],
            "details": json.dumps(details, sort_keys=True, separators=(",", ":"), default=str),
            "prev_hash": tail[1],
        }
        record = AuditEventRecord(**values)
        record.hash = values["hash"] = self.seal(record.prev_hash, record)
        # A Core INSERT of the sealed row on the transaction's connection: the ORM unit of
        # work (identity map, flush bookkeeping) bought nothing for an append-only row. The
        # returned object is transient, with its id.
        record.id = conn.execute(_INSERT_EVENT, values).scalar_one()
        session.info[_CHAIN_TAIL] = (record.seq, record.hash)
        # Sealed at commit: a use case that records several events seals one head.
        session.info[_PENDING_HEAD] = (self, record.seq, record.hash)
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

    def _iter_chain_rows(self, session: Session, batch: int = 10000) -> Iterator[Row[Any]]:
        """Every event in chain order as plain rows of the sealed columns (Core, not the ORM),
        read in batches so memory stays flat."""
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
        """Walk the whole chain and compare its end with the stored head.

        Reports the first event whose position, link or seal does not match (edited,
        inserted, deleted in the middle, or sealed with another key), or how many events are
        missing from the end. The head is read before the walk: events committed meanwhile
        only make the chain longer than the head, which is fine when they verify.
        """
        try:
            head = self.head.read()
        except HeadStoreError as exc:
            return VerifyResult(False, 0, reason=f"the chain head cannot be read: {exc}")
        if head is not None and not head.is_authentic(self._key):
            return VerifyResult(
                False,
                0,
                reason=f"the chain head in {self.head.description} was altered "
                "(or written with another audit key)",
            )
        prev = GENESIS
        checked = 0
        for row in self._iter_chain_rows(session):
            if row.seq != checked + 1:
                return VerifyResult(
                    False,
                    checked,
                    row.id,
                    f"position {row.seq} where {checked + 1} was due: "
                    f"{row.seq - checked - 1} events before it are missing",
                )
            if row.prev_hash != prev:
                return VerifyResult(
                    False, checked, row.id, "prev_hash does not match the row before"
                )
            if self.seal(prev, row) != row.hash:
                return VerifyResult(
                    False,
                    checked,
                    row.id,
                    "content does not match its seal (edited, or sealed with another key)",
                )
            if head is not None and row.seq == head.seq and row.hash != head.hash:
                return VerifyResult(
                    False, checked, row.id, "differs from the event the chain head recorded"
                )
            prev = row.hash
            checked += 1
        if head is None:
            if checked:
                return VerifyResult(
                    False,
                    checked,
                    reason=f"no chain head in {self.head.description}: cannot tell whether "
                    "events were deleted from the end",
                )
            return VerifyResult(True, 0)
        if checked < head.seq:
            missing = head.seq - checked
            return VerifyResult(
                False,
                checked,
                reason=f"{missing} events missing from the end (the head recorded "
                f"{head.seq}, the database holds {checked})",
                missing=missing,
            )
        return VerifyResult(True, checked)

    def count(self, session: Session) -> int:
        """How many events the trail holds."""
        return int(session.scalar(select(func.count(AuditEventRecord.id))) or 0)
