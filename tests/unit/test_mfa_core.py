"""MFAManager: secrets, provisioning URI, QR code, TOTP window, backup codes, Fernet storage.

SECURITY_CHECKLIST §1 (window, input), §3 (backup codes), §4 (secret, Fernet, rotation),
§10.4 (Key URI format) and §10.5 (Fernet token layout).
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import time
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.fernet import Fernet, MultiFernet
from hypothesis import given, settings
from hypothesis import strategies as st

from qpki.auth.mfa import (
    BACKUP_ALPHABET,
    BackupCodeEntry,
    CodeKind,
    MFAManager,
    SecretDecryptionError,
)

FAST = settings(max_examples=50, deadline=None)
EXCLUDED_LOOKALIKES = "0O1IL"
# A fixed secret and moment for deterministic window tests (2009-02-13 23:31:30 UTC).
SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"  # base32 of b"12345678901234567890"
AT = 1234567890
STEP = AT // 30

backup_code_strategy = st.text(alphabet=BACKUP_ALPHABET, min_size=8, max_size=8)


def decoded(token: str) -> bytes:
    return base64.urlsafe_b64decode(token.encode())


def reencoded(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


# -- secrets --------------------------------------------------------------------------------


def test_secret_is_32_base32_chars_of_160_bits() -> None:
    secret = MFAManager.generate_secret()
    assert len(secret) == 32
    assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert "=" not in secret
    assert len(base64.b32decode(secret)) == 20


def test_secret_differs_each_call() -> None:
    generated = {MFAManager.generate_secret() for _ in range(50)}
    assert len(generated) == 50


def test_format_secret_groups_in_fours() -> None:
    assert MFAManager.format_secret(SECRET) == "GEZD GNBV GY3T QOJQ GEZD GNBV GY3T QOJQ"


# -- provisioning URI and QR code ----------------------------------------------------------


def test_provisioning_uri_exact() -> None:
    secret = MFAManager.generate_secret()
    uri = MFAManager().provisioning_uri(secret, "alice")
    assert uri == f"otpauth://totp/qPKI:alice?secret={secret}&issuer=qPKI"


def test_provisioning_uri_only_default_parameters() -> None:
    secret = MFAManager.generate_secret()
    parts = urlsplit(MFAManager(issuer="Example Org").provisioning_uri(secret, "bob@example.org"))
    assert parts.scheme == "otpauth"
    assert parts.netloc == "totp"
    params = parse_qs(parts.query, strict_parsing=True)
    assert params.pop("secret") == [secret]
    assert params.pop("issuer") == ["Example Org"]
    # Apps ignore non-default parameters (§10.4): absent, or exactly the defaults.
    assert params.pop("algorithm", ["SHA1"]) == ["SHA1"]
    assert params.pop("digits", ["6"]) == ["6"]
    assert params.pop("period", ["30"]) == ["30"]
    assert params == {}


@pytest.mark.parametrize("username", ["ali:ce", ":alice", "alice:"])
def test_colon_in_username_refused(username: str) -> None:
    with pytest.raises(ValueError, match="colon"):
        MFAManager().provisioning_uri(MFAManager.generate_secret(), username)


def test_colon_in_issuer_refused() -> None:
    with pytest.raises(ValueError, match="colon"):
        MFAManager(issuer="q:PKI")


def test_qr_png_decodes_to_the_uri(zbarimg: str, tmp_path) -> None:
    secret = MFAManager.generate_secret()
    uri = MFAManager().provisioning_uri(secret, "alice")
    png = MFAManager.qr_png(uri)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = tmp_path / "qr.png"
    image.write_bytes(png)
    result = subprocess.run(
        [zbarimg, "--raw", "-q", str(image)], capture_output=True, check=True, timeout=30
    )
    assert result.stdout.decode("utf-8").removesuffix("\n") == uri


# -- TOTP verification ---------------------------------------------------------------------


def test_fixed_codes_are_distinct_in_the_tested_range() -> None:
    """Precondition for the window tests below: no accidental code collision."""
    codes = [MFAManager.code_at_step(SECRET, STEP + d) for d in range(-3, 4)]
    assert len(set(codes)) == len(codes)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_verify_accepts_adjacent_steps_and_returns_the_step(offset: int) -> None:
    code = MFAManager.code_at_step(SECRET, STEP + offset)
    assert MFAManager().verify_totp(SECRET, code, at=AT) == STEP + offset


@pytest.mark.parametrize("offset", [-3, -2, 2, 3])
def test_verify_rejects_steps_outside_window(offset: int) -> None:
    code = MFAManager.code_at_step(SECRET, STEP + offset)
    assert MFAManager().verify_totp(SECRET, code, at=AT) is None


def test_verify_accepts_datetime_and_server_time() -> None:
    manager = MFAManager()
    moment = datetime.fromtimestamp(AT, tz=UTC)
    assert manager.verify_totp(SECRET, manager.code_at_step(SECRET, STEP), at=moment) == STEP
    secret = manager.generate_secret()
    now_step = manager.time_step()
    matched = manager.verify_totp(secret, manager.current_code(secret))
    assert matched is not None
    assert abs(matched - now_step) <= 1
    assert abs(now_step - int(time.time()) // 30) <= 1


@pytest.mark.parametrize("padded", [" {}", "{} ", "\t{}\n", "  {}  "])
def test_verify_trims_whitespace(padded: str) -> None:
    code = MFAManager.code_at_step(SECRET, STEP)
    assert MFAManager().verify_totp(SECRET, padded.format(code), at=AT) == STEP


def to_arabic_indic(code: str) -> str:
    return "".join(chr(0x0660 + int(c)) for c in code)


def to_fullwidth(code: str) -> str:
    return "".join(chr(0xFF10 + int(c)) for c in code)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda c: c[:5],  # 5 digits
        lambda c: c + "0",  # 7 digits
        lambda c: "0" + c,  # 7 digits
        lambda c: c[:3] + "a" + c[4:],  # a letter
        lambda c: "+" + c[1:],
        lambda c: "",
        to_arabic_indic,  # unicode digits: isdigit() is true for these
        to_fullwidth,
    ],
)
def test_verify_rejects_malformed_codes(mangle) -> None:
    code = MFAManager.code_at_step(SECRET, STEP)
    assert MFAManager().verify_totp(SECRET, mangle(code), at=AT) is None


def test_verify_rejects_unicode_digits_literal() -> None:
    assert "١٢٣٤٥٦".isdigit()
    assert MFAManager().verify_totp(SECRET, "١٢٣٤٥٦", at=AT) is None


@FAST
@given(st.text(max_size=20))
def test_verify_never_raises_on_arbitrary_text(text: str) -> None:
    result = MFAManager().verify_totp(SECRET, text, at=AT)
    assert result is None or result in {STEP - 1, STEP, STEP + 1}
    if result is not None:
        assert text.strip() == MFAManager.code_at_step(SECRET, result)


# -- backup codes --------------------------------------------------------------------------


def test_backup_codes_shape() -> None:
    codes = MFAManager.generate_backup_codes()
    assert len(codes) == 8
    assert len(set(codes)) == 8
    for code in codes:
        assert len(code) == 9
        assert code[4] == "-"
        body = code[:4] + code[5:]
        assert set(body) <= set(BACKUP_ALPHABET)
        assert not set(body) & set(EXCLUDED_LOOKALIKES)


def test_backup_alphabet_excludes_lookalikes() -> None:
    assert not set(BACKUP_ALPHABET) & set(EXCLUDED_LOOKALIKES)
    assert len(set(BACKUP_ALPHABET)) == len(BACKUP_ALPHABET) == 31


def test_backup_codes_use_the_whole_alphabet() -> None:
    """1,600 characters drawn: missing a symbol by chance has probability < 1e-20."""
    drawn = "".join(MFAManager.generate_backup_codes(200)).replace("-", "")
    assert set(drawn) == set(BACKUP_ALPHABET)
    assert len(set(MFAManager.generate_backup_codes(200))) == 200


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ABCD-EFGH", "ABCDEFGH"),
        ("abcd-efgh", "ABCDEFGH"),
        ("ABCDEFGH", "ABCDEFGH"),
        ("abcd efgh", "ABCDEFGH"),
        (" ab cd - ef gh ", "ABCDEFGH"),
        ("AB-CD-EF-GH", "ABCDEFGH"),
    ],
)
def test_normalize_accepts_variants(raw: str, expected: str) -> None:
    assert MFAManager.normalize_backup_code(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "ABCD-EFG",  # 7
        "ABCD-EFGHJ",  # 9
        "",
        "ABCD-EFG0",  # zero
        "ABCD-EFGO",  # letter O
        "ABCD-EFG1",  # one
        "ABCD-EFGI",  # letter I
        "ABCD-EFGL",  # letter L
        "abcd-efgl",  # lower-case l
        "ABCD_EFGH",  # underscore is not a separator
        "ABCD-EFG!",
    ],
)
def test_normalize_rejects(raw: str) -> None:
    assert MFAManager.normalize_backup_code(raw) is None


@FAST
@given(backup_code_strategy, st.sampled_from(["dash", "lower", "plain", "spaces", "padded"]))
def test_normalize_round_trips_format_variants(body: str, variant: str) -> None:
    shown = f"{body[:4]}-{body[4:]}"
    typed = {
        "dash": shown,
        "lower": shown.lower(),
        "plain": body,
        "spaces": " ".join(body),
        "padded": f"  {shown.lower()}\n",
    }[variant]
    assert MFAManager.normalize_backup_code(typed) == body


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("123456", CodeKind.TOTP),
        (" 123456 ", CodeKind.TOTP),
        ("123 456", CodeKind.TOTP),
        ("ABCD-EFGH", CodeKind.BACKUP),
        ("abcdefgh", CodeKind.BACKUP),
        ("23456789", CodeKind.BACKUP),  # 8 digits from the alphabet: a backup code
        ("12345678", CodeKind.INVALID),  # 8 chars but contains '1'
        ("12345", CodeKind.INVALID),
        ("1234567", CodeKind.INVALID),
        ("١٢٣٤٥٦", CodeKind.INVALID),
        ("ABCD-EFG0", CodeKind.INVALID),
        ("", CodeKind.INVALID),
        ("hello", CodeKind.INVALID),
    ],
)
def test_classify_code(raw: str, kind: CodeKind) -> None:
    assert MFAManager().classify_code(raw) is kind


def test_classify_generated_codes() -> None:
    manager = MFAManager()
    for code in manager.generate_backup_codes():
        assert manager.classify_code(code) is CodeKind.BACKUP
    assert manager.classify_code(manager.current_code(SECRET)) is CodeKind.TOTP


@FAST
@given(st.text(max_size=20))
def test_classify_never_raises(text: str) -> None:
    assert MFAManager().classify_code(text) in set(CodeKind)


def test_hashed_backup_codes_hold_no_plaintext(mfa: MFAManager) -> None:
    codes = mfa.generate_backup_codes()
    entries = mfa.hash_backup_codes(codes)
    assert len(entries) == len(codes)
    as_json = json.dumps([e.to_json() for e in entries])
    token = mfa.encrypt_backup_entries(entries)
    inside = mfa.decrypt(token)
    for code in codes:
        for form in (code, code.replace("-", ""), code.lower(), code.replace("-", "").lower()):
            assert form not in as_json
            assert form not in token
            assert form not in inside
    for entry in entries:
        assert len(base64.b64decode(entry.salt)) >= 4  # >= 32-bit salt (§3.2)
        assert entry.used_at is None


def test_salts_differ_for_equal_codes(mfa: MFAManager) -> None:
    first, second = mfa.hash_backup_codes(["ABCD-EFGH", "abcdefgh"])
    assert first.salt != second.salt
    assert first.hash != second.hash
    assert mfa.match_backup_code([first], "ABCD-EFGH") == 0
    assert mfa.match_backup_code([second], "ABCD-EFGH") == 0


def test_hash_rejects_non_codes(mfa: MFAManager) -> None:
    with pytest.raises(ValueError):
        mfa.hash_backup_codes(["ABCD-EFG0"])


def test_match_backup_code(mfa: MFAManager) -> None:
    codes = mfa.generate_backup_codes()
    entries = mfa.hash_backup_codes(codes)
    for index, code in enumerate(codes):
        assert mfa.match_backup_code(entries, code) == index
        assert mfa.match_backup_code(entries, code.lower().replace("-", " ")) == index
    wrong = next(c for c in mfa.generate_backup_codes(50) if c not in codes)
    assert mfa.match_backup_code(entries, wrong) is None
    assert mfa.match_backup_code(entries, "not a code") is None
    assert mfa.match_backup_code([], codes[0]) is None


def test_backup_entries_round_trip_through_fernet(mfa: MFAManager) -> None:
    codes = mfa.generate_backup_codes()
    entries = mfa.hash_backup_codes(codes)
    entries[3].used_at = "2024-01-01T00:00:00+00:00"
    restored = mfa.decrypt_backup_entries(mfa.encrypt_backup_entries(entries))
    assert restored == entries
    assert mfa.match_backup_code(restored, codes[5]) == 5


@FAST
@given(backup_code_strategy)
def test_match_finds_code_typed_in_any_format(body: str) -> None:
    mfa = MFAManager()
    entries = mfa.hash_backup_codes(["2345-6789", f"{body[:4]}-{body[4:]}"])
    expected = 0 if body == "23456789" else 1
    assert mfa.match_backup_code(entries, body.lower()) == expected


# -- encryption at rest --------------------------------------------------------------------


def test_encrypt_gives_fresh_fernet_tokens(mfa: MFAManager) -> None:
    secret = mfa.generate_secret()
    first, second = mfa.encrypt(secret), mfa.encrypt(secret)
    assert first != second
    assert secret not in first
    for token in (first, second):
        raw = decoded(token)
        assert raw[0] == 0x80
        assert mfa.decrypt(token) == secret
    assert decoded(first)[9:25] != decoded(second)[9:25]  # fresh IV


def test_encrypt_records_the_given_timestamp(mfa: MFAManager) -> None:
    token = mfa.encrypt("x", at=978307200)
    assert struct.unpack(">Q", decoded(token)[1:9])[0] == 978307200


def test_one_changed_byte_anywhere_is_refused(mfa: MFAManager) -> None:
    secret = mfa.generate_secret()
    raw = decoded(mfa.encrypt(secret))
    for position in range(len(raw)):
        tampered = bytearray(raw)
        tampered[position] ^= 0x01
        with pytest.raises(SecretDecryptionError):
            mfa.decrypt(reencoded(bytes(tampered)))


@pytest.mark.parametrize("token", ["", "garbage", "gAAAAA", "ü" * 40])
def test_garbage_tokens_are_refused(mfa: MFAManager, token: str) -> None:
    with pytest.raises(SecretDecryptionError):
        mfa.decrypt(token)


def test_decrypt_with_another_key_is_refused(mfa: MFAManager) -> None:
    token = mfa.encrypt("JBSWY3DPEHPK3PXP")
    other = MFAManager(MultiFernet([Fernet(Fernet.generate_key())]))
    with pytest.raises(SecretDecryptionError):
        other.decrypt(token)


@pytest.mark.parametrize("at", [0, 978307200, datetime(2001, 1, 1, tzinfo=UTC)])
def test_old_tokens_still_decrypt(mfa: MFAManager, at) -> None:
    """No TTL (§4.5): a token from long ago is still good."""
    token = mfa.encrypt("JBSWY3DPEHPK3PXP", at=at)
    assert mfa.decrypt(token) == "JBSWY3DPEHPK3PXP"


def test_no_key_means_no_encryption() -> None:
    with pytest.raises(RuntimeError):
        MFAManager().encrypt("x")


def test_rotation_then_old_key_removed() -> None:
    """§4.6: rotate every row with [new, old], drop old, every row decrypts with new alone."""
    old, new = Fernet(Fernet.generate_key()), Fernet(Fernet.generate_key())
    before = MFAManager(MultiFernet([old]))
    rows = {
        "secret": before.encrypt(before.generate_secret(), at=0),
        "recent": before.encrypt(before.generate_secret()),
        "codes": before.encrypt_backup_entries(before.hash_backup_codes(["ABCD-EFGH"])),
    }
    plain = {name: before.decrypt(token) for name, token in rows.items()}
    after_only = MFAManager(MultiFernet([new]))
    for token in rows.values():
        with pytest.raises(SecretDecryptionError):
            after_only.decrypt(token)

    ring = MultiFernet([new, old])
    rotated = {name: ring.rotate(token.encode()).decode() for name, token in rows.items()}

    for name, token in rotated.items():
        assert after_only.decrypt(token) == plain[name]
        assert decoded(token)[1:9] == decoded(rows[name])[1:9]  # timestamp kept
        with pytest.raises(SecretDecryptionError):
            before.decrypt(token)
    entries = after_only.decrypt_backup_entries(rotated["codes"])
    assert after_only.match_backup_code(entries, "abcd efgh") == 0


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "",
        "{}",
        '{"scheme": "x"}',
        "null",
        "42",
        '"text"',
        "[{}]",
        '[{"scheme": "pbkdf2-sha256$1000", "salt": "AAAA"}]',
        '[{"scheme": "md5", "salt": "AAAA", "hash": "AAAA"}]',
    ],
)
def test_malformed_backup_entries_raise(mfa: MFAManager, content: str) -> None:
    with pytest.raises(SecretDecryptionError):
        mfa.decrypt_backup_entries(mfa.encrypt(content))


@pytest.mark.parametrize("content", ["[1]", '["ABCDEFGH"]', "[null]", "[[]]"])
def test_backup_list_of_non_objects_raises_secret_decryption_error(
    mfa: MFAManager, content: str
) -> None:
    """A JSON list whose items are not objects is malformed too, and must fail the same way.

    The service layer only catches SecretDecryptionError, so any other exception type here
    turns a corrupt row into an unhandled error instead of a logged, fail-closed refusal.
    """
    with pytest.raises(SecretDecryptionError):
        mfa.decrypt_backup_entries(mfa.encrypt(content))


def test_backup_entries_of_tampered_token_raise(mfa: MFAManager) -> None:
    raw = bytearray(decoded(mfa.encrypt_backup_entries(mfa.hash_backup_codes(["ABCD-EFGH"]))))
    raw[-1] ^= 0xFF
    with pytest.raises(SecretDecryptionError):
        mfa.decrypt_backup_entries(reencoded(bytes(raw)))


def test_empty_list_is_a_valid_empty_set(mfa: MFAManager) -> None:
    assert mfa.decrypt_backup_entries(mfa.encrypt_backup_entries([])) == []


def test_entry_json_has_scheme() -> None:
    entry = BackupCodeEntry(salt="c2FsdA==", hash="aGFzaA==")
    assert BackupCodeEntry.from_json(entry.to_json()) == entry
    assert entry.to_json()["scheme"].startswith("pbkdf2-sha256$")


@pytest.mark.parametrize("shape", ["{a} {b}", "{a}-{b}", " {a} {b} ", "{a}\t{b}"])
def test_verify_accepts_codes_grouped_as_apps_show_them(mfa, shape: str) -> None:
    """Apps show '123 456'; people type it that way."""
    secret = mfa.generate_secret()
    code = mfa.current_code(secret, at=1_700_000_000)
    typed = shape.format(a=code[:3], b=code[3:])
    assert mfa.verify_totp(secret, typed, at=1_700_000_000) == mfa.time_step(1_700_000_000)
