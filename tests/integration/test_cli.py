"""The qpki command through click's runner, against a real SQLite database."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from helpers import PASSWORD, oathtool_code
from qpki.app import create_app
from qpki.audit.models import AuditEventRecord
from qpki.cli import main
from qpki.config import Settings
from qpki.db.manager import DatabaseManager


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QPKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("QPKI_DATABASE_URL", raising=False)
    monkeypatch.delenv("QPKI_MFA_KEY", raising=False)
    return tmp_path / "data"


def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)
    return result.exit_code, result.output


def test_migrate_and_create_and_list(cli_env: Path) -> None:
    code, out = run("migrate")
    head = DatabaseManager("sqlite://").head_revision()
    assert code == 0 and str(head) in out, out
    code, out = run(
        "users",
        "create",
        "admin",
        "--email",
        "a@example.org",
        "--role",
        "admin",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert code == 0 and "Created admin admin" in out and PASSWORD not in out
    code, out = run("users", "list")
    assert code == 0 and "admin" in out and "disabled" in out


def test_create_refuses_weak_password_and_duplicates(cli_env: Path) -> None:
    code, out = run("users", "create", "bob", "--password-stdin", stdin="short\n")
    assert code == 1 and "at least 12 characters" in out
    assert run("users", "create", "bob", "--password-stdin", stdin=PASSWORD + "\n")[0] == 0
    code, out = run("users", "create", "BOB", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 1 and "already exists" in out


def test_mfa_status_disable_and_cleanup(cli_env: Path) -> None:
    run("users", "create", "carol", "--password-stdin", stdin=PASSWORD + "\n")
    app = create_app(Settings.from_env())
    user = app.auth_manager.get_user(username="carol")  # type: ignore[attr-defined]
    setup = app.auth_manager.start_mfa_setup(user.id)  # type: ignore[attr-defined]
    app.auth_manager.confirm_mfa_setup(user.id, oathtool_code(setup.secret))  # type: ignore[attr-defined]
    code, out = run("mfa", "status", "carol")
    assert code == 0 and "enabled" in out and "8 of 8" in out
    code, out = run("mfa", "disable", "carol")
    assert code == 2 and "--reason" in out  # reason is required
    code, out = run("mfa", "disable", "carol", "--reason", "lost phone; identity checked by phone")
    assert code == 0
    assert run("mfa", "status", "carol")[1].strip() == "carol: 2FA disabled"
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        (event,) = s.scalars(
            select(AuditEventRecord).where(AuditEventRecord.event == "mfa_admin_disabled")
        )
    assert event.actor_name == "cli" and "lost phone" in event.details
    code, out = run("cleanup")
    assert code == 0 and "setup_sessions" in out
    code, out = run("mfa", "status", "nobody")
    assert code == 1 and "No user named" in out


def test_audit_verify_reports_tampering(cli_env: Path) -> None:
    run("users", "create", "dave", "--password-stdin", stdin=PASSWORD + "\n")
    run("users", "create", "erin", "--password-stdin", stdin=PASSWORD + "\n")
    code, out = run("audit", "verify")
    assert code == 0 and "2 events verified" in out
    app = create_app(Settings.from_env())
    with app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.exec_driver_sql("UPDATE audit_events SET target_name='mallory' WHERE id=1")
    code, out = run("audit", "verify")
    assert code == 1 and "BROKEN at event id 1" in out


def test_unlock(cli_env: Path) -> None:
    from qpki.auth.errors import AccountThrottled, InvalidCredentials

    run("users", "create", "frank", "--password-stdin", stdin=PASSWORD + "\n")
    app = create_app(Settings.from_env())
    manager = app.auth_manager  # type: ignore[attr-defined]
    for _ in range(5):
        with pytest.raises(InvalidCredentials):
            manager.authenticate("frank", "wrong password!!")
    with pytest.raises(AccountThrottled):
        manager.authenticate("frank", PASSWORD)
    code, out = run("users", "unlock", "frank")
    assert code == 0 and "Unlocked frank" in out
    assert manager.authenticate("frank", PASSWORD).username == "frank"


def test_key_file_with_wide_permissions_is_made_private(cli_env: Path) -> None:
    """§12.11: start-up narrows a key file others could read to 0600 (and says so)."""
    assert run("migrate")[0] == 0
    assert run("users", "list")[0] == 0  # the first start creates the key file
    key = cli_env / ".mfa_key"
    key.chmod(0o644)
    code, _out = run("users", "list")
    assert code == 0
    assert key.stat().st_mode & 0o777 == 0o600
