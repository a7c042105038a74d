"""Indexes that match the queries; the audit chain sealed with the audit key.

Revision ID: 0003_indexes_and_keyed_audit
Revises: 0002_mfa
Create Date: 2026-11-30

Indexes: three unique columns also had a plain index on the same column (a second copy that
every insert paid for); they go. The audit page and the per-user query read newest first by
id, so each filter column is indexed together with ``id``; the user list filtered by 2FA state
reads in username order.

Audit chain: 0001/0002 chained events with plain SHA-256, which anyone can recompute after
editing a row. This revision gives each event its position (``seq``) and re-seals every event
with HMAC-SHA256 under the application's audit key (``.audit_key`` or ``QPKI_AUDIT_KEY``),
after checking the old chain. It then appends an ``audit_chain_sealed`` event saying how many
events were sealed and whether the old chain verified (and where it broke, if not), and stores
the chain head outside the database. The key comes from the application that runs the
migration (``qpki migrate``, or ``create_app(...).db_manager.migrate_database()``); a bare
``alembic upgrade`` on a database that holds events stops with a message instead.

If a head already exists for this deployment, an unkeyed chain means the schema was put back
by hand, and re-sealing would launder whatever was written meanwhile: the migration stops and
says so. ``downgrade`` restores the old SHA-256 chain and removes the head, so upgrading again
works.
"""

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from qpki.audit.chain import GENESIS
from qpki.audit.log import AuditLog, audit_log_for
from qpki.db.base import UTCDateTime

revision: str = "0003_indexes_and_keyed_audit"
down_revision: str | None = "0002_mfa"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

BATCH = 5000
SEALED_EVENT = "audit_chain_sealed"

# (name, table, columns) of the indexes before and after this revision.
_DUPLICATES = [
    ("ix_users_username_key", "users", ["username_key"]),
    ("ix_user_sessions_token_hash", "user_sessions", ["token_hash"]),
    ("ix_mfa_setup_sessions_user_id", "mfa_setup_sessions", ["user_id"]),
]
_OLD_AUDIT = [
    ("ix_audit_events_event", "audit_events", ["event"]),
    ("ix_audit_events_target_user_id", "audit_events", ["target_user_id"]),
]
_NEW = [
    ("ix_users_two_factor_enabled_username_key", "users", ["two_factor_enabled", "username_key"]),
    ("ix_audit_events_target_user_id_id", "audit_events", ["target_user_id", "id"]),
    ("ix_audit_events_actor_id_id", "audit_events", ["actor_id", "id"]),
    ("ix_audit_events_event_id", "audit_events", ["event", "id"]),
    ("ix_audit_events_outcome_id", "audit_events", ["outcome", "id"]),
]

_events = sa.table(
    "audit_events",
    sa.column("id", sa.BigInteger()),
    sa.column("seq", sa.BigInteger()),
    sa.column("occurred_at", UTCDateTime()),
    sa.column("event", sa.String()),
    sa.column("outcome", sa.String()),
    sa.column("actor_id", sa.Integer()),
    sa.column("actor_name", sa.String()),
    sa.column("target_user_id", sa.Integer()),
    sa.column("target_name", sa.String()),
    sa.column("ip", sa.String()),
    sa.column("user_agent", sa.String()),
    sa.column("details", sa.Text()),
    sa.column("prev_hash", sa.String()),
    sa.column("hash", sa.String()),
)


@dataclass
class _Event:
    """One stored event, as both chain formats read it."""

    id: int
    seq: int
    occurred_at: datetime
    event: str
    outcome: str
    actor_id: int | None
    actor_name: str
    target_user_id: int | None
    target_name: str
    ip: str
    user_agent: str
    details: str
    prev_hash: str
    hash: str


def _legacy_hash(prev_hash: str, e: _Event) -> str:
    """The 0001/0002 chain, frozen here: SHA-256 over the previous hash and the row (no seq)."""
    payload = {
        "occurred_at": e.occurred_at.isoformat(),
        "event": e.event,
        "outcome": e.outcome,
        "actor_id": e.actor_id,
        "actor_name": e.actor_name,
        "target_user_id": e.target_user_id,
        "target_name": e.target_name,
        "ip": e.ip,
        "user_agent": e.user_agent,
        "details": e.details,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256((prev_hash + text).encode()).hexdigest()


def _walk(conn: sa.Connection) -> Iterator[list[_Event]]:
    """Every event in chain order, in batches (memory stays flat on millions of events)."""
    cols = [c for c in _events.c if c.name != "seq"]
    last_id = 0
    position = 0
    while True:
        rows = conn.execute(
            sa.select(*cols).where(_events.c.id > last_id).order_by(_events.c.id).limit(BATCH)
        ).all()
        if not rows:
            return
        batch = []
        for row in rows:
            position += 1
            batch.append(_Event(seq=position, **row._mapping))
        yield batch
        last_id = rows[-1].id


def _rewrite(conn: sa.Connection, rows: list[dict[str, object]]) -> None:
    conn.execute(
        _events.update()
        .where(_events.c.id == sa.bindparam("b_id"))
        .values(
            seq=sa.bindparam("b_seq"),
            prev_hash=sa.bindparam("b_prev"),
            hash=sa.bindparam("b_hash"),
        ),
        rows,
    )


def _seal_existing(conn: sa.Connection, audit: AuditLog) -> tuple[int, str, int | None]:
    """Check the old chain and re-seal it: (events, last seal, first broken id or None)."""
    old_prev, new_prev = GENESIS, GENESIS
    count, broken = 0, None
    for batch in _walk(conn):
        updates: list[dict[str, object]] = []
        for e in batch:
            if broken is None and (e.prev_hash != old_prev or _legacy_hash(old_prev, e) != e.hash):
                broken = e.id
            old_prev = e.hash
            sealed = audit.seal(new_prev, e)
            updates.append({"b_id": e.id, "b_seq": e.seq, "b_prev": new_prev, "b_hash": sealed})
            new_prev = sealed
            count = e.seq
        _rewrite(conn, updates)
    return count, new_prev, broken


def _append_sealed_event(
    conn: sa.Connection, audit: AuditLog, seq: int, prev: str, sealed: int, broken: int | None
) -> str:
    """Record in the keyed chain itself what was sealed and whether the old chain held."""
    details: dict[str, object] = {"sealed_events": sealed, "legacy_chain": "intact"}
    if broken is not None:
        details.update(legacy_chain="broken", legacy_first_bad_event_id=broken)
    e = _Event(
        id=0,
        seq=seq,
        occurred_at=datetime.now(UTC),
        event=SEALED_EVENT,
        outcome="success" if broken is None else "failure",
        actor_id=None,
        actor_name="migration",
        target_user_id=None,
        target_name="",
        ip="",
        user_agent="",
        details=json.dumps(details, sort_keys=True, separators=(",", ":")),
        prev_hash=prev,
        hash="",
    )
    e.hash = audit.seal(prev, e)
    values = {k: v for k, v in e.__dict__.items() if k != "id"}
    conn.execute(_events.insert().values(**values))
    return e.hash


def upgrade() -> None:
    conn = op.get_bind()
    for name, table, _cols in _DUPLICATES:
        op.drop_index(name, table_name=table)

    op.add_column("audit_events", sa.Column("seq", sa.BigInteger(), nullable=True))
    has_events = conn.execute(sa.text("SELECT 1 FROM audit_events LIMIT 1")).first() is not None
    audit = audit_log_for(conn.engine)
    if has_events:
        if audit is None:
            raise RuntimeError(
                "audit_events holds events that must be sealed with the audit key, which this "
                "migration gets from the application: run `qpki migrate` (with the usual "
                "QPKI_DATA_DIR / QPKI_AUDIT_KEY) instead of a bare `alembic upgrade`."
            )
        existing = audit.head.read()
        if existing is not None:
            raise RuntimeError(
                f"A sealed audit chain head already exists in {audit.head.description}, but the "
                "database holds an unsealed chain: its schema was reverted outside qPKI's "
                "migrations. Sealing now would make whatever was written meanwhile look "
                "authentic, so nothing was changed. Investigate; to seal anyway, move the head "
                "away and run `qpki migrate` again."
            )
        count, last, broken = _seal_existing(conn, audit)
        if broken is not None:
            log.warning(
                "the old (unkeyed) audit chain was already broken at event id %s; sealed as "
                "found and recorded in an audit_chain_sealed event",
                broken,
            )
        last = _append_sealed_event(conn, audit, count + 1, last, count, broken)
        audit.head.replace(audit.sealed_head(count + 1, last))

    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch.create_unique_constraint("uq_audit_events_seq", ["seq"])
    for name, table, _cols in _OLD_AUDIT:
        op.drop_index(name, table_name=table)
    for name, table, cols in _NEW:
        op.create_index(name, table, cols)


def downgrade() -> None:
    conn = op.get_bind()
    for name, table, _cols in _NEW:
        op.drop_index(name, table_name=table)
    for name, table, cols in _OLD_AUDIT + _DUPLICATES:
        op.create_index(name, table, cols)

    prev = GENESIS
    for batch in _walk(conn):
        updates: list[dict[str, object]] = []
        for e in batch:
            digest = _legacy_hash(prev, e)
            updates.append({"b_id": e.id, "b_seq": e.seq, "b_prev": prev, "b_hash": digest})
            prev = digest
        _rewrite(conn, updates)
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.drop_constraint("uq_audit_events_seq", type_="unique")
        batch_op.drop_column("seq")
    audit = audit_log_for(conn.engine)
    if audit is not None:
        audit.head.replace(None)  # the unkeyed chain has no head; upgrading seals it again
