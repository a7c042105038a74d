"""WAL checkpoints of a SQLite database, off the request path.

In WAL mode SQLite copies the log back into the database file ("checkpoint") from inside the
commit that crosses ``wal_autocheckpoint`` pages (1000 by default). That commit then does
the copying and the ``fsync`` calls of every other request's writes too: with a
verification writing about a dozen pages, one request in a hundred waited several
milliseconds for work that was not its own (the p99 of the hot path, issue #15).

Here each process that writes runs a small daemon thread that, half a second after a
commit, runs ``PRAGMA wal_checkpoint(PASSIVE)`` on a connection of its own. A passive checkpoint
never waits for a reader or a writer (and they never wait for it); whatever it could not
copy, the next one copies. The connections of the application keep an automatic checkpoint
as a backstop at :data:`BACKSTOP_PAGES`, far above what the thread leaves behind, so the log
stays bounded even if the thread cannot run. The thread ends after :data:`IDLE_EXIT_S`
without writes and starts again with the next one; a forked worker starts its own.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The automatic checkpoint the application's connections keep (pages of the log; 4 KiB each).
BACKSTOP_PAGES = 4000
# How soon after a commit the thread checkpoints: the writes in between share one checkpoint.
# Not sooner: a page written again after a checkpoint is copied again by the next, so
# checkpoints every few requests would copy the busy pages (the audit tail, the indexes'
# last leaves) over and over; two a second copy each about as rarely as SQLite's default.
DELAY_S = 0.5
# A thread with nothing to do for this long ends (tests create many databases).
IDLE_EXIT_S = 30.0
# A checkpoint never waits long for SQLite's checkpoint lock (another process may hold it).
_BUSY_TIMEOUT_MS = 100


@dataclass(frozen=True)
class CheckpointResult:
    """``PRAGMA wal_checkpoint``'s answer: whether it was blocked, the frames in the log, and
    how many of them are now in the database file (both -1 when not in WAL mode)."""

    busy: bool
    log_frames: int
    checkpointed: int


class WalCheckpointer:
    """Checkpoints one SQLite database file from a background thread of each process."""

    def __init__(self, path: Path, *, delay_s: float = DELAY_S, idle_exit_s: float = IDLE_EXIT_S):
        self.path = path
        self.delay_s = delay_s
        self.idle_exit_s = idle_exit_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.checkpoints = 0  # how many this process ran (for tests and diagnostics)

    def note_write(self) -> None:
        """A write transaction committed: checkpoint soon (starts the thread if needed)."""
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            return
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive() and self._pid == os.getpid():
                return
            self._stop.clear()
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, name=f"qpki-wal-checkpoint:{self.path.name}", daemon=True
            )
            self._thread.start()

    def checkpoint_now(self) -> CheckpointResult:
        """One passive checkpoint, now, on a connection of its own."""
        # mode=rw: a database file that is gone is an error, never created anew.
        conn = sqlite3.connect(
            f"{self.path.absolute().as_uri()}?mode=rw",
            uri=True,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
        )
        try:
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            conn.close()
        self.checkpoints += 1
        return CheckpointResult(bool(busy), int(frames), int(done))

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (the database is being closed)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(self.idle_exit_s):
                with self._lock:
                    if not self._wake.is_set():  # no write arrived while deciding: end
                        self._thread = None
                        return
                continue
            # Let the writes of the next moment join this checkpoint.
            if self._stop.wait(self.delay_s):
                return
            self._wake.clear()
            try:
                self.checkpoint_now()
            except sqlite3.Error as exc:
                # The next write wakes the thread again; the backstop bounds the log meanwhile.
                log.warning("WAL checkpoint of %s failed: %s", self.path, exc)
