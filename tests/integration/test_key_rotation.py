"""`qpki keys rotate`: new key first, everything re-encrypted, old key retired (checklist §4.6)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from sqlalchemy import select

import qpki.auth.keys as keys_module
from helpers import PASSWORD, oathtool_code
from qpki.app import create_app
from qpki.audit.models import AuditEventRecord
from qpki.auth.keys import read_key_file
from qpki.auth.models import MFASetupSession, User
from qpki.cli import main
from qpki.config import Settings


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_rotate_then_retire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QPKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("QPKI_MFA_KEY", raising=False)
    monkeypatch.setattr(keys_module, "RELOAD_CHECK_SECONDS", 0.0)
    app = create_app(Settings.from_env())
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    manager = app.auth_manager  # type: ignore[attr-defined]
    codes = {}
    for name in ("amy", "ben"):
        user = manager.create_user(name, PASSWORD)
        setup = manager.start_mfa_setup(user.id)
        codes[name] = manager.confirm_mfa_setup(user.id, oathtool_code(setup.secret))
    pending_user = manager.create_user("cat", PASSWORD)
    manager.start_mfa_setup(pending_user.id)
    key_path = tmp_path / "data" / ".mfa_key"
    (old_key,) = read_key_file(key_path)

    code, out = run("keys", "rotate")
    assert code == 0, out
    assert "2 secrets, 2 backup-code sets and 1 pending setups" in out
    new_key, second = read_key_file(key_path)
    assert second == old_key and new_key != old_key
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    new_only = Fernet(new_key)
    with manager.db.transaction(write=False) as s:
        tokens = [t for u in s.scalars(select(User)) for t in (u.totp_secret, u.backup_codes) if t]
        tokens += [p.secret for p in s.scalars(select(MFASetupSession))]
    assert len(tokens) == 5
    for token in tokens:
        new_only.decrypt(token.encode())  # raises if still under the old key

    # the already running app reloads the file and still works
    amy = manager.get_user(username="amy")
    assert manager.verify_mfa_code(amy.id, codes["amy"][0])[0]

    code, out = run("keys", "rotate", "--retire-old")
    assert code == 0, out
    assert read_key_file(key_path) == [new_key]
    assert manager.verify_mfa_code(amy.id, codes["amy"][1])[0]
    ben = manager.get_user(username="ben")
    assert manager.verify_mfa_code(ben.id, codes["ben"][0])[0]
    with manager.db.transaction(write=False) as s:
        actions = [
            e.details
            for e in s.scalars(
                select(AuditEventRecord).where(AuditEventRecord.event == "keys_rotated")
            )
        ]
    assert len(actions) == 2 and "rotated" in actions[0] and "retired_old_keys" in actions[1]
    assert run("keys", "rotate", "--retire-old")[1].startswith("Only one key")


def test_env_key_cannot_be_rotated_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QPKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("QPKI_MFA_KEY", Fernet.generate_key().decode())
    code, out = run("keys", "rotate")
    assert code == 1 and "QPKI_MFA_KEY" in out
    assert not (tmp_path / "data" / ".mfa_key").exists()
