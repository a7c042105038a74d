"""RFC 6238 / RFC 4226 reference vectors, and an independent cross-check with ``oathtool``.

SECURITY_CHECKLIST §1.1 and §10.1/§10.2: the generator must reproduce every published vector,
including T = 20000000000 (more than 32 bits). The vectors are checked through pyotp, the
library MFAManager uses, and then through MFAManager's own code path (SHA-1, 6 digits).
"""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
import subprocess

import pyotp
import pytest

from qpki.auth.mfa import MFAManager

SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
DIGESTS = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256, "SHA512": hashlib.sha512}

# RFC 6238 Appendix B: (time, T in hex, TOTP, mode) -- all 18 rows.
RFC6238_ROWS = [
    (59, "0000000000000001", "94287082", "SHA1"),
    (59, "0000000000000001", "46119246", "SHA256"),
    (59, "0000000000000001", "90693936", "SHA512"),
    (1111111109, "00000000023523EC", "07081804", "SHA1"),
    (1111111109, "00000000023523EC", "68084774", "SHA256"),
    (1111111109, "00000000023523EC", "25091201", "SHA512"),
    (1111111111, "00000000023523ED", "14050471", "SHA1"),
    (1111111111, "00000000023523ED", "67062674", "SHA256"),
    (1111111111, "00000000023523ED", "99943326", "SHA512"),
    (1234567890, "000000000273EF07", "89005924", "SHA1"),
    (1234567890, "000000000273EF07", "91819424", "SHA256"),
    (1234567890, "000000000273EF07", "93441116", "SHA512"),
    (2000000000, "0000000003F940AA", "69279037", "SHA1"),
    (2000000000, "0000000003F940AA", "90698825", "SHA256"),
    (2000000000, "0000000003F940AA", "38618901", "SHA512"),
    (20000000000, "0000000027BC86AA", "65353130", "SHA1"),
    (20000000000, "0000000027BC86AA", "77737706", "SHA256"),
    (20000000000, "0000000027BC86AA", "47863826", "SHA512"),
]
SHA1_ROWS = [row for row in RFC6238_ROWS if row[3] == "SHA1"]

# RFC 4226 Appendix D: HOTP for counts 0..9, secret "12345678901234567890", 6 digits.
RFC4226_HOTP = [
    "755224",
    "287082",
    "359152",
    "969429",
    "338314",
    "254676",
    "287922",
    "162583",
    "399871",
    "520489",
]


def b32(seed: bytes) -> str:
    return base64.b32encode(seed).decode("ascii")


def test_vector_table_is_complete() -> None:
    assert len(RFC6238_ROWS) == 18
    assert {mode for *_, mode in RFC6238_ROWS} == {"SHA1", "SHA256", "SHA512"}
    assert len(RFC4226_HOTP) == 10
    for seed_mode, seed in SEEDS.items():
        assert len(seed) == DIGESTS[seed_mode]().digest_size


@pytest.mark.parametrize(("t", "t_hex", "expected", "mode"), RFC6238_ROWS)
def test_rfc6238_appendix_b_through_pyotp(t: int, t_hex: str, expected: str, mode: str) -> None:
    totp = pyotp.TOTP(b32(SEEDS[mode]), digits=8, interval=30, digest=DIGESTS[mode])
    assert t // 30 == int(t_hex, 16)
    assert totp.at(t) == expected
    assert totp.generate_otp(int(t_hex, 16)) == expected
    assert totp.verify(expected, for_time=t)


def test_time_step_beyond_32_bits() -> None:
    """T = 20000000000 gives a step that does not fit in 32 bits."""
    assert MFAManager.time_step(20000000000) == 0x27BC86AA
    assert 20000000000 > 2**32


@pytest.mark.parametrize(("count", "expected"), list(enumerate(RFC4226_HOTP)))
def test_rfc4226_appendix_d_through_pyotp(count: int, expected: str) -> None:
    hotp = pyotp.HOTP(b32(SEEDS["SHA1"]), digits=6)
    assert hotp.at(count) == expected


@pytest.mark.parametrize(("t", "t_hex", "expected", "mode"), SHA1_ROWS)
def test_product_path_matches_sha1_rows(t: int, t_hex: str, expected: str, mode: str) -> None:
    """MFAManager (SHA-1, 6 digits) gives the last 6 digits of the 8-digit SHA-1 vector."""
    secret = b32(SEEDS["SHA1"])
    step = int(t_hex, 16)
    manager = MFAManager()
    assert manager.code_at_step(secret, step) == expected[-6:]
    assert manager.time_step(t) == step
    assert manager.current_code(secret, at=t) == expected[-6:]
    assert manager.verify_totp(secret, expected[-6:], at=t) == step
    # The 8-digit form is not a valid 6-digit code.
    assert manager.verify_totp(secret, expected, at=t) is None


@pytest.mark.parametrize(("count", "expected"), list(enumerate(RFC4226_HOTP)))
def test_product_path_matches_rfc4226(count: int, expected: str) -> None:
    """TOTP is HOTP with the counter = time step, so code_at_step(count) is the HOTP value."""
    assert MFAManager.code_at_step(b32(SEEDS["SHA1"]), count) == expected


# -- independent implementation: OATH Toolkit -------------------------------------------------


def run_oathtool(oathtool: str, key: str, t: int, *, base32: bool, mode: str, digits: int) -> str:
    """One TOTP from oathtool; the key goes through stdin ('-'), never the command line."""
    args = [oathtool, f"--totp={mode}", f"--digits={digits}", f"--now=@{t}"]
    if base32:
        args.append("--base32")
    args.append("-")
    result = subprocess.run(args, input=key, capture_output=True, text=True, check=True, timeout=10)
    return result.stdout.strip()


@pytest.mark.parametrize(("t", "t_hex", "expected", "mode"), RFC6238_ROWS)
def test_oathtool_agrees_with_rfc6238(
    oathtool: str, t: int, t_hex: str, expected: str, mode: str
) -> None:
    """Sanity check of the cross-check tool itself on the published vectors."""
    code = run_oathtool(oathtool, SEEDS[mode].hex(), t, base32=False, mode=mode, digits=8)
    assert code == expected


def test_oathtool_agrees_with_mfa_manager_on_random_secrets(oathtool: str) -> None:
    seed = secrets.randbits(64)
    rng = random.Random(seed)
    manager = MFAManager()
    for _ in range(30):
        secret = manager.generate_secret()
        t = rng.randrange(0, 20_000_000_000)
        expected = run_oathtool(oathtool, secret, t, base32=True, mode="SHA1", digits=6)
        context = f"seed={seed} t={t}"
        assert len(expected) == 6 and expected.isdigit(), context
        assert manager.current_code(secret, at=t) == expected, context
        assert manager.verify_totp(secret, expected, at=t) == t // 30, context
