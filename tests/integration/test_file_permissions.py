"""The data directory is 0700 and every file in it 0600 (checklist §12.11, issue 10 item 12).

Found by the outside review: an existing data dir stayed 0755, ``qpki.db``, ``-wal`` and
``-shm`` were 0644 and ``.secret_key``'s mode was never checked. Start-up now narrows them and
says so once; a fresh install never makes them readable by others in the first place, even
under the common umask 022.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import PASSWORD
from qpki.app import create_app
from qpki.config import Settings


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def run_qpki(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPKI_")}
    env["QPKI_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "qpki", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=lambda: os.umask(0o022),  # what most shells and services start with
    )


def test_fresh_install_under_umask_022_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    made = run_qpki(data, "users", "create", "amy", "--password-stdin", stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    listed = run_qpki(data, "users", "list")
    assert listed.returncode == 0, listed.stderr
    files = [p for p in data.rglob("*")]
    names = {p.name for p in files}
    assert {"qpki.db", ".secret_key", ".mfa_key"} <= names
    assert mode_of(data) == 0o700
    for path in files:
        expected = 0o700 if path.is_dir() else 0o600
        assert mode_of(path) == expected, (path.name, oct(mode_of(path)))
    assert "Made readable by the owner only" not in made.stderr + listed.stderr  # nothing to fix


def test_start_up_narrows_wide_modes_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    env = {"QPKI_DATA_DIR": str(data)}
    settings = Settings.from_env(env, argon2_profile="fast")
    app = create_app(settings)
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    app.auth_manager.create_user("amy", PASSWORD)  # type: ignore[attr-defined]
    app.db_manager.dispose()  # type: ignore[attr-defined]
    # What an older version, a copied backup or a careless chmod leaves behind.
    data.chmod(0o755)
    wide = [p for p in data.iterdir() if p.is_file()]
    for path in wide:
        path.chmod(0o644)
    for suffix in ("-wal", "-shm"):
        extra = data / f"qpki.db{suffix}"
        if not extra.exists():
            extra.write_bytes(b"")
            wide.append(extra)
        extra.chmod(0o644)
    assert {p.name for p in wide} >= {"qpki.db", "qpki.db-wal", "qpki.db-shm", ".secret_key"}

    with caplog.at_level(logging.WARNING, logger="qpki.app"):
        restarted = create_app(Settings.from_env(env, argon2_profile="fast"))
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name == "qpki.app"
    ]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(data) in message and ".mfa_key" in message and "qpki.db-wal" in message
    assert mode_of(data) == 0o700
    for path in wide:
        assert mode_of(path) == 0o600, path.name
    assert restarted.auth_manager.get_user(username="amy") is not None  # type: ignore[attr-defined]
    restarted.db_manager.dispose()  # type: ignore[attr-defined]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qpki.app"):
        create_app(Settings.from_env(env, argon2_profile="fast")).db_manager.dispose()  # type: ignore[attr-defined]
    assert [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name == "qpki.app"
    ] == []  # once, when fixed
