"""Migrations: idempotent, upgrade an older database in place, same schema on both backends."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import inspect, text

from qpki.db.manager import DatabaseManager


def test_migrate_twice_is_a_no_op(db_url: str) -> None:
    db = DatabaseManager(db_url)
    db.migrate_database()
    tables = set(inspect(db.engine).get_table_names())
    db.migrate_database()
    assert db.current_revision() == db.head_revision()
    assert set(inspect(db.engine).get_table_names()) == tables
    assert {
        "users",
        "audit_events",
        "user_sessions",
        "login_throttle",
        "mfa_setup_sessions",
    } <= tables
    columns = {c["name"] for c in inspect(db.engine).get_columns("users")}
    assert {"totp_secret", "backup_codes", "two_factor_enabled", "totp_last_step"} <= columns
    db.dispose()


def test_upgrade_from_first_revision_keeps_data(db_url: str) -> None:
    db = DatabaseManager(db_url)
    db.migrate_database("0001_foundation")
    assert "mfa_setup_sessions" not in inspect(db.engine).get_table_names()
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (username, username_key, email, password_hash, role, is_active,"
                " must_change_password, created_at, two_factor_enabled)"
                " VALUES ('old', 'old', 'old@example.org', 'x', 'admin', :t, :f, :c, :f)"
            ),
            {"t": True, "f": False, "c": datetime(2025, 1, 1, tzinfo=UTC).replace(tzinfo=None)},
        )
    db.migrate_database()
    assert db.current_revision() == db.head_revision()
    with db.engine.connect() as conn:
        row = conn.execute(
            text("SELECT username, role, backup_codes_version, totp_last_step FROM users")
        ).one()
    assert tuple(row) == ("old", "admin", 0, None)
    db.dispose()


def test_seed_migration_command_verbatim(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`python -c "from app import app; app.db_manager.migrate_database()"` works as documented."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {"QPKI_DATA_DIR": str(tmp_path / "inst"), "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-c", "from app import app; app.db_manager.migrate_database()"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    db = DatabaseManager(f"sqlite:///{tmp_path / 'inst' / 'qpki.db'}")
    assert db.current_revision() == db.head_revision()
    assert oct((tmp_path / "inst").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "inst" / ".secret_key").stat().st_mode & 0o777) == "0o600"
    db.dispose()
