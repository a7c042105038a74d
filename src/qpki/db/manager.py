"""Engine, sessions and schema migrations.

One ``DatabaseManager`` per application. Use cases open exactly one transaction through
:meth:`DatabaseManager.transaction`; on SQLite a writing transaction starts with
``BEGIN IMMEDIATE`` so that read-then-write use cases (the audit hash chain, backup-code
compare-and-swap) never fail half-way with a lock upgrade error under concurrency.

Only ``qpki migrate`` changes a shared schema, and it does so under a database lock (a
PostgreSQL advisory lock; ``BEGIN IMMEDIATE`` on SQLite) so that two operators upgrading at
the same moment run one after the other. Serving processes only *compare* the schema with the
code (:meth:`DatabaseManager.schema_state`), which needs no Alembic.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from qpki.errors import QPKIError

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# Defaults sized for gunicorn's sync workers, which serve one request at a time: a request
# needs one connection (two at most, briefly), so 2 kept + 3 on demand is plenty, and
# instances x workers x 5 stays under PostgreSQL's default max_connections=100 for a typical
# deployment (2 instances x 4 workers x 5 = 40).
DEFAULT_POOL_SIZE = 2
DEFAULT_MAX_OVERFLOW = 3

# Key of the session-independent PostgreSQL advisory lock held while migrating ("qPKImigr").
_MIGRATION_LOCK_ID = 0x71504B496D696772

_REVISION_LINE = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.M)


@cache
def _shipped_revisions() -> tuple[frozenset[str], frozenset[str]]:
    """(every revision in versions/, every revision some other one revises), read as text."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        fields = dict(_REVISION_LINE.findall(path.read_text(encoding="utf-8")))
        if "revision" not in fields:
            continue
        revisions.add(fields["revision"].strip("\"'"))
        parent = fields.get("down_revision", "None").strip("\"'")
        if parent != "None":
            parents.add(parent)
    return frozenset(revisions), frozenset(parents)


def code_head_revision() -> str | None:
    """The newest migration this code ships, read from the revision files without Alembic.

    Serving processes call this (for the schema check and ``/readyz``); importing Alembic there
    would cost each gunicorn worker about 11 MB. The chain is linear by house rule, so the head
    is the one revision that is nobody's ``down_revision``; a test checks it matches Alembic.
    """
    revisions, parents = _shipped_revisions()
    heads = revisions - parents
    if len(heads) > 1:
        raise RuntimeError(f"migration chain has several heads: {sorted(heads)}")
    return next(iter(heads), None)


@dataclass(frozen=True)
class SchemaState:
    """Where the database schema stands relative to this code."""

    current: str | None
    head: str | None
    known: bool  # ``current`` is a revision this code ships (False: the schema is newer)

    @property
    def status(self) -> Literal["current", "empty", "behind", "ahead"]:
        if self.current == self.head:
            return "current"
        if self.current is None:
            return "empty"
        return "behind" if self.known else "ahead"


def _revision_on(conn: Any) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    value = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return None if value is None else str(value)


# Session.info key: work that must follow the commit but needs no database, run by
# DatabaseManager.transaction once the transaction has committed and (on SQLite) its writer
# turn is given up — every moment a writer holds the turn, the other workers wait.
AFTER_RELEASE = "qpki_after_release"


def after_release(session: Session, work: Callable[[], None]) -> bool:
    """Queue ``work`` to run after ``session``'s transaction committed and released its write
    turn; False when the session is not one of :meth:`DatabaseManager.transaction` (then the
    caller does the work itself)."""
    queued: list[Callable[[], None]] | None = session.info.get(AFTER_RELEASE)
    if queued is None:
        return False
    queued.append(work)
    return True


class DatabaseUnavailable(QPKIError):
    """The database could not be reached or failed mid-transaction; nothing was committed."""


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


# How long a writer waits for the SQLite writer lock: the same as PRAGMA busy_timeout.
SQLITE_WRITER_WAIT_S = 30.0
# Pauses between tries while another process writes. A verification holds the lock for about
# a millisecond, so for the first 2 ms a waiter looks every 50 µs (a try is one flock call):
# each moment the lock lies free while its next writer sleeps is lost to every worker, and
# with pauses of up to 1 ms two workers wrote 20-30 % fewer verifications per second (B7).
# Longer waits back off to 1 ms. SQLite's own busy handler sleeps 1, 2, 5, 10, ... up to
# 100 ms between tries, which is what made the p99 of writes under 2-4 workers.
_WRITER_PAUSES_S = (0.00005,) * 40 + (0.0002, 0.0005, 0.001)


class SQLiteWriterLock:
    """Serialises SQLite write transactions of every process on one database file.

    SQLite admits one writer at a time; a ``BEGIN IMMEDIATE`` that finds another writer is
    retried by SQLite's busy handler after sleeps of up to 100 ms, so under a few workers a
    write that only had to wait 5 ms could wait 50. Writers that take this lock first (an
    ``flock`` on ``<database>.writer-lock``, plus a thread lock within the process) meet a
    free database and begin at once; a waiter looks again within 50 µs at first. SQLite's
    own locking stays in force underneath (other programs, migrations, the busy timeout):
    this only orders the writers that go through :meth:`DatabaseManager.transaction`.

    The lock file is opened once per process (a descriptor inherited over ``fork`` would be
    shared with the parent, and ``flock`` would then not exclude it). Re-entry by the thread
    already holding it (a nested write transaction) does not wait on itself.
    """

    def __init__(self, path: Path, wait_s: float = SQLITE_WRITER_WAIT_S) -> None:
        self.path = path
        self.wait_s = wait_s
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._pid = 0

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def _acquire_file(self, fd: int) -> None:
        deadline = time.monotonic() + self.wait_s
        for attempt in itertools.count():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DatabaseUnavailable(
                        f"database is locked: no write turn within {self.wait_s:.0f} s "
                        f"({self.path})"
                    ) from None
                time.sleep(_WRITER_PAUSES_S[min(attempt, len(_WRITER_PAUSES_S) - 1)])

    @contextmanager
    def held(self) -> Iterator[None]:
        if not self._thread_lock.acquire(timeout=self.wait_s):
            raise DatabaseUnavailable(
                f"database is locked: no write turn within {self.wait_s:.0f} s"
            )
        try:
            if self._depth == 0:
                self._acquire_file(self._descriptor())
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; ``None`` for an in-memory database."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return Path(database)


class DatabaseManager:
    """Owns the engine; hands out transactions; runs migrations."""

    def __init__(
        self,
        url: str,
        *,
        echo: bool = False,
        pool_size: int = DEFAULT_POOL_SIZE,
        max_overflow: int = DEFAULT_MAX_OVERFLOW,
        connect_timeout: int = 10,
    ) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            # A connect timeout, so an unreachable server fails a request (503) or a start-up
            # check in seconds instead of hanging on the operating system's TCP timeout.
            kwargs.update(
                pool_pre_ping=True,
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_recycle=1800,
                connect_args={"connect_timeout": connect_timeout},
            )
        self.pool_size = pool_size
        self.max_overflow = max_overflow
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        sqlite_file = _sqlite_file(url) if self.is_sqlite else None
        self._writer_lock = (
            SQLiteWriterLock(sqlite_file.with_name(sqlite_file.name + ".writer-lock"))
            if sqlite_file is not None
            else None
        )

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Session]:
        """One unit of work: commit on success, roll back on any error.

        Database connectivity errors surface as :class:`DatabaseUnavailable` so the web layer
        can answer 503 without knowing driver exception types. On a SQLite file a writing
        transaction first takes its turn on :class:`SQLiteWriterLock`.
        """
        if write and self._writer_lock is not None:
            with self._writer_lock.held(), self._transaction(write=True) as session:
                yield session
        else:
            with self._transaction(write=write) as session:
                yield session
        # Committed, and the write turn given up: what waited for the commit runs now.
        for work in session.info.pop(AFTER_RELEASE, ()):
            work()

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read transaction on a plain connection, for Core statements only.

        For a lookup made on every request (the JSON API's key): an ORM session's own
        bookkeeping costs about 60 µs a transaction, more than such a lookup itself. Errors
        surface as in :meth:`transaction`.
        """
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except OperationalError as exc:
            raise DatabaseUnavailable(str(exc.orig)) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise DatabaseUnavailable(str(exc.orig)) from exc
            raise

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Session]:
        session = self._sessions()
        session.info[AFTER_RELEASE] = []
        try:
            if self.is_sqlite:
                session.connection(
                    execution_options={"sqlite_begin": "IMMEDIATE" if write else "DEFERRED"}
                )
            yield session
            session.commit()
        except OperationalError as exc:
            session.rollback()
            raise DatabaseUnavailable(str(exc.orig)) from exc
        except DBAPIError as exc:
            session.rollback()
            if exc.connection_invalidated:
                raise DatabaseUnavailable(str(exc.orig)) from exc
            raise
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # -- migrations -------------------------------------------------------------------------
    # Alembic is imported only here: serving processes never migrate, and leaving it out of
    # them keeps each gunicorn worker about 11 MB smaller.
    def _alembic_config(self) -> Config:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return cfg

    def migrate_database(self, revision: str = "head") -> str | None:
        """Create or upgrade the schema to ``revision``; running it again changes nothing.

        Runs in one transaction under the migration lock: a second ``qpki migrate`` started
        meanwhile waits, then finds the schema current and does nothing. Returns the revision
        found once the lock was held (what this run started from).
        """
        from alembic import command

        cfg = self._alembic_config()
        with self._migration_transaction() as connection:
            before = _revision_on(connection)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
        log.info("database schema at %s", self.current_revision())
        return before

    def downgrade_database(self, revision: str) -> str | None:
        """Take the schema back to ``revision`` (a rollback before running older code);
        returns the revision it started from."""
        from alembic import command

        cfg = self._alembic_config()
        with self._migration_transaction() as connection:
            before = _revision_on(connection)
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, revision)
        log.info("database schema at %s", self.current_revision())
        return before

    def revisions(self) -> list[str]:
        """Every revision this code ships, oldest first."""
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(self._alembic_config())
        return [rev.revision for rev in reversed(list(script.walk_revisions()))]

    @contextmanager
    def _migration_transaction(self) -> Iterator[Any]:
        if self.is_sqlite:
            connection = self.engine.connect().execution_options(sqlite_begin="IMMEDIATE")
            with connection as conn, conn.begin():
                yield conn
            return
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                got = conn.execute(
                    text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID}
                ).scalar()
                if not got:
                    log.warning("another qpki migrate is running; waiting for it to finish")
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID}
                    )
            yield conn

    def schema_state(self) -> SchemaState:
        """Compare the database's revision with this code's, reading ``alembic_version``
        directly (no Alembic import, so serving processes can afford it)."""
        with self.engine.connect() as conn:
            current = _revision_on(conn)
        return SchemaState(
            current=current, head=code_head_revision(), known=current in _shipped_revisions()[0]
        )

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at, or ``None`` for an empty database."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def head_revision(self) -> str | None:
        """The newest revision this version of qPKI ships."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def dispose(self) -> None:
        """Close pooled connections (tests and forked workers)."""
        self.engine.dispose()
