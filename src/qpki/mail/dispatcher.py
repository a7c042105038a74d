"""Deliver the outbox from a background thread in each serving process.

Why a thread per process rather than a separate ``qpki mail worker`` process: there is nothing
extra to start, supervise or forget in a deployment (``qpki run``, plain gunicorn, a container
with one process all behave the same); a mail leaves right after the commit that queued it
(the Notifier wakes the thread), never inside the request; and since claiming is atomic in the
database, any number of these threads across workers and machines share one outbox safely.

The thread runs only while there is mail to send: it drains what is due, sleeps until the next
retry, and exits when the outbox has nothing pending. It is started by a commit that queued a
mail and, at most every few minutes, by a request (to pick up mail left by an instance that
stopped, or retries after a database outage). It is started lazily and never in a process
that forks afterwards (gunicorn's master builds the app but serves nothing), and a process that
finds itself forked starts afresh.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError

from qpki.db.manager import DatabaseUnavailable
from qpki.mail.outbox import OutboxSender

log = logging.getLogger(__name__)

IDLE_POLL = timedelta(seconds=30)  # the longest the thread sleeps between passes
REQUEST_NUDGE = timedelta(minutes=5)  # how often a request may restart a stopped thread
MAX_DB_FAILURES = 5  # consecutive database errors before the thread gives up for now


class MailDispatcher:
    """Owns the per-process delivery thread."""

    def __init__(self, sender: OutboxSender, *, enabled: bool = True) -> None:
        self.sender = sender
        self.enabled = enabled
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._woken_again = False
        self._last_nudge = 0.0
        self._atexit_registered = False

    def wake(self) -> None:
        """Something was queued (or may be due): make sure the thread runs and looks now."""
        if not self.enabled:
            return
        with self._lock:
            if os.getpid() != self._pid:  # forked: the parent's thread does not exist here
                self._pid, self._thread = os.getpid(), None
                self._wake, self._stop = threading.Event(), threading.Event()
            self._woken_again = True
            self._wake.set()
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="qpki-mail-outbox", daemon=True)
            self._thread.start()
            if not self._atexit_registered:
                atexit.register(self.stop)
                self._atexit_registered = True

    def nudge(self) -> None:
        """Called on requests: wake at most every REQUEST_NUDGE (cheap otherwise)."""
        now = time.monotonic()
        if now - self._last_nudge < REQUEST_NUDGE.total_seconds():
            return
        self._last_nudge = now
        self.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the thread finish the mail in hand and end (process exit, tests)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        """Drain, then sleep until the next retry; exit when nothing is pending.

        A stop request (process exit) still lets one pass run, so that a short-lived process
        such as a ``qpki`` command hands over the mail it just queued before it exits.
        """
        db_failures = 0
        while True:
            with self._lock:
                self._woken_again = False
                self._wake.clear()
            try:
                self.sender.deliver_due()
                next_due = None if self._stop.is_set() else self.sender.next_due_at()
                db_failures = 0
            except (DatabaseUnavailable, SQLAlchemyError) as exc:
                db_failures += 1
                log.warning("mail outbox: database error (%d in a row): %s", db_failures, exc)
                if db_failures >= MAX_DB_FAILURES or self._stop.is_set():
                    log.error("mail outbox: pausing delivery until the next mail or request")
                    break
                self._wake.wait(min(30.0 * 2**db_failures, 300.0))
                continue
            if self._stop.is_set():
                break
            if next_due is None:
                with self._lock:
                    if not self._woken_again:  # nothing pending and nobody queued since
                        self._thread = None
                        return
                continue
            wait = (next_due - self.sender.clock()).total_seconds()
            self._wake.wait(max(0.05, min(wait, IDLE_POLL.total_seconds())))
        with self._lock:
            if self._thread is threading.current_thread():
                self._thread = None
