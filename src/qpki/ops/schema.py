"""Upgrading and rolling back the database schema: the use case behind ``qpki migrate``.

Only this changes a schema. It works from the database URL alone (no keys needed, so an
operator can upgrade from any machine), under the migration lock of
:meth:`DatabaseManager.migrate_database`, and reports failures in one line; the migration runs
in one transaction, so a failure leaves the schema as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy.exc import DBAPIError

from qpki.config import Settings
from qpki.ops.startup import StartupError, check_schema, open_database, probe_database


@dataclass(frozen=True)
class MigrationResult:
    before: str | None
    after: str | None
    direction: Literal["upgraded", "rolled back", "unchanged"]


def check(settings: Settings) -> None:
    """Raise StartupError (one line naming the command to run) unless the schema is current."""
    db = open_database(settings)
    try:
        probe_database(db)
        check_schema(db)
    finally:
        db.dispose()


def migrate(settings: Settings, revision: str = "head") -> MigrationResult:
    """Bring the schema to ``revision``: forwards to upgrade, backwards to roll back."""
    from alembic.util import CommandError

    db = open_database(settings)
    try:
        probe_database(db)
        chain = db.revisions()
        state = db.schema_state()
        if state.status == "ahead":
            raise StartupError(
                f"The database schema is at {state.current}, newer than this qPKI knows; "
                f"roll it back with the newer qPKI: qpki migrate --revision {chain[-1]}"
            )
        target = chain[-1] if revision == "head" else revision
        if target not in chain:
            raise StartupError(
                f"Unknown revision {revision!r}; this qPKI knows: {', '.join(chain)}"
            )
        before = state.current
        position = chain.index(before) if before in chain else -1
        try:
            # ``before`` is read again under the migration lock: another `qpki migrate` may
            # have finished while this one waited.
            if chain.index(target) >= position:
                before = db.migrate_database(target)
                direction: Literal["upgraded", "rolled back", "unchanged"] = "upgraded"
            else:
                before = db.downgrade_database(target)
                direction = "rolled back"
        except (DBAPIError, CommandError) as exc:
            raise StartupError(
                f"Migration to {target} failed ({type(exc).__name__}); the schema is unchanged "
                f"at {before}. Run with QPKI_LOG_LEVEL=DEBUG for details."
            ) from None
        after = db.schema_state().current
        return MigrationResult(before, after, "unchanged" if before == after else direction)
    finally:
        db.dispose()
