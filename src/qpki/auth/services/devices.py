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
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from qpki.auth.models import KnownDevice, User

DEVICE_KEY_PREFIX = "#dev:"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KnownDevices:
    """Device-cookie rows, inside the caller's transaction."""

    def find(self, s: Session, user: User | None, token: str | None) -> KnownDevice | None:
        """The device ``token`` names, if it belongs to ``user``."""
        if user is None or not token or len(token) > 128:
            return None
        return s.scalar(
            select(KnownDevice).where(
                KnownDevice.token_hash == _digest(token), KnownDevice.user_id == user.id
            )
        )

    def throttle_key(
        self, s: Session, user: User | None, account_key: str, token: str | None
    ) -> str:
        """The throttle key for an attempt: the device's own one, else the account name's."""
        device = self.find(s, user, token)
        return device.throttle_key if device is not None else account_key

    def remember(
        self, s: Session, user: User, token: str | None, now: datetime, ip: str, user_agent: str
    ) -> str | None:
        """After a successful sign-in: touch the known device, or register this browser.

        Returns a new cookie token when one must be set, ``None`` when the browser's is fine.
        """
        device = self.find(s, user, token)
        if device is not None:
            device.last_used_at = now
            return None
        new_token = secrets.token_urlsafe(32)
        s.add(
            KnownDevice(
                user_id=user.id,
                token_hash=_digest(new_token),
                throttle_key=DEVICE_KEY_PREFIX + secrets.token_hex(16),
                created_at=now,
                last_used_at=now,
                ip=ip[:64],
                user_agent=user_agent[:256],
            )
        )
        return new_token

    def throttle_keys_of(self, s: Session, user: User) -> list[str]:
        """Every throttle key that protects ``user``: the name's and each device's."""
        keys = list(
            s.scalars(select(KnownDevice.throttle_key).where(KnownDevice.user_id == user.id))
        )
        return [user.username_key, *keys]
