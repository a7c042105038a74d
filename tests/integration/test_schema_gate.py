"""The schema gate on the embedded SQLite database: commands migrate it (zero configuration),
refuse a schema newer than the code, and `qpki migrate` moves it both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from qpki.cli import main
from qpki.db.manager import DatabaseManager, code_head_revision

HEAD = code_head_revision()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DatabaseManager:
    for name in ("QPKI_DATABASE_URL", "QPKI_MFA_KEY", "QPKI_SECRET_KEY", "QPKI_AUDIT_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QPKI_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir(mode=0o700)
    manager = DatabaseManager(f"sqlite:///{tmp_path / 'data' / 'qpki.db'}")
    yield manager  # type: ignore[misc]
    manager.dispose()


def test_migrate_moves_the_schema_both_ways_and_reports_it(db: DatabaseManager) -> None:
    assert run("migrate", "--check") == (1, "Error: The database has no qPKI schema yet; "
                                            "create it with: qpki migrate\n")  # fmt: skip
    assert run("migrate") == (0, f"Database upgraded from None to {HEAD}.\n")
    assert run("migrate") == (0, f"Database is at revision {HEAD}; nothing to do.\n")
    assert run("migrate", "--revision", "0002_mfa") == (
        0,
        f"Database rolled back from {HEAD} to 0002_mfa.\n",
    )
    assert db.schema_state().current == "0002_mfa"
    code, out = run("migrate", "--revision", "0042_nonsense")
    assert code == 1 and "Unknown revision '0042_nonsense'; this qPKI knows: 0001_foundation" in out
    assert run("migrate", "--check")[0] == 1
    assert run("migrate")[0] == 0 and db.schema_state().status == "current"
    assert run("migrate", "--check") == (0, "Database schema is current.\n")


def test_commands_bring_the_embedded_database_up_to_date(db: DatabaseManager) -> None:
    assert run("migrate", "--revision", "0002_mfa")[0] == 0
    code, out = run("users", "list")
    assert code == 0, out
    assert db.schema_state().current == HEAD


def test_a_schema_newer_than_the_code_is_refused_even_on_sqlite(db: DatabaseManager) -> None:
    assert run("migrate")[0] == 0
    with db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099_future'")
    for command in (["users", "list"], ["migrate"]):
        code, out = run(*command)
        assert code == 1 and out.count("\n") == 1, out
        assert "0099_future, newer than this qPKI knows" in out


def test_the_serving_path_checks_the_schema_without_loading_alembic(
    db: DatabaseManager, tmp_path: Path
) -> None:
    """`qpki run` checks (and /readyz re-checks) the schema in processes that never import
    Alembic; only the `qpki migrate` child does."""
    import os
    import subprocess
    import sys

    assert run("migrate")[0] == 0
    probe = (
        "import os, sys\n"
        "from qpki.config import Settings\n"
        "from qpki.ops.startup import prepare_database\n"
        "from qpki.app import create_app\n"
        "settings = Settings.from_env()\n"
        "prepare_database(settings, os.environ, migrate_sqlite=False)\n"
        "app = create_app(settings)\n"
        "assert app.test_client().get('/readyz').status_code == 200\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=dict(os.environ), capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout
