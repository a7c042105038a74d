"""The verification hot path does less work without losing a guarantee (issue 15).

- Session resolution reads (no write transaction) unless a write is due: last-seen moving
  (at most once a minute) or an expired row being ended.
- The audit chain's tail is read once per transaction; a second event links to the first,
  and a rolled-back savepoint does not leave a stale tail behind.
- The file head store advances in place (no new file and rename per commit) and stays one
  JSON document.
- SQLite writers of several processes take turns on a file lock, one descriptor per process.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, select

from helpers import PASSWORD, create_user, enable_mfa
from qpki.audit.chain import ChainHead
from qpki.audit.events import AuditEvent
from qpki.audit.head import FileHeadStore
from qpki.audit.log import AuditLog
from qpki.auth.models import UserSession
from qpki.auth.sessions import token_digest
from qpki.clock import SteppedClock
from qpki.db.manager import DatabaseManager, DatabaseUnavailable, SQLiteWriterLock

START = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)


@contextmanager
def statements(app: Flask) -> Iterator[list[str]]:
    """Every SQL statement the app's engine runs inside the block (BEGINs included)."""
    seen: list[str] = []
    engine = app.db_manager.engine  # type: ignore[attr-defined]

    def _log(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", _log)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", _log)


def _row(app: Flask, token: str) -> UserSession:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        row = s.scalar(select(UserSession).where(UserSession.token_hash == token_digest(token)))
        assert row is not None
        return row


def _audit(app: Flask) -> AuditLog:
    return app.auth_manager.audit  # type: ignore[attr-defined, no-any-return]


# -- session resolution ------------------------------------------------------------------------
def test_resolving_a_session_reads_unless_a_write_is_due(make_app: Callable[..., Flask]) -> None:
    clock = SteppedClock(START)
    app = make_app(clock=clock)
    user = create_user(app, "rosa")
    enable_mfa(app, user.id, at=clock())
    pending = app.auth_manager.login("rosa", PASSWORD).token  # type: ignore[attr-defined]

    with statements(app) as seen:
        found = app.auth_manager.resolve_session(pending)  # type: ignore[attr-defined]
    assert found is not None and found[0].id == user.id and not found[1].mfa_passed
    assert not [q for q in seen if q.startswith(("BEGIN IMMEDIATE", "UPDATE", "INSERT"))], seen

    clock.advance(seconds=61)  # last-seen is due to move: one conditional UPDATE
    with statements(app) as seen:
        assert app.auth_manager.resolve_session(pending) is not None  # type: ignore[attr-defined]
    assert len([q for q in seen if q.startswith("UPDATE user_sessions")]) == 1
    assert _row(app, pending).last_seen_at == clock()

    clock.advance(minutes=5)  # the pending sign-in expired: ended on the spot, once
    assert app.auth_manager.resolve_session(pending) is None  # type: ignore[attr-defined]
    row = _row(app, pending)
    assert row.ended_at == clock() and row.end_reason == "expired"
    with statements(app) as seen:
        assert app.auth_manager.resolve_session(pending) is None  # type: ignore[attr-defined]
    assert not [q for q in seen if q.startswith(("BEGIN IMMEDIATE", "UPDATE"))], seen


def test_a_deactivated_users_session_is_ended_when_resolved(
    make_app: Callable[..., Flask],
) -> None:
    clock = SteppedClock(START)
    app = make_app(clock=clock)
    user = create_user(app, "sven")
    token = app.auth_manager.login("sven", PASSWORD).token  # type: ignore[attr-defined]
    assert app.auth_manager.resolve_session(token) is not None  # type: ignore[attr-defined]
    from qpki.auth.models import User

    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        stored = s.get(User, user.id)
        assert stored is not None
        stored.is_active = False
    assert app.auth_manager.resolve_session(token) is None  # type: ignore[attr-defined]
    assert _row(app, token).end_reason == "user_inactive"


# -- audit chain -------------------------------------------------------------------------------
def test_events_of_one_transaction_read_the_tail_once_and_chain(app: Flask) -> None:
    audit = _audit(app)
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        audit.record(s, AuditEvent.USER_CHANGED, target_name="warm-up")
    with statements(app) as seen, app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        first = audit.record(s, AuditEvent.USER_CHANGED, target_name="a")
        second = audit.record(s, AuditEvent.USER_CHANGED, target_name="b")
    tail_reads = [q for q in seen if q.startswith("SELECT audit_events.seq, audit_events.hash")]
    assert len(tail_reads) == 1, seen
    assert second.seq == first.seq + 1 and second.prev_hash == first.hash
    assert isinstance(first.id, int) and second.id == first.id + 1
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        result = audit.verify(s)
    assert result.ok and result.checked == 3
    head = audit.head.read()
    assert head is not None and (head.seq, head.hash) == (second.seq, second.hash)


def test_a_rolled_back_savepoint_leaves_no_stale_tail(app: Flask) -> None:
    audit = _audit(app)
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        kept = audit.record(s, AuditEvent.USER_CHANGED, target_name="kept")
        savepoint = s.begin_nested()
        audit.record(s, AuditEvent.USER_CHANGED, target_name="rolled back")
        savepoint.rollback()
        after = audit.record(s, AuditEvent.USER_CHANGED, target_name="after")
    assert after.seq == kept.seq + 1 and after.prev_hash == kept.hash
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        assert audit.verify(s).ok


# -- head store --------------------------------------------------------------------------------
def test_the_file_head_advances_in_place_and_stays_json(tmp_path: Path) -> None:
    store = FileHeadStore(tmp_path / ".audit_head")
    key = os.urandom(32)
    store.advance(ChainHead.sealed(key, 1, "a" * 64))
    inode = os.stat(store.path).st_ino
    store.advance(ChainHead.sealed(key, 2, "b" * 64))
    store.advance(ChainHead.sealed(key, 1, "c" * 64))  # never backwards
    assert os.stat(store.path).st_ino == inode  # rewritten, not replaced by a new file
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert json.loads(store.path.read_text())["seq"] == 2
    head = store.read()
    assert head is not None and head.seq == 2 and head.is_authentic(key)

    store.replace(ChainHead.sealed(key, 7, "d" * 64))  # migrations: exactly this head
    store.advance(ChainHead.sealed(key, 8, "e" * 64))
    head = store.read()
    assert head is not None and (head.seq, head.hash) == (8, "e" * 64)


# -- SQLite writer lock ------------------------------------------------------------------------
def _hold_lock(lock: SQLiteWriterLock, held: Any, release: Any) -> None:
    with lock.held():
        held.set()
        release.wait(30)


def test_sqlite_writers_of_two_processes_take_turns(tmp_path: Path) -> None:
    lock = SQLiteWriterLock(tmp_path / "db.sqlite.writer-lock", wait_s=0.2)
    with lock.held():  # the parent opens its descriptor before the fork
        pass
    ctx = mp.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_lock, args=(lock, held, release))
    child.start()
    try:
        assert held.wait(30)
        with pytest.raises(DatabaseUnavailable, match="database is locked"), lock.held():
            pass
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0
    with lock.held():  # free again once the other process is done
        pass


def test_write_transactions_on_a_sqlite_file_use_the_writer_lock(tmp_path: Path) -> None:
    db = DatabaseManager(f"sqlite:///{tmp_path / 'w.db'}")
    try:
        with db.transaction():
            assert (tmp_path / "w.db.writer-lock").exists()
        with db.transaction(), db.transaction(write=False) as reader:
            assert reader is not None  # a read inside a write neither waits nor deadlocks
    finally:
        db.dispose()
    memory = DatabaseManager("sqlite://")
    try:
        with memory.transaction():
            pass
        assert memory._writer_lock is None
    finally:
        memory.dispose()


# -- the verification's statements ------------------------------------------------------------
def test_a_reservation_is_one_statement_until_a_back_off_starts(app: Flask) -> None:
    """The throttle's reserve is one upsert; a second statement only opens the back-off."""
    from qpki.auth.throttle import FREE_FAILURES
    from qpki.auth.throttle_store import AccountThrottle

    store = AccountThrottle()
    db = app.db_manager  # type: ignore[attr-defined]
    for n in range(1, FREE_FAILURES + 2):
        with statements(app) as seen, db.transaction() as s:
            granted = store.reserve(s, "mallory", START)
        work = [q for q in seen if not q.startswith(("BEGIN", "COMMIT"))]
        if n < FREE_FAILURES:
            assert granted.granted and granted.state.failures == n
            assert len(work) == 1 and work[0].startswith("INSERT INTO login_throttle"), work
        else:  # this attempt starts the back-off: the upsert, then the window
            assert granted.granted and granted.state.retry_at is not None
            assert len(work) == 2 and work[1].startswith("UPDATE login_throttle"), work
            break
    with db.transaction() as s:
        refused = store.reserve(s, "mallory", START)
        assert not refused.granted and refused.state.failures == FREE_FAILURES
        assert store.state(s, "mallory") == refused.state  # nothing counted


def test_the_second_step_is_one_write_transaction(make_app: Callable[..., Flask]) -> None:
    """The code's POST is one write transaction: the pending row is claimed, not read
    first (the password step marked the cookie pending); the role's policy and the user are
    read once each."""
    from helpers import login, oathtool_code

    clock = SteppedClock(START)
    app = make_app(clock=clock)
    user = create_user(app, "tess")
    secret, _codes = enable_mfa(app, user.id, at=clock())
    clock.advance(seconds=30)
    client = app.test_client()
    assert login(client, "tess").status_code == 302
    with statements(app) as seen:
        done = client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
    assert done.status_code == 302 and done.headers["Location"].endswith("/")
    begins = [q for q in seen if q.startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE"], begins
    assert len([q for q in seen if "FROM role_policies" in q]) == 1, seen
    assert len([q for q in seen if q.startswith("SELECT users.")]) == 1, seen


def test_a_known_browser_is_looked_up_once_per_second_step(
    make_app: Callable[..., Flask],
) -> None:
    """With a device cookie, the throttle key and the new session both need the device: one
    read serves both."""
    from helpers import login, oathtool_code

    clock = SteppedClock(START)
    app = make_app(clock=clock)
    user = create_user(app, "vic")
    secret, _codes = enable_mfa(app, user.id, at=clock())
    clock.advance(seconds=30)
    client = app.test_client()
    login(client, "vic")
    client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
    client.post("/auth/logout")
    clock.advance(seconds=30)
    login(client, "vic")  # this browser now holds a device cookie
    with statements(app) as seen:
        done = client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock())})
    assert done.status_code == 302 and done.headers["Location"].endswith("/")
    lookups = [q for q in seen if q.startswith("SELECT known_devices.id")]
    assert len(lookups) == 1, seen
    assert len([q for q in seen if q.startswith("UPDATE known_devices")]) == 1  # touched


def test_the_api_verify_is_one_write_transaction(make_app: Callable[..., Flask]) -> None:
    """The key is read; user, policy, code, replay guard and audit are one write."""
    from helpers import oathtool_code
    from qpki.api import api_keys_of

    clock = SteppedClock(START)
    app = make_app(clock=clock)
    user = create_user(app, "uma")
    secret, _codes = enable_mfa(app, user.id, at=clock())
    clock.advance(seconds=30)
    key = api_keys_of(app).create("hot", "verify", actor_name="test").secret
    api = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    api.post("/api/v1/verify", json={"username": "nobody", "code": "1"}, headers=headers)
    # (that first use recorded the key's last use: not again within the minute)
    with statements(app) as seen:
        answer = api.post(
            "/api/v1/verify",
            json={"username": "uma", "code": oathtool_code(secret, clock())},
            headers=headers,
        )
    assert answer.status_code == 200 and answer.get_json()["result"] == "accept"
    begins = [q for q in seen if q.startswith("BEGIN")]
    assert begins == ["BEGIN DEFERRED", "BEGIN IMMEDIATE"], begins


def test_the_audit_head_is_stored_after_the_write_turn_is_given_up(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storing the head needs no database: it waits for the commit, not in the writer's turn
    (the other workers wait for every moment a writer holds it)."""
    import fcntl

    db = app.db_manager  # type: ignore[attr-defined]
    audit = _audit(app)
    lock_path = db._writer_lock.path
    stored: list[tuple[int, bool]] = []
    advance = audit.head.advance

    def watched(head: ChainHead) -> None:
        fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a writer holds it
            stored.append((head.seq, True))
        except BlockingIOError:
            stored.append((head.seq, False))
        finally:
            os.close(fd)
        advance(head)

    monkeypatch.setattr(audit.head, "advance", watched)
    with db.transaction() as s:
        first = audit.record(s, AuditEvent.USER_CHANGED, target_name="a")
        audit.record(s, AuditEvent.USER_CHANGED, target_name="b")
        assert stored == []  # nothing before the commit
    assert stored == [(first.seq + 1, True)]  # once, for the newest event, outside the turn
    head = audit.head.read()
    assert head is not None and head.seq == first.seq + 1


def test_a_plain_read_is_a_deferred_transaction_without_the_writer_lock(tmp_path: Path) -> None:
    """``reading()`` (the API key lookup): a Core read in ``BEGIN DEFERRED`` that does not wait
    for a writer's turn; database errors come out as DatabaseUnavailable, like a transaction's."""
    import threading

    from sqlalchemy import text

    db = DatabaseManager(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        with db.transaction() as s:
            s.execute(text("CREATE TABLE t (v INTEGER)"))
            s.execute(text("INSERT INTO t VALUES (7)"))
        seen: list[str] = []
        event.listen(db.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        lock = db._writer_lock
        assert lock is not None
        holding, done = threading.Event(), threading.Event()

        def writer_turn() -> None:
            with lock.held():
                holding.set()
                done.wait(10)

        other = threading.Thread(target=writer_turn)
        other.start()
        try:
            assert holding.wait(10)
            with db.reading() as conn:  # another thread holds the writer's turn meanwhile
                assert conn.execute(text("SELECT v FROM t")).scalar() == 7
        finally:
            done.set()
            other.join(10)
        assert seen == ["BEGIN DEFERRED", "SELECT v FROM t"], seen
        with pytest.raises(DatabaseUnavailable), db.reading() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
    finally:
        db.dispose()
