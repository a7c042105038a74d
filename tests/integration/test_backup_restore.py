"""The backup drill on the embedded SQLite database: backup while serving → wipe → restore →
the audit chain verifies → a user signs in with 2FA again.

The keys go to a separate directory (never beside the database unless asked), and restore puts
them back into the data directory; without them the restored 2FA secrets would be unreadable.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pyotp
import pytest
from click.testing import CliRunner

from helpers import PASSWORD, enable_mfa, login_with_mfa
from qpki.app import create_app
from qpki.cli import main
from qpki.clock import SteppedClock
from qpki.config import Settings


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("QPKI_DATABASE_URL", "QPKI_MFA_KEY", "QPKI_SECRET_KEY", "QPKI_AUDIT_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QPKI_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_backup_wipe_restore_verify_and_sign_in_with_2fa(data_dir: Path, tmp_path: Path) -> None:
    clock = SteppedClock()
    app = create_app(Settings.from_env(), clock=clock)
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    alice = app.auth_manager.create_user("alice", PASSWORD, "alice@example.org", "viewer")  # type: ignore[attr-defined]
    secret, _codes = enable_mfa(app, alice.id)

    # Back up while another thread keeps writing (users + their audit events).
    stop = threading.Event()
    written: list[str] = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            app.auth_manager.create_user(f"busy{n}", PASSWORD, "", "viewer")  # type: ignore[attr-defined]
            written.append(f"busy{n}")
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 3:
            stop.wait(0.01)
        code, out = run("backup", str(tmp_path / "backup"), "--keys-to", str(tmp_path / "vault"))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert code == 0, out
    assert "backed up to" in out and "Keys (" in out
    assert not any((tmp_path / "backup").glob(".*key*")), "keys must not sit beside the database"
    assert {".mfa_key", ".secret_key"} <= {p.name for p in (tmp_path / "vault").iterdir()}
    with sqlite3.connect(tmp_path / "backup" / "qpki.db") as snapshot:
        assert snapshot.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        saved = snapshot.execute("SELECT count(*) FROM users").fetchone()[0]
    assert 2 <= saved <= 1 + len(written)
    app.db_manager.dispose()  # type: ignore[attr-defined]

    # Disaster: the whole data directory is gone.
    shutil.rmtree(data_dir)
    code, out = run("restore", str(tmp_path / "backup"), "--keys-from", str(tmp_path / "vault"))
    assert code == 0, out
    assert "Database restored" in out and ".mfa_key" in out

    code, out = run("audit", "verify")
    assert code == 0 and "Audit chain intact" in out, out

    # Sign-ins with 2FA work on the restored data (a later time step: the old one was spent).
    clock.advance(seconds=60)
    restored = create_app(
        Settings.from_env(csrf_enabled=False, rate_limits_enabled=False, testing=True),
        clock=clock,
    )
    try:
        done = login_with_mfa(restored.test_client(), "alice", pyotp.TOTP(secret).at(clock.now))
        assert done.status_code == 302 and done.headers["Location"].endswith("/"), done.data[:300]
        assert restored.auth_manager.count_users() == saved  # type: ignore[attr-defined]
    finally:
        restored.db_manager.dispose()  # type: ignore[attr-defined]

    # Restoring over a database that holds data needs --force.
    code, out = run("restore", str(tmp_path / "backup"))
    assert code == 1 and "--force" in out


def test_keys_are_never_written_beside_the_database_unless_asked(
    data_dir: Path, tmp_path: Path
) -> None:
    assert run("users", "list")[0] == 0  # creates and migrates the embedded database
    code, out = run("backup", str(tmp_path / "b1"))
    assert code == 0 and "Keys NOT included" in out
    assert sorted(p.name for p in (tmp_path / "b1").iterdir()) == ["manifest.json", "qpki.db"]

    code, out = run("backup", str(tmp_path / "b2"), "--keys-to", str(tmp_path / "b2" / "keys"))
    assert code == 1 and "beside the database backup" in out
    assert not (tmp_path / "b2").exists(), "a refused backup writes nothing"

    code, out = run("backup", str(tmp_path / "b3"), "--include-keys")
    assert code == 0
    assert (tmp_path / "b3" / "keys" / ".mfa_key").stat().st_mode & 0o777 == 0o600

    code, out = run("backup", str(tmp_path / "b1"))
    assert code == 1 and "not empty" in out


def test_restore_checks_the_backup_before_touching_anything(data_dir: Path, tmp_path: Path) -> None:
    assert run("users", "list")[0] == 0
    assert run("backup", str(tmp_path / "b"))[0] == 0
    with (tmp_path / "b" / "qpki.db").open("r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00corrupt")
    before = (data_dir / "qpki.db").read_bytes()
    code, out = run("restore", str(tmp_path / "b"), "--force")
    assert code == 1 and "checksum" in out
    assert (data_dir / "qpki.db").read_bytes() == before
    code, out = run("restore", str(tmp_path / "nothing-here"))
    assert code == 2  # click: the directory does not exist
