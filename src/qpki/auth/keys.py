"""The MFA encryption key ring: ``.mfa_key`` in the data directory, or ``QPKI_MFA_KEY``.

The file holds one Fernet key per line. The first line is the primary key (used to encrypt);
later lines are older keys kept only to decrypt until rotation has re-encrypted everything.
``QPKI_MFA_KEY`` (comma-separated, primary first) replaces the file where a secret store
supplies the key, and ``QPKI_MFA_DECRYPT_KEYS`` adds keys that only decrypt, for a rolling
rotation across several instances (see ``deploy/README.md``).
It is created on first use with mode 0600 from the first byte, and every write is atomic
(temporary file, fsync, rename). Problems stop start-up with a message naming the file and the
remedy, because guessing would silently turn 2FA off or lose backup codes.
"""

from __future__ import annotations

import logging
import secrets
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from qpki.config import write_private_file
from qpki.errors import QPKIError

KEY_FILE_NAME = ".mfa_key"
# How often a running server looks at the key file for a rotation (a stat() call).
DEFAULT_RELOAD_SECONDS = 1.0

log = logging.getLogger(__name__)


class KeyFileError(QPKIError):
    """The key is missing, unreadable, malformed or too widely readable."""


def generate_keys() -> dict[str, str]:
    """One new key of each kind, by setting name (``qpki keys generate``).

    The Flask secret key is 48 random bytes (64 characters, well over the 32-byte minimum);
    the MFA key is a Fernet key; the audit key is 32 random bytes. All are URL-safe base64,
    so they survive env files, systemd credentials and shells unquoted.
    """
    return {
        "QPKI_SECRET_KEY": secrets.token_urlsafe(48),
        "QPKI_MFA_KEY": Fernet.generate_key().decode(),
        "QPKI_AUDIT_KEY": secrets.token_urlsafe(32),
    }


def key_file_path(data_dir: Path) -> Path:
    """Where the key ring lives."""
    return data_dir / KEY_FILE_NAME


def parse_keys(text: str, source: str) -> list[bytes]:
    """Fernet keys separated by commas or new lines, each checked; errors name ``source``."""
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
    return parse_keys(text, str(path))


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


class TokenSampleError(KeyFileError):
    """Stored tokens could not be read to check a key against them (e.g. database down)."""


TokenSample = Callable[[], Sequence[str]]


def build_ring(keys: Sequence[bytes], decrypt_only: Sequence[bytes] = ()) -> MultiFernet:
    """A MultiFernet whose first key encrypts and every other key only decrypts."""
    unique = list(dict.fromkeys([*keys, *decrypt_only]))
    return MultiFernet([Fernet(k) for k in unique])


class KeyRing:
    """The live key ring: primary key first, then older and decrypt-only keys.

    When it comes from the file, a changed file is picked up at most ``reload_interval``
    seconds later, so ``qpki keys rotate`` never leaves running servers unable to read new
    tokens. A changed file is adopted only when it is usable: unreadable or malformed, or
    unable to decrypt stored tokens the current keys can decrypt (checked on
    ``token_sample``), it is refused with an ERROR naming the file and the working keys stay in
    use -- otherwise enrolments would be encrypted under a key that nothing else has, and every
    2FA sign-in would fail while the server looked healthy. Each version of the file is judged
    once, so a bad file logs one error, not one per request.
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        path: Path | None = None,
        *,
        decrypt_only: Sequence[bytes] = (),
        reload_interval: float = DEFAULT_RELOAD_SECONDS,
        token_sample: TokenSample | None = None,
    ) -> None:
        if reload_interval < 0:
            raise ValueError("reload_interval must not be negative")
        self._keys = list(keys)
        self._decrypt_only = list(decrypt_only)
        self._fernet = build_ring(self._keys, self._decrypt_only)
        self._path = path
        self._reload_interval = reload_interval
        self._token_sample = token_sample
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @property
    def keys(self) -> list[bytes]:
        """The primary and older keys in use (the file's lines, or ``QPKI_MFA_KEY``)."""
        self._maybe_reload()
        return list(self._keys)

    @property
    def fernet(self) -> MultiFernet:
        self._maybe_reload()
        return self._fernet

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            info = self._path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_ino, info.st_size

    def _maybe_reload(self) -> None:
        if self._path is None or time.monotonic() - self._checked < self._reload_interval:
            return
        with self._lock:
            if time.monotonic() - self._checked < self._reload_interval:
                return  # another thread checked while this one waited for the lock
            self._checked = time.monotonic()
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            self._try_adopt(self._path)

    def _try_adopt(self, path: Path) -> None:
        try:
            keys = read_key_file(path)
        except KeyFileError as exc:
            log.error("%s changed but cannot be used; still using the previous keys: %s", path, exc)
            return
        candidate = build_ring(keys, self._decrypt_only)
        try:
            lost = self._tokens_lost(candidate)
        except TokenSampleError as exc:
            self._stamp = None  # not judged: look at the file again at the next check
            log.error("%s changed. %s; still using the previous keys until it can be", path, exc)
            return
        if lost:
            log.error(
                "%s changed, but its keys cannot decrypt %d stored 2FA secret(s) that the "
                "previous keys can; still using the previous keys. Put the previous key back on "
                "a later line of the file (or restore it from the backup); to rotate, use "
                "`qpki keys rotate`",
                path,
                lost,
            )
            return
        self._keys = keys
        self._fernet = candidate
        log.info("MFA key ring reloaded from %s (%d keys)", path, len(keys))

    def _tokens_lost(self, candidate: MultiFernet) -> int:
        """How many sampled stored tokens the current ring reads and ``candidate`` does not."""
        if self._token_sample is None:
            return 0
        lost = 0
        for token in self._token_sample():
            if decrypts(self._fernet, token) and not decrypts(candidate, token):
                lost += 1
        return lost


def decrypts(fernet: Fernet | MultiFernet, token: str) -> bool:
    """Whether ``fernet`` can decrypt ``token`` (a malformed token counts as not)."""
    try:
        fernet.decrypt(token.encode())
    except InvalidToken:
        return False
    return True


def load_key_ring(
    data_dir: Path,
    env_key: str | None,
    *,
    encrypted_data_exists: bool,
    decrypt_keys: str | None = None,
    reload_interval: float = DEFAULT_RELOAD_SECONDS,
    token_sample: TokenSample | None = None,
) -> tuple[KeyRing, list[bytes], str]:
    """The key ring to use and where it came from.

    ``QPKI_MFA_KEY`` wins over the file when set (a secret store supplies it). Without either,
    a new file is created, unless encrypted data already exists: then a new key could never
    decrypt it, so start-up stops instead. ``decrypt_keys`` (``QPKI_MFA_DECRYPT_KEYS``) are
    added to whichever ring is used, only to decrypt: during a rolling rotation across several
    instances a new key is first added this way everywhere, then promoted.
    """
    extra = parse_keys(decrypt_keys, "QPKI_MFA_DECRYPT_KEYS") if decrypt_keys else []
    if env_key:
        keys = parse_keys(env_key, "QPKI_MFA_KEY")
        return KeyRing(keys, decrypt_only=extra), keys, "QPKI_MFA_KEY"
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
    ring = KeyRing(
        keys,
        path,
        decrypt_only=extra,
        reload_interval=reload_interval,
        token_sample=token_sample,
    )
    return ring, keys, str(path)
