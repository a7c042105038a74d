"""SQLite WAL checkpoints run off the request path (issue 15): a background thread of each
writing process copies the log into the database, the connections keep only a backstop."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import text

from harness.services import wait_until
from qpki.db.manager import DatabaseManager
from qpki.db.sqlite_checkpoint import BACKSTOP_PAGES, WalCheckpointer


def _db(tmp_path: Path) -> DatabaseManager:
    db = DatabaseManager(f"sqlite:///{tmp_path / 'c.db'}")
    with db.transaction() as s:
        s.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)"))
    return db


def _write(db: DatabaseManager, rows: int = 20) -> None:
    for i in range(rows):
        with db.transaction() as s:
            s.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": "x" * 500 + str(i)})


def _log_frames(path: Path) -> tuple[int, int]:
    """(frames in the log, frames already in the database file), read without copying."""
    conn = sqlite3.connect(path)
    try:
        # A NOOP-like probe: PASSIVE copies what it can, so read the state from a second
        # call (nothing left to copy by then if the thread did its work).
        _busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    return int(frames), int(done)


def test_connections_keep_only_the_backstop_checkpoint(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.transaction(write=False) as s:
        assert s.execute(text("PRAGMA wal_autocheckpoint")).scalar() == BACKSTOP_PAGES
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    db.dispose()


def test_writes_are_checkpointed_by_the_background_thread(tmp_path: Path) -> None:
    db = _db(tmp_path)
    checkpointer = db.checkpointer
    assert checkpointer is not None
    before = checkpointer.checkpoints
    _write(db)
    wait_until(lambda: checkpointer.checkpoints > before, what="a background checkpoint")
    thread = checkpointer._thread
    assert thread is not None and thread.name.startswith("qpki-wal-checkpoint")
    frames, done = _log_frames(tmp_path / "c.db")
    assert frames > 0 and done == frames, "every frame of the log is in the database file"
    db.dispose()
    assert checkpointer._thread is None, "dispose ends the thread"


def test_an_idle_thread_ends_and_the_next_write_starts_one(tmp_path: Path) -> None:
    path = tmp_path / "idle.db"
    checkpointer = WalCheckpointer(path, delay_s=0.0, idle_exit_s=0.05)
    sqlite3.connect(path, isolation_level=None).execute("PRAGMA journal_mode=WAL").close()
    checkpointer.note_write()
    wait_until(lambda: checkpointer.checkpoints >= 1, what="the first checkpoint")
    wait_until(lambda: checkpointer._thread is None, what="the idle thread to end")
    checkpointer.note_write()
    wait_until(lambda: checkpointer.checkpoints >= 2, what="a new thread's checkpoint")
    checkpointer.stop()


def _child_writes(db: DatabaseManager, out: Any) -> None:
    """In a forked worker: the parent's manager, whose thread did not come along."""
    checkpointer = db.checkpointer
    assert checkpointer is not None
    inherited = checkpointer._thread
    db.engine.dispose(close=False)  # as gunicorn's post_fork does
    before = checkpointer.checkpoints
    _write(db, rows=5)
    wait_until(lambda: checkpointer.checkpoints > before, what="the worker's checkpoint")
    out.put((inherited is not None, checkpointer._thread is not inherited))


def test_a_forked_worker_checkpoints_with_a_thread_of_its_own(tmp_path: Path) -> None:
    db = _db(tmp_path)
    _write(db, rows=2)  # the parent's thread is running when the worker forks
    ctx = mp.get_context("fork")
    out: Any = ctx.Queue()
    child = ctx.Process(target=_child_writes, args=(db, out))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert out.get(timeout=5) == (True, True)
    db.dispose()


def test_a_failed_checkpoint_is_logged_and_the_thread_goes_on(tmp_path: Path, caplog: Any) -> None:
    missing_dir = tmp_path / "gone"
    checkpointer = WalCheckpointer(missing_dir / "x.db", delay_s=0.0, idle_exit_s=5.0)
    checkpointer.note_write()
    wait_until(lambda: "WAL checkpoint of" in caplog.text, what="the warning")
    assert checkpointer._thread is not None and checkpointer._thread.is_alive()
    checkpointer.stop()
    assert checkpointer._thread is None
