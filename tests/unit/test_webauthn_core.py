"""The pure WebAuthn core on real authenticator data (python-fido2 software authenticator).

Every fault the checklist names (§9.3, §12.1) is made on otherwise correct, correctly signed
data, so each test fails if that one check is missing.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from fido2.utils import websafe_decode
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qpki.auth.webauthn import (
    CeremonyRejected,
    CounterNotIncreased,
    KnownCredential,
    RelyingParty,
    assertion_claim,
    authentication_options,
    new_challenge,
    new_user_handle,
    parse_response,
    registration_options,
    relying_party,
    response_challenge,
    verify_assertion,
    verify_registration,
)
from qpki.config import ConfigError, Settings
from webauthn_softkey import ORIGIN, SoftKey, b64

DEV = relying_party(None, ())


def _register(key: SoftKey, rp: RelyingParty = DEV, **fault: Any) -> tuple[Any, bytes, dict]:
    challenge = new_challenge()
    options = registration_options(
        rp,
        user_handle=new_user_handle(),
        user_name="alice",
        display_name="alice",
        challenge=challenge,
        exclude=[],
    )
    response = key.create(options, **fault)
    return verify_registration(rp, response, challenge=challenge), challenge, options


def _assert(
    key: SoftKey, public_key: bytes, stored: int, *, require_uv: bool = False, **fault: Any
) -> Any:
    challenge = new_challenge()
    options = authentication_options(
        DEV,
        challenge=challenge,
        allow=[KnownCredential(key.credential_id, ("usb",))],
        require_user_verification=require_uv,
    )
    response = key.get(options, **fault)
    return verify_assertion(
        DEV,
        response,
        challenge=challenge,
        public_key=public_key,
        stored_sign_count=stored,
        require_user_verification=require_uv,
    )


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
def test_each_required_algorithm_registers_and_signs_in(alg: str) -> None:
    key = SoftKey(alg=alg, backup_eligible=True, backed_up=True, transports=("internal",))
    new, _challenge, _ = _register(key)
    assert new.credential_id == key.credential_id
    assert new.aaguid == "f8a011f3-8c0a-4d15-8006-17111f9edc7d"
    assert new.backup_eligible and new.backed_up and new.user_verified
    assert new.transports == ("internal",)
    verified = _assert(key, new.public_key, new.sign_count)
    assert verified.new_sign_count == 1 and verified.user_verified


def test_options_name_the_algorithms_attestation_none_and_exclude_list() -> None:
    known = KnownCredential(b"\x01" * 16, ("usb", "nfc", "bogus"))
    options = registration_options(
        DEV,
        user_handle=b"\x02" * 64,
        user_name="alice",
        display_name="alice",
        challenge=b"\x03" * 32,
        exclude=[known],
    )
    assert [p["alg"] for p in options["pubKeyCredParams"]] == [-7, -8, -257]
    assert options["attestation"] == "none"
    assert options["rp"]["id"] == "localhost"
    assert options["user"]["id"] == b64(b"\x02" * 64)
    assert options["excludeCredentials"] == [
        {"id": b64(b"\x01" * 16), "type": "public-key", "transports": ["usb", "nfc"]}
    ]
    assert options["authenticatorSelection"]["residentKey"] == "preferred"
    request = authentication_options(
        DEV, challenge=b"\x04" * 32, allow=[], require_user_verification=True
    )
    assert request["allowCredentials"] == [] and request["userVerification"] == "required"


def test_challenges_and_handles_are_random_and_long_enough() -> None:
    challenges = {new_challenge() for _ in range(50)}
    assert len(challenges) == 50 and all(len(c) * 8 >= 64 for c in challenges)
    assert len(new_user_handle()) == 64


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"challenge": b64(b"another challenge!")}, "challenge"),
        ({"origin": "https://evil.example"}, "origin"),
        ({"origin": "http://localhost.evil.example:5000"}, "origin"),
        ({"rp_id": "evil.example"}, "rp_id"),
        ({"up": False}, "user_presence"),
        ({"type_": "webauthn.get"}, "type"),
    ],
)
def test_registration_faults_are_rejected(fault: dict[str, Any], reason: str) -> None:
    with pytest.raises(CeremonyRejected) as caught:
        _register(SoftKey(), **fault)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"challenge": b64(b"another challenge!")}, "challenge"),
        ({"origin": "https://evil.example"}, "origin"),
        ({"rp_id": "evil.example"}, "rp_id"),
        ({"up": False}, "user_presence"),
        ({"tamper_signature": True}, "signature"),
    ],
)
def test_assertion_faults_are_rejected(fault: dict[str, Any], reason: str) -> None:
    key = SoftKey()
    new, _, _ = _register(key)
    with pytest.raises(CeremonyRejected) as caught:
        _assert(key, new.public_key, 0, **fault)
    assert caught.value.reason == reason


def test_user_verification_is_enforced_only_when_required() -> None:
    key = SoftKey(uv=False)
    new, _, _ = _register(key)
    assert not new.user_verified
    assert not _assert(key, new.public_key, 0).user_verified  # presence suffices here
    with pytest.raises(CeremonyRejected) as caught:
        _assert(key, new.public_key, 1, require_uv=True)
    assert caught.value.reason == "user_verification"


def test_another_keys_signature_does_not_verify() -> None:
    mine, thief = SoftKey(), SoftKey()
    new, _, _ = _register(mine)
    _register(thief)
    thief.credential_id = mine.credential_id
    with pytest.raises(CeremonyRejected) as caught:
        _assert(thief, new.public_key, 0)
    assert caught.value.reason == "signature"


def test_counter_must_increase_when_either_side_is_non_zero() -> None:
    key = SoftKey()
    new, _, _ = _register(key)
    assert _assert(key, new.public_key, 0, counter=5).new_sign_count == 5
    for stale in (5, 4):
        with pytest.raises(CounterNotIncreased) as caught:
            _assert(key, new.public_key, 5, counter=stale)
        assert caught.value.reason == "counter" and caught.value.stored == 5
    with pytest.raises(CounterNotIncreased):  # a clone that reports 0 after real use
        _assert(key, new.public_key, 7, counter=0)
    # A provider without counters (always 0) is fine while the stored value is 0 too.
    assert _assert(key, new.public_key, 0, counter=0).new_sign_count == 0


def test_counter_is_judged_only_after_the_signature() -> None:
    """A forged response must not be able to mark a key as cloned."""
    key = SoftKey()
    new, _, _ = _register(key)
    with pytest.raises(CeremonyRejected) as caught:
        _assert(key, new.public_key, 9, counter=1, tamper_signature=True)
    assert caught.value.reason == "signature"


def test_claim_reads_credential_id_and_user_handle() -> None:
    key = SoftKey()
    _register(key)
    response = key.get({"challenge": b64(b"c" * 32), "rpId": "localhost"})
    claim = assertion_claim(response)
    assert claim.credential_id == key.credential_id and claim.user_handle == key.user_handle
    assert response_challenge(response) == b"c" * 32
    plain = SoftKey(resident=False)
    _register(plain)
    assert assertion_claim(plain.get({"challenge": b64(b"c" * 32)})).user_handle is None


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        json.dumps({"id": 1}),
        json.dumps({"id": "x", "rawId": "x", "type": "public-key", "response": {}}),
        json.dumps({"x": "A" * 20_000}),
        42,
    ],
)
def test_malformed_responses_are_rejected(raw: object) -> None:
    with pytest.raises(CeremonyRejected) as caught:
        response = parse_response(raw)
        verify_registration(DEV, response, challenge=new_challenge())
    assert caught.value.reason in {"malformed", "too_large"}


def _truncations() -> st.SearchStrategy[tuple[str, int]]:
    return st.tuples(st.sampled_from(["attestationObject", "clientDataJSON"]), st.integers(0, 400))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=_truncations(), flip=st.integers(0, 399))
def test_truncated_or_flipped_registration_is_a_clean_rejection(
    cut: tuple[str, int], flip: int
) -> None:
    """Truncated CBOR, a flipped byte: a CeremonyRejected, never another exception."""
    key = SoftKey()
    challenge = new_challenge()
    options = registration_options(
        DEV,
        user_handle=new_user_handle(),
        user_name="a",
        display_name="a",
        challenge=challenge,
        exclude=[],
    )
    response = key.create(options)
    field, length = cut
    data = bytearray(websafe_decode(response["response"][field]))
    if flip < len(data):
        data[flip] ^= 0xFF
    mutated = bytes(data[: length or len(data)])
    assume(mutated != websafe_decode(response["response"][field]))
    response["response"][field] = b64(mutated)
    # With attestation "none" nothing signs a registration, so a flipped AAGUID byte may
    # pass; what must never happen is any other exception (a 500 in the web layer).
    with contextlib.suppress(CeremonyRejected):
        verify_registration(DEV, response, challenge=challenge)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 120), flip=st.integers(0, 119))
def test_truncated_or_flipped_assertion_is_a_clean_rejection(length: int, flip: int) -> None:
    key = SoftKey()
    new, _, _ = _register(key)
    challenge = new_challenge()
    response = key.get({"challenge": b64(challenge)})
    data = bytearray(websafe_decode(response["response"]["authenticatorData"]))
    if flip < len(data):
        data[flip] ^= 0x01
    mutated = bytes(data[: length or len(data)])
    assume(mutated != websafe_decode(response["response"]["authenticatorData"]))
    response["response"]["authenticatorData"] = b64(mutated)
    with pytest.raises(CeremonyRejected):
        verify_assertion(
            DEV,
            response,
            challenge=challenge,
            public_key=new.public_key,
            stored_sign_count=0,
            require_user_verification=False,
        )


# -- origins and settings ----------------------------------------------------------------------
def test_development_accepts_localhost_on_any_port_only() -> None:
    assert DEV.rp_id == "localhost"
    for origin in ("http://localhost:5000", "http://localhost:61234", "http://localhost"):
        assert DEV.origin_allowed(origin), origin
    for origin in (
        "http://127.0.0.1:5000",
        "http://localhost.evil.example",
        "http://evil.example",
        "http://localhost:5000/path",
        "http://user@localhost:5000",
        "http://localhost:99999",
        "",
    ):
        assert not DEV.origin_allowed(origin), origin


def test_configured_origins_are_exact() -> None:
    rp = relying_party("qpki.example.org", ())
    assert rp.origins == ("https://qpki.example.org",) and not rp.origin_allowed(ORIGIN)
    rp = relying_party("example.org", ("https://qpki.example.org", "https://id.example.org"))
    assert rp.origin_allowed("https://id.example.org")
    assert not rp.origin_allowed("https://example.org")


def test_verification_uses_the_configured_rp() -> None:
    rp = relying_party("qpki.example.org", ())
    key = SoftKey()
    with pytest.raises(CeremonyRejected) as caught:
        _register(key, rp)  # signed for localhost, served at http://localhost:5000
    assert caught.value.reason == "origin"
    new, _, _ = _register(key, rp, origin="https://qpki.example.org")
    assert new.credential_id == key.credential_id


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"QPKI_DATA_DIR": str(tmp_path / "data"), **values}


def test_https_without_rp_id_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="QPKI_WEBAUTHN_RP_ID"):
        Settings.from_env(_env(tmp_path, QPKI_HTTPS="1"))
    ok = Settings.from_env(
        _env(
            tmp_path,
            QPKI_HTTPS="1",
            QPKI_WEBAUTHN_RP_ID="Example.org",
            QPKI_WEBAUTHN_ORIGINS="https://qpki.example.org/, https://example.org",
        )
    )
    assert ok.webauthn_rp_id == "example.org"
    assert ok.webauthn_origins == ("https://qpki.example.org", "https://example.org")
    plain = Settings.from_env(_env(tmp_path))
    assert plain.webauthn_rp_id is None and plain.webauthn_origins == ()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"QPKI_WEBAUTHN_RP_ID": "https://qpki.example.org"}, "bare domain"),
        ({"QPKI_WEBAUTHN_RP_ID": "qpki.example.org:443"}, "bare domain"),
        ({"QPKI_WEBAUTHN_ORIGINS": "https://qpki.example.org"}, "needs QPKI_WEBAUTHN_RP_ID"),
        (
            {"QPKI_WEBAUTHN_RP_ID": "example.org", "QPKI_WEBAUTHN_ORIGINS": "https://evil.org"},
            "subdomain",
        ),
        (
            {"QPKI_WEBAUTHN_RP_ID": "example.org", "QPKI_WEBAUTHN_ORIGINS": "http://example.org"},
            "only on localhost",
        ),
    ],
)
def test_bad_webauthn_settings_say_what_is_wrong(
    tmp_path: Path, values: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(_env(tmp_path, **values))
