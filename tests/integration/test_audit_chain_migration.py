"""Revision 0003 seals an existing unkeyed (SHA-256) chain with the audit key.

The old chain is checked first; the result is recorded in an ``audit_chain_sealed`` event in
the keyed chain itself, and the head is stored. A head that already exists means the schema
was reverted by hand: sealing then would launder what was written meanwhile, so it stops.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask
from sqlalchemy import select, text

from qpki.audit.chain import ChainHead
from qpki.audit.events import AuditEvent
from qpki.audit.head import HEAD_FILE_NAME
from qpki.audit.models import AuditEventRecord
from qpki.config import Settings, write_private_file
from qpki.db.manager import DatabaseManager

LEGACY_EVENTS = 25


def _legacy_hash(prev: str, row: dict[str, object]) -> str:
    """The 0001/0002 format: SHA-256 over the previous hash and the row without ``seq``."""
    payload = {k: row[k] for k in row if k not in {"prev_hash", "hash"}}
    payload["occurred_at"] = row["occurred_at"].isoformat()  # type: ignore[attr-defined]
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256((prev + canon).encode()).hexdigest()


def _legacy_database(url: str, *, break_at: int | None = None) -> list[str]:
    """A database at 0002 holding an unkeyed chain (broken at position ``break_at``)."""
    db = DatabaseManager(url)
    db.migrate_database("0002_mfa")
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    prev, hashes = "0" * 64, []
    with db.engine.begin() as conn:
        for i in range(LEGACY_EVENTS):
            row: dict[str, object] = {
                "occurred_at": start + timedelta(minutes=i, microseconds=i),
                "event": "login_failure" if i % 3 else "login_success",
                "outcome": "failure" if i % 3 else "success",
                "actor_id": None,
                "actor_name": "",
                "target_user_id": 1,
                "target_name": "old",
                "ip": "192.0.2.7",
                "user_agent": "ua",
                "details": json.dumps({"n": i}, separators=(",", ":")),
            }
            digest = _legacy_hash(prev, row)
            row.update(prev_hash=prev, hash=digest)
            if break_at is not None and i == break_at:
                row["details"] = '{"n":"edited"}'  # edited after hashing: the old chain breaks
            naive = dict(row, occurred_at=row["occurred_at"].replace(tzinfo=None))  # type: ignore[attr-defined]
            conn.execute(
                text(
                    "INSERT INTO audit_events (occurred_at, event, outcome, actor_id, actor_name,"
                    " target_user_id, target_name, ip, user_agent, details, prev_hash, hash)"
                    " VALUES (:occurred_at, :event, :outcome, :actor_id, :actor_name,"
                    " :target_user_id, :target_name, :ip, :user_agent, :details, :prev_hash,"
                    " :hash)"
                ),
                naive,
            )
            prev = digest
            hashes.append(digest)
    db.dispose()
    return hashes


def _events(app: Flask) -> list[AuditEventRecord]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return list(s.scalars(select(AuditEventRecord).order_by(AuditEventRecord.id)))


def test_existing_chain_is_sealed_and_verifies(make_app: Callable[..., Flask], db_url: str) -> None:
    old_hashes = _legacy_database(db_url)
    app = make_app(db_url)  # create_app + migrate: 0003 seals with this app's audit key
    events = _events(app)
    assert len(events) == LEGACY_EVENTS + 1
    assert [e.seq for e in events] == list(range(1, LEGACY_EVENTS + 2))
    assert not {e.hash for e in events} & set(old_hashes)  # every seal is new
    assert [json.loads(e.details)["n"] for e in events[:-1]] == list(range(LEGACY_EVENTS))
    sealed = events[-1]
    assert sealed.event == AuditEvent.AUDIT_CHAIN_SEALED and sealed.outcome == "success"
    assert json.loads(sealed.details) == {"legacy_chain": "intact", "sealed_events": 25}
    audit = app.auth_manager.audit  # type: ignore[attr-defined]
    head = audit.head.read()
    assert head is not None and (head.seq, head.hash) == (sealed.seq, sealed.hash)
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        result = audit.verify(s)
    assert result.ok and result.checked == LEGACY_EVENTS + 1
    # New events continue the sealed chain.
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        audit.record(s, AuditEvent.USER_CHANGED)
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        assert audit.verify(s).checked == LEGACY_EVENTS + 2


def test_a_broken_old_chain_is_sealed_as_found_and_recorded(
    make_app: Callable[..., Flask], sqlite_url: str
) -> None:
    _legacy_database(sqlite_url, break_at=7)
    app = make_app(sqlite_url)
    events = _events(app)
    sealed = events[-1]
    assert sealed.outcome == "failure"
    details = json.loads(sealed.details)
    assert details["legacy_chain"] == "broken"
    assert details["legacy_first_bad_event_id"] == events[7].id


def test_sealing_stops_when_a_head_already_exists(
    make_settings: Callable[..., Settings], make_app: Callable[..., Flask], sqlite_url: str
) -> None:
    """A head plus an unkeyed chain = a schema reverted by hand; nothing is changed."""
    _legacy_database(sqlite_url)
    settings = make_settings(sqlite_url)
    head = ChainHead(seq=40, hash="a" * 64, mac="b" * 64)
    write_private_file(settings.data_dir / HEAD_FILE_NAME, head.to_json().encode())
    with pytest.raises(RuntimeError, match="reverted outside qPKI's migrations"):
        make_app(sqlite_url)
    db = DatabaseManager(sqlite_url)
    assert db.current_revision() == "0002_mfa"
    db.dispose()


def test_bare_migration_without_the_key_refuses_to_seal(sqlite_url: str) -> None:
    _legacy_database(sqlite_url)
    db = DatabaseManager(sqlite_url)  # not built by create_app: no audit key attached
    with pytest.raises(RuntimeError, match="run `qpki migrate`"):
        db.migrate_database()
    assert db.current_revision() == "0002_mfa"
    db.dispose()
