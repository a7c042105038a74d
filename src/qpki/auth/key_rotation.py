"""Key rotation (``qpki keys rotate``) and the sample of stored tokens that key checks use.

The MultiFernet workflow: put a new key first, re-encrypt every token with
``MultiFernet.rotate`` (which keeps each token's timestamp), verify that every token decrypts
with the new key alone, and only then retire the old key. The service re-encrypts with the
keys it has just written or been given -- never through the live :class:`~qpki.auth.keys.KeyRing`,
which may not have reloaded the key file yet: that once made the command report success while
leaving every secret under the old key, so an operator who then removed it lost every 2FA
secret.

Rows are updated in batches, one transaction per batch, each update conditional on the value
it read; a row changed meanwhile (a user spending a backup code, enrolling again) is read again
and retried, never skipped and counted. The verification pass then reads every stored token;
one written meanwhile under an older key (by a server that has not picked up the new key yet)
sends the pass round again. The audit record is written in the use case's last transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import inspect, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth.keys import (
    TokenSampleError,
    build_ring,
    decrypts,
    key_file_path,
    parse_keys,
    read_key_file,
    write_key_file,
)
from qpki.auth.models import MFASetupSession, User
from qpki.clock import Clock
from qpki.config import Settings
from qpki.db.base import affected_rows
from qpki.db.manager import DatabaseManager, DatabaseUnavailable
from qpki.errors import QPKIError

BATCH = 500
# A row that changes under the rotation this many times in a row is reported, not skipped.
MAX_ROW_ATTEMPTS = 5
# Verification passes that may find tokens written meanwhile under an older key.
MAX_ROUNDS = 5
# Stored tokens per column that start-up and key-file reloads check a key against.
SAMPLE_PER_COLUMN = 5

ENV_ROTATION_STEPS = (
    "The key ring comes from QPKI_MFA_KEY, which this command cannot change. Rotate it on "
    "every instance in turn: add the new key as QPKI_MFA_DECRYPT_KEYS and restart each; then "
    "make it QPKI_MFA_KEY with the old one in QPKI_MFA_DECRYPT_KEYS and restart each; run "
    "`qpki keys rotate --reencrypt-only`; then drop the old key and restart each "
    "(deploy/README.md, 'Rotating keys')."
)


class RotationError(QPKIError):
    """Rotation cannot go on (an unreadable token, a key ring it cannot change); the message
    says what to do. Nothing was retired."""


class TokenColumn(NamedTuple):
    """One column holding Fernet tokens, and how a concurrent change is detected."""

    # Mapped attributes (User.totp_secret, ...). Typed Any: mypy reads a descriptor-typed
    # field as the column's value type (str, int), not as the attribute used in queries.
    label: str
    model: Any
    column: Any
    # backup_codes is compare-and-swapped on its version by backup-code sign-ins; rotation
    # follows the same protocol so that either side notices the other and retries.
    version: Any = None


TOKEN_COLUMNS = (
    TokenColumn("users.totp_secret", User, User.totp_secret),
    TokenColumn("users.backup_codes", User, User.backup_codes, User.backup_codes_version),
    TokenColumn("mfa_setup_sessions.secret", MFASetupSession, MFASetupSession.secret),
)


@dataclass(frozen=True)
class RotationReport:
    """What a rotation did. ``reencrypted`` counts rows rewritten under the newest key;
    ``verified`` counts stored tokens that decrypt with the newest key alone at the end."""

    action: str
    reencrypted: dict[str, int] = field(default_factory=dict)
    verified: int = 0
    retried: int = 0
    key_file: Path | None = None

    @property
    def totp_secrets(self) -> int:
        return self.reencrypted.get("users.totp_secret", 0)

    @property
    def backup_code_sets(self) -> int:
        return self.reencrypted.get("users.backup_codes", 0)

    @property
    def setup_sessions(self) -> int:
        return self.reencrypted.get("mfa_setup_sessions.secret", 0)


@dataclass(frozen=True)
class KeySource:
    """Where the MFA keys come from: the key file, or ``QPKI_MFA_KEY``; plus decrypt-only keys."""

    path: Path
    env_keys: list[bytes] | None = None
    decrypt_only: list[bytes] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeySource:
        env = parse_keys(settings.mfa_key, "QPKI_MFA_KEY") if settings.mfa_key else None
        extra = (
            parse_keys(settings.mfa_decrypt_keys, "QPKI_MFA_DECRYPT_KEYS")
            if settings.mfa_decrypt_keys
            else []
        )
        return cls(key_file_path(settings.data_dir), env, extra)

    def current(self) -> list[bytes]:
        """Primary first, then older keys (read afresh: the file may have just changed)."""
        return list(self.env_keys) if self.env_keys else read_key_file(self.path)


class KeyRotationService:
    """The use cases behind ``qpki keys rotate``; each ends with its audit record."""

    def __init__(self, db: DatabaseManager, audit: AuditLog, clock: Clock, keys: KeySource) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.keys = keys

    def rotate(self, *, actor_name: str) -> RotationReport:
        """Put a new key first in the key file, then re-encrypt everything under it."""
        if self.keys.env_keys:
            raise RotationError(ENV_ROTATION_STEPS)
        current = read_key_file(self.keys.path)
        new_ring = [Fernet.generate_key(), *current]
        write_key_file(self.keys.path, new_ring)
        return self._run("rotated", new_ring, actor_name)

    def reencrypt(self, *, actor_name: str) -> RotationReport:
        """Re-encrypt everything under the current primary key (after promoting a key)."""
        return self._run("reencrypted", self.keys.current(), actor_name)

    def retire_old(self, *, actor_name: str) -> RotationReport | None:
        """Re-encrypt and verify, then leave only the primary key in the file.

        Returns None when the file holds one key already (nothing to retire).
        """
        if self.keys.env_keys:
            raise RotationError(ENV_ROTATION_STEPS)
        current = read_key_file(self.keys.path)
        if len(current) == 1:
            return None
        return self._run("retired_old_keys", current, actor_name, retire=True)

    # -- the pass ---------------------------------------------------------------------------
    def _run(
        self, action: str, keys: list[bytes], actor_name: str, *, retire: bool = False
    ) -> RotationReport:
        primary = Fernet(keys[0])
        ring = build_ring(keys, self.keys.decrypt_only)
        reencrypted = {c.label: 0 for c in TOKEN_COLUMNS}
        retried = 0
        for _round in range(MAX_ROUNDS):
            unreadable: list[str] = []
            for column in TOKEN_COLUMNS:
                done, again, bad = self._reencrypt_column(column, primary, ring)
                reencrypted[column.label] += done
                retried += again
                unreadable += bad
            if not unreadable:
                verified, stragglers, unreadable = self._verify(primary, ring)
            if unreadable:
                self._fail(action, actor_name, unreadable)
                raise _unreadable_error(unreadable)
            if not stragglers:
                break
        else:
            self._fail(action, actor_name, ["tokens kept appearing under an older key"])
            raise RotationError(
                "Tokens kept being written under an older key while rotating: a running "
                "server still encrypts with it. Give every instance the new key first, then "
                "run this command again."
            )
        report = RotationReport(
            action, reencrypted, verified, retried, None if self.keys.env_keys else self.keys.path
        )
        with self.db.transaction() as s:
            if retire:
                # Inside the transaction: if the file cannot be written, no record claims it.
                write_key_file(self.keys.path, keys[:1])
            self.audit.record(
                s,
                AuditEvent.KEYS_ROTATED,
                actor_name=actor_name,
                details={
                    "action": action,
                    "totp_secrets": report.totp_secrets,
                    "backup_code_sets": report.backup_code_sets,
                    "setup_sessions": report.setup_sessions,
                    "verified": verified,
                    "retried": retried,
                },
                at=self.clock(),
            )
        return report

    def _reencrypt_column(
        self, column: TokenColumn, primary: Fernet, ring: MultiFernet
    ) -> tuple[int, int, list[str]]:
        """Rewrite every token of ``column`` not yet under ``primary``.

        Returns (rows rewritten, rows retried after a concurrent change, unreadable rows).
        """
        done = retried = 0
        unreadable: list[str] = []
        last: Any = None
        while True:
            with self.db.transaction() as s:
                rows = self._batch(s, column, last)
                if not rows:
                    break
                for row in rows:
                    outcome, attempts = reencrypt_row(s, column, row, primary, ring)
                    retried += attempts
                    if outcome == "rewritten":
                        done += 1
                    elif outcome == "unreadable":
                        unreadable.append(f"{column.label} id={row[0]}")
                last = rows[-1][0]
        return done, retried, unreadable

    @staticmethod
    def _batch(s: Session, column: TokenColumn, after: Any) -> list[tuple[Any, ...]]:
        cols: list[Any] = [column.model.id, column.column]
        if column.version is not None:
            cols.append(column.version)
        query = select(*cols).where(column.column.is_not(None)).order_by(column.model.id)
        if after is not None:
            query = query.where(column.model.id > after)
        return [tuple(r) for r in s.execute(query.limit(BATCH)).all()]

    def _verify(self, primary: Fernet, ring: MultiFernet) -> tuple[int, int, list[str]]:
        """Every stored token must decrypt with ``primary`` alone.

        Returns (tokens under ``primary``, tokens still under an older key, unreadable rows).
        """
        verified = stragglers = 0
        unreadable: list[str] = []
        for column in TOKEN_COLUMNS:
            last: Any = None
            while True:
                with self.db.transaction(write=False) as s:
                    rows = self._batch(s, column, last)
                if not rows:
                    break
                for row in rows:
                    if decrypts(primary, row[1]):
                        verified += 1
                    elif decrypts(ring, row[1]):
                        stragglers += 1
                    else:
                        unreadable.append(f"{column.label} id={row[0]}")
                last = rows[-1][0]
        return verified, stragglers, unreadable

    def _fail(self, action: str, actor_name: str, rows: Sequence[str]) -> None:
        """Record a rotation that stopped (the old keys stay; nothing was retired)."""
        with self.db.transaction() as s:
            self.audit.record(
                s,
                AuditEvent.KEYS_ROTATED,
                Outcome.FAILURE,
                actor_name=actor_name,
                details={"action": action, "unreadable": len(rows), "rows": list(rows[:5])},
                at=self.clock(),
            )


def reencrypt_row(
    s: Session, column: TokenColumn, row: tuple[Any, ...], primary: Fernet, ring: MultiFernet
) -> tuple[str, int]:
    """Put one row's token under ``primary``, compare-and-swap on the value that was read.

    ``row`` is (id, token[, version]) as read earlier; if the row changed since, the update
    matches nothing and the row is read again and retried. Returns ("rewritten" | "current" |
    "gone" | "unreadable", how many times it was read again).
    """
    row_id, token = row[0], row[1]
    version = row[2] if column.version is not None else None
    for attempt in range(MAX_ROW_ATTEMPTS):
        if token is None:
            return "gone", attempt  # 2FA was turned off meanwhile: nothing to keep
        if decrypts(primary, token):
            return "current", attempt
        try:
            new = ring.rotate(token.encode()).decode()
        except InvalidToken:
            return "unreadable", attempt
        where = [column.model.id == row_id]
        values: dict[str, Any] = {column.column.key: new}
        if column.version is not None:
            where.append(column.version == version)
            values[column.version.key] = (version or 0) + 1
        else:
            where.append(column.column == token)
        changed = s.execute(
            update(column.model)
            .where(*where)
            .values(values)
            .execution_options(synchronize_session=False)
        )
        if affected_rows(changed) == 1:
            return "rewritten", attempt
        # Changed under us: read it again and start over with what is there now.
        cols: list[Any] = [column.column]
        if column.version is not None:
            cols.append(column.version)
        fresh = s.execute(select(*cols).where(column.model.id == row_id)).first()
        if fresh is None:
            return "gone", attempt + 1
        token = fresh[0]
        version = fresh[1] if column.version is not None else None
    raise RotationError(
        f"{column.label} id={row_id} kept changing while it was being re-encrypted; "
        "run the command again."
    )


def _unreadable_error(rows: Sequence[str]) -> RotationError:
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return RotationError(
        f"{', '.join(rows[:5])}{more} cannot be decrypted with any known key; rotation stopped "
        "and no key was retired. Restore the key that encrypted them (QPKI_MFA_DECRYPT_KEYS "
        "or a later line of the key file), or reset those users' 2FA."
    )


# -- the sample that start-up and key-file reloads check a key against -------------------------
def sample_stored_tokens(
    db: DatabaseManager, now: datetime, per_column: int = SAMPLE_PER_COLUMN
) -> list[str]:
    """The newest stored tokens of every encrypted column (none before the first migration).

    TOTP secrets, backup-code sets and unexpired pending setups all count: a key that cannot
    read them is the wrong key even when no user has finished enrolling yet. Expired setups do
    not, so a stale row never blocks start-up (``qpki cleanup`` removes them).
    """
    try:
        tables = inspect(db.engine)
        names = set(tables.get_table_names())
        tokens: list[str] = []
        with db.transaction(write=False) as s:
            for column in TOKEN_COLUMNS:
                table = column.model.__tablename__
                if table not in names:
                    continue
                if column.column.key not in {c["name"] for c in tables.get_columns(table)}:
                    continue
                query = select(column.column).where(column.column.is_not(None))
                if column.model is MFASetupSession:
                    query = query.where(MFASetupSession.expires_at > now)
                    query = query.order_by(MFASetupSession.created_at.desc())
                else:
                    query = query.order_by(column.model.id.desc())
                tokens.extend(s.scalars(query.limit(per_column)))
    except (SQLAlchemyError, DatabaseUnavailable) as exc:
        raise TokenSampleError(
            "The MFA keys cannot be checked against the stored 2FA secrets: the database "
            f"could not be read ({type(exc).__name__})"
        ) from None
    return tokens
