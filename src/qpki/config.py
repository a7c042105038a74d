"""Settings from ``QPKI_*`` environment variables.

Everything has a safe default so that the application runs with no configuration at all: a data
directory ``./instance`` (mode 0700) holding the SQLite database, the MFA key file and a Flask
secret key generated once. There is deliberately no hard-coded secret key anywhere.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


class ConfigError(RuntimeError):
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


@dataclass(frozen=True)
class Settings:
    """All runtime settings; build with :meth:`from_env` or directly in tests."""

    data_dir: Path
    database_url: str
    secret_key: str
    issuer: str = "qPKI"
    redis_url: str | None = None
    mfa_key: str | None = None
    https: bool = False
    proxy_fix_hops: int = 0
    session_idle_minutes: int = 30
    session_absolute_hours: int = 12
    pending_mfa_seconds: int = 300
    setup_session_minutes: int = 15
    log_json: bool = False
    log_level: str = "INFO"
    max_content_length: int = 64 * 1024
    csrf_enabled: bool = True
    rate_limits_enabled: bool = True
    testing: bool = False
    # "fast" is for the test suite only (it is not reachable from the environment).
    argon2_profile: str = "default"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Read the environment; create the data directory and secret key file if needed."""
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("QPKI_DATA_DIR") or "instance").resolve()
        ensure_data_dir(data_dir)
        database_url = env.get("QPKI_DATABASE_URL") or f"sqlite:///{data_dir / 'qpki.db'}"
        secret_key = env.get("QPKI_SECRET_KEY") or load_or_create_secret_key(data_dir)
        values: dict[str, object] = {
            "data_dir": data_dir,
            "database_url": database_url,
            "secret_key": secret_key,
            "issuer": env.get("QPKI_ISSUER") or "qPKI",
            "redis_url": env.get("QPKI_REDIS_URL") or None,
            "mfa_key": env.get("QPKI_MFA_KEY") or None,
            "https": _env_bool("QPKI_HTTPS", False, env),
            "proxy_fix_hops": _env_int("QPKI_PROXY_FIX", 0, env),
            "session_idle_minutes": _env_int("QPKI_SESSION_IDLE_MINUTES", 30, env, 1),
            "session_absolute_hours": _env_int("QPKI_SESSION_ABSOLUTE_HOURS", 12, env, 1),
            "log_json": _env_bool("QPKI_LOG_JSON", False, env),
            "log_level": (env.get("QPKI_LOG_LEVEL") or "INFO").upper(),
            "rate_limits_enabled": _env_bool("QPKI_RATE_LIMITS", True, env),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def ensure_data_dir(data_dir: Path) -> None:
    """Create the data directory readable by the owner only."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


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
