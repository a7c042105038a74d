"""Build the application's AuditLog: its key, where its head lives, and the start-up checks."""

from __future__ import annotations

import logging

from sqlalchemy import inspect, text

from qpki.audit.head import HEAD_FILE_NAME, FileHeadStore, HeadStore, RedisHeadStore
from qpki.audit.keys import load_audit_key
from qpki.audit.log import AuditLog
from qpki.config import Settings
from qpki.db.manager import DatabaseManager

log = logging.getLogger(__name__)


def _sealed_events_exist(db: DatabaseManager) -> bool:
    """True once migration 0003 sealed the chain and it holds at least one event."""
    inspector = inspect(db.engine)
    if "audit_events" not in inspector.get_table_names():
        return False
    if "seq" not in {c["name"] for c in inspector.get_columns("audit_events")}:
        return False  # still the unkeyed chain: migration 0003 seals it with this key
    with db.engine.connect() as conn:
        return conn.execute(text("SELECT 1 FROM audit_events LIMIT 1")).first() is not None


def head_store(settings: Settings) -> HeadStore:
    """Redis when several instances share ``QPKI_REDIS_URL``, else a file in the data dir."""
    if settings.redis_url:
        return RedisHeadStore(settings.redis_url)
    return FileHeadStore(settings.data_dir / HEAD_FILE_NAME)


def open_audit_log(settings: Settings, db: DatabaseManager) -> AuditLog:
    """The AuditLog for ``db``, attached to its engine so migrations seal with the same key."""
    key, source = load_audit_key(
        settings.data_dir, settings.audit_key, sealed_events_exist=_sealed_events_exist(db)
    )
    audit = AuditLog(key, head_store(settings))
    audit.attach(db.engine)
    log.info("audit key loaded from %s; chain head kept in %s", source, audit.head.description)
    return audit
