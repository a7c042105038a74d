"""Password policy (NIST SP 800-63B: length, blocklist, no composition rules) and argon2id."""

from __future__ import annotations

import hashlib
from importlib import resources

import argon2
import pytest
from argon2 import PasswordHasher

import qpki.auth.passwords as passwords_module
from qpki.auth.passwords import (
    MAX_LENGTH,
    MIN_LENGTH,
    PasswordPolicyError,
    Passwords,
    check_password_policy,
    common_passwords,
    normalise,
)

DUMMY_PASSWORD = "qpki-dummy-password-for-timing"  # the public dummy in passwords.py


class CountingHasher(PasswordHasher):
    """A cheap argon2id hasher that counts verify() calls."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8192, parallelism=1)
        self.verify_calls: list[str] = []

    def verify(self, hash, password):  # type: ignore[override]
        self.verify_calls.append(hash if isinstance(hash, str) else hash.decode())
        return super().verify(hash, password)


@pytest.fixture(scope="module")
def default_passwords() -> Passwords:
    """The production configuration (argon2-cffi defaults); built once, it is slow-ish."""
    return Passwords()


@pytest.fixture
def fast() -> Passwords:
    return Passwords(CountingHasher())


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" for c in text)


# -- policy --------------------------------------------------------------------------------


def test_limits() -> None:
    assert MIN_LENGTH == 12
    assert MAX_LENGTH == 256


@pytest.mark.parametrize("password", ["", "a", "abcdefghijk", "correct hor", "x" * 11, " " * 11])
def test_too_short_is_refused(password: str) -> None:
    with pytest.raises(PasswordPolicyError, match="at least 12"):
        check_password_policy(password)


# Unpredictable passwords of every "shape": composition is never required.
LONGEST_OK = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(8))[:MAX_LENGTH]


@pytest.mark.parametrize(
    "password",
    [
        "correct horse",  # lower case and a space only
        "horse staple",  # exactly 12
        "ALLUPPERCASE WORDS",
        "xkcd battery!",
        "zebra lantern mosaic",
        LONGEST_OK,  # exactly 256
    ],
)
def test_no_composition_rules(password: str) -> None:
    assert MIN_LENGTH <= len(password) <= MAX_LENGTH
    check_password_policy(password)  # no exception


def test_exactly_twelve_is_enough() -> None:
    assert len("horse staple") == 12
    check_password_policy("horse staple")


def test_too_long_is_refused() -> None:
    with pytest.raises(PasswordPolicyError, match="at most 256"):
        check_password_policy("x" * 257)


@pytest.mark.parametrize("password", ["abc\x00defghijklm", "\x00" * 12, "correct horse\x00"])
def test_nul_is_refused(password: str) -> None:
    with pytest.raises(PasswordPolicyError, match="NUL"):
        check_password_policy(password)


@pytest.mark.parametrize("username", ["Alice.Example1", "alice.example1", "ALICE.EXAMPLE1"])
def test_password_equal_to_username_is_refused(username: str) -> None:
    with pytest.raises(PasswordPolicyError, match="username"):
        check_password_policy("alice.EXAMPLE1", username)


def test_username_check_uses_nfkc() -> None:
    with pytest.raises(PasswordPolicyError, match="username"):
        check_password_policy(fullwidth("alice.example1"), "alice.example1")


def test_password_containing_username_is_allowed() -> None:
    check_password_policy("alice.example1 is here", "alice.example1")


def test_common_list_has_exactly_1000_lower_case_entries() -> None:
    entries = common_passwords()
    assert len(entries) == 1000
    assert all(e == e.lower() and e == e.strip() and e for e in entries)
    raw = resources.files("qpki.data").joinpath("common_passwords.txt").read_text("utf-8")
    assert len([line for line in raw.splitlines() if line.strip()]) == 1000
    assert {"password", "123456", "qwerty"} <= entries


def test_blocklist_logic_rejects_listed_entries_case_insensitively(monkeypatch) -> None:
    """The check itself, with a list that holds a policy-length entry."""
    monkeypatch.setattr(passwords_module, "common_passwords", lambda: frozenset({"iloveyou1234"}))
    for candidate in ("iloveyou1234", "ILoveYou1234", fullwidth("iloveyou1234")):
        with pytest.raises(PasswordPolicyError, match="too common"):
            check_password_policy(candidate)
    check_password_policy("iloveyou12345")


@pytest.mark.parametrize(
    "password",
    [
        "password1234",
        "PASSWORD1234",
        "Password1234",
        "qwerty123456",
        "iloveyou2024",
        "!!password!!",
        "qwertyqwerty",
        "123456789012",  # sequential (SP 800-63B names it)
        "aaaaaaaaaaaa",  # repetitive
    ],
)
def test_common_passwords_padded_to_policy_length_are_refused(password: str) -> None:
    """Every list entry is shorter than 12 characters, so the list alone can never fire.

    SP 800-63B (5.1.1.2 / N4 3.1.1.2) requires comparing against commonly used passwords; the
    ones people actually use at 12+ characters are list entries padded or repeated.
    """
    assert len(password) >= MIN_LENGTH
    with pytest.raises(PasswordPolicyError, match="too common"):
        check_password_policy(password)


def test_every_list_entry_padded_with_symbols_is_refused() -> None:
    """'123456!!!!!!' is as common as '123456' followed by a symbol run; no entry is exempt."""
    accepted = []
    for entry in sorted(common_passwords()):
        candidate = entry + "!" * max(0, MIN_LENGTH - len(entry))
        try:
            check_password_policy(candidate)
        except PasswordPolicyError:
            continue
        accepted.append(candidate)
    assert not accepted, f"{len(accepted)} padded common passwords accepted, e.g. {accepted[:5]}"


# -- hashing -------------------------------------------------------------------------------


def test_hash_is_argon2id_and_verifies(default_passwords: Passwords) -> None:
    hashed = default_passwords.hash("correct horse battery")
    assert hashed.startswith("$argon2id$")
    assert "correct horse" not in hashed
    assert default_passwords.verify(hashed, "correct horse battery") is True
    assert default_passwords.verify(hashed, "correct horse batterY") is False
    assert default_passwords.needs_rehash(hashed) is False


def test_hashes_are_salted(fast: Passwords) -> None:
    assert fast.hash("correct horse battery") != fast.hash("correct horse battery")


def test_verify_wrong_and_invalid_hash(fast: Passwords) -> None:
    hashed = fast.hash("correct horse battery")
    assert fast.verify(hashed, "wrong password!") is False
    assert fast.verify("not-a-hash", "correct horse battery") is False
    assert fast.verify("$argon2id$v=19$m=8,t=1,p=1$AAAA$BBBB", "x") is False


def test_verify_none_is_false_but_does_the_work(fast: Passwords) -> None:
    """An unknown user costs one real argon2 verification (timing equalisation)."""
    hasher = fast.hasher
    assert isinstance(hasher, CountingHasher)
    assert fast.verify(None, "correct horse battery") is False
    assert len(hasher.verify_calls) == 1
    assert hasher.verify_calls[0].startswith("$argon2id$")
    # Even the dummy's own password must not log anyone in.
    assert fast.verify(None, DUMMY_PASSWORD) is False
    assert len(hasher.verify_calls) == 2


def test_verify_known_user_calls_hasher_once(fast: Passwords) -> None:
    hashed = fast.hash("correct horse battery")
    fast.hasher.verify_calls.clear()  # type: ignore[attr-defined]
    assert fast.verify(hashed, "nope nope nope") is False
    assert fast.hasher.verify_calls == [hashed]  # type: ignore[attr-defined]


def test_empty_stored_hash_never_matches(fast: Passwords) -> None:
    """An empty password_hash (e.g. a blanked or half-created row) must not match anything.

    verify() substitutes the dummy hash for a falsy stored hash but only forces False for
    ``None``; with ``""`` the publicly known dummy password is accepted.
    """
    assert fast.verify("", "correct horse battery") is False
    assert fast.verify("", DUMMY_PASSWORD) is False


def test_needs_rehash_for_weaker_parameters(default_passwords: Passwords) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192).hash("correct horse battery")
    assert weak.startswith("$argon2id$")
    assert default_passwords.needs_rehash(weak) is True
    # ...and the old hash still verifies, so login can upgrade it.
    assert default_passwords.verify(weak, "correct horse battery") is True


def test_default_parameters_are_not_weak(default_passwords: Passwords) -> None:
    params = argon2.extract_parameters(default_passwords.hash("correct horse battery"))
    assert params.type is argon2.Type.ID
    assert params.memory_cost >= 19 * 1024  # OWASP minimum for argon2id
    assert params.time_cost >= 2


# -- NFKC ----------------------------------------------------------------------------------


def test_normalise_is_nfkc() -> None:
    assert normalise("ｐａｓｓｗｏｒｄ") == "password"
    assert normalise("ﬁ") == "fi"
    assert normalise("e\u0301") == "é"


def test_fullwidth_password_equals_ascii(fast: Passwords) -> None:
    ascii_form = "password for qpki"
    wide = fullwidth(ascii_form)
    assert wide != ascii_form
    assert wide.startswith("ｐａｓｓｗｏｒｄ")
    assert fast.verify(fast.hash(wide), ascii_form) is True
    assert fast.verify(fast.hash(ascii_form), wide) is True


def test_composed_and_decomposed_accents_match(fast: Passwords) -> None:
    assert fast.verify(fast.hash("caf\u00e9 au lait!!"), "cafe\u0301 au lait!!") is True


def test_length_counts_normalised_characters() -> None:
    # 10 characters with ligatures become 14 after NFKC: long enough.
    raw = "ﬁne ﬂow ﬃx"
    assert len(raw) < MIN_LENGTH <= len(normalise(raw))
    check_password_policy(raw)
    with pytest.raises(PasswordPolicyError, match="at most"):
        check_password_policy("ﬃ" * 86)  # 258 characters after NFKC
