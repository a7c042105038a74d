"""Per-client-address rate limits (Flask-Limiter), counted once per machine or through Redis.

``qpki run`` serves with several gunicorn worker processes. Flask-Limiter's in-memory storage
lives in each process, so with N workers an address got N times the documented allowance
(150 sign-in POSTs in a minute gave 106 accepted where 60 are documented). The counters must
therefore live outside the workers:

* with ``QPKI_REDIS_URL`` they live in Redis, shared by every instance of a deployment;
* otherwise they live in one SQLite file in the data directory (:class:`SQLiteStorage`), shared
  by every worker of the machine without any server to run. ``limits`` ships storages only for
  servers (Redis, Memcached, MongoDB) besides per-process memory, hence this small one.

If the storage fails (Redis unreachable, the file unwritable), Flask-Limiter falls back to
in-memory counting and logs a warning: the per-account throttle in the database still applies,
so the fallback never leaves the second factor unthrottled.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits.errors import ConfigurationError
from limits.storage import Storage

from qpki.clock import Clock, system_clock
from qpki.config import Settings

# Generous enough for an office behind one NAT address at 9 a.m.; the per-account throttle
# (in the database) is what protects each account.
LOGIN_LIMIT = "60 per minute;1000 per hour"
VERIFY_LIMIT = "60 per minute;1000 per hour"
SETUP_LIMIT = "20 per minute"
REGENERATE_LIMIT = "10 per minute"

# The counter file in the data directory when no Redis is configured.
COUNTER_FILE = "ratelimits.sqlite3"

limiter = Limiter(key_func=get_remote_address, default_limits=[], headers_enabled=True)


def _switched_off() -> bool:
    """QPKI_RATE_LIMITS=0, read from the app serving the request (not the last one built)."""
    return not current_app.config["QPKI_RATE_LIMITS"]


def per_address(limit: str, methods: list[str] | None = None) -> Callable[[Any], Any]:
    """A per-client-address limit on a view, honouring this app's QPKI_RATE_LIMITS."""
    return limiter.limit(limit, methods=methods, exempt_when=_switched_off)


def storage_uri(settings: Settings) -> str:
    """Where the counters live: Redis when configured, else the machine's counter file."""
    if settings.redis_url:
        return settings.redis_url
    return SQLiteStorage.uri_for(settings.data_dir / COUNTER_FILE)


class SQLiteStorage(Storage):
    """Fixed-window counters in one SQLite file, shared by all worker processes of a machine.

    Registered with ``limits`` under the scheme ``qpki+sqlite`` (``qpki+sqlite:///abs/path``),
    so Flask-Limiter builds it from ``RATELIMIT_STORAGE_URI`` like any built-in storage.
    Each process (and thread) keeps its own connection, opened on first use: gunicorn forks
    the workers after the app is built, and an SQLite connection must not cross a fork, so a
    connection inherited from another process id is abandoned, never used or closed. An
    increment is one ``BEGIN IMMEDIATE`` transaction, so concurrent workers queue on SQLite's
    write lock (waiting up to ``BUSY_TIMEOUT`` seconds) and never lose a hit. Expired windows
    are deleted as new hits arrive, so the file stays as small as the set of addresses seen in
    the last hour. A hit costs about 20 µs (with an fsync per commit it cost 12 ms).
    """

    STORAGE_SCHEME = ["qpki+sqlite"]
    BUSY_TIMEOUT = 5.0

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        clock: Clock = system_clock,
        **options: float | str | bool,
    ) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        path = urllib.parse.unquote(urllib.parse.urlparse(uri or "").path)
        if not path or not Path(path).is_absolute():
            raise ConfigurationError(
                f"qpki+sqlite storage needs an absolute file path, e.g. qpki+sqlite:///var/x.db "
                f"(got {uri!r})"
            )
        self.path = Path(path)
        self._clock = clock
        self._local = threading.local()
        # Connections inherited through fork(): kept referenced so that garbage collection
        # never closes them in the child (closing would release the parent's file locks).
        self._inherited: list[sqlite3.Connection] = []
        self._create()

    @staticmethod
    def uri_for(path: Path) -> str:
        return "qpki+sqlite://" + urllib.parse.quote(str(path.resolve()))

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return sqlite3.Error

    def _now(self) -> float:
        return self._clock().timestamp()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        # Counters need consistency, not durability: in WAL mode NORMAL skips the fsync per
        # commit, and a crash can only lose the latest hits, never corrupt the file.
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This process's and thread's connection (opened on first use after a fork)."""
        held: tuple[int, sqlite3.Connection] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        if held is not None:
            self._inherited.append(held[1])
        conn = self._open()
        self._local.held = (os.getpid(), conn)
        return conn

    def _create(self) -> None:
        # Owner-only like every file in the data directory; SQLite gives its -wal and -shm
        # files the same mode as the database file.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        # A short-lived connection: the app is built in gunicorn's master before the fork.
        conn = self._open()
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # kept in the file; readers never wait
            conn.execute(
                "CREATE TABLE IF NOT EXISTS rate_limit_counters ("
                " key TEXT PRIMARY KEY, hits INTEGER NOT NULL, expires_at REAL NOT NULL"
                ") WITHOUT ROWID"
            )
            conn.execute(
                "CREATE INDEX IF NOT EXISTS ix_rate_limit_counters_expires_at "
                "ON rate_limit_counters (expires_at)"
            )
        finally:
            conn.close()

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` hits; a window starts at its first hit and lasts ``expiry`` seconds."""
        now = self._now()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM rate_limit_counters WHERE expires_at <= ?", (now,))
            row = conn.execute(
                "INSERT INTO rate_limit_counters (key, hits, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET hits = hits + excluded.hits "
                "RETURNING hits",
                (key, amount, now + expiry),
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may already have rolled back itself
                conn.execute("ROLLBACK")
            raise
        return int(row[0])

    def get(self, key: str) -> int:
        row = (
            self._conn()
            .execute(
                "SELECT hits FROM rate_limit_counters WHERE key = ? AND expires_at > ?",
                (key, self._now()),
            )
            .fetchone()
        )
        return int(row[0]) if row else 0

    def get_expiry(self, key: str) -> float:
        now = self._now()
        row = (
            self._conn()
            .execute(
                "SELECT expires_at FROM rate_limit_counters WHERE key = ? AND expires_at > ?",
                (key, now),
            )
            .fetchone()
        )
        return float(row[0]) if row else now

    def check(self) -> bool:
        """Health probe used by Flask-Limiter to leave the in-memory fallback again."""
        try:
            self._conn().execute("SELECT COUNT(*) FROM rate_limit_counters").fetchone()
        except sqlite3.Error:
            return False
        return True

    def reset(self) -> int | None:
        return int(self._conn().execute("DELETE FROM rate_limit_counters").rowcount)

    def clear(self, key: str) -> None:
        self._conn().execute("DELETE FROM rate_limit_counters WHERE key = ?", (key,))
