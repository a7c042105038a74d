"""The models and the migrated schema agree exactly, on SQLite and PostgreSQL.

Alembic's autogenerate comparison must find nothing: no missing or extra column, index or
constraint, no type difference. Before revision 0003 it found 9 differences, among them three
indexes that existed twice.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask import Flask
from sqlalchemy import inspect

import qpki
from qpki.audit.events import AuditEvent
from qpki.audit.models import AuditEventRecord
from qpki.db.base import Base
from qpki.db.manager import DatabaseManager

# Every ``models`` module of the package registers its tables on Base.metadata; a model
# module added later is compared too without editing this test.
MODEL_MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(qpki.__path__, "qpki.")
    if m.name.rsplit(".", 1)[-1].endswith("models")  # models, webauthn_models, ...
)
for _name in MODEL_MODULES:
    importlib.import_module(_name)


def _differences(db: DatabaseManager) -> list[object]:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def _index_columns(db: DatabaseManager, table: str) -> list[tuple[str, ...]]:
    return sorted(tuple(i["column_names"]) for i in inspect(db.engine).get_indexes(table))


def test_models_match_the_migrated_schema(db_url: str) -> None:
    db = DatabaseManager(db_url)
    db.migrate_database()
    assert _differences(db) == []
    db.dispose()


def test_no_column_is_indexed_twice(db_url: str) -> None:
    """A unique constraint already is an index; a second plain index on it only costs."""
    db = DatabaseManager(db_url)
    db.migrate_database()
    inspector = inspect(db.engine)
    for table in inspector.get_table_names():
        unique = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)}
        plain = [
            tuple(i["column_names"])
            for i in inspector.get_indexes(table)
            if not i.get("duplicates_constraint")  # PostgreSQL: the constraint's own index
        ]
        assert not unique & set(plain), table
        assert len(plain) == len(set(plain)), table
    db.dispose()


def test_upgrade_downgrade_upgrade(make_app: Callable[..., Flask], db_url: str) -> None:
    """Down to 0002 and up again, with events: the chain survives both ways and verifies."""
    app = make_app(db_url)
    db: DatabaseManager = app.db_manager  # type: ignore[attr-defined]
    audit = app.auth_manager.audit  # type: ignore[attr-defined]
    with db.transaction() as s:
        for i in range(7):
            audit.record(s, AuditEvent.USER_CHANGED, target_name=f"u{i}")
    with db.transaction(write=False) as s:
        assert audit.verify(s).ok

    db.downgrade_database("0002_mfa")
    assert db.current_revision() == "0002_mfa"
    assert "seq" not in {c["name"] for c in inspect(db.engine).get_columns("audit_events")}
    assert ("username_key",) in _index_columns(db, "users")  # the old duplicate is back
    assert audit.head.read() is None  # the unkeyed chain has no head

    db.migrate_database()
    assert db.current_revision() == db.head_revision()
    assert _differences(db) == []
    with db.transaction(write=False) as s:
        result = audit.verify(s)
        events = [r.event for r in s.query(AuditEventRecord).order_by(AuditEventRecord.id)]
    assert result.ok and result.checked == 8
    assert events[-1] == AuditEvent.AUDIT_CHAIN_SEALED
