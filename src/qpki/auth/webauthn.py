"""Passkey and security-key ceremonies (WebAuthn): options out, responses checked. No Flask, no DB.

Everything cryptographic and every byte of CBOR/COSE is py_webauthn's (``webauthn`` 3.x); this
module decides the policy around it:

* which algorithms are accepted (ES256, EdDSA, RS256 — passed explicitly, since py_webauthn 3.0
  narrowed its defaults), attestation ``none``, a challenge of 32 random bytes;
* which origins and RP ID count (:class:`RelyingParty`, from ``QPKI_WEBAUTHN_RP_ID`` and
  ``QPKI_WEBAUTHN_ORIGINS``; with neither, ``http://localhost`` on any port, for development);
* the signature counter rule (checklist §12.1): a counter that does not increase, when either
  value is non-zero, is refused as a suspected clone — only after the signature is verified, so
  nobody without the key can make a credential look cloned.

Hostile or malformed input of any shape (truncated CBOR, wrong types, oversized JSON) becomes a
:class:`CeremonyRejected` with a short ``reason`` for the audit trail; library exception text is
never shown to users.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

# py_webauthn (with cbor2, pyasn1, pyOpenSSL and cryptography's X.509) is imported inside the
# functions that use it, on the first ceremony: a worker that only signs users in with
# passwords and TOTP never loads it (about 6 MB per gunicorn worker, benchmark B6).
if TYPE_CHECKING:
    from webauthn.helpers.cose import COSEAlgorithmIdentifier
    from webauthn.helpers.structs import PublicKeyCredentialDescriptor


def _algorithms() -> list[COSEAlgorithmIdentifier]:
    """Explicit, in order of preference (the browser picks the first its authenticator
    supports)."""
    from webauthn.helpers.cose import COSEAlgorithmIdentifier

    return [
        COSEAlgorithmIdentifier.ECDSA_SHA_256,
        COSEAlgorithmIdentifier.EDDSA,
        COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
    ]


CHALLENGE_BYTES = 32  # 256 bits from the CSPRNG (checklist §9.2 asks for at least 64)
USER_HANDLE_BYTES = 64  # the largest user handle WebAuthn allows: random, never the user id
TIMEOUT_MS = 300_000  # the browser's hint; the server-side challenge also lives 5 minutes
# A real response is 1-3 KB (an RSA key with a long attestation chain stays under 8 KB).
MAX_RESPONSE_CHARS = 16_384
MAX_CREDENTIAL_ID_BYTES = 1023  # WebAuthn L2 §5.8.3
LOCALHOST = "localhost"

# Failures a response can have; the audit trail records these words.
REASONS = (
    "malformed",
    "too_large",
    "challenge",
    "origin",
    "rp_id",
    "user_presence",
    "user_verification",
    "signature",
    "algorithm",
    "attestation",
    "counter",
    "type",
)


class CeremonyRejected(Exception):
    """A response that must not be accepted; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class CounterNotIncreased(CeremonyRejected):
    """The signature is valid but the counter went backwards or stood still: a clone?"""

    def __init__(self, stored: int, received: int) -> None:
        super().__init__("counter", f"stored {stored}, received {received}")
        self.stored = stored
        self.received = received


@dataclass(frozen=True)
class RelyingParty:
    """Who we are to authenticators: the RP ID and the origins pages are served from.

    With ``any_localhost_port`` (no settings at all), ``http://localhost:<any port>`` and
    ``https://localhost:<any port>`` are accepted, so a development server works on whatever
    port it was given. Otherwise the origin must be one of ``origins`` exactly.
    """

    rp_id: str = LOCALHOST
    name: str = "qPKI"
    origins: tuple[str, ...] = ()
    any_localhost_port: bool = True

    def origin_allowed(self, origin: str) -> bool:
        if origin in self.origins:
            return True
        if not self.any_localhost_port:
            return False
        try:
            parts = urlsplit(origin)
            port = parts.port
        except ValueError:
            return False
        return (
            parts.scheme in ("http", "https")
            and parts.hostname == LOCALHOST
            and origin == f"{parts.scheme}://{LOCALHOST}" + (f":{port}" if port else "")
        )


def relying_party(
    rp_id: str | None, origins: tuple[str, ...], *, name: str = "qPKI"
) -> RelyingParty:
    """The relying party for settings (already validated by qpki.config)."""
    if not rp_id:
        return RelyingParty(LOCALHOST, name, origins, any_localhost_port=not origins)
    return RelyingParty(rp_id, name, origins or (f"https://{rp_id}",), any_localhost_port=False)


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_BYTES)


def new_user_handle() -> bytes:
    return secrets.token_bytes(USER_HANDLE_BYTES)


def encode(data: bytes) -> str:
    """base64url without padding, as WebAuthn's JSON forms use."""
    from webauthn.helpers import bytes_to_base64url

    return bytes_to_base64url(data)


def decode(text: str) -> bytes:
    """The bytes of a base64url string; CeremonyRejected("malformed") when it is not one."""
    from webauthn.helpers import base64url_to_bytes

    try:
        return base64url_to_bytes(text)
    except (ValueError, TypeError) as exc:
        raise CeremonyRejected("malformed", "not base64url") from exc


@dataclass(frozen=True)
class KnownCredential:
    """A registered credential as the options need it: its id and how it was reachable."""

    credential_id: bytes
    transports: tuple[str, ...] = ()


def _descriptors(known: list[KnownCredential]) -> list[PublicKeyCredentialDescriptor]:
    from webauthn.helpers.structs import AuthenticatorTransport, PublicKeyCredentialDescriptor

    out = []
    for cred in known:
        transports = [AuthenticatorTransport(t) for t in cred.transports if _is_transport(t)]
        out.append(PublicKeyCredentialDescriptor(id=cred.credential_id, transports=transports))
    return out


def _is_transport(value: str) -> bool:
    from webauthn.helpers.structs import AuthenticatorTransport

    return value in {t.value for t in AuthenticatorTransport}


def registration_options(
    rp: RelyingParty,
    *,
    user_handle: bytes,
    user_name: str,
    display_name: str,
    challenge: bytes,
    exclude: list[KnownCredential],
) -> dict[str, Any]:
    """``PublicKeyCredentialCreationOptions`` as JSON-ready data for ``navigator.credentials
    .create``. A passkey (discoverable credential) is preferred, not required, so a plain USB
    security key registers too; ``excludeCredentials`` stops registering one key twice."""
    from webauthn import generate_registration_options, options_to_json
    from webauthn.helpers.structs import (
        AttestationConveyancePreference,
        AuthenticatorSelectionCriteria,
        ResidentKeyRequirement,
        UserVerificationRequirement,
    )

    options = generate_registration_options(
        rp_id=rp.rp_id,
        rp_name=rp.name,
        user_name=user_name,
        user_id=user_handle,
        user_display_name=display_name,
        challenge=challenge,
        timeout=TIMEOUT_MS,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            user_verification=UserVerificationRequirement.PREFERRED,
        ),
        exclude_credentials=_descriptors(exclude),
        supported_pub_key_algs=_algorithms(),
    )
    data: dict[str, Any] = json.loads(options_to_json(options))
    data["extensions"] = {"credProps": True}  # tells us whether the key kept a passkey
    return data


def authentication_options(
    rp: RelyingParty,
    *,
    challenge: bytes,
    allow: list[KnownCredential],
    require_user_verification: bool,
) -> dict[str, Any]:
    """``PublicKeyCredentialRequestOptions`` as JSON-ready data. An empty ``allow`` asks for a
    discoverable credential (a passkey), as passwordless sign-in does."""
    from webauthn import generate_authentication_options, options_to_json
    from webauthn.helpers.structs import UserVerificationRequirement

    options = generate_authentication_options(
        rp_id=rp.rp_id,
        challenge=challenge,
        timeout=TIMEOUT_MS,
        allow_credentials=_descriptors(allow),
        user_verification=(
            UserVerificationRequirement.REQUIRED
            if require_user_verification
            else UserVerificationRequirement.PREFERRED
        ),
    )
    data: dict[str, Any] = json.loads(options_to_json(options))
    return data


# -- reading responses -----------------------------------------------------------------------
def parse_response(raw: object) -> dict[str, Any]:
    """The browser's credential as a JSON object, refused when oversized or not an object."""
    if isinstance(raw, str):
        if len(raw) > MAX_RESPONSE_CHARS:
            raise CeremonyRejected("too_large", f"{len(raw)} characters")
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise CeremonyRejected("malformed", "not JSON") from exc
    if not isinstance(raw, dict):
        raise CeremonyRejected("malformed", "not a JSON object")
    size = len(json.dumps(raw, separators=(",", ":")))
    if size > MAX_RESPONSE_CHARS:
        raise CeremonyRejected("too_large", f"{size} characters")
    return raw


def response_challenge(response: dict[str, Any]) -> bytes:
    """The challenge a response answers (read from its clientDataJSON), to find the ceremony
    it belongs to. Checked for real by the verification."""
    from webauthn.helpers import parse_client_data_json
    from webauthn.helpers.exceptions import WebAuthnException

    inner = response.get("response")
    client_data = inner.get("clientDataJSON") if isinstance(inner, dict) else None
    if not isinstance(client_data, str):
        raise CeremonyRejected("malformed", "no clientDataJSON")
    try:
        challenge = parse_client_data_json(decode(client_data)).challenge
    except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
        raise CeremonyRejected("malformed", "clientDataJSON") from exc
    if not isinstance(challenge, bytes) or not challenge:
        raise CeremonyRejected("malformed", "no challenge")
    return challenge


def _origin_of(response: dict[str, Any]) -> str:
    from webauthn.helpers import parse_client_data_json
    from webauthn.helpers.exceptions import WebAuthnException

    inner = response.get("response")
    client_data = inner.get("clientDataJSON") if isinstance(inner, dict) else None
    if not isinstance(client_data, str):
        raise CeremonyRejected("malformed", "no clientDataJSON")
    try:
        origin = parse_client_data_json(decode(client_data)).origin
    except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
        raise CeremonyRejected("malformed", "clientDataJSON") from exc
    return origin if isinstance(origin, str) else ""


def _checked_origin(rp: RelyingParty, response: dict[str, Any]) -> str:
    origin = _origin_of(response)
    if not rp.origin_allowed(origin):
        raise CeremonyRejected("origin", origin[:100])
    return origin


@dataclass(frozen=True)
class AssertionClaim:
    """Who an assertion says it is, before it is verified: the credential, and the user
    handle the authenticator returned (always, for a passkey)."""

    credential_id: bytes
    user_handle: bytes | None


def assertion_claim(response: dict[str, Any]) -> AssertionClaim:
    """Read the credential id (and user handle) to look the credential up by."""
    from webauthn.helpers import parse_authentication_credential_json
    from webauthn.helpers.exceptions import WebAuthnException

    try:
        parsed = parse_authentication_credential_json(response)
    except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
        raise CeremonyRejected("malformed", "credential") from exc
    if not parsed.raw_id or len(parsed.raw_id) > MAX_CREDENTIAL_ID_BYTES:
        raise CeremonyRejected("malformed", "credential id")
    handle = parsed.response.user_handle
    return AssertionClaim(parsed.raw_id, bytes(handle) if handle else None)


def _reason_of(message: str) -> str:
    """Map py_webauthn's message to one of our reasons (the library's text is not shown)."""
    text = message.lower()
    for needle, reason in (
        ("challenge", "challenge"),
        ("origin", "origin"),
        ("rp id", "rp_id"),
        ("user presence", "user_presence"),
        ("not present", "user_presence"),
        ("user verification", "user_verification"),
        ("signature", "signature"),
        ("alg", "algorithm"),
        ("attestation", "attestation"),
        ("type", "type"),
    ):
        if needle in text:
            return reason
    return "malformed"


def _library_failures() -> tuple[type[Exception], ...]:
    """Library failures on hostile input: its own exceptions, and the ValueError/TypeError/
    KeyError family its parsers (cbor2, cryptography, struct) raise on truncated or ill-typed
    data."""
    from webauthn.helpers.exceptions import WebAuthnException

    return (WebAuthnException, ValueError, TypeError, KeyError, IndexError, OverflowError)


@dataclass(frozen=True)
class NewCredential:
    """A verified registration, ready to store."""

    credential_id: bytes
    public_key: bytes
    sign_count: int
    transports: tuple[str, ...]
    aaguid: str
    backup_eligible: bool
    backed_up: bool
    user_verified: bool


def verify_registration(
    rp: RelyingParty, response: dict[str, Any], *, challenge: bytes
) -> NewCredential:
    """Check a ``navigator.credentials.create`` response against our challenge, origins, RP
    ID and algorithms, with attestation ``none`` (no vendor list is kept)."""
    from webauthn import verify_registration_response

    origin = _checked_origin(rp, response)
    try:
        verified = verify_registration_response(
            credential=response,
            expected_challenge=challenge,
            expected_rp_id=rp.rp_id,
            expected_origin=origin,
            require_user_presence=True,
            require_user_verification=False,
            supported_pub_key_algs=_algorithms(),
        )
    except _library_failures() as exc:
        raise CeremonyRejected(_reason_of(str(exc)), str(exc)[:200]) from exc
    if len(verified.credential_id) > MAX_CREDENTIAL_ID_BYTES:
        raise CeremonyRejected("malformed", "credential id too long")
    inner = response.get("response")
    raw_transports = inner.get("transports") if isinstance(inner, dict) else None
    transports = tuple(
        t
        for t in (raw_transports if isinstance(raw_transports, list) else [])
        if isinstance(t, str) and _is_transport(t)
    )
    return NewCredential(
        credential_id=verified.credential_id,
        public_key=verified.credential_public_key,
        sign_count=verified.sign_count,
        transports=transports,
        aaguid=verified.aaguid,
        backup_eligible=verified.credential_device_type == "multi_device",
        backed_up=verified.credential_backed_up,
        user_verified=verified.user_verified,
    )


@dataclass(frozen=True)
class VerifiedAssertion:
    """A verified ``navigator.credentials.get`` response."""

    new_sign_count: int
    user_verified: bool
    backed_up: bool


def verify_assertion(
    rp: RelyingParty,
    response: dict[str, Any],
    *,
    challenge: bytes,
    public_key: bytes,
    stored_sign_count: int,
    require_user_verification: bool,
) -> VerifiedAssertion:
    """Check an assertion with the stored public key; then the counter rule (§12.1).

    py_webauthn's own counter check is given 0 so that it verifies the signature first and
    our :class:`CounterNotIncreased` can tell a clone apart from a bad response.
    """
    from webauthn import verify_authentication_response

    origin = _checked_origin(rp, response)
    try:
        verified = verify_authentication_response(
            credential=response,
            expected_challenge=challenge,
            expected_rp_id=rp.rp_id,
            expected_origin=origin,
            credential_public_key=public_key,
            credential_current_sign_count=0,
            require_user_verification=require_user_verification,
        )
    except _library_failures() as exc:
        raise CeremonyRejected(_reason_of(str(exc)), str(exc)[:200]) from exc
    received = verified.new_sign_count
    if (received or stored_sign_count) and received <= stored_sign_count:
        raise CounterNotIncreased(stored_sign_count, received)
    return VerifiedAssertion(received, verified.user_verified, verified.credential_backed_up)
