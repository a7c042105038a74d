"""The audit key: ``QPKI_AUDIT_KEY`` (or ``QPKI_AUDIT_KEY_FILE``), else ``<data dir>/.audit_key``.

The key seals the audit chain (HMAC-SHA256). It lives outside the database on purpose: someone
who can write to the database but cannot read the key cannot rewrite or append events that
verify. Like ``.mfa_key`` the file is created once with mode 0600 from the first byte; it is
never replaced, because a new key would make every sealed event fail verification.
"""

from __future__ import annotations

import contextlib
import secrets
import stat
from pathlib import Path

from qpki.config import ConfigError, write_private_file

AUDIT_KEY_FILE_NAME = ".audit_key"
MIN_KEY_CHARS = 32


class AuditKeyError(ConfigError):
    """The audit key is missing, unreadable, too short or too widely readable."""


def audit_key_path(data_dir: Path) -> Path:
    """Where the generated audit key lives."""
    return data_dir / AUDIT_KEY_FILE_NAME


def _checked(text: str, source: str) -> bytes:
    key = text.strip()
    if len(key) < MIN_KEY_CHARS:
        raise AuditKeyError(
            f"{source} holds an audit key shorter than {MIN_KEY_CHARS} characters. "
            "Use a long random value, e.g. `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'` (the same on every instance)."
        )
    return key.encode()


def _read_private(path: Path) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AuditKeyError(f"{path} is missing") from None
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise AuditKeyError(
            f"{path} is readable by other users (mode {mode:o}). Run: chmod 600 {path}"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeError) as exc:
        raise AuditKeyError(
            f"{path} cannot be read ({exc.__class__.__name__}); it must be 0600 and owned by "
            "the user running qPKI."
        ) from None
    return _checked(text, str(path))


def load_audit_key(
    data_dir: Path, env_key: str | None, *, sealed_events_exist: bool
) -> tuple[bytes, str]:
    """The audit key and where it came from (for logs; never the key itself).

    ``env_key`` is ``QPKI_AUDIT_KEY`` or the content of ``QPKI_AUDIT_KEY_FILE`` (read by
    :mod:`qpki.config`); it wins over the generated file. The file is only generated while no
    sealed event exists: after that a new key could verify nothing, so start-up stops and says
    to restore the key instead.
    """
    if env_key:
        return _checked(env_key, "QPKI_AUDIT_KEY"), "QPKI_AUDIT_KEY"
    path = audit_key_path(data_dir)
    if not path.exists():
        if sealed_events_exist:
            raise AuditKeyError(
                f"{path} is missing but the database holds sealed audit events. Restore the "
                "audit key from your backup (mode 0600), or set QPKI_AUDIT_KEY / "
                "QPKI_AUDIT_KEY_FILE. A new key could not verify the existing trail."
            )
        with contextlib.suppress(FileExistsError):  # a concurrent worker won the race
            write_private_file(path, secrets.token_urlsafe(32).encode() + b"\n", overwrite=False)
    return _read_private(path), "the audit key file"
