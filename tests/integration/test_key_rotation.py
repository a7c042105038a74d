"""`qpki keys rotate` and `qpki keys generate`, run as the real command (checklist §4.6).

Issue 10 item 2: the command once re-encrypted through the live key ring, which looks at the
key file at most once a second; run within a second of start-up it re-encrypted under the old
key, printed success, and an operator who then removed the old key lost every 2FA secret. A
test that set the reload interval to 0 never saw it. These tests run the command in a child
process exactly as an operator does, with nothing patched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from flask import Flask
from sqlalchemy import select, update

from helpers import (
    PASSWORD,
    create_user,
    enable_mfa,
    login_with_mfa,
    next_step_code,
    oathtool_code,
)
from qpki.app import create_app
from qpki.audit.models import AuditEventRecord
from qpki.auth.key_rotation import (
    TOKEN_COLUMNS,
    KeyRotationService,
    KeySource,
    RotationError,
    reencrypt_row,
)
from qpki.auth.keys import build_ring, read_key_file, write_key_file
from qpki.auth.models import MFASetupSession, User
from qpki.clock import system_clock
from qpki.config import Settings


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of an operator's shell: no QPKI_* settings but the ones given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPKI_")}
    env["QPKI_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def qpki(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qpki", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def open_app(env: dict[str, str]) -> Flask:
    """A freshly started server process's app (reads the key file as it is now)."""
    settings = Settings.from_env(
        env, csrf_enabled=False, rate_limits_enabled=False, testing=True, argon2_profile="fast"
    )
    app = create_app(settings)
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    return app


def stored_tokens(app: Flask) -> list[str]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        tokens = [t for u in s.scalars(select(User)) for t in (u.totp_secret, u.backup_codes) if t]
        tokens += [p.secret for p in s.scalars(select(MFASetupSession))]
    return tokens


def rotation_events(app: Flask) -> list[tuple[str, dict[str, object]]]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        rows = s.scalars(
            select(AuditEventRecord)
            .where(AuditEventRecord.event == "keys_rotated")
            .order_by(AuditEventRecord.id)
        )
        return [(r.outcome, json.loads(r.details) if r.details else {}) for r in rows]


@pytest.fixture
def enrolled(tmp_path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[str]]], str]:
    """amy and ben with 2FA, cat with a pending setup; returns (env, factors, cat's secret)."""
    env = cli_env(tmp_path / "data")
    app = open_app(env)
    factors = {}
    for name in ("amy", "ben"):
        factors[name] = enable_mfa(app, create_user(app, name).id)
    cat = create_user(app, "cat")
    pending = app.auth_manager.start_mfa_setup(cat.id)  # type: ignore[attr-defined]
    app.db_manager.dispose()  # type: ignore[attr-defined]
    return env, factors, pending.secret


def test_rotate_right_after_start_then_remove_the_old_key_by_hand(
    enrolled: tuple[dict[str, str], dict[str, tuple[str, list[str]]], str],
) -> None:
    env, factors, cat_secret = enrolled
    key_path = Path(env["QPKI_DATA_DIR"]) / ".mfa_key"
    (old_key,) = read_key_file(key_path)

    done = qpki(env, "keys", "rotate")  # loads the app, then rotates at once
    assert done.returncode == 0, done.stderr
    new_key, kept = read_key_file(key_path)
    assert kept == old_key != new_key

    # The operator removes the old key by hand (the file keeps its mode 0600).
    key_path.write_bytes(new_key + b"\n")
    restarted = open_app(env)  # start-up refuses a key that cannot read the stored secrets
    tokens = stored_tokens(restarted)
    assert len(tokens) == 5
    for token in tokens:
        Fernet(new_key).decrypt(token.encode())  # raises if anything is still under the old key
    amy_secret, _ = factors["amy"]
    assert (
        login_with_mfa(restarted.test_client(), "amy", next_step_code(amy_secret)).status_code
        == 302
    )
    ben = restarted.test_client()
    assert login_with_mfa(ben, "ben", factors["ben"][1][0]).status_code == 302
    assert ben.get("/auth/profile").status_code == 200
    cat = restarted.auth_manager.get_user(username="cat")  # type: ignore[attr-defined]
    restarted.auth_manager.confirm_mfa_setup(cat.id, oathtool_code(cat_secret))  # type: ignore[attr-defined]

    # Exact counts, and only after every token was verified under the new key.
    assert done.stdout.startswith(f"New key added to {key_path}. ")
    assert (
        "Re-encrypted 2 TOTP secrets, 2 backup-code sets and 1 pending setups; verified: all 5 "
        "stored secrets decrypt with the newest key alone."
    ) in done.stdout
    ((outcome, details),) = rotation_events(restarted)
    assert outcome == "success"
    assert details == {
        "action": "rotated",
        "totp_secrets": 2,
        "backup_code_sets": 2,
        "setup_sessions": 1,
        "verified": 5,
        "retried": 0,
    }


def test_rotate_then_retire_through_the_command(
    enrolled: tuple[dict[str, str], dict[str, tuple[str, list[str]]], str],
) -> None:
    env, factors, _ = enrolled
    key_path = Path(env["QPKI_DATA_DIR"]) / ".mfa_key"
    assert qpki(env, "keys", "rotate").returncode == 0
    new_key, _old = read_key_file(key_path)

    retired = qpki(env, "keys", "rotate", "--retire-old")
    assert retired.returncode == 0, retired.stderr
    assert "Re-encrypted 0 TOTP secrets, 0 backup-code sets and 0 pending setups" in retired.stdout
    assert "all 5 stored secrets decrypt with the newest key alone" in retired.stdout
    assert read_key_file(key_path) == [new_key]
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"

    app = open_app(env)
    amy_secret, _ = factors["amy"]
    assert login_with_mfa(app.test_client(), "amy", next_step_code(amy_secret)).status_code == 302
    assert [d["action"] for _, d in rotation_events(app)] == ["rotated", "retired_old_keys"]

    again = qpki(env, "keys", "rotate", "--retire-old")
    assert again.returncode == 0 and again.stdout.startswith("Only one key")
    both = qpki(env, "keys", "rotate", "--retire-old", "--reencrypt-only")
    assert both.returncode == 2 and "not both" in both.stderr


def test_unreadable_token_stops_rotation_and_retires_nothing(
    enrolled: tuple[dict[str, str], dict[str, tuple[str, list[str]]], str],
) -> None:
    env, _, _ = enrolled
    key_path = Path(env["QPKI_DATA_DIR"]) / ".mfa_key"
    assert qpki(env, "keys", "rotate").returncode == 0
    ring_before = read_key_file(key_path)
    app = open_app(env)
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        ben = s.scalar(select(User).where(User.username == "ben"))
        assert ben is not None
        ben.totp_secret = Fernet(Fernet.generate_key()).encrypt(b"foreign").decode()
        ben_id = ben.id

    failed = qpki(env, "keys", "rotate", "--retire-old")
    assert failed.returncode == 1
    assert f"users.totp_secret id={ben_id} cannot be decrypted" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert read_key_file(key_path) == ring_before  # the old key stays
    outcome, details = rotation_events(app)[-1]
    assert outcome == "failure"
    assert details["rows"] == [f"users.totp_secret id={ben_id}"]


def test_env_keys_cannot_be_rotated_by_file(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "data", QPKI_MFA_KEY=Fernet.generate_key().decode())
    for args in (("keys", "rotate"), ("keys", "rotate", "--retire-old")):
        refused = qpki(env, *args)
        assert refused.returncode == 1
        assert "QPKI_MFA_KEY" in refused.stderr and "QPKI_MFA_DECRYPT_KEYS" in refused.stderr
    assert not (tmp_path / "data" / ".mfa_key").exists()


def test_reencrypt_only_after_promoting_an_env_key(tmp_path: Path) -> None:
    """The rolling procedure's third step: promote the new key, then re-encrypt."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    before = cli_env(tmp_path / "data", QPKI_MFA_KEY=old)
    app = open_app(before)
    secret, codes = enable_mfa(app, create_user(app, "amy").id)
    app.db_manager.dispose()  # type: ignore[attr-defined]

    promoted = cli_env(tmp_path / "data", QPKI_MFA_KEY=new, QPKI_MFA_DECRYPT_KEYS=old)
    done = qpki(promoted, "keys", "rotate", "--reencrypt-only")
    assert done.returncode == 0, done.stderr
    assert "Re-encrypted 1 TOTP secrets, 1 backup-code sets and 0 pending setups" in done.stdout
    assert "can now be removed from every instance" in done.stdout

    retired = open_app(cli_env(tmp_path / "data", QPKI_MFA_KEY=new))
    assert login_with_mfa(retired.test_client(), "amy", codes[0]).status_code == 302
    assert retired.auth_manager.verify_mfa_code(  # type: ignore[attr-defined]
        retired.auth_manager.get_user(username="amy").id,  # type: ignore[attr-defined]
        next_step_code(secret),
    )[0]


def test_keys_generate_prints_working_keys(tmp_path: Path) -> None:
    out = qpki(cli_env(tmp_path / "unused"), "keys", "generate")
    assert out.returncode == 0, out.stderr
    values = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert list(values) == ["QPKI_SECRET_KEY", "QPKI_MFA_KEY", "QPKI_AUDIT_KEY"]
    assert not (tmp_path / "unused").exists()  # nothing stored, nothing opened
    env = cli_env(tmp_path / "data", **values)
    listed = qpki(env, "users", "list")
    assert listed.returncode == 0, listed.stderr
    assert not (tmp_path / "data" / ".mfa_key").exists()  # the printed MFA key was used


def test_short_secret_key_stops_start_up_with_one_line(tmp_path: Path) -> None:
    out = qpki(cli_env(tmp_path / "data", QPKI_SECRET_KEY="abc"), "users", "list")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "Error: QPKI_SECRET_KEY is too short (3 bytes; at least 32 needed). "
        "Make one with: qpki keys generate"
    ]


# -- concurrent changes: retried, never skipped and counted ------------------------------------
def _service(app: Flask, tmp_path: Path) -> KeyRotationService:
    return KeyRotationService(
        app.db_manager,  # type: ignore[attr-defined]
        app.auth_manager.audit,  # type: ignore[attr-defined]
        system_clock,
        KeySource(tmp_path / "data" / ".mfa_key"),
    )


def test_a_row_changed_after_it_was_read_is_read_again(make_app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The compare-and-swap misses a row that changed since it was read, and retries it."""
    app = make_app()
    old, new = Fernet.generate_key(), Fernet.generate_key()
    amy = create_user(app, "amy")
    stale = Fernet(old).encrypt(b"JBSWY3DPEHPK3PXP").decode()
    current = Fernet(old).encrypt(b"JBSWY3DPEHPK3PXP").decode()  # written by someone else
    totp = next(c for c in TOKEN_COLUMNS if c.label == "users.totp_secret")
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        s.execute(update(User).where(User.id == amy.id).values(totp_secret=current))
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        outcome = reencrypt_row(s, totp, (amy.id, stale), Fernet(new), build_ring([new, old]))
    assert outcome == ("rewritten", 1)
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        stored = s.scalar(select(User.totp_secret).where(User.id == amy.id))
    assert stored != current
    assert Fernet(new).decrypt(stored.encode()) == b"JBSWY3DPEHPK3PXP"


def test_rotation_while_backup_codes_are_being_used(  # type: ignore[no-untyped-def]
    make_app, db_url: str, tmp_path: Path
) -> None:
    """Sign-ins spending backup codes during a rotation lose nothing and leave nothing behind
    under the old key (the version compare-and-swap on both sides)."""
    app = make_app(db_url, mfa_key_reload_seconds=0.0)
    users = []
    for i in range(12):
        user = create_user(app, f"user{i}")
        users.append((user.id, enable_mfa(app, user.id)[1]))
    key_path = tmp_path / "data" / ".mfa_key"
    manager = app.auth_manager  # type: ignore[attr-defined]
    results: list[bool] = []
    start = threading.Barrier(2)

    def spend() -> None:
        start.wait()
        for user_id, codes in users:
            for code in codes[:3]:
                results.append(manager.verify_mfa_code(user_id, code)[0])

    spender = threading.Thread(target=spend)
    spender.start()
    start.wait()
    report = _service(app, tmp_path).rotate(actor_name="test")
    spender.join()

    assert results == [True] * 36
    assert report.verified == 24
    new_key = read_key_file(key_path)[0]
    for token in stored_tokens(app):
        Fernet(new_key).decrypt(token.encode())
    write_key_file(key_path, [new_key])  # the old key is gone: nothing may need it
    for user_id, codes in users:
        assert manager.verify_mfa_code(user_id, codes[0]) == (False, "Backup code already used")
        assert manager.verify_mfa_code(user_id, codes[3])[0]


def test_rotation_reports_rows_it_cannot_read(make_app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app = make_app()
    amy = create_user(app, "amy", password=PASSWORD)
    enable_mfa(app, amy.id)
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        s.execute(
            update(User)
            .where(User.id == amy.id)
            .values(backup_codes=Fernet(Fernet.generate_key()).encrypt(b"[]").decode())
        )
    with pytest.raises(RotationError, match=f"users.backup_codes id={amy.id}"):
        _service(app, tmp_path).reencrypt(actor_name="test")
