"""Start-up checks that stop with one clear line instead of a traceback.

Each check raises :class:`StartupError` whose message is a single line saying what is wrong
and what to do. Messages never contain a secret: database and Redis URLs are shown with the
password replaced by ``***``, and driver error texts are not echoed (a password with an
unencoded ``@`` once leaked its tail into "failed to resolve host 'ss'"); the cause is
classified instead.

The checks run before anything is served or changed: ``qpki run`` and every ``qpki`` command
call :func:`prepare_database` (connectivity and schema) and, for serving, :func:`check_redis`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

if TYPE_CHECKING:
    from qpki.config import Settings
    from qpki.db.manager import DatabaseManager

log = logging.getLogger(__name__)

ENCODE_HINT = (
    "special characters in the user name or password must be URL-encoded "
    "(@ as %40, : as %3A, / as %2F, % as %25)"
)


class StartupError(RuntimeError):
    """qPKI must not start; ``str()`` is one line for the operator, free of secrets."""


# -- database URL -------------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (or only its scheme if unparseable)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return url.split("://", 1)[0] + "://…" if "://" in url else "(unparseable)"


def parse_database_url(url: str) -> URL:
    """Parse QPKI_DATABASE_URL, refusing the shapes that would connect somewhere unintended."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise StartupError(
            f"QPKI_DATABASE_URL is not a valid database URL; {ENCODE_HINT}. "
            "Expected postgresql+psycopg://USER:PASSWORD@HOST:5432/DBNAME"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        return parsed
    # An unencoded "@" in the password makes the URL parser take the rest of the password as
    # part of the host name; an unencoded ":" or "/" shifts the port or database likewise.
    if not parsed.host or "@" in parsed.host or "@" in (parsed.database or ""):
        raise StartupError(
            f"QPKI_DATABASE_URL does not name a host clearly; {ENCODE_HINT}. "
            "Expected postgresql+psycopg://USER:PASSWORD@HOST:5432/DBNAME"
        )
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise StartupError(
            f"QPKI_DATABASE_URL has an invalid port; {ENCODE_HINT}. "
            "Expected postgresql+psycopg://USER:PASSWORD@HOST:5432/DBNAME"
        )
    if not parsed.database:
        raise StartupError(
            f"QPKI_DATABASE_URL ({redact_url(url)}) names no database; add /DBNAME at the end"
        )
    return parsed


# -- keys for shared databases ----------------------------------------------------------------
def check_shared_keys(settings: Settings, env: Mapping[str, str]) -> None:
    """A shared database needs the same keys on every instance, so they must be explicit.

    Without them each machine would make its own key files: cookies signed by one instance
    would be refused by another, and 2FA secrets enrolled through one could not be read by
    the others.
    """
    if settings.database_url.startswith("sqlite"):
        return
    missing = []
    if not (env.get("QPKI_MFA_KEY") or env.get("QPKI_MFA_KEY_FILE") or settings.mfa_key):
        missing.append("QPKI_MFA_KEY")
    if not (env.get("QPKI_SECRET_KEY") or env.get("QPKI_SECRET_KEY_FILE")):
        missing.append("QPKI_SECRET_KEY")
    # The audit chain's HMAC key, where this version has one: instances sealing with
    # different keys would make the shared chain fail verification.
    if hasattr(settings, "audit_key") and not (
        env.get("QPKI_AUDIT_KEY") or env.get("QPKI_AUDIT_KEY_FILE") or settings.audit_key
    ):
        missing.append("QPKI_AUDIT_KEY")
    if missing:
        names = ", ".join(missing)
        raise StartupError(
            "QPKI_DATABASE_URL names a shared database, so every instance needs the same keys: "
            f"set {names} (or the _FILE form of each) to the same values on every instance; "
            "make new ones with: qpki keys generate"
        )


# -- reaching the database ---------------------------------------------------------------------
def _describe_db_failure(exc: DBAPIError, where: str) -> str:
    """Classify a connection failure from the driver's text without echoing that text."""
    detail = str(exc.orig).lower()
    if "password authentication failed" in detail or "authentication failed" in detail:
        return (
            f"the database at {where} refused the login: authentication failed "
            "(check the user name and password in QPKI_DATABASE_URL; "
            f"{ENCODE_HINT})"
        )
    if "no pg_hba.conf entry" in detail:
        return (
            f"the database at {where} does not allow this client (no pg_hba.conf entry for "
            "this address, user and database)"
        )
    if "does not exist" in detail and "database" in detail:
        return f"the database at {where} does not exist (create it: createdb --owner USER NAME)"
    if "role" in detail and "does not exist" in detail:
        return f"the database user in QPKI_DATABASE_URL does not exist on {where}"
    if "connection refused" in detail:
        return (
            f"the database at {where} refused the connection "
            "(is PostgreSQL running and listening on that address and port?)"
        )
    if "resolve host" in detail or "name or service not known" in detail:
        return f"the database host in {where} cannot be resolved (check the host name)"
    if "timeout" in detail or "timed out" in detail:
        return f"the database at {where} is unreachable (connection timed out)"
    if "ssl" in detail:
        return f"the database at {where} failed the TLS handshake (check sslmode and the CA)"
    return f"the database at {where} is unreachable ({type(exc.orig).__name__})"


def probe_database(db: DatabaseManager) -> None:
    """Open one connection and run ``SELECT 1``; a failure becomes a one-line StartupError."""
    where = redact_url(db.url)
    if not db.is_sqlite:
        parsed = make_url(db.url)
        where = f"{parsed.host}:{parsed.port or 5432}/{parsed.database}"
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise StartupError("qPKI cannot start: " + _describe_db_failure(exc, where)) from None


def open_database(settings: Settings) -> DatabaseManager:
    """A DatabaseManager for ``settings`` after checking the URL (one-line errors)."""
    from qpki.db.manager import DatabaseManager

    parse_database_url(settings.database_url)
    try:
        return DatabaseManager(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
    except (NoSuchModuleError, ImportError):
        scheme = settings.database_url.split("://", 1)[0]
        raise StartupError(
            f"QPKI_DATABASE_URL starts with {scheme!r}, a database driver that is unknown or "
            "not installed; use postgresql+psycopg://… (install qpki with the postgres extra) "
            "or sqlite:///…"
        ) from None
    except (ArgumentError, ValueError, TypeError):
        raise StartupError(f"QPKI_DATABASE_URL cannot be used; {ENCODE_HINT}") from None


# -- schema ------------------------------------------------------------------------------------
def check_schema(db: DatabaseManager) -> None:
    """Refuse to go on when the schema is not the one this code was written for."""
    state = db.schema_state()
    status = state.status
    if status == "current":
        return
    if status == "empty":
        raise StartupError("The database has no qPKI schema yet; create it with: qpki migrate")
    if status == "behind":
        raise StartupError(
            f"The database schema is at {state.current} but this qPKI needs {state.head}; "
            "upgrade it first with: qpki migrate"
        )
    raise StartupError(
        f"The database schema is at {state.current}, newer than this qPKI knows "
        f"(its newest is {state.head}); run the newer qPKI, or roll the schema back with the "
        f"newer version: qpki migrate --revision {state.head}"
    )


def prepare_database(
    settings: Settings, env: Mapping[str, str], *, migrate_sqlite: bool = True
) -> None:
    """Every check a command needs before it builds the app, in the order an operator fixes
    them: keys, URL, reachability, schema. The embedded SQLite database is migrated here (the
    zero-configuration default); a shared database is only checked — ``qpki migrate`` alone
    changes it."""
    check_shared_keys(settings, env)
    db = open_database(settings)
    try:
        probe_database(db)
        if db.is_sqlite and migrate_sqlite and db.schema_state().status in ("empty", "behind"):
            db.migrate_database()
        check_schema(db)
    finally:
        db.dispose()


# -- Redis ---------------------------------------------------------------------------------------
def check_redis(url: str, *, timeout: float) -> None:
    """PING the rate-limit storage once; wrong password and unreachable are told apart."""
    import redis
    from redis import exceptions as rex

    shown = redact_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError:
        raise StartupError(
            "QPKI_REDIS_URL is not a valid Redis URL; expected redis://:PASSWORD@HOST:6379/0 "
            f"or rediss://… for TLS; {ENCODE_HINT}"
        ) from None
    try:
        client.ping()
    except (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError):
        raise StartupError(
            f"qPKI cannot start: Redis at {shown} refused the login: authentication failed "
            "(check the password in QPKI_REDIS_URL)"
        ) from None
    except rex.ResponseError as exc:
        if "noauth" in str(exc).lower() or "auth" in str(exc).lower():
            raise StartupError(
                f"qPKI cannot start: Redis at {shown} refused the login: authentication "
                "failed (it requires a password; put it in QPKI_REDIS_URL)"
            ) from None
        raise StartupError(
            f"qPKI cannot start: Redis at {shown} answered PING with an error"
        ) from None
    except rex.TimeoutError:
        raise StartupError(
            f"qPKI cannot start: Redis at {shown} is unreachable (no answer within {timeout} s)"
        ) from None
    except rex.ConnectionError:
        raise StartupError(
            f"qPKI cannot start: Redis at {shown} is unreachable (connection refused or "
            "failed; is redis-server running and listening there?)"
        ) from None
    finally:
        client.close()
