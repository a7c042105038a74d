"""Backups and restores: the use cases behind ``qpki backup`` and ``qpki restore``.

The database and the keys are backed up *separately*. A database backup holds the 2FA
secrets and backup codes encrypted under the MFA key and the audit chain sealed with the
audit key; whoever holds both the backup and the keys holds every second factor. So the keys
are written only when asked, to a directory that must not be inside (or contain) the database
backup — unless ``include_keys`` is given on purpose, for a throwaway test or a vault that is
itself encrypted.

SQLite is copied with SQLite's online backup API (``sqlite3.Connection.backup``), which takes a
consistent snapshot while the server keeps serving (WAL readers and writers continue).
PostgreSQL is copied with ``pg_dump --format=custom`` and restored with ``pg_restore``; the
password goes to them in the ``PGPASSWORD`` environment variable, never on the command line.
Every backup carries a ``manifest.json`` (kind, schema revision, time, SHA-256) that restore
checks before it touches anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from qpki.config import Settings, write_private_file
from qpki.ops.startup import StartupError, open_database, probe_database

MANIFEST = "manifest.json"
SQLITE_FILE = "qpki.db"
PG_FILE = "qpki.pgdump"
KEY_FILES = (".mfa_key", ".secret_key", ".audit_key")
ENV_KEYS_FILE = "keys-from-environment.env"


class BackupError(StartupError):
    """The backup or restore cannot be done as asked; nothing was changed."""


@dataclass(frozen=True)
class BackupResult:
    directory: Path
    database_file: Path
    revision: str | None
    keys_directory: Path | None
    key_files: list[str] = field(default_factory=list)
    command: str | None = None  # the pg_dump line that ran (no password in it)


@dataclass(frozen=True)
class RestoreResult:
    revision: str | None
    key_files: list[str]
    environment_keys: list[str]
    command: str | None = None
    # How the audit chain head (kept outside the database) was set to the restored chain.
    audit_head: str = ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _prepare_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise BackupError(f"{path} is not empty; back up into a new, empty directory")


def _sqlite_path(settings: Settings) -> Path:
    database = make_url(settings.database_url).database
    if not database or database == ":memory:":
        raise BackupError("QPKI_DATABASE_URL is an in-memory SQLite database; nothing to back up")
    return Path(database)


def _sqlite_copy(source_path: Path, target_path: Path) -> None:
    """Copy with SQLite's online backup API: a consistent snapshot even while other
    processes write (it restarts itself when the source changes mid-copy)."""
    source = sqlite3.connect(source_path, timeout=30)
    target = sqlite3.connect(target_path)
    try:
        with target:
            source.backup(target)
    finally:
        target.close()
        source.close()
    target_path.chmod(0o600)


def _libpq(settings: Settings) -> tuple[str, dict[str, str]]:
    """(connection URI without the password, environment with PGPASSWORD)."""
    url = make_url(settings.database_url)
    # A new URL without the password (URL.set() ignores None, so it cannot remove one).
    safe = URL.create(
        "postgresql",
        username=url.username,
        host=url.host,
        port=url.port,
        database=url.database,
        query=url.query,
    )
    env = {**os.environ}
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    return safe.render_as_string(hide_password=False), env


def _run_pg(tool: str, args: list[str], env: dict[str, str]) -> str:
    binary = shutil.which(tool)
    if binary is None:
        raise BackupError(f"{tool} not found; install the PostgreSQL client (postgresql-client)")
    command = [binary, *args]
    # A fixed tool found on PATH with our own arguments; no shell.
    result = subprocess.run(  # noqa: S603
        command, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise BackupError(f"{tool} failed (exit {result.returncode}): {last}")
    return " ".join([tool, *args])


def _keys_of(settings: Settings) -> tuple[dict[str, Path], dict[str, str]]:
    """Key files in the data directory and key values given in the environment."""
    files = {name: settings.data_dir / name for name in KEY_FILES}
    files = {name: path for name, path in files.items() if path.exists()}
    env_values: dict[str, str] = {}
    if settings.mfa_key:
        env_values["QPKI_MFA_KEY"] = settings.mfa_key
    decrypt = getattr(settings, "mfa_decrypt_keys", None)
    if decrypt:
        env_values["QPKI_MFA_DECRYPT_KEYS"] = decrypt
    audit = getattr(settings, "audit_key", None)
    if audit:
        env_values["QPKI_AUDIT_KEY"] = audit
    secret_file = settings.data_dir / ".secret_key"
    if not secret_file.exists() or secret_file.read_text().strip() != settings.secret_key:
        env_values["QPKI_SECRET_KEY"] = settings.secret_key
    fallbacks = getattr(settings, "secret_key_fallbacks", ())
    if fallbacks:
        env_values["QPKI_SECRET_KEY_FALLBACKS"] = ",".join(fallbacks)
    return files, env_values


def backup(
    settings: Settings,
    directory: Path,
    *,
    keys_directory: Path | None = None,
    include_keys: bool = False,
) -> BackupResult:
    """Write the database (and, if asked, the keys) to new, empty directories."""
    directory = directory.resolve()
    if include_keys and keys_directory is None:
        keys_directory = directory / "keys"
    elif keys_directory is not None:
        keys_directory = keys_directory.resolve()
        if _inside(keys_directory, directory) or _inside(directory, keys_directory):
            raise BackupError(
                "The keys must not be kept beside the database backup: choose a keys directory "
                "outside the backup directory (or pass --include-keys on purpose)"
            )
    db = open_database(settings)
    try:
        probe_database(db)
        revision = db.schema_state().current
        _prepare_dir(directory)
        command = None
        if db.is_sqlite:
            target = directory / SQLITE_FILE
            _sqlite_copy(_sqlite_path(settings), target)
            kind = "sqlite"
        else:
            target = directory / PG_FILE
            uri, env = _libpq(settings)
            command = _run_pg(
                "pg_dump",
                ["--format=custom", "--no-owner", "--no-privileges", f"--file={target}", uri],
                env,
            )
            target.chmod(0o600)
            kind = "postgresql"
    finally:
        db.dispose()
    manifest = {
        "kind": kind,
        "file": target.name,
        "sha256": _sha256(target),
        "revision": revision,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "keys_included": keys_directory is not None and _inside(keys_directory, directory),
    }
    write_private_file(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
    written: list[str] = []
    if keys_directory is not None:
        _prepare_dir(keys_directory)
        files, env_values = _keys_of(settings)
        for name, path in files.items():
            write_private_file(keys_directory / name, path.read_bytes())
            written.append(name)
        if env_values:
            lines = "".join(f"{name}={value}\n" for name, value in env_values.items())
            write_private_file(keys_directory / ENV_KEYS_FILE, lines.encode())
            written.append(ENV_KEYS_FILE)
    return BackupResult(directory, target, revision, keys_directory, written, command)


def _read_manifest(directory: Path) -> dict[str, object]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{directory} holds no qPKI backup ({MANIFEST} is missing)") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"{path} cannot be read ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in ("sqlite", "postgresql"):
        raise BackupError(f"{path} is not a qPKI backup manifest")
    data = directory / str(manifest.get("file"))
    if not data.exists() or _sha256(data) != manifest.get("sha256"):
        raise BackupError(f"{data} is missing or does not match its checksum; not restoring")
    return manifest


def _database_has_data(settings: Settings) -> bool:
    db = open_database(settings)
    try:
        probe_database(db)
        return db.schema_state().current is not None
    finally:
        db.dispose()


def restore(
    settings: Settings,
    directory: Path,
    *,
    keys_directory: Path | None = None,
    force: bool = False,
) -> RestoreResult:
    """Put a backup back: the database, and the key files when a keys directory is given.

    Stop every instance first. A database that already holds a schema is replaced only with
    ``force``; key files already present are replaced only with ``force`` too, because a
    different key would make the restored 2FA secrets or audit chain unreadable.
    """
    directory = directory.resolve()
    manifest = _read_manifest(directory)
    kind = manifest["kind"]
    is_sqlite = settings.database_url.startswith("sqlite")
    if (kind == "sqlite") != is_sqlite:
        raise BackupError(
            f"This is a {kind} backup but QPKI_DATABASE_URL names a "
            f"{'SQLite' if is_sqlite else 'PostgreSQL'} database; restore it into the same kind"
        )
    key_sources: dict[str, Path] = {}
    env_keys: list[str] = []
    if keys_directory is not None:
        keys_directory = keys_directory.resolve()
        key_sources = {n: keys_directory / n for n in KEY_FILES if (keys_directory / n).exists()}
        env_file = keys_directory / ENV_KEYS_FILE
        if env_file.exists():
            env_keys = [
                line.split("=", 1)[0] for line in env_file.read_text().splitlines() if "=" in line
            ]
        if not key_sources and not env_keys:
            raise BackupError(f"{keys_directory} holds no qPKI keys")
        for name, source in key_sources.items():
            existing = settings.data_dir / name
            # The cookie-signing key protects no stored data (a fresh data directory has just
            # generated one); replacing it only keeps the restored sessions valid.
            if name == ".secret_key":
                continue
            if existing.exists() and existing.read_bytes() != source.read_bytes() and not force:
                raise BackupError(
                    f"{existing} exists and differs from the backed-up key; pass --force to "
                    "replace it (the old key is then lost)"
                )
    if _database_has_data(settings) and not force:
        raise BackupError(
            "The database already holds a qPKI schema; stop every instance, then pass --force "
            "to replace its contents with the backup"
        )
    data = directory / str(manifest["file"])
    command = None
    if kind == "sqlite":
        target = _sqlite_path(settings)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _sqlite_copy(data, target)
    else:
        uri, env = _libpq(settings)
        command = _run_pg(
            "pg_restore",
            [
                "--clean",
                "--if-exists",
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                f"--dbname={uri}",
                str(data),
            ],
            env,
        )
    for name, source_path in key_sources.items():
        write_private_file(settings.data_dir / name, source_path.read_bytes())
    revision = manifest.get("revision")
    return RestoreResult(
        revision if isinstance(revision, str) else None,
        sorted(key_sources),
        env_keys,
        command,
        _reanchor_audit_head(settings),
    )


def _reanchor_audit_head(settings: Settings) -> str:
    """Point the audit chain head (kept outside the database) at the restored chain's end.

    The head records how long the chain was, so that deleting events from its end shows. A
    restore *is* such a deletion: the events written after the backup are gone, and the
    operator knows it. The new head is stored only if the restored chain verifies against it
    with the audit key; otherwise the old head stays and ``qpki audit verify`` will say why.
    """
    from sqlalchemy import select

    from qpki.audit.models import AuditEventRecord
    from qpki.audit.setup import open_audit_log

    db = open_database(settings)
    try:
        if db.schema_state().status != "current":
            return "not checked: run qpki migrate first, then qpki audit verify"
        audit = open_audit_log(settings, db)
        with db.transaction(write=False) as session:
            last = session.execute(
                select(AuditEventRecord.seq, AuditEventRecord.hash)
                .order_by(AuditEventRecord.seq.desc())
                .limit(1)
            ).first()
        if last is None:
            audit.head.replace(None)
            return "the restored audit trail is empty; chain head cleared"
        previous = audit.head.read()
        audit.head.replace(audit.sealed_head(int(last.seq), str(last.hash)))
        with db.transaction(write=False) as session:
            result = audit.verify(session)
        if not result.ok:
            audit.head.replace(previous)
            return f"NOT reset: the restored chain does not verify ({result.reason})"
        return f"chain head set to the restored chain's {result.checked} events"
    finally:
        db.dispose()
