"""A software authenticator for tests: real WebAuthn responses, built with python-fido2's data
classes (CBOR, COSE keys, authenticator data) and signed with ``cryptography``.

It answers the options qPKI sends exactly as a browser plus an authenticator would, and can be
told to misbehave (another origin or RP ID, flags cleared, a counter that goes back) so the
tests see the verification refuse each fault on real, correctly signed data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from fido2 import cose
from fido2.utils import websafe_decode, websafe_encode
from fido2.webauthn import (
    AttestationObject,
    AttestedCredentialData,
    AuthenticatorData,
    CollectedClientData,
)

ORIGIN = "http://localhost:5000"
RP_ID = "localhost"
FLAG = AuthenticatorData.FLAG
AAGUID = bytes.fromhex("f8a011f38c0a4d15800617111f9edc7d")


def b64(data: bytes) -> str:
    return websafe_encode(data)


@dataclass
class SoftKey:
    """One credential on a software authenticator.

    ``resident``: a passkey (returns the user handle); ``uv``: verifies the user (PIN or
    biometric); ``alg``: "ES256", "EdDSA" or "RS256"; ``counter_step`` 0 models a passkey
    provider that keeps no counter.
    """

    alg: str = "ES256"
    resident: bool = True
    uv: bool = True
    backup_eligible: bool = False
    backed_up: bool = False
    counter_step: int = 1
    transports: tuple[str, ...] = ("usb",)
    credential_id: bytes = field(default_factory=lambda: os.urandom(32))
    counter: int = 0
    user_handle: bytes | None = None

    def __post_init__(self) -> None:
        if self.alg == "ES256":
            self._key: Any = ec.generate_private_key(ec.SECP256R1())
            self._cose: cose.CoseKey = cose.ES256.from_cryptography_key(self._key.public_key())
        elif self.alg == "EdDSA":
            self._key = ed25519.Ed25519PrivateKey.generate()
            self._cose = cose.EdDSA.from_cryptography_key(self._key.public_key())
        elif self.alg == "RS256":
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self._cose = cose.RS256.from_cryptography_key(self._key.public_key())
        else:
            raise ValueError(self.alg)

    # -- navigator.credentials.create ----------------------------------------------------------
    def create(
        self,
        options: dict[str, Any],
        *,
        origin: str = ORIGIN,
        rp_id: str | None = None,
        challenge: str | None = None,
        up: bool = True,
        type_: str = "webauthn.create",
    ) -> dict[str, Any]:
        """The JSON a browser sends back after ``navigator.credentials.create(options)``."""
        self.user_handle = websafe_decode(options["user"]["id"])
        client_data = CollectedClientData.create(type_, challenge or options["challenge"], origin)
        attested = AttestedCredentialData.create(AAGUID, self.credential_id, self._cose)
        auth_data = AuthenticatorData.create(
            hashlib.sha256((rp_id or options["rp"]["id"]).encode()).digest(),
            self._flags(up=up, uv=self.uv) | FLAG.AT,
            self.counter,
            attested,
        )
        attestation = AttestationObject.create("none", auth_data, {})
        return {
            "id": b64(self.credential_id),
            "rawId": b64(self.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64(client_data),
                "attestationObject": b64(attestation),
                "transports": list(self.transports),
            },
            "clientExtensionResults": {"credProps": {"rk": self.resident}},
            "authenticatorAttachment": "cross-platform",
        }

    # -- navigator.credentials.get -------------------------------------------------------------
    def get(
        self,
        options: dict[str, Any],
        *,
        origin: str = ORIGIN,
        rp_id: str | None = None,
        challenge: str | None = None,
        up: bool = True,
        uv: bool | None = None,
        counter: int | None = None,
        tamper_signature: bool = False,
        user_handle: bytes | None = None,
    ) -> dict[str, Any]:
        """The JSON a browser sends back after ``navigator.credentials.get(options)``."""
        if counter is None:
            self.counter += self.counter_step
            counter = self.counter
        client_data = CollectedClientData.create(
            "webauthn.get", challenge or options["challenge"], origin
        )
        auth_data = AuthenticatorData.create(
            hashlib.sha256((rp_id or options.get("rpId") or RP_ID).encode()).digest(),
            self._flags(up=up, uv=self.uv if uv is None else uv),
            counter,
        )
        signature = self._sign(bytes(auth_data) + hashlib.sha256(client_data).digest())
        if tamper_signature:
            signature = signature[:-1] + bytes([signature[-1] ^ 1])
        handle = user_handle if user_handle is not None else self.user_handle
        response: dict[str, Any] = {
            "clientDataJSON": b64(client_data),
            "authenticatorData": b64(auth_data),
            "signature": b64(signature),
        }
        if self.resident and handle:
            response["userHandle"] = b64(handle)
        return {
            "id": b64(self.credential_id),
            "rawId": b64(self.credential_id),
            "type": "public-key",
            "response": response,
            "clientExtensionResults": {},
            "authenticatorAttachment": "cross-platform",
        }

    def _flags(self, *, up: bool, uv: bool) -> AuthenticatorData.FLAG:
        flags = FLAG(0)
        if up:
            flags |= FLAG.UP
        if uv:
            flags |= FLAG.UV
        if self.backup_eligible:
            flags |= FLAG.BE
        if self.backed_up:
            flags |= FLAG.BS
        return flags

    def _sign(self, data: bytes) -> bytes:
        if self.alg == "ES256":
            return bytes(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        if self.alg == "EdDSA":
            return bytes(self._key.sign(data))
        return bytes(self._key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
