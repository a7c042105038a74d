"""Password hashing (argon2id) and the NIST SP 800-63B password rules.

Rules: at least 12 characters, at most 256, no composition rules, not the username, and not
predictable. Every entry of the shipped list of the 1,000 most common passwords is shorter than
12 characters, so the list is applied the way people actually pad such passwords: a common
password with digits or symbols around it ("password1234"), or repeated ("qwertyqwerty"), is
refused too, as are one character repeated and straight sequences ("123456789012"), which
SP 800-63B names explicitly. Unicode is NFKC-normalised before hashing so the same password
typed on different keyboards matches.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import unicodedata
from functools import lru_cache
from importlib import resources

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from qpki.errors import QPKIError

MIN_LENGTH = 12
MAX_LENGTH = 256


class PasswordPolicyError(QPKIError, ValueError):
    """The chosen password breaks a rule; the message is shown to the user as is."""


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The shipped list of the 1,000 most common passwords, lower-cased."""
    text = resources.files("qpki.data").joinpath("common_passwords.txt").read_text("utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip())


_PADDINGS = (re.compile(r"^[\W_]+|[\W_]+$"), re.compile(r"^[\W\d_]+|[\W\d_]+$"))


def _is_repetition(value: str) -> bool:
    """'abcabcabcabc' or 'aaaaaaaaaaaa': the whole value is one short unit repeated."""
    return any(
        len(value) % size == 0 and value == value[:size] * (len(value) // size)
        for size in range(1, len(value) // 2 + 1)
    )


def _is_sequence(value: str) -> bool:
    """'123456789012', 'abcdefghijkl' or their reverse (digits wrap around 9 → 0)."""
    if value.isdigit():
        steps = {(int(b) - int(a)) % 10 for a, b in itertools.pairwise(value)}
        return steps in ({1}, {9})
    if value.isalpha() and value.isascii():
        steps = {ord(b) - ord(a) for a, b in itertools.pairwise(value)}
        return steps in ({1}, {-1})
    return False


def is_predictable(password: str) -> bool:
    """Common, padded-common, repeated or sequential (case-insensitive)."""
    value = normalise(password).lower()
    common = common_passwords()
    if value in common or any(pad.sub("", value) in common for pad in _PADDINGS):
        return True
    for size in range(1, len(value) // 2 + 1):
        unit = value[:size]
        if len(value) % size == 0 and value == unit * (len(value) // size) and unit in common:
            return True
    return _is_repetition(value) or _is_sequence(value)


def normalise(password: str) -> str:
    """NFKC form, as SP 800-63B recommends for Unicode passwords."""
    return unicodedata.normalize("NFKC", password)


def check_password_policy(password: str, username: str = "") -> None:
    """Raise PasswordPolicyError with a plain message if ``password`` may not be used."""
    value = normalise(password)
    if len(value) < MIN_LENGTH:
        raise PasswordPolicyError(f"Password must be at least {MIN_LENGTH} characters long.")
    if len(value) > MAX_LENGTH:
        raise PasswordPolicyError(f"Password must be at most {MAX_LENGTH} characters long.")
    if "\x00" in value:
        raise PasswordPolicyError("Password may not contain NUL characters.")
    if is_predictable(value):
        raise PasswordPolicyError("This password is too common. Choose a less predictable one.")
    if username and value.lower() == username.lower():
        raise PasswordPolicyError("Password may not be the same as the username.")


class Passwords:
    """argon2id hashing with rehash-on-login when the parameters change."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher or PasswordHasher()
        # A real hash to verify against when the user does not exist, so that a failed login
        # costs the same time whether or not the account exists.
        self._dummy_hash = self.hasher.hash("qpki-dummy-password-for-timing")

    def hash(self, password: str) -> str:
        return self.hasher.hash(normalise(password))

    def verify(self, password_hash: str | None, password: str) -> bool:
        """True if ``password`` matches; always spends one full hash computation."""
        if not password_hash:  # unknown user (or an empty column): same work, never a match
            with contextlib.suppress(VerifyMismatchError, VerificationError, InvalidHashError):
                self.hasher.verify(self._dummy_hash, normalise(password))
            return False
        try:
            return self.hasher.verify(password_hash, normalise(password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        return self.hasher.check_needs_rehash(password_hash)
