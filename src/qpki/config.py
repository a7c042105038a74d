"""Settings from ``QPKI_*`` environment variables.

Everything has a safe default so that the application runs with no configuration at all: a data
directory ``./instance`` (mode 0700) holding the SQLite database, the MFA key file and a Flask
secret key generated once. There is deliberately no hard-coded secret key anywhere.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from qpki.errors import QPKIError


class ConfigError(QPKIError):
    """A setting is missing or unusable; the message says which and what to do."""


def _env_bool(name: str, default: bool, env: dict[str, str]) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0")


def _env_int(name: str, default: int, env: dict[str, str], minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _env_secret(name: str, env: Mapping[str, str]) -> str | None:
    """A secret from ``NAME`` or from the file that ``NAME_FILE`` names, or None if neither.

    The ``_FILE`` form exists for systemd credentials (``LoadCredential=``) and container
    secrets, which hand a process a file rather than an environment variable that any child
    process or crash report could see. Surrounding whitespace (the usual trailing newline) is
    stripped. Setting both forms is refused rather than guessing which one is meant; errors
    name the variable and the file, never the secret.
    """
    direct = env.get(name) or None
    file_name = env.get(f"{name}_FILE") or None
    if direct is not None and file_name is not None:
        raise ConfigError(f"Both {name} and {name}_FILE are set; set only one of them")
    if file_name is None:
        return direct
    path = Path(file_name)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{name}_FILE names {path}, which does not exist") from None
    except OSError as exc:
        raise ConfigError(
            f"{name}_FILE names {path}, which cannot be read ({exc.strerror or exc}); "
            "check its owner and permissions"
        ) from None
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{name}_FILE names {path}, which is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{name}_FILE names {path}, which is empty")
    return value


MIN_SECRET_KEY_BYTES = 32

# Every Redis client of a request path (rate-limit storage, audit chain head) uses these
# connect/read timeouts: a frozen Redis must cost a request well under a second before the
# caller falls back (redis-py's own defaults are 5 s in 8.x and none before).
REDIS_TIMEOUT_SECONDS = 0.5
# `qpki run` pings Redis once before serving, with more patience than a request gets.
REDIS_STARTUP_TIMEOUT_SECONDS = 3.0


def _check_secret_key_length(name: str, key: str) -> None:
    """Flask signs session cookies with this key; a short one can be guessed offline from a
    single cookie, so it stops start-up (the message never contains the key)."""
    if len(key.encode()) < MIN_SECRET_KEY_BYTES:
        raise ConfigError(
            f"{name} is too short ({len(key.encode())} bytes; at least {MIN_SECRET_KEY_BYTES} "
            "needed). Make one with: qpki keys generate"
        )


def _split_keys(raw: str | None) -> tuple[str, ...]:
    """Keys separated by commas or new lines (a ``_FILE`` may hold one per line)."""
    if not raw:
        return ()
    return tuple(k.strip() for k in raw.replace(",", "\n").splitlines() if k.strip())


@dataclass(frozen=True)
class Settings:
    """All runtime settings; build with :meth:`from_env` or directly in tests."""

    data_dir: Path
    database_url: str
    secret_key: str
    issuer: str = "qPKI"
    redis_url: str | None = None
    mfa_key: str | None = None
    # Keys kept only to decrypt (rolling rotation across instances), comma- or line-separated.
    mfa_decrypt_keys: str | None = None
    # Seals the audit chain (HMAC); None = <data dir>/.audit_key, generated once.
    audit_key: str | None = None
    # Older Flask secret keys still accepted for existing sessions (SECRET_KEY_FALLBACKS).
    secret_key_fallbacks: tuple[str, ...] = ()
    https: bool = False
    proxy_fix_hops: int = 0
    session_idle_minutes: int = 30
    session_absolute_hours: int = 12
    pending_mfa_seconds: int = 300
    setup_session_minutes: int = 15
    # Step-up window for sensitive actions; 0 = ask again for every one.
    reauth_minutes: int = 10
    log_json: bool = False
    log_level: str = "INFO"
    max_content_length: int = 64 * 1024
    csrf_enabled: bool = True
    rate_limits_enabled: bool = True
    # Connections per worker process: pool_size kept open + max_overflow opened on demand.
    db_pool_size: int = 2
    db_max_overflow: int = 3
    # Names this process in every log line (several instances log to one place).
    instance_name: str = field(default_factory=socket.gethostname)
    testing: bool = False
    # "fast" is for the test suite only (it is not reachable from the environment).
    argon2_profile: str = "default"
    # How often a server looks at the MFA key file for a rotation; tests pass 0.
    mfa_key_reload_seconds: float = 1.0
    # Mail (qpki.mail): without smtp_url, mails are written as .eml files to <data dir>/outbox.
    smtp_url: str | None = None
    mail_from: str = "qPKI <qpki@localhost>"
    base_url: str = "http://localhost:5000"
    # Deliver queued mail from a background thread in each process (tests drain it by hand).
    mail_worker: bool = True
    # Passkeys (WebAuthn): the RP ID (a domain) and the exact origins pages are served from.
    # Neither set: RP ID "localhost" and http://localhost on any port (development only).
    webauthn_rp_id: str | None = None
    webauthn_origins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Read the environment; create the data directory and secret key file if needed."""
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("QPKI_DATA_DIR") or "instance").resolve()
        ensure_data_dir(data_dir)
        database_url = env.get("QPKI_DATABASE_URL") or f"sqlite:///{data_dir / 'qpki.db'}"
        create_private_sqlite_file(database_url)
        secret_key = _env_secret("QPKI_SECRET_KEY", env)
        if secret_key is None:
            secret_key = load_or_create_secret_key(data_dir)
        else:
            _check_secret_key_length("QPKI_SECRET_KEY", secret_key)
        fallbacks = _split_keys(_env_secret("QPKI_SECRET_KEY_FALLBACKS", env))
        for fallback in fallbacks:
            _check_secret_key_length("QPKI_SECRET_KEY_FALLBACKS", fallback)
        values: dict[str, object] = {
            "data_dir": data_dir,
            "database_url": database_url,
            "secret_key": secret_key,
            "issuer": env.get("QPKI_ISSUER") or "qPKI",
            "redis_url": env.get("QPKI_REDIS_URL") or None,
            "secret_key_fallbacks": fallbacks,
            "mfa_key": _env_secret("QPKI_MFA_KEY", env),
            "mfa_decrypt_keys": _env_secret("QPKI_MFA_DECRYPT_KEYS", env),
            "audit_key": _env_secret("QPKI_AUDIT_KEY", env),
            "https": _env_bool("QPKI_HTTPS", False, env),
            "proxy_fix_hops": _env_int("QPKI_PROXY_FIX", 0, env),
            "session_idle_minutes": _env_int("QPKI_SESSION_IDLE_MINUTES", 30, env, 1),
            "session_absolute_hours": _env_int("QPKI_SESSION_ABSOLUTE_HOURS", 12, env, 1),
            "reauth_minutes": _env_int("QPKI_REAUTH_MINUTES", 10, env, 0),
            "log_json": _env_bool("QPKI_LOG_JSON", False, env),
            "log_level": (env.get("QPKI_LOG_LEVEL") or "INFO").upper(),
            "rate_limits_enabled": _env_bool("QPKI_RATE_LIMITS", True, env),
            "smtp_url": _smtp_url(env),
            "mail_from": env.get("QPKI_MAIL_FROM") or "qPKI <qpki@localhost>",
            "base_url": _base_url(env),
            "db_pool_size": _env_int("QPKI_DB_POOL_SIZE", 2, env, 1),
            "db_max_overflow": _env_int("QPKI_DB_MAX_OVERFLOW", 3, env, 0),
            "instance_name": env.get("QPKI_INSTANCE_NAME") or socket.gethostname(),
        }
        values.update(_webauthn_settings(env, https=bool(values["https"])))
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _smtp_url(env: Mapping[str, str]) -> str | None:
    """QPKI_SMTP_URL (or QPKI_SMTP_URL_FILE, as it may hold a password), checked at start-up."""
    from qpki.mail.smtp_url import SmtpUrlError, parse_smtp_url

    raw = _env_secret("QPKI_SMTP_URL", env)
    if raw is None:
        return None
    try:
        parse_smtp_url(raw)
    except SmtpUrlError as exc:
        raise ConfigError(f"QPKI_SMTP_URL: {exc}") from None
    return raw


def _webauthn_settings(env: Mapping[str, str], *, https: bool) -> dict[str, object]:
    """QPKI_WEBAUTHN_RP_ID and QPKI_WEBAUTHN_ORIGINS, checked at start-up.

    A passkey is bound to its RP ID for good: guessing one in production (from a Host header,
    which a client chooses) could lock every user out of their keys after a move, so a site
    served over HTTPS must name it. Each origin must be the RP ID or a subdomain of it, as
    browsers require.
    """
    rp_id = (env.get("QPKI_WEBAUTHN_RP_ID") or "").strip().lower() or None
    origins = tuple(
        o.strip().rstrip("/")
        for o in (env.get("QPKI_WEBAUTHN_ORIGINS") or "").split(",")
        if o.strip()
    )
    if rp_id is None:
        if https:
            raise ConfigError(
                "QPKI_HTTPS=1 needs QPKI_WEBAUTHN_RP_ID: the domain passkeys are bound to, "
                "e.g. QPKI_WEBAUTHN_RP_ID=qpki.example.org (and QPKI_WEBAUTHN_ORIGINS="
                "https://qpki.example.org if pages are served from other origins)"
            )
        if origins:
            raise ConfigError("QPKI_WEBAUTHN_ORIGINS needs QPKI_WEBAUTHN_RP_ID as well")
        return {}
    if any(ch in rp_id for ch in ":/ ?#@[]"):
        raise ConfigError(
            f"QPKI_WEBAUTHN_RP_ID={rp_id!r} must be a bare domain such as qpki.example.org "
            "(no scheme, port or path)"
        )
    for origin in origins:
        parts = urlsplit(origin)
        host = parts.hostname or ""
        if (
            parts.scheme not in ("https", "http")
            or parts.path
            or parts.query
            or not (host == rp_id or host.endswith("." + rp_id))
        ):
            raise ConfigError(
                f"QPKI_WEBAUTHN_ORIGINS: {origin!r} must be an origin such as "
                f"https://{rp_id} on the RP ID {rp_id} or a subdomain of it"
            )
        if parts.scheme == "http" and host != "localhost":
            raise ConfigError(
                f"QPKI_WEBAUTHN_ORIGINS: {origin!r} — browsers allow passkeys over plain "
                "http only on localhost; use https://"
            )
    return {"webauthn_rp_id": rp_id, "webauthn_origins": origins}


def _base_url(env: Mapping[str, str]) -> str:
    """QPKI_BASE_URL: where links in mails point. Never taken from a request's Host header,
    which a client chooses (a reset link must not be steerable to another site)."""
    raw = (env.get("QPKI_BASE_URL") or "http://localhost:5000").strip().rstrip("/")
    if not raw.startswith(("http://", "https://")) or "?" in raw or "#" in raw:
        raise ConfigError(
            f"QPKI_BASE_URL={raw!r} must be an http:// or https:// address such as "
            "https://qpki.example.org"
        )
    return raw


def ensure_data_dir(data_dir: Path) -> None:
    """Create the data directory readable by the owner only."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def _narrow(path: Path, mode: int) -> bool:
    """chmod ``path`` to ``mode`` if group or others have any access; True if it changed."""
    try:
        info = path.lstat()
    except FileNotFoundError:  # a temporary file renamed or removed meanwhile
        return False
    if stat.S_ISLNK(info.st_mode) or not stat.S_IMODE(info.st_mode) & 0o077:
        return False
    try:
        path.chmod(mode)
    except OSError as exc:
        raise ConfigError(
            f"{path} is readable by other users and cannot be made private "
            f"({exc.strerror or exc}); run: chmod {mode:o} {path}"
        ) from None
    return True


def secure_data_dir(data_dir: Path) -> list[Path]:
    """Make the data directory 0700 and every file in it 0600 where they are wider (§12.11).

    It holds the database, its WAL files and the keys; an existing directory from an older
    install, a copied backup or a umask of 022 could leave them world-readable. Symbolic links
    are not followed. Returns what was changed, so start-up can say so once.
    """
    fixed: list[Path] = []
    if _narrow(data_dir, 0o700):
        fixed.append(data_dir)
    for root, dirs, files in os.walk(data_dir):
        base = Path(root)
        for name in dirs:
            if _narrow(base / name, 0o700):
                fixed.append(base / name)
        for name in files:
            if _narrow(base / name, 0o600):
                fixed.append(base / name)
    return fixed


def sqlite_file(database_url: str) -> Path | None:
    """The database file of an SQLite URL (None for other databases and in-memory ones)."""
    if not database_url.startswith("sqlite"):
        return None
    try:
        database = make_url(database_url).database
    except ArgumentError:
        raise ConfigError("QPKI_DATABASE_URL is not a valid database URL") from None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def create_private_sqlite_file(database_url: str) -> None:
    """Create a missing SQLite database file with mode 0600 before the engine opens it.

    SQLite creates a missing database with mode 0644 (less the umask) and gives its -wal,
    -shm and -journal files the database file's mode, so an empty file made 0600 first keeps
    all of them private without changing the process's umask (which other threads share).
    """
    path = sqlite_file(database_url)
    if path is None:
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def secure_sqlite_files(database_url: str) -> list[Path]:
    """Create the database file privately; narrow it and its companions to 0600 where wider
    (they may live outside the data directory). Returns what was changed."""
    create_private_sqlite_file(database_url)
    path = sqlite_file(database_url)
    if path is None:
        return []
    fixed: list[Path] = []
    for candidate in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        if candidate.exists() and _narrow(candidate, 0o600):
            fixed.append(candidate)
    return fixed


def write_private_file(path: Path, content: bytes, *, overwrite: bool = True) -> None:
    """Write ``content`` atomically to ``path`` with mode 0600 from the first byte.

    The temporary file is created with 0600 (not chmod-ed later), fsync-ed, then renamed over
    the target, so a crash leaves either the old file or the new one, never a torn or
    world-readable one. With ``overwrite=False`` an existing file is never replaced (two
    workers creating a key at once must agree on one): FileExistsError is raised instead.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create_secret_key(data_dir: Path) -> str:
    """Return the Flask secret key kept in ``data_dir/.secret_key``, creating it once."""
    path = data_dir / ".secret_key"
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # a concurrent worker won the race
            write_private_file(path, secrets.token_urlsafe(48).encode(), overwrite=False)
    key = path.read_text().strip()
    if len(key) < 32:
        raise ConfigError(f"{path} holds a secret key that is too short; delete it to regenerate")
    return key
