"""Passkeys and security keys: registering, renaming and removing them, and using them to sign
in (as the second factor, or alone as a passkey) and to step up.

Each ceremony is two requests. ``begin_*`` stores a random challenge server-side, bound to the
session that asked (the pending sign-in, the signed-in session, or for a passwordless sign-in
a random value kept in the signed cookie) and valid for five minutes; ``finish_*`` claims it
with one conditional DELETE — so it is used once, by whichever worker or instance receives the
answer — and verifies the response with the pure core :mod:`qpki.auth.webauthn`.

Every finish is one write transaction with its audit record inside. A response that fails
(wrong challenge, origin, RP ID, flags, signature, malformed data, a counter that went back)
is audited and the transaction commits the record; nothing else is stored, and the caller gets
a :class:`CeremonyRefused` with a message chosen here.

Whose credential it is, is always checked against the user the session is for (checklist
§12.3; Flask-Security's GHSA-f66q-9rf6-8795 accepted another user's passkey at re-auth).
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth import errors
from qpki.auth.errors import AuthError, PermissionDenied
from qpki.auth.mfa import MFAManager
from qpki.auth.models import User, UserSession
from qpki.auth.services.admin_rule import refused_as_admin
from qpki.auth.services.common import (
    Client,
    ThrottleGate,
    actor_fields,
    audit_own,
    load_user,
    refusal_for,
)
from qpki.auth.services.devices import KnownDevices
from qpki.auth.services.factors import (
    FACTOR_REQUIRED,
    clear_factors,
    issue_backup_codes,
)
from qpki.auth.services.policy import PolicyService
from qpki.auth.services.signin import SignInService
from qpki.auth.services.step_up import StepUpService
from qpki.auth.sessions import SessionStore, token_digest
from qpki.auth.webauthn import (
    AssertionClaim,
    CeremonyRejected,
    CounterNotIncreased,
    KnownCredential,
    NewCredential,
    RelyingParty,
    assertion_claim,
    authentication_options,
    decode,
    encode,
    new_challenge,
    new_user_handle,
    parse_response,
    registration_options,
    response_challenge,
    verify_assertion,
    verify_registration,
)
from qpki.auth.webauthn_models import WebAuthnChallenge, WebAuthnCredential, WebAuthnUserHandle
from qpki.clock import Clock
from qpki.db.manager import DatabaseManager
from qpki.mail.alerts import Alert
from qpki.mail.notifier import Notifier

log = logging.getLogger(__name__)

CHALLENGE_LIFETIME = timedelta(minutes=5)
MAX_KEYS = 10
MAX_NAME_LENGTH = 64
# Ceremonies one session may have open per purpose (a second tab, a retried click).
MAX_OPEN_CEREMONIES = 5

REGISTER = "register"
SECOND_FACTOR = "second_factor"
PASSWORDLESS = "passwordless"
STEP_UP = "step_up"

METHOD = "webauthn"

# Messages users see (chosen here, never built from a library's exception text).
CEREMONY_EXPIRED = "This request has expired or was already used. Please try again."
KEY_NOT_ACCEPTED = "That security key was not accepted. Please try again."
UNKNOWN_KEY = "That security key is not registered for this account."
CLONE_REFUSED = (
    "That security key was refused: its use counter went backwards, which happens when a key "
    "has been copied. Use another method and tell your administrator."
)
PASSKEY_NEEDS_UV = (
    "Signing in with a passkey alone needs your device to check it is you (PIN, fingerprint or "
    "face). Sign in with your password instead."
)
STEP_UP_NEEDED = "Confirm it is you first."
ALREADY_REGISTERED = "This security key is already registered."


class CeremonyRefused(AuthError):
    """A ceremony that did not succeed. ``reason`` is for the caller's status code and the
    tests: "expired", "rejected", "clone", "unknown_key", "foreign_key", "step_up",
    "invalid", "limit", "duplicate", "confirm_last", "throttled", "locked", "session"."""

    def __init__(self, message: str, reason: str, *, retry_at: datetime | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_at = retry_at


@dataclass(frozen=True)
class KeyInfo:
    """A registered key as pages and the CLI show it."""

    id: int
    user_id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None
    backup_eligible: bool
    backed_up: bool
    transports: tuple[str, ...]
    aaguid: str

    @property
    def synced(self) -> bool:
        """A passkey kept in a synced store (a password manager, a platform account)."""
        return self.backed_up


@dataclass(frozen=True)
class Registered:
    """A new key: its name, and the backup codes when it was the user's first factor."""

    name: str
    backup_codes: list[str] | None = None


@dataclass(frozen=True)
class SignedIn:
    """A full session opened with a key."""

    user_id: int
    token: str
    device_token: str | None
    remember_cookie: str | None = None  # the box "don't ask on this device" was ticked


@dataclass(frozen=True)
class Removed:
    """A removed key, and whether that turned two-factor authentication off."""

    name: str
    two_factor_off: bool


def _info(row: WebAuthnCredential) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        backup_eligible=row.backup_eligible,
        backed_up=row.backed_up,
        transports=tuple(t for t in row.transports.split(",") if t),
        aaguid=row.aaguid,
    )


def clean_name(raw: str) -> str:
    """A key's name as stored: trimmed, NFC, 1-64 printable characters; else ValueError."""
    name = unicodedata.normalize("NFC", (raw or "").strip())
    if not name:
        raise ValueError("Give the key a name, for example “YubiKey on my keyring”.")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"A key's name can be at most {MAX_NAME_LENGTH} characters.")
    # Control, surrogate, private-use and unassigned characters; format characters (the
    # zero-width joiner inside an emoji) are fine.
    if any(unicodedata.category(ch) in {"Cc", "Cs", "Co", "Cn"} for ch in name):
        raise ValueError("A key's name cannot contain control characters.")
    return name


class WebAuthnService:
    """Passkey and security-key use cases over one database, audit log and relying party."""

    def __init__(
        self,
        db: DatabaseManager,
        audit: AuditLog,
        clock: Clock,
        notifier: Notifier,
        *,
        rp: RelyingParty,
        mfa: MFAManager,
        sessions: SessionStore,
        signin: SignInService,
        step_up: StepUpService,
        gate: ThrottleGate,
        devices: KnownDevices,
        policy: PolicyService,
        challenge_lifetime: timedelta = CHALLENGE_LIFETIME,
    ) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.notifier = notifier
        self.rp = rp
        self.mfa = mfa
        self.sessions = sessions
        self.signin = signin
        self.step_up = step_up
        self.gate = gate
        self.devices = devices
        self.policy = policy
        self.challenge_lifetime = challenge_lifetime

    # -- reading -------------------------------------------------------------------------------
    def keys_of(self, user_id: int) -> list[KeyInfo]:
        """The user's keys, oldest first."""
        with self.db.transaction(write=False) as s:
            rows = s.scalars(
                select(WebAuthnCredential)
                .where(WebAuthnCredential.user_id == user_id)
                .order_by(WebAuthnCredential.created_at, WebAuthnCredential.id)
            )
            return [_info(r) for r in rows]

    def keys_of_users(self, user_ids: list[int]) -> dict[int, list[KeyInfo]]:
        """Keys of several users at once (the admin user list): one query."""
        found: dict[int, list[KeyInfo]] = {uid: [] for uid in user_ids}
        if not user_ids:
            return found
        with self.db.transaction(write=False) as s:
            rows = s.scalars(
                select(WebAuthnCredential)
                .where(WebAuthnCredential.user_id.in_(user_ids))
                .order_by(WebAuthnCredential.created_at, WebAuthnCredential.id)
            )
            for row in rows:
                found[row.user_id].append(_info(row))
        return found

    def has_keys(self, user_id: int) -> bool:
        with self.db.transaction(write=False) as s:
            return bool(
                s.scalar(
                    select(func.count(WebAuthnCredential.id)).where(
                        WebAuthnCredential.user_id == user_id
                    )
                )
            )

    # -- registering ---------------------------------------------------------------------------
    def begin_registration(
        self, session_token: str, name: str, *, now: datetime | None = None
    ) -> dict[str, Any]:
        """Options for ``navigator.credentials.create``: a step-up action (§12.4).

        The name is checked now (so the user is not asked to touch a key for nothing) and kept
        with the challenge; it is checked again when the key comes back.
        """
        now = now or self.clock()
        try:
            name = clean_name(name)
        except ValueError as exc:
            raise CeremonyRefused(str(exc), "invalid") from None
        with self.db.transaction() as s:
            _row, user = self._fresh_session(s, session_token, now)
            self._check_room(s, user.id, name)
            handle = self._user_handle(s, user.id)
            known = self._known(s, user.id)
            challenge = self._store_challenge(
                s, REGISTER, session_token, user.id, now, payload=name
            )
            return registration_options(
                self.rp,
                user_handle=handle,
                user_name=user.username,
                display_name=user.username,
                challenge=challenge,
                exclude=known,
            )

    def finish_registration(
        self, session_token: str, raw: object, *, now: datetime | None = None
    ) -> Registered:
        """Store the new key; the first second factor also turns 2FA on, with backup codes."""
        now = now or self.clock()
        refused: CeremonyRefused | None = None
        with self.db.transaction() as s:
            _row, user = self._fresh_session(s, session_token, now)
            try:
                response = parse_response(raw)
                ceremony = self._claim(s, REGISTER, session_token, response, now)
                if ceremony is None or ceremony.user_id != user.id:
                    raise CeremonyRejected("challenge", "no open ceremony")
                new = verify_registration(self.rp, response, challenge=decode(ceremony.challenge))
            except CeremonyRejected as exc:
                self._audit_registration_failure(s, user, now, exc.reason)
                message = CEREMONY_EXPIRED if exc.reason == "challenge" else KEY_NOT_ACCEPTED
                refused = CeremonyRefused(
                    message, "expired" if exc.reason == "challenge" else "rejected"
                )
            else:
                name = ceremony.payload
                credential_id = encode(new.credential_id)
                if s.scalar(
                    select(WebAuthnCredential.id).where(
                        WebAuthnCredential.credential_id == credential_id
                    )
                ):
                    self._audit_registration_failure(s, user, now, "duplicate")
                    refused = CeremonyRefused(ALREADY_REGISTERED, "duplicate")
                else:
                    try:
                        self._check_room(s, user.id, name)
                    except CeremonyRefused as exc:
                        self._audit_registration_failure(s, user, now, exc.reason)
                        refused = exc
                if refused is None:
                    return self._store_key(s, user, session_token, new, name, credential_id, now)
        assert refused is not None
        raise refused

    def _store_key(
        self,
        s: Session,
        user: User,
        session_token: str,
        new: NewCredential,
        name: str,
        credential_id: str,
        now: datetime,
    ) -> Registered:
        s.add(
            WebAuthnCredential(
                user_id=user.id,
                credential_id=credential_id,
                public_key=new.public_key,
                sign_count=new.sign_count,
                transports=",".join(new.transports),
                aaguid=new.aaguid,
                backup_eligible=new.backup_eligible,
                backed_up=new.backed_up,
                name=name,
                created_at=now,
            )
        )
        codes: list[str] | None = None
        first = not user.two_factor_enabled
        if first:
            codes = issue_backup_codes(self.mfa, user)
            user.two_factor_enabled = True
            user.mfa_enabled_at = now
            self.policy.enrolled_in(s, user.id)
            ended = self.sessions.end_all(s, user.id, "mfa_enabled", now, keep_token=session_token)
            audit_own(
                self.audit,
                s,
                AuditEvent.MFA_ENABLED,
                user,
                at=now,
                details={
                    "method": METHOD,
                    "codes_issued": len(codes),
                    "sessions_ended": ended,
                },
            )
            self.notifier.security_alert(s, user, Alert.MFA_ENABLED, at=now)
        audit_own(
            self.audit,
            s,
            AuditEvent.WEBAUTHN_REGISTERED,
            user,
            at=now,
            details={
                "name": name,
                "aaguid": new.aaguid,
                "backup_eligible": new.backup_eligible,
                "user_verified": new.user_verified,
            },
        )
        self.notifier.security_alert(s, user, Alert.AUTHENTICATOR_ADDED, at=now, device_name=name)
        return Registered(name, codes)

    def _check_room(self, s: Session, user_id: int, name: str) -> None:
        names = list(
            s.scalars(select(WebAuthnCredential.name).where(WebAuthnCredential.user_id == user_id))
        )
        if len(names) >= MAX_KEYS:
            raise CeremonyRefused(
                f"You already have {MAX_KEYS} security keys, the most an account can have. "
                "Remove one first.",
                "limit",
            )
        if name.casefold() in {n.casefold() for n in names}:
            raise CeremonyRefused(f"You already have a key named “{name}”.", "duplicate")

    def _audit_registration_failure(
        self, s: Session, user: User, now: datetime, reason: str
    ) -> None:
        audit_own(
            self.audit,
            s,
            AuditEvent.WEBAUTHN_REGISTRATION_FAILURE,
            user,
            Outcome.FAILURE,
            at=now,
            details={"reason": reason},
        )

    # -- renaming and removing -----------------------------------------------------------------
    def rename(self, user_id: int, key_id: int, name: str, *, now: datetime | None = None) -> str:
        """Give one of the user's own keys a new name (unique among theirs)."""
        now = now or self.clock()
        try:
            name = clean_name(name)
        except ValueError as exc:
            raise CeremonyRefused(str(exc), "invalid") from None
        with self.db.transaction() as s:
            key = self._own_key(s, user_id, key_id)
            clash = s.scalar(
                select(WebAuthnCredential.id).where(
                    WebAuthnCredential.user_id == user_id,
                    func.lower(WebAuthnCredential.name) == name.lower(),
                    WebAuthnCredential.id != key_id,
                )
            )
            if clash:
                raise CeremonyRefused(f"You already have a key named “{name}”.", "duplicate")
            old, key.name = key.name, name
            user = load_user(s, user_id)
            audit_own(
                self.audit,
                s,
                AuditEvent.WEBAUTHN_RENAMED,
                user,
                at=now,
                details={"old_name": old, "name": name},
            )
        return name

    def is_last_factor(self, user_id: int) -> bool:
        """Whether removing one key would leave the user with no second factor."""
        with self.db.transaction(write=False) as s:
            user = load_user(s, user_id)
            return user.totp_secret is None and self._count(s, user_id) <= 1

    def remove(
        self,
        user_id: int,
        key_id: int,
        *,
        confirm_last: bool = False,
        keep_session_token: str | None = None,
        now: datetime | None = None,
    ) -> Removed:
        """Remove one of the user's own keys (after step-up). Removing the last second factor
        turns 2FA off, and only with ``confirm_last``: the page asks first."""
        now = now or self.clock()
        with self.db.transaction() as s:
            user = load_user(s, user_id)
            key = self._own_key(s, user_id, key_id)
            name = key.name
            last = user.totp_secret is None and self._count(s, user_id) <= 1
            if last and self.policy.must_keep_factor_in(s, user):
                raise CeremonyRefused(FACTOR_REQUIRED, "required_by_policy")
            if last and not confirm_last:
                raise CeremonyRefused(
                    f"“{name}” is your last second factor: removing it turns two-factor "
                    "authentication off. Confirm that this is what you want.",
                    "confirm_last",
                )
            s.delete(key)
            audit_own(
                self.audit,
                s,
                AuditEvent.WEBAUTHN_REMOVED,
                user,
                at=now,
                details={"name": name, "last_factor": last},
            )
            self.notifier.security_alert(
                s, user, Alert.AUTHENTICATOR_REMOVED, at=now, device_name=name
            )
            if last:
                s.flush()
                clear_factors(s, user)
                ended = self.sessions.end_all(
                    s, user_id, "mfa_disabled", now, keep_token=keep_session_token
                )
                audit_own(
                    self.audit,
                    s,
                    AuditEvent.MFA_DISABLED,
                    user,
                    at=now,
                    details={"sessions_ended": ended, "method": METHOD},
                )
                self.notifier.security_alert(s, user, Alert.MFA_DISABLED, at=now)
        return Removed(name, last)

    def admin_remove(
        self, actor: User, user_id: int, key_id: int, *, now: datetime | None = None
    ) -> Removed:
        """An administrator removes one named key of another user (a lost key). When it was
        the user's last second factor, 2FA goes off as with the emergency reset."""
        now = now or self.clock()
        with self.db.transaction() as s:
            denied = refused_as_admin(s, self.audit, actor, user_id, "webauthn_admin_remove", now)
            if denied is None:
                user = load_user(s, user_id)
                key = self._own_key(s, user_id, key_id)
                name = key.name
                last = user.totp_secret is None and self._count(s, user_id) <= 1
                s.delete(key)
                s.flush()
                ended = 0
                if last:
                    clear_factors(s, user)
                    ended = self.sessions.end_all(s, user_id, "mfa_admin_reset", now)
                self.audit.record(
                    s,
                    AuditEvent.WEBAUTHN_ADMIN_REMOVED,
                    **actor_fields(actor),
                    target_user_id=user.id,
                    target_name=user.username,
                    details={"name": name, "last_factor": last, "sessions_ended": ended},
                    at=now,
                )
                self.notifier.security_alert(
                    s,
                    user,
                    Alert.AUTHENTICATOR_REMOVED,
                    at=now,
                    device_name=name,
                    admin_name=actor.username,
                )
                if last:
                    self.notifier.security_alert(
                        s, user, Alert.MFA_DISABLED, at=now, admin_name=actor.username
                    )
                return Removed(name, last)
        raise PermissionDenied(denied)

    # -- the second factor after the password ---------------------------------------------------
    def begin_second_factor(
        self, pending_token: str, *, now: datetime | None = None
    ) -> dict[str, Any]:
        """Options listing the user's keys, for the pending sign-in of ``pending_token``."""
        now = now or self.clock()
        with self.db.transaction() as s:
            row = self.sessions.find(s, pending_token)
            if row is None or row.mfa_passed or row.ended_at is not None or row.expires_at <= now:
                raise CeremonyRefused(errors.SIGNIN_EXPIRED, "session")
            return self._key_options(s, SECOND_FACTOR, pending_token, row.user_id, now)

    def _key_options(
        self, s: Session, kind: str, token: str, user_id: int, now: datetime
    ) -> dict[str, Any]:
        """Options asking for one of the user's own keys (second factor, step-up), with a
        stored single-use challenge bound to ``token``."""
        known = self._known(s, user_id)
        if not known:
            raise CeremonyRefused(UNKNOWN_KEY, "unknown_key")
        challenge = self._store_challenge(s, kind, token, user_id, now)
        return authentication_options(
            self.rp, challenge=challenge, allow=known, require_user_verification=False
        )

    def finish_second_factor(
        self,
        pending_token: str,
        raw: object,
        *,
        client: Client | None = None,
        remember_device: bool = False,
        now: datetime | None = None,
    ) -> SignedIn:
        """Complete the sign-in with a key: the pending session is claimed (as a code would
        claim it), the key checked, and a new full session opened; all or nothing. With
        ``remember_device`` (where the role's policy allows it) the browser is remembered as
        after a code."""
        client = client or Client()
        now = now or self.clock()
        refused: CeremonyRefused | None = None
        with self.db.transaction() as s:
            pending = self.sessions.claim_pending(s, pending_token, now)
            user = s.get(User, pending.user_id) if pending is not None else None
            if pending is None or user is None or not user.is_active:
                raise CeremonyRefused(errors.SIGNIN_EXPIRED, "session")
            throttle_key = self.devices.throttle_key(
                s, user, user.username_key, client.device_token
            )
            reservation = self.gate.reserve(
                s, throttle_key, now, user=user, typed_name=user.username
            )
            if not reservation.granted:
                refusal = refusal_for(reservation.state, now)
                self._failure(s, AuditEvent.MFA_VERIFY_FAILURE, user, now, "throttled")
                self.sessions.release(s, pending)
                refused = CeremonyRefused(
                    refusal.message,
                    "locked" if refusal.locked else "throttled",
                    retry_at=refusal.retry_at,
                )
            else:
                try:
                    key = self._verify_for_user(
                        s, SECOND_FACTOR, pending_token, raw, user, now, require_uv=False
                    )
                except CeremonyRefused as exc:
                    self._failure(
                        s,
                        AuditEvent.MFA_VERIFY_FAILURE,
                        user,
                        now,
                        exc.reason,
                        failures=reservation.state.failures,
                    )
                    self.sessions.release(s, pending)
                    refused = exc
                else:
                    audit_own(
                        self.audit,
                        s,
                        AuditEvent.MFA_VERIFY_SUCCESS,
                        user,
                        at=now,
                        details={"method": METHOD, "key_name": key.name},
                    )
                    token, device_token = self.signin.open_full_session(
                        s, user, now, client, method=METHOD, throttle_key=throttle_key
                    )
                    cookie = (
                        self.signin.remember_device(s, user, now, client)
                        if remember_device
                        else None
                    )
                    return SignedIn(user.id, token, device_token, cookie)
        assert refused is not None
        raise refused

    # -- passwordless: a passkey alone -----------------------------------------------------------
    def begin_passwordless(self, binding: str, *, now: datetime | None = None) -> dict[str, Any]:
        """Options with no allowed list: the browser offers the passkeys it holds for us.
        ``binding`` is a random value the browser keeps in its signed cookie."""
        now = now or self.clock()
        with self.db.transaction() as s:
            challenge = self._store_challenge(s, PASSWORDLESS, binding, None, now)
        return authentication_options(
            self.rp, challenge=challenge, allow=[], require_user_verification=True
        )

    def finish_passwordless(
        self,
        binding: str,
        raw: object,
        *,
        client: Client | None = None,
        replaces_token: str | None = None,
        now: datetime | None = None,
    ) -> SignedIn:
        """Sign in with a discoverable credential and user verification: both factors at once
        (§12.2). The credential is looked up by its id, and the user handle it returns must
        be its owner's."""
        client = client or Client()
        now = now or self.clock()
        refused: CeremonyRefused | None = None
        with self.db.transaction() as s:
            try:
                response = parse_response(raw)
                claim = assertion_claim(response)
            except CeremonyRejected as exc:
                self._anonymous_failure(s, now, exc.reason)
                refused = CeremonyRefused(KEY_NOT_ACCEPTED, "rejected")
            else:
                key = self._key_by_id(s, claim)
                user = s.get(User, key.user_id) if key is not None else None
                if key is None or user is None or not user.is_active:
                    self._anonymous_failure(
                        s, now, "unknown_key" if key is None else "inactive", user
                    )
                    # The challenge is spent either way: one answer per ceremony.
                    self._claim(s, PASSWORDLESS, binding, response, now)
                    refused = CeremonyRefused(
                        "This passkey is not registered here (it may have been removed).",
                        "unknown_key",
                    )
                else:
                    refused = None
                    throttle_key = self.devices.throttle_key(
                        s, user, user.username_key, client.device_token
                    )
                    reservation = self.gate.reserve(
                        s, throttle_key, now, user=user, typed_name=user.username
                    )
                    if not reservation.granted:
                        refusal = refusal_for(reservation.state, now)
                        self._failure(s, AuditEvent.LOGIN_FAILURE, user, now, "throttled")
                        refused = CeremonyRefused(
                            refusal.message,
                            "locked" if refusal.locked else "throttled",
                            retry_at=refusal.retry_at,
                        )
                    else:
                        try:
                            if claim.user_handle is None:
                                self._claim(s, PASSWORDLESS, binding, response, now)
                                raise CeremonyRefused(PASSKEY_NEEDS_UV, "not_discoverable")
                            key = self._verify_for_user(
                                s, PASSWORDLESS, binding, response, user, now, require_uv=True
                            )
                        except CeremonyRefused as exc:
                            self._failure(
                                s,
                                AuditEvent.LOGIN_FAILURE,
                                user,
                                now,
                                exc.reason,
                                failures=reservation.state.failures,
                            )
                            refused = exc
                        else:
                            if replaces_token:
                                old = self.sessions.find(s, replaces_token)
                                if old is not None:
                                    self.sessions.end(s, old, "signed_in_again", now)
                            token, device_token = self.signin.open_full_session(
                                s, user, now, client, method=METHOD, throttle_key=throttle_key
                            )
                            return SignedIn(user.id, token, device_token)
        assert refused is not None
        raise refused

    # -- step-up with a key ---------------------------------------------------------------------
    def begin_step_up(self, session_token: str, *, now: datetime | None = None) -> dict[str, Any]:
        """Options listing the signed-in user's own keys."""
        now = now or self.clock()
        with self.db.transaction() as s:
            row = self._live_session(s, session_token, now)
            return self._key_options(s, STEP_UP, session_token, row.user_id, now)

    def finish_step_up(
        self,
        session_token: str,
        raw: object,
        *,
        password: str | None = None,
        client: Client | None = None,
        now: datetime | None = None,
    ) -> None:
        """Re-authenticate the session with one of its user's keys.

        With the password typed as well, user presence is enough (the key is the second
        factor); with the key alone, the key must have verified the user (PIN or biometric),
        as for a passwordless sign-in — either way two factors are proved (§12.4).
        """
        client = client or Client()
        now = now or self.clock()
        with self.db.transaction(write=False) as s:
            row = self._live_session(s, session_token, now)
            username = load_user(s, row.user_id).username
        password_ok = False
        if password:
            try:
                self.signin.check_password(username, password, client=client, now=now)
            except AuthError as exc:
                raise CeremonyRefused(exc.message, "password") from None
            password_ok = True
        refused: CeremonyRefused | None = None
        with self.db.transaction() as s:
            row = self._live_session(s, session_token, now)
            user = load_user(s, row.user_id)
            try:
                key = self._verify_for_user(
                    s, STEP_UP, session_token, raw, user, now, require_uv=not password_ok
                )
            except CeremonyRefused as exc:
                self._failure(s, AuditEvent.REAUTH_FAILURE, user, now, exc.reason)
                refused = exc
            else:
                s.execute(update(UserSession).where(UserSession.id == row.id).values(reauth_at=now))
                audit_own(
                    self.audit,
                    s,
                    AuditEvent.REAUTHENTICATED,
                    user,
                    at=now,
                    details={"method": METHOD, "key_name": key.name, "with_password": password_ok},
                )
        if refused is not None:
            raise refused

    # -- the shared steps ---------------------------------------------------------------------
    def _verify_for_user(
        self,
        s: Session,
        purpose: str,
        binding: str,
        raw: object,
        user: User,
        now: datetime,
        *,
        require_uv: bool,
    ) -> WebAuthnCredential:
        """Claim the ceremony, check the credential is ``user``'s, verify, update its counter.
        Raises CeremonyRefused (the caller audits it in the same transaction)."""
        try:
            response = parse_response(raw)
        except CeremonyRejected as exc:
            raise CeremonyRefused(KEY_NOT_ACCEPTED, exc.reason) from None
        ceremony = self._claim(s, purpose, binding, response, now)
        if ceremony is None:
            raise CeremonyRefused(CEREMONY_EXPIRED, "expired")
        if ceremony.user_id is not None and ceremony.user_id != user.id:
            raise CeremonyRefused(CEREMONY_EXPIRED, "expired")
        try:
            claim = assertion_claim(response)
        except CeremonyRejected as exc:
            raise CeremonyRefused(KEY_NOT_ACCEPTED, exc.reason) from None
        key = self._key_by_id(s, claim)
        if key is None:
            raise CeremonyRefused(UNKNOWN_KEY, "unknown_key")
        if key.user_id != user.id:
            log.warning(
                "a key of user id=%s was offered for user id=%s; refused", key.user_id, user.id
            )
            raise CeremonyRefused(UNKNOWN_KEY, "foreign_key")
        if claim.user_handle is not None and claim.user_handle != self._user_handle(s, user.id):
            raise CeremonyRefused(UNKNOWN_KEY, "user_handle")
        try:
            verified = verify_assertion(
                self.rp,
                response,
                challenge=decode(ceremony.challenge),
                public_key=key.public_key,
                stored_sign_count=key.sign_count,
                require_user_verification=require_uv,
            )
        except CounterNotIncreased as exc:
            log.warning(
                "security key %r of user id=%s: counter %d after %d, suspected clone; refused",
                key.name,
                user.id,
                exc.received,
                exc.stored,
            )
            audit_own(
                self.audit,
                s,
                AuditEvent.WEBAUTHN_CLONE_SUSPECTED,
                user,
                Outcome.FAILURE,
                at=now,
                details={"name": key.name, "stored": exc.stored, "received": exc.received},
            )
            raise CeremonyRefused(CLONE_REFUSED, "clone") from None
        except CeremonyRejected as exc:
            message = PASSKEY_NEEDS_UV if exc.reason == "user_verification" else KEY_NOT_ACCEPTED
            raise CeremonyRefused(message, exc.reason) from None
        key.sign_count = verified.new_sign_count
        key.backed_up = verified.backed_up
        key.last_used_at = now
        return key

    def _claim(
        self, s: Session, purpose: str, binding: str, response: dict[str, Any], now: datetime
    ) -> WebAuthnChallenge | None:
        """Take the ceremony this response answers, once: a conditional DELETE that only one
        request can win, on any instance. None when it is unknown, spent, expired or bound
        to another session."""
        try:
            challenge = encode(response_challenge(response))
        except CeremonyRejected:
            return None
        found = s.execute(
            delete(WebAuthnChallenge)
            .where(
                WebAuthnChallenge.challenge == challenge,
                WebAuthnChallenge.purpose == purpose,
                WebAuthnChallenge.binding_hash == token_digest(binding),
                WebAuthnChallenge.expires_at > now,
            )
            .returning(WebAuthnChallenge.user_id, WebAuthnChallenge.payload)
            .execution_options(synchronize_session=False)
        ).first()
        if found is None:
            return None
        return WebAuthnChallenge(
            challenge=challenge, purpose=purpose, user_id=found[0], payload=found[1]
        )

    def _store_challenge(
        self,
        s: Session,
        purpose: str,
        binding: str,
        user_id: int | None,
        now: datetime,
        *,
        payload: str = "",
    ) -> bytes:
        """A new challenge bound to ``binding``; expired ones (anyone's) are swept, and a
        session keeps at most a few open ceremonies per purpose."""
        digest = token_digest(binding)
        s.execute(delete(WebAuthnChallenge).where(WebAuthnChallenge.expires_at <= now))
        open_ids = list(
            s.scalars(
                select(WebAuthnChallenge.id)
                .where(
                    WebAuthnChallenge.binding_hash == digest,
                    WebAuthnChallenge.purpose == purpose,
                )
                .order_by(WebAuthnChallenge.id.desc())
                .offset(MAX_OPEN_CEREMONIES - 1)
            )
        )
        if open_ids:
            s.execute(delete(WebAuthnChallenge).where(WebAuthnChallenge.id.in_(open_ids)))
        challenge = new_challenge()
        s.add(
            WebAuthnChallenge(
                challenge=encode(challenge),
                purpose=purpose,
                binding_hash=digest,
                user_id=user_id,
                payload=payload,
                created_at=now,
                expires_at=now + self.challenge_lifetime,
            )
        )
        return challenge

    def _user_handle(self, s: Session, user_id: int) -> bytes:
        """The user's stable random handle, made on first use."""
        handle = s.scalar(
            select(WebAuthnUserHandle.handle).where(WebAuthnUserHandle.user_id == user_id)
        )
        if handle is None:
            handle = new_user_handle()
            s.add(WebAuthnUserHandle(user_id=user_id, handle=handle))
            s.flush()
        return bytes(handle)

    def _known(self, s: Session, user_id: int) -> list[KnownCredential]:
        rows = s.scalars(select(WebAuthnCredential).where(WebAuthnCredential.user_id == user_id))
        return [
            KnownCredential(decode(r.credential_id), tuple(t for t in r.transports.split(",") if t))
            for r in rows
        ]

    def _count(self, s: Session, user_id: int) -> int:
        return int(
            s.scalar(
                select(func.count(WebAuthnCredential.id)).where(
                    WebAuthnCredential.user_id == user_id
                )
            )
            or 0
        )

    def _key_by_id(self, s: Session, claim: AssertionClaim) -> WebAuthnCredential | None:
        return s.scalar(
            select(WebAuthnCredential).where(
                WebAuthnCredential.credential_id == encode(claim.credential_id)
            )
        )

    def _own_key(self, s: Session, user_id: int, key_id: int) -> WebAuthnCredential:
        key = s.get(WebAuthnCredential, key_id)
        if key is None or key.user_id != user_id:
            raise CeremonyRefused("That security key was not found.", "not_found")
        return key

    def _live_session(self, s: Session, token: str, now: datetime) -> UserSession:
        row = self.sessions.find(s, token)
        if row is None or not row.mfa_passed or self.sessions.expiry_reason(row, now):
            raise CeremonyRefused("Your session has ended. Please sign in again.", "session")
        return row

    def _fresh_session(self, s: Session, token: str, now: datetime) -> tuple[UserSession, User]:
        row = self._live_session(s, token, now)
        if not self.step_up.is_fresh(row, now):
            raise CeremonyRefused(STEP_UP_NEEDED, "step_up")
        return row, load_user(s, row.user_id)

    def _failure(
        self,
        s: Session,
        event: AuditEvent,
        user: User,
        now: datetime,
        reason: str,
        *,
        failures: int | None = None,
    ) -> None:
        details: dict[str, object] = {"reason": reason, "method": METHOD}
        if failures is not None:
            details["failures"] = failures
        audit_own(self.audit, s, event, user, Outcome.FAILURE, at=now, details=details)

    def _anonymous_failure(
        self, s: Session, now: datetime, reason: str, user: User | None = None
    ) -> None:
        """A passwordless attempt that names no usable account."""
        self.audit.record(
            s,
            AuditEvent.LOGIN_FAILURE,
            Outcome.FAILURE,
            target_user_id=user.id if user else None,
            target_name=user.username if user else "",
            details={"reason": reason, "method": METHOD},
            at=now,
        )
