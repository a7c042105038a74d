"""The MFA encryption key ring: ``.mfa_key`` in the data directory, or ``QPKI_MFA_KEY``.

The file holds one Fernet key per line. The first line is the primary key (used to encrypt);
later lines are older keys kept only to decrypt until rotation has re-encrypted everything.
It is created on first use with mode 0600 from the first byte, and every write is atomic
(temporary file, fsync, rename). Problems stop start-up with a message naming the file and the
remedy, because guessing would silently turn 2FA off or lose backup codes.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from pathlib import Path

from cryptography.fernet import Fernet, MultiFernet

from qpki.config import write_private_file

KEY_FILE_NAME = ".mfa_key"
RELOAD_CHECK_SECONDS = 1.0

log = logging.getLogger(__name__)


class KeyFileError(RuntimeError):
    """The key is missing, unreadable, malformed or too widely readable."""


def key_file_path(data_dir: Path) -> Path:
    """Where the key ring lives."""
    return data_dir / KEY_FILE_NAME


def _parse(text: str, source: str) -> list[bytes]:
    keys = [line.strip().encode() for line in text.replace(",", "\n").splitlines() if line.strip()]
    if not keys:
        raise KeyFileError(f"{source} holds no key. Restore it from your backup.")
    for key in keys:
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise KeyFileError(
                f"{source} does not hold valid Fernet keys (one url-safe base64 32-byte key per "
                "line). Restore the file from your backup; do not replace it with a new key, or "
                "every stored 2FA secret becomes unreadable."
            ) from None
    return keys


def read_key_file(path: Path) -> list[bytes]:
    """Load and check the key file; raise KeyFileError naming the file and what to do."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path} is missing") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise KeyFileError(
            f"{path} is readable by other users (mode {stat.S_IMODE(info.st_mode):o}). "
            f"Run: chmod 600 {path}"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeError) as exc:
        raise KeyFileError(
            f"{path} cannot be read ({exc.__class__.__name__}). "
            "Check its owner and permissions (it must be 0600 and owned by "
            "the user running qPKI)."
        ) from None
    return _parse(text, str(path))


def create_key_file(path: Path) -> list[bytes]:
    """Create a new key file atomically; if another process won the race, load theirs."""
    key = Fernet.generate_key()
    try:
        write_private_file(path, key + b"\n", overwrite=False)  # never overwrite a key
    except FileExistsError:
        return read_key_file(path)
    return [key]


def write_key_file(path: Path, keys: list[bytes]) -> None:
    """Replace the key ring atomically (rotation)."""
    write_private_file(path, b"".join(k + b"\n" for k in keys))


class KeyRing:
    """The live key ring. When it comes from the file, a changed file is picked up within a
    second, so ``qpki keys rotate`` never leaves running servers unable to read new tokens.
    A file that turns unreadable keeps the last good ring in use and logs an error."""

    def __init__(self, keys: list[bytes], path: Path | None = None) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self._path = path
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _file_stamp(self) -> tuple[int, int] | None:
        if self._path is None:
            return None
        try:
            info = self._path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_ino

    @property
    def fernet(self) -> MultiFernet:
        if self._path is not None and time.monotonic() - self._checked >= RELOAD_CHECK_SECONDS:
            with self._lock:
                self._checked = time.monotonic()
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    try:
                        keys = read_key_file(self._path)
                    except KeyFileError as exc:
                        log.error(
                            "key file changed but cannot be used, keeping the old ring: %s", exc
                        )
                    else:
                        self._fernet = MultiFernet([Fernet(k) for k in keys])
                        self._stamp = stamp
                        log.info("MFA key ring reloaded (%d keys)", len(keys))
        return self._fernet


def load_key_ring(
    data_dir: Path, env_key: str | None, *, encrypted_data_exists: bool
) -> tuple[KeyRing, list[bytes], str]:
    """The key ring to use and where it came from.

    ``QPKI_MFA_KEY`` wins over the file when set (a secret store supplies it). Without either,
    a new file is created, unless encrypted data already exists: then a new key could never
    decrypt it, so start-up stops instead.
    """
    if env_key:
        keys = _parse(env_key, "QPKI_MFA_KEY")
        return KeyRing(keys), keys, "QPKI_MFA_KEY"
    path = key_file_path(data_dir)
    if path.exists():
        keys = read_key_file(path)
    elif encrypted_data_exists:
        raise KeyFileError(
            f"{path} is missing but the database holds encrypted 2FA secrets. Restore the key "
            "file from your backup (mode 0600), or set QPKI_MFA_KEY. Do not create a new key: "
            "the stored secrets could never be decrypted with it."
        )
    else:
        keys = create_key_file(path)
    return KeyRing(keys, path), keys, str(path)
