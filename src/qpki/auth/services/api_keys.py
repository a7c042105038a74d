"""Service keys of the JSON API: create (shown once), list, revoke, and authenticate a request.

A key is ``qpki_`` followed by 43 URL-safe characters from 32 random bytes (256 bits). The
visible prefix lets people and secret scanners recognise a leaked key; its first 13 characters
are kept to tell keys apart in lists. Only a keyed hash is stored: HMAC-SHA256 under a key
derived (HKDF) from ``QPKI_SECRET_KEY``. Why that key: every instance of a deployment already
shares it, so no new setting has to be distributed; a copy of the database alone (a backup, a
dump) cannot be used to test candidate keys or to plant a key of one's own; and rolling
rotation works like the sessions' — hashes under ``QPKI_SECRET_KEY_FALLBACKS`` are still
recognised and re-hashed under the current key at their next use. A hash is looked up by
equality on a unique index, so no key comparison depends on secret data byte by byte.

Missing, wrong, revoked and expired keys all come back as ``None``: the API answers 401 and
says nothing about which it was.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from qpki.api.models import ApiKey
from qpki.audit.events import AuditEvent
from qpki.audit.log import AuditLog
from qpki.auth.errors import NotFound, PermissionDenied, ValidationFailed
from qpki.auth.models import User
from qpki.auth.services.admin_rule import refused_as_admin
from qpki.auth.services.common import actor_fields
from qpki.clock import Clock
from qpki.db.manager import DatabaseManager

# Every API request runs it: built once, Core on the read transaction's connection. The
# candidates are the key's hash under the current secret and under the previous ones.
_KEYS = ApiKey.__table__
_KEY_BY_HASH = select(
    _KEYS.c.id,
    _KEYS.c.name,
    _KEYS.c.key_hash,
    _KEYS.c.scopes,
    _KEYS.c.revoked_at,
    _KEYS.c.expires_at,
    _KEYS.c.last_used_at,
).where(_KEYS.c.key_hash.in_(bindparam("hashes", expanding=True)))

log = logging.getLogger(__name__)

KEY_PREFIX = "qpki_"
KEY_RANDOM_BYTES = 32  # 256 bits; the checklist asks for at least 128
SHOWN_PREFIX_LENGTH = len(KEY_PREFIX) + 8
# A key is ``qpki_`` + 43 URL-safe base64 characters; anything else is refused before hashing.
KEY_RE = re.compile(r"^qpki_[A-Za-z0-9_-]{43}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SCOPES = ("verify", "users:read", "users:write", "audit:read", "metrics")
MAX_EXPIRY_DAYS = 3650
# Last use is written at most once a minute per key, so a busy caller does not turn every
# read request into a database write.
LAST_USE_GRANULARITY = timedelta(minutes=1)
_HKDF_INFO = b"qpki api key hash v1"


def hash_key_from_secret(secret_key: str) -> bytes:
    """The key-hashing key derived from one application secret key (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        secret_key.encode()
    )


@dataclass(frozen=True)
class ApiPrincipal:
    """The caller of an API request: the key's name and what it may do."""

    name: str
    scopes: frozenset[str]

    @property
    def actor_name(self) -> str:
        """How the audit trail names this caller."""
        return f"api:{self.name}"


@dataclass(frozen=True)
class ApiKeyInfo:
    """A key as lists show it (never the key itself)."""

    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True)
class CreatedKey:
    """A new key: its record, and the key itself (shown once, never stored)."""

    info: ApiKeyInfo
    secret: str


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        name=row.name,
        prefix=row.prefix,
        scopes=tuple(row.scope_list),
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def parse_scopes(raw: str | Iterable[str]) -> tuple[str, ...]:
    """Scopes from ``verify,users:read`` (or a list); ValidationFailed names any unknown one."""
    items = raw.replace(" ", ",").split(",") if isinstance(raw, str) else list(raw)
    chosen = [s.strip() for s in items if s.strip()]
    unknown = sorted({s for s in chosen if s not in SCOPES})
    if unknown:
        raise ValidationFailed(
            f"Unknown scope {', '.join(repr(u[:32]) for u in unknown)}; "
            f"choose from {', '.join(SCOPES)}."
        )
    if not chosen:
        raise ValidationFailed(f"Give at least one scope: {', '.join(SCOPES)}.")
    return tuple(s for s in SCOPES if s in chosen)


class ApiKeyService:
    """Service keys over the database, the audit log, a clock and the key-hashing keys.

    ``hash_keys`` is the current key-hashing key first, then older ones still accepted
    (derived from ``QPKI_SECRET_KEY`` and its fallbacks by :func:`hash_key_from_secret`).
    """

    def __init__(
        self, db: DatabaseManager, audit: AuditLog, clock: Clock, hash_keys: Sequence[bytes]
    ) -> None:
        if not hash_keys:
            raise ValueError("ApiKeyService needs at least one key-hashing key")
        self.db = db
        self.audit = audit
        self.clock = clock
        self.hash_keys = tuple(hash_keys)

    def _hashes(self, presented: str) -> list[str]:
        return [hmac.new(k, presented.encode(), hashlib.sha256).hexdigest() for k in self.hash_keys]

    # -- administration -----------------------------------------------------------------------
    def create(
        self,
        name: str,
        scopes: str | Iterable[str],
        *,
        expires_days: int | None = None,
        actor: User | None = None,
        actor_name: str = "",
    ) -> CreatedKey:
        """A new key with ``scopes``; the returned secret is the only copy there will be."""
        now = self.clock()
        name = (name or "").strip()
        if not NAME_RE.match(name):
            raise ValidationFailed(
                "Key name must be 1-64 characters: letters, digits, '.', '_' or '-', "
                "starting with a letter or digit."
            )
        chosen = parse_scopes(scopes)
        if expires_days is not None and not 1 <= expires_days <= MAX_EXPIRY_DAYS:
            raise ValidationFailed(f"Expiry must be 1 to {MAX_EXPIRY_DAYS} days.")
        secret = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
        expires_at = now + timedelta(days=expires_days) if expires_days else None
        with self.db.transaction() as s:
            denied = self._denied(s, actor, "api_key_create", now)
            if denied is None:
                if s.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
                    raise ValidationFailed(
                        "A key with this name exists (revoked keys keep their name); "
                        "choose another name."
                    )
                row = ApiKey(
                    name=name,
                    prefix=secret[:SHOWN_PREFIX_LENGTH],
                    key_hash=self._hashes(secret)[0],
                    scopes=" ".join(chosen),
                    created_at=now,
                    created_by=(actor.username if actor else actor_name)[:64],
                    expires_at=expires_at,
                )
                s.add(row)
                s.flush()
                self.audit.record(
                    s,
                    AuditEvent.API_KEY_CREATED,
                    **actor_fields(actor, actor_name),
                    details={
                        "key_name": name,
                        "scopes": list(chosen),
                        "expires_at": expires_at.isoformat() if expires_at else None,
                    },
                    at=now,
                )
                info = _info(row)
        if denied is not None:
            raise PermissionDenied(denied)
        return CreatedKey(info, secret)

    def list_keys(self) -> list[ApiKeyInfo]:
        """Every key, newest first, revoked ones included."""
        with self.db.transaction(write=False) as s:
            return [_info(r) for r in s.scalars(select(ApiKey).order_by(ApiKey.id.desc()))]

    def revoke(self, name: str, *, actor: User | None = None, actor_name: str = "") -> ApiKeyInfo:
        """Revoke a key at once (its next request answers 401); the record stays."""
        now = self.clock()
        with self.db.transaction() as s:
            denied = self._denied(s, actor, "api_key_revoke", now)
            if denied is None:
                row = s.scalar(select(ApiKey).where(ApiKey.name == (name or "").strip()))
                if row is None:
                    raise NotFound(f"No API key named {name[:64]!r}.")
                if row.revoked_at is not None:
                    raise ValidationFailed(f"The API key {row.name!r} is already revoked.")
                row.revoked_at = now
                self.audit.record(
                    s,
                    AuditEvent.API_KEY_REVOKED,
                    **actor_fields(actor, actor_name),
                    details={"key_name": row.name},
                    at=now,
                )
                info = _info(row)
        if denied is not None:
            raise PermissionDenied(denied)
        return info

    def _denied(self, s: Session, actor: User | None, action: str, now: datetime) -> str | None:
        """An administrator without their own 2FA may not hand out keys (audited refusal)."""
        return refused_as_admin(s, self.audit, actor, None, action, now)

    # -- requests -----------------------------------------------------------------------------
    def authenticate(self, presented: str | None) -> ApiPrincipal | None:
        """The caller of a request, or ``None`` for a missing, wrong, revoked or expired key.

        Records the key's last use (to the minute) and moves a hash made under an older
        secret key to the current one.
        """
        if not presented or not KEY_RE.match(presented):
            return None
        now = self.clock()
        candidates = self._hashes(presented)
        with self.db.reading() as conn:
            row = conn.execute(_KEY_BY_HASH, {"hashes": candidates}).first()
            if row is None:
                return None
            key_id, stored_hash = row.id, row.key_hash
            principal = ApiPrincipal(row.name, frozenset(row.scopes.split()))
            usable = row.revoked_at is None and (row.expires_at is None or row.expires_at > now)
            stale = row.last_used_at is None or now - row.last_used_at >= LAST_USE_GRANULARITY
        if not usable:
            return None
        if stale or stored_hash != candidates[0]:
            with self.db.transaction() as s:
                fresh = s.get(ApiKey, key_id)
                if fresh is not None:
                    fresh.last_used_at = now
                    fresh.key_hash = candidates[0]
        return principal
