"""MFAManager: the pure core of two-factor authentication. No Flask, no database.

- TOTP per RFC 6238 through pyotp: SHA-1, 6 digits, 30-second steps, the parameters every
  authenticator app honours (apps silently ignore others, see SECURITY_CHECKLIST §10.4).
- Verification accepts the current step ±1 (about 30 s of clock drift either way) and returns
  the step that matched, so the service layer can refuse a replay (``step > last_step``).
- Backup codes: 8 single-use codes of 8 characters from an alphabet without look-alikes; stored
  only as salted PBKDF2 hashes inside a Fernet token, so they cannot be read back even with the key.
- Secrets at rest are Fernet tokens, decrypted without a TTL (rotation keeps old timestamps).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import io
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import pyotp
from cryptography.fernet import InvalidToken, MultiFernet

from qpki.errors import QPKIError

TOTP_DIGITS = 6
TOTP_PERIOD = 30
TOTP_WINDOW = 1
SECRET_BYTES = 20  # 160 bits, RFC 4226 R6's recommendation; 32 base32 characters
BACKUP_CODE_COUNT = 8
BACKUP_CODE_LENGTH = 8
BACKUP_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"  # no 0/O, 1/I/L
BACKUP_HASH_ITERATIONS = 1000
BACKUP_HASH_SCHEME = f"pbkdf2-sha256${BACKUP_HASH_ITERATIONS}"
_SEPARATORS = re.compile(r"[\s\-]+")


class _HasFernet(Protocol):
    """Anything that hands out the current key ring (``qpki.auth.keys.KeyRing``)."""

    @property
    def fernet(self) -> MultiFernet: ...


class CodeKind(enum.Enum):
    """What a submitted second-factor input looks like."""

    TOTP = "totp"
    BACKUP = "backup_code"
    INVALID = "invalid"


class SecretDecryptionError(QPKIError):
    """A stored token could not be decrypted: wrong key or tampered data. Never fall back."""


@dataclass
class BackupCodeEntry:
    """One stored backup code: salt and hash of the code, and when it was used (if ever)."""

    salt: str
    hash: str
    used_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": BACKUP_HASH_SCHEME,
            "salt": self.salt,
            "hash": self.hash,
            "used_at": self.used_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackupCodeEntry:
        if not isinstance(data, dict):
            raise SecretDecryptionError("backup code entry is not an object")
        if data.get("scheme") != BACKUP_HASH_SCHEME:
            raise SecretDecryptionError(f"unknown backup code scheme {data.get('scheme')!r}")
        return cls(salt=data["salt"], hash=data["hash"], used_at=data.get("used_at"))


def _timestamp(at: datetime | float | None) -> float:
    if at is None:
        return time.time()
    if isinstance(at, datetime):
        return at.timestamp()
    return float(at)


def _hash_code(normalised: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", normalised.encode(), salt, BACKUP_HASH_ITERATIONS)


class MFAManager:
    """TOTP, provisioning URI, QR code, backup codes, and encryption of what is stored."""

    def __init__(
        self, fernet: MultiFernet | _HasFernet | None = None, issuer: str = "qPKI"
    ) -> None:
        if ":" in issuer:
            raise ValueError("the issuer may not contain a colon (Key URI format)")
        self.issuer = issuer
        self._fernet = fernet

    # -- TOTP ---------------------------------------------------------------------------------
    @staticmethod
    def generate_secret() -> str:
        """A new random 160-bit secret, base32 without padding (32 characters)."""
        return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")

    def provisioning_uri(self, secret: str, username: str) -> str:
        """``otpauth://totp/<issuer>:<username>?secret=…&issuer=<issuer>`` for apps."""
        if ":" in username:
            raise ValueError("the account name may not contain a colon (Key URI format)")
        return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD).provisioning_uri(
            name=username, issuer_name=self.issuer
        )

    @staticmethod
    def qr_png(uri: str) -> bytes:
        """The URI as a QR code PNG, rendered here (never by a third-party service)."""
        import qrcode  # imported on first enrolment: most workers never draw a QR code
        import qrcode.constants
        from qrcode.image.pil import PilImage

        qr = qrcode.QRCode(
            error_correction=qrcode.constants.ERROR_CORRECT_M,
            box_size=8,
            border=4,
            image_factory=PilImage,
        )
        qr.add_data(uri)
        qr.make(fit=True)
        buffer = io.BytesIO()
        qr.make_image().save(buffer, format="PNG")
        return buffer.getvalue()

    @staticmethod
    def format_secret(secret: str) -> str:
        """The secret grouped in fours for typing into an app by hand."""
        return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))

    @staticmethod
    def time_step(at: datetime | float | None = None) -> int:
        """The RFC 6238 time step ``T`` for the given moment."""
        return int(_timestamp(at) // TOTP_PERIOD)

    @staticmethod
    def code_at_step(secret: str, step: int) -> str:
        """The code for one time step (tests and the product share this pyotp path)."""
        return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD).generate_otp(step)

    def current_code(self, secret: str, at: datetime | float | None = None) -> str:
        """The code an authenticator shows at ``at``."""
        return self.code_at_step(secret, self.time_step(at))

    def verify_totp(
        self, secret: str, code: str, at: datetime | float | None = None, window: int = TOTP_WINDOW
    ) -> int | None:
        """The matched time step if ``code`` is valid within ±``window`` steps, else ``None``.

        Every candidate in the window is compared with ``hmac.compare_digest`` and the loop
        does not stop early, so timing tells nothing about which step matched.
        """
        code = _SEPARATORS.sub("", code)  # apps show "123 456"; people type it that way
        if len(code) != TOTP_DIGITS or not code.isdigit() or not code.isascii():
            return None
        now = self.time_step(at)
        totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD)
        matched: int | None = None
        for step in range(now - window, now + window + 1):
            if hmac.compare_digest(totp.generate_otp(step), code) and matched is None:
                matched = step
        return matched

    # -- backup codes -----------------------------------------------------------------------
    @staticmethod
    def generate_backup_codes(count: int = BACKUP_CODE_COUNT) -> list[str]:
        """``count`` fresh codes shown as ``XXXX-XXXX`` (31^8 ≈ 2^39.6 each)."""
        codes = []
        for _ in range(count):
            raw = "".join(secrets.choice(BACKUP_ALPHABET) for _ in range(BACKUP_CODE_LENGTH))
            codes.append(f"{raw[:4]}-{raw[4:]}")
        return codes

    @staticmethod
    def normalize_backup_code(raw: str) -> str | None:
        """Upper-case, without dashes or spaces; ``None`` if it cannot be a backup code."""
        candidate = _SEPARATORS.sub("", raw).upper()
        if len(candidate) != BACKUP_CODE_LENGTH or any(c not in BACKUP_ALPHABET for c in candidate):
            return None
        return candidate

    def classify_code(self, raw: str) -> CodeKind:
        """Tell a 6-digit TOTP code from an 8-character backup code."""
        stripped = _SEPARATORS.sub("", raw)
        if len(stripped) == TOTP_DIGITS and stripped.isdigit() and stripped.isascii():
            return CodeKind.TOTP
        if self.normalize_backup_code(raw) is not None:
            return CodeKind.BACKUP
        return CodeKind.INVALID

    def hash_backup_codes(self, codes: list[str]) -> list[BackupCodeEntry]:
        """Salted hashes of ``codes`` (each salt 128 bits); the codes themselves are dropped."""
        entries = []
        for code in codes:
            normalised = self.normalize_backup_code(code)
            if normalised is None:
                raise ValueError("not a backup code")
            salt = secrets.token_bytes(16)
            entries.append(
                BackupCodeEntry(
                    salt=base64.b64encode(salt).decode(),
                    hash=base64.b64encode(_hash_code(normalised, salt)).decode(),
                )
            )
        return entries

    def match_backup_code(self, entries: list[BackupCodeEntry], raw: str) -> int | None:
        """Index of the entry ``raw`` matches (used or not), or ``None``. Checks every entry."""
        normalised = self.normalize_backup_code(raw)
        if normalised is None:
            return None
        found: int | None = None
        for index, entry in enumerate(entries):
            digest = _hash_code(normalised, base64.b64decode(entry.salt))
            if hmac.compare_digest(digest, base64.b64decode(entry.hash)) and found is None:
                found = index
        return found

    # -- encryption at rest -----------------------------------------------------------------
    @property
    def fernet(self) -> MultiFernet:
        """The current ring (a reloading key ring is asked each time)."""
        if self._fernet is None:
            raise RuntimeError("MFAManager was built without a key; encryption is unavailable")
        if isinstance(self._fernet, MultiFernet):
            return self._fernet
        return self._fernet.fernet

    def encrypt(self, plaintext: str, at: datetime | float | None = None) -> str:
        """A Fernet token for ``plaintext`` (a fresh IV each time)."""
        return self.fernet.encrypt_at_time(plaintext.encode(), int(_timestamp(at))).decode()

    def decrypt(self, token: str) -> str:
        """Decrypt a stored token, with no TTL; raise SecretDecryptionError on any failure."""
        try:
            return self.fernet.decrypt(token.encode()).decode()
        except (InvalidToken, UnicodeError, ValueError) as exc:
            raise SecretDecryptionError("stored token could not be decrypted") from exc

    def encrypt_backup_entries(self, entries: list[BackupCodeEntry]) -> str:
        """The ``backup_codes`` column value: a Fernet token of the JSON list of entries."""
        return self.encrypt(json.dumps([e.to_json() for e in entries], separators=(",", ":")))

    def decrypt_backup_entries(self, token: str) -> list[BackupCodeEntry]:
        """Inverse of :meth:`encrypt_backup_entries`; malformed content is an error, never []."""
        try:
            data = json.loads(self.decrypt(token))
            if not isinstance(data, list):
                raise TypeError("backup code list is not a list")
            return [BackupCodeEntry.from_json(item) for item in data]
        except (ValueError, TypeError, KeyError) as exc:
            raise SecretDecryptionError("stored backup codes are malformed") from exc
