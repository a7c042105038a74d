"""Faults lose nothing: a killed process, an unreachable database, a corrupted row."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
from flask import Flask
from sqlalchemy import create_engine, text

from helpers import (
    PASSWORD,
    create_user,
    enroll,
    login,
    login_with_mfa,
    next_step_code,
    oathtool_code,
)
from qpki.config import Settings

# A child process that runs one use case and SIGKILLs itself just before its commit, the way a
# crash or an OOM kill would strike. The fault is injected from outside the product code.
CHILD = textwrap.dedent(
    """
    import json, os, pathlib, signal, sys
    from sqlalchemy import event, text
    from sqlalchemy.orm import Session
    from qpki.app import create_app
    from qpki.config import Settings

    args = json.loads(sys.argv[1])
    values = dict(args["settings"], data_dir=pathlib.Path(args["settings"]["data_dir"]))
    app = create_app(Settings(**values))
    manager = app.auth_manager
    QUERY = "SELECT two_factor_enabled, backup_codes_version FROM users WHERE id=:i"

    @event.listens_for(Session, "before_commit")
    def _crash(session):
        enabled, version = session.execute(text(QUERY), {"i": args["user_id"]}).one()
        if args["use_case"] == "enable" and enabled:
            os.kill(os.getpid(), signal.SIGKILL)
        if args["use_case"] == "regenerate" and version != args["version"]:
            os.kill(os.getpid(), signal.SIGKILL)

    if args["use_case"] == "enable":
        manager.confirm_mfa_setup(args["user_id"], args["code"])
    else:
        manager.regenerate_backup_codes(args["user_id"], args["password"], args["code"])
    print("committed")
    """
)


def _run_child(settings: Settings, **args: object) -> subprocess.CompletedProcess[str]:
    payload = {
        "settings": {
            "data_dir": str(settings.data_dir),
            "database_url": settings.database_url,
            "secret_key": settings.secret_key,
            "argon2_profile": "fast",
        },
        **args,
    }
    return subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sigkill_during_enable_leaves_old_state(
    make_app: Callable[..., Flask], db_url: str
) -> None:
    app = make_app(db_url)
    user = create_user(app, "kim")
    setup = app.auth_manager.start_mfa_setup(user.id)  # type: ignore[attr-defined]
    done = _run_child(
        app.settings,
        use_case="enable",
        user_id=user.id,  # type: ignore[attr-defined]
        code=oathtool_code(setup.secret),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    after = app.auth_manager.get_user(user_id=user.id)  # type: ignore[attr-defined]
    assert not after.two_factor_enabled and after.totp_secret is None and after.backup_codes is None
    # the pending setup survived, so the user can simply try again
    codes = app.auth_manager.confirm_mfa_setup(user.id, next_step_code(setup.secret))  # type: ignore[attr-defined]
    assert len(codes) == 8


def test_sigkill_during_regenerate_keeps_old_codes(
    make_app: Callable[..., Flask], db_url: str
) -> None:
    app = make_app(db_url)
    user = create_user(app, "lou")
    setup = app.auth_manager.start_mfa_setup(user.id)  # type: ignore[attr-defined]
    old = app.auth_manager.confirm_mfa_setup(user.id, oathtool_code(setup.secret))  # type: ignore[attr-defined]
    done = _run_child(
        app.settings,
        use_case="regenerate",
        user_id=user.id,  # type: ignore[attr-defined]
        password=PASSWORD,
        code=next_step_code(setup.secret),
        version=app.auth_manager.get_user(user_id=user.id).backup_codes_version,  # type: ignore[attr-defined]
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    after = app.auth_manager.get_user(user_id=user.id)  # type: ignore[attr-defined]
    assert after.two_factor_enabled and after.totp_secret and after.backup_codes
    assert app.auth_manager.get_backup_codes_info(user.id).remaining == 8  # type: ignore[attr-defined]
    assert app.auth_manager.verify_mfa_code(user.id, old[0])[0]  # type: ignore[attr-defined]


def test_database_unreachable_gives_clean_503(app: Flask) -> None:
    create_user(app, "mia")
    real_engine = app.db_manager.engine  # type: ignore[attr-defined]
    dead = create_engine(
        "postgresql+psycopg://nobody:x@127.0.0.1:9/none", connect_args={"connect_timeout": 2}
    )
    app.db_manager.engine = dead  # type: ignore[attr-defined]
    app.db_manager._sessions.configure(bind=dead)  # type: ignore[attr-defined]
    try:
        response = login(app.test_client(), "mia")
        body = response.get_data(as_text=True)
        assert response.status_code == 503
        assert "temporarily unavailable" in body
        assert "Traceback" not in body and "psycopg" not in body and "127.0.0.1:9" not in body
    finally:
        app.db_manager.engine = real_engine  # type: ignore[attr-defined]
        app.db_manager._sessions.configure(bind=real_engine)  # type: ignore[attr-defined]
        dead.dispose()
    assert login(app.test_client(), "mia").status_code == 302  # back to normal, nothing lost


def test_corrupted_row_refuses_that_login_only(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = app.test_client()
    secrets = {}
    for name in ("nia", "oto"):
        create_user(app, name)
        assert login(client, name).status_code == 302
        secret, _codes = enroll(client)
        client.post("/auth/logout", data={})
        secrets[name] = secret
    with app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        token = conn.execute(
            text("SELECT totp_secret FROM users WHERE username='nia'")
        ).scalar_one()
        tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
        conn.execute(text("UPDATE users SET totp_secret=:t WHERE username='nia'"), {"t": tampered})
    caplog.clear()
    response = login_with_mfa(client, "nia", next_step_code(secrets["nia"]))
    body = response.get_data(as_text=True)
    assert response.status_code == 200 and "cannot be read" in body
    errors = [
        r
        for r in caplog.records
        if r.levelname == "ERROR" and "cannot be decrypted" in r.getMessage()
    ]
    assert len(errors) == 1
    assert app.auth_manager.get_user(username="nia").two_factor_enabled  # type: ignore[attr-defined]
    other = app.test_client()
    assert login_with_mfa(other, "oto", next_step_code(secrets["oto"])).status_code == 302


def test_wrong_key_stops_startup(make_app: Callable[..., Flask]) -> None:
    """An instance given another key refuses to start instead of refusing every 2FA login."""
    from cryptography.fernet import Fernet

    from qpki.auth.keys import KeyFileError

    app = make_app()
    user = create_user(app, "pat")
    setup = app.auth_manager.start_mfa_setup(user.id)  # type: ignore[attr-defined]
    app.auth_manager.confirm_mfa_setup(user.id, oathtool_code(setup.secret))  # type: ignore[attr-defined]
    with pytest.raises(KeyFileError, match="cannot decrypt the 2FA secrets"):
        make_app(mfa_key=Fernet.generate_key().decode())
    assert make_app() is not None  # the right key still starts
