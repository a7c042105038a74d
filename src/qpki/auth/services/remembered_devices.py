"""Remembered devices: "don't ask for a code on this device for N days" (checklist §12.6).

The cookie holds ``<series>.<token>``: a public series that names the device, and a secret
token of 256 bits of which only the SHA-256 digest is stored. Every use replaces the token
(privacyIDEA 3.14's series/counter scheme; Jaspan's improved persistent-login cookie): a copy
of the cookie works at most once, and whichever of thief and owner comes second presents a
stale token for a known series — the device is revoked on the spot and the event audited, so
the owner's next sign-in asks for a code again and the trail shows the theft.

A remembered device never replaces the password: it is only looked at after a right one, and
only where the user's role policy allows it (``PolicyService.remember_days_in``). A password
change, any 2FA change, an administrator's reset and "sign out everywhere" forget them all
(:func:`forget_all`, called inside those use cases' transactions).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth.errors import PermissionDenied
from qpki.auth.models import User
from qpki.auth.services.admin_rule import refused_as_admin
from qpki.auth.services.common import actor_fields, audit_own, load_user
from qpki.clock import Clock
from qpki.db.base import affected_rows
from qpki.db.manager import DatabaseManager
from qpki.mail.useragent import describe_user_agent
from qpki.policy.models import RememberedDevice

SEPARATOR = "."
MAX_COOKIE_LENGTH = 128


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_cookie(value: str | None) -> tuple[str, str] | None:
    """``(series, token)`` of a well-formed cookie value, else ``None``."""
    if not value or len(value) > MAX_COOKIE_LENGTH or value.count(SEPARATOR) != 1:
        return None
    series, token = value.split(SEPARATOR)
    if not series or not token:
        return None
    return series, token


class DeviceCheck(enum.StrEnum):
    """What a presented remembered-device cookie turned out to be."""

    VALID = "valid"  # skips the code; a new token was issued
    STALE = "stale"  # known series, old token: revoked (theft signal)
    EXPIRED = "expired"  # past its lifetime (or the policy's, if shorter): deleted
    UNKNOWN = "unknown"  # malformed, forgotten, or another account's
    NOT_ALLOWED = "not_allowed"  # the user's policy does not allow remembering now


@dataclass(frozen=True)
class DeviceUse:
    """The outcome, and the cookie value to set instead (only for VALID)."""

    check: DeviceCheck
    new_cookie: str | None = None


@dataclass(frozen=True)
class DeviceView:
    """A remembered device as the profile and the admin pages list it."""

    id: int
    browser: str
    ip: str
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime


def issue(s: Session, user: User, now: datetime, days: int, *, ip: str, user_agent: str) -> str:
    """Remember this browser for ``days``; returns the cookie value (shown to nobody else)."""
    series = secrets.token_urlsafe(18)
    token = secrets.token_urlsafe(32)
    s.add(
        RememberedDevice(
            user_id=user.id,
            series=series,
            token_hash=_digest(token),
            created_at=now,
            last_used_at=now,
            expires_at=now + timedelta(days=days),
            ip=ip[:64],
            user_agent=user_agent[:256],
        )
    )
    return f"{series}{SEPARATOR}{token}"


def use(
    s: Session,
    audit: AuditLog,
    user: User,
    cookie: str | None,
    now: datetime,
    *,
    allowed_days: int,
    ip: str = "",
    user_agent: str = "",
) -> DeviceUse:
    """Check a presented cookie after a right password, rotating its token when it is good.

    ``allowed_days`` is what the user's policy allows now (0: not at all); a device older than
    that is expired even if it was issued for longer.
    """
    parsed = parse_cookie(cookie)
    if parsed is None:
        return DeviceUse(DeviceCheck.UNKNOWN)
    series, token = parsed
    device = s.scalar(
        select(RememberedDevice).where(
            RememberedDevice.series == series, RememberedDevice.user_id == user.id
        )
    )
    if device is None:
        return DeviceUse(DeviceCheck.UNKNOWN)
    presented = _digest(token)
    if not hmac.compare_digest(device.token_hash, presented):
        return _revoke_stale(s, audit, user, device, now, ip=ip, user_agent=user_agent)
    if allowed_days <= 0:
        return DeviceUse(DeviceCheck.NOT_ALLOWED)
    ends = min(device.expires_at, device.created_at + timedelta(days=allowed_days))
    if now >= ends:
        s.delete(device)
        return DeviceUse(DeviceCheck.EXPIRED)
    new_token = secrets.token_urlsafe(32)
    # Rotate only if nobody rotated it since we read it: of two requests presenting the same
    # value at once, one wins and the other holds a stale value — exactly as a stolen copy.
    rotated = affected_rows(
        s.execute(
            update(RememberedDevice)
            .where(RememberedDevice.id == device.id, RememberedDevice.token_hash == presented)
            .values(token_hash=_digest(new_token), last_used_at=now, ip=ip[:64])
            .execution_options(synchronize_session=False)
        )
    )
    if rotated != 1:
        return _revoke_stale(s, audit, user, device, now, ip=ip, user_agent=user_agent)
    return DeviceUse(DeviceCheck.VALID, f"{series}{SEPARATOR}{new_token}")


def _revoke_stale(
    s: Session,
    audit: AuditLog,
    user: User,
    device: RememberedDevice,
    now: datetime,
    *,
    ip: str,
    user_agent: str,
) -> DeviceUse:
    """A known series with an old token: someone holds a copy. Revoke and audit (theft)."""
    device_id = device.id
    s.execute(delete(RememberedDevice).where(RememberedDevice.id == device_id))
    audit_own(
        audit,
        s,
        AuditEvent.REMEMBERED_DEVICE_REUSED,
        user,
        Outcome.FAILURE,
        at=now,
        details={
            "device_id": device_id,
            "browser": describe_user_agent(user_agent),
            "ip": ip[:64],
            "revoked": True,
        },
    )
    return DeviceUse(DeviceCheck.STALE)


def forget_all(s: Session, user_id: int) -> int:
    """Forget every remembered device of the user (inside the caller's use case)."""
    return affected_rows(
        s.execute(delete(RememberedDevice).where(RememberedDevice.user_id == user_id))
    )


def forget_for_users(s: Session, user_ids: list[int]) -> int:
    """Forget the remembered devices of several users (a policy no longer allows them)."""
    if not user_ids:
        return 0
    return affected_rows(
        s.execute(delete(RememberedDevice).where(RememberedDevice.user_id.in_(user_ids)))
    )


class RememberedDeviceService:
    """The user's list of remembered devices, forgetting them; the administrator's view."""

    def __init__(self, db: DatabaseManager, audit: AuditLog, clock: Clock) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock

    def list_for_user(self, user_id: int, *, now: datetime | None = None) -> list[DeviceView]:
        """Live remembered devices, most recently used first (expired ones are not shown)."""
        now = now or self.clock()
        with self.db.transaction(write=False) as s:
            rows = s.scalars(
                select(RememberedDevice)
                .where(RememberedDevice.user_id == user_id, RememberedDevice.expires_at > now)
                .order_by(RememberedDevice.last_used_at.desc(), RememberedDevice.id.desc())
            ).all()
            return [
                DeviceView(
                    id=row.id,
                    browser=describe_user_agent(row.user_agent),
                    ip=row.ip,
                    created_at=row.created_at,
                    last_used_at=row.last_used_at,
                    expires_at=row.expires_at,
                )
                for row in rows
            ]

    def forget(
        self,
        actor: User | None,
        user_id: int,
        device_id: int | None = None,
        *,
        actor_name: str = "",
        now: datetime | None = None,
    ) -> int:
        """Forget one device (``device_id``) or all of them; how many were forgotten.

        A user forgets their own; an administrator (with their own 2FA) anyone's; the command
        line (``actor=None``) anyone's. A refusal is audited and committed, then raised.
        """
        now = now or self.clock()
        denied: str | None = None
        forgotten = 0
        with self.db.transaction() as s:
            if actor is not None and actor.id != user_id:
                denied = refused_as_admin(
                    s, self.audit, actor, user_id, "forget_remembered_device", now
                )
            if denied is None:
                user = load_user(s, user_id)
                stmt = delete(RememberedDevice).where(RememberedDevice.user_id == user_id)
                if device_id is not None:
                    stmt = stmt.where(RememberedDevice.id == device_id)
                forgotten = affected_rows(s.execute(stmt))
                if forgotten:
                    details = {
                        "forgotten": forgotten,
                        "scope": "one" if device_id is not None else "all",
                    }
                    if actor is not None and actor.id == user_id:
                        audit_own(
                            self.audit,
                            s,
                            AuditEvent.REMEMBERED_DEVICE_REVOKED,
                            user,
                            at=now,
                            details=details,
                        )
                    else:
                        self.audit.record(
                            s,
                            AuditEvent.REMEMBERED_DEVICE_REVOKED,
                            **actor_fields(actor, actor_name),
                            target_user_id=user.id,
                            target_name=user.username,
                            details=details,
                            at=now,
                        )
        if denied is not None:
            raise PermissionDenied(denied)
        return forgotten
