"""Re-encrypt every stored secret under the newest key (``qpki keys rotate``).

The documented MultiFernet workflow: put a new key first, re-encrypt everything with
``MultiFernet.rotate`` (which keeps each token's timestamp), then retire the old key once no
token needs it. Rows are updated in batches, one transaction per batch, and each update is
conditional on the value it read, so a user spending a backup code meanwhile is never
overwritten: that row is simply read again.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select, update

from qpki.auth.models import MFASetupSession, User
from qpki.db.manager import DatabaseManager

BATCH = 500


class RotationError(RuntimeError):
    """A stored token could not be decrypted with any known key; nothing was retired."""


@dataclass(frozen=True)
class RotationCounts:
    totp_secrets: int
    backup_code_sets: int
    setup_sessions: int


def reencrypt_all(db: DatabaseManager, ring: MultiFernet) -> RotationCounts:
    """Re-encrypt every token under the ring's first key; raises RotationError on bad data."""
    secrets_done = codes_done = 0
    last_id = 0
    while True:
        with db.transaction() as s:
            users = list(
                s.scalars(select(User).where(User.id > last_id).order_by(User.id).limit(BATCH))
            )
            if not users:
                break
            for user in users:
                if user.totp_secret:
                    new = _rotate(ring, user.totp_secret, f"users.totp_secret id={user.id}")
                    s.execute(
                        update(User)
                        .where(User.id == user.id, User.totp_secret == user.totp_secret)
                        .values(totp_secret=new)
                        .execution_options(synchronize_session=False)
                    )
                    secrets_done += 1
                if user.backup_codes:
                    new = _rotate(ring, user.backup_codes, f"users.backup_codes id={user.id}")
                    s.execute(
                        update(User)
                        .where(
                            User.id == user.id,
                            User.backup_codes_version == user.backup_codes_version,
                        )
                        .values(
                            backup_codes=new, backup_codes_version=user.backup_codes_version + 1
                        )
                        .execution_options(synchronize_session=False)
                    )
                    codes_done += 1
            last_id = users[-1].id
    setups = 0
    with db.transaction() as s:
        for pending in s.scalars(select(MFASetupSession)):
            pending.secret = _rotate(ring, pending.secret, f"mfa_setup_sessions id={pending.id}")
            setups += 1
    return RotationCounts(secrets_done, codes_done, setups)


def undecryptable_with(db: DatabaseManager, key: bytes) -> list[str]:
    """Rows whose tokens the single ``key`` cannot decrypt (must be empty before retiring)."""
    only = Fernet(key)
    bad: list[str] = []
    with db.transaction(write=False) as s:
        for user in s.scalars(select(User)):
            for column in ("totp_secret", "backup_codes"):
                token = getattr(user, column)
                if token and not _decrypts(only, token):
                    bad.append(f"users.{column} id={user.id}")
        for pending in s.scalars(select(MFASetupSession)):
            if not _decrypts(only, pending.secret):
                bad.append(f"mfa_setup_sessions id={pending.id}")
    return bad


def _decrypts(fernet: Fernet, token: str) -> bool:
    try:
        fernet.decrypt(token.encode())
    except InvalidToken:
        return False
    return True


def _rotate(ring: MultiFernet, token: str, where: str) -> str:
    try:
        return ring.rotate(token.encode()).decode()
    except InvalidToken:
        raise RotationError(
            f"{where} cannot be decrypted with any known key; rotation stopped. Restore the key "
            "that encrypted it, or reset that user's 2FA."
        ) from None
