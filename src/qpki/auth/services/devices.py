"""Known devices (OWASP's device cookies): a browser that once completed a sign-in for an
account keeps its own throttling allowance for that account.

Without them, anyone who knows a username keeps its owner out: five wrong passwords make the
owner wait, a hundred lock the account. With them, failures from strangers count against the
account name, while the owner's own browsers are throttled under a key of their own — still
bounded, but not by the stranger's traffic. A new browser of the owner shares the strangers'
allowance until its first successful sign-in.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from qpki.auth.models import KnownDevice, User
from qpki.db.base import UTCDateTime, table_of

DEVICE_KEY_PREFIX = "#dev:"
# Built once (every sign-in and code runs these); Core on the transaction's connection.
_DEVICES = table_of(KnownDevice)
_FIND = select(_DEVICES.c.id, _DEVICES.c.throttle_key).where(
    _DEVICES.c.token_hash == bindparam("digest"), _DEVICES.c.user_id == bindparam("uid")
)
_TOUCH = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("device_id"))
    .values(last_used_at=bindparam("at", type_=UTCDateTime()))
)
_INSERT = insert(_DEVICES)
# Session.info key: the devices this transaction has looked up.
_DEVICES_READ = "qpki_devices_read"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Device:
    """A known device of an account: its row and its own throttle key."""

    id: int
    throttle_key: str


class KnownDevices:
    """Device-cookie rows, inside the caller's transaction."""

    def find(self, s: Session, user: User | None, token: str | None) -> Device | None:
        """The device ``token`` names, if it belongs to ``user``."""
        if user is None or not token or len(token) > 128:
            return None
        # Read once per transaction: a sign-in asks for the throttle key, then again when
        # it opens the session (the session lives one transaction).
        seen: dict[tuple[str, int], Device | None] = s.info.setdefault(_DEVICES_READ, {})
        key = (_digest(token), user.id)
        if key not in seen:
            row = s.connection().execute(_FIND, {"digest": key[0], "uid": user.id}).first()
            seen[key] = Device(row.id, row.throttle_key) if row is not None else None
        return seen[key]

    def throttle_key(
        self, s: Session, user: User | None, account_key: str, token: str | None
    ) -> str:
        """The throttle key for an attempt: the device's own one, else the account name's."""
        device = self.find(s, user, token)
        return device.throttle_key if device is not None else account_key

    def remember(
        self,
        s: Session,
        user: User,
        device: Device | None,
        now: datetime,
        ip: str,
        user_agent: str,
    ) -> str | None:
        """After a successful sign-in: touch the known ``device`` (what :meth:`find` gave for
        the browser's cookie), or register this browser when it has none.

        Returns a new cookie token when one must be set, ``None`` when the browser's is fine.
        """
        conn = s.connection()
        if device is not None:
            conn.execute(_TOUCH, {"device_id": device.id, "at": now})
            return None
        new_token = secrets.token_urlsafe(32)
        conn.execute(
            _INSERT,
            {
                "user_id": user.id,
                "token_hash": _digest(new_token),
                "throttle_key": DEVICE_KEY_PREFIX + secrets.token_hex(16),
                "created_at": now,
                "last_used_at": now,
                "ip": ip[:64],
                "user_agent": user_agent[:256],
            },
        )
        return new_token

    def throttle_keys_of(self, s: Session, user: User) -> list[str]:
        """Every throttle key that protects ``user``: the name's and each device's."""
        keys = list(
            s.scalars(select(KnownDevice.throttle_key).where(KnownDevice.user_id == user.id))
        )
        return [user.username_key, *keys]
