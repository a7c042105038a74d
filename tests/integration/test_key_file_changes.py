"""A key file changed or lost while qPKI runs or is stopped (issue 10 item 11).

Found by the outside review: a new valid key written over ``.mfa_key`` was picked up by the
running server with an INFO line; sign-ins then failed closed, and enrolments meanwhile were
encrypted under a key that could not read anything else. And the start-up check looked only at
enabled TOTP secrets, so with nothing but pending setups a deleted key was silently replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from flask import Flask
from sqlalchemy import select, update

from helpers import create_user, enable_mfa, login_with_mfa, next_step_code
from qpki.auth.keys import KeyFileError, read_key_file, write_key_file
from qpki.auth.models import MFASetupSession, User
from qpki.db.base import utcnow


def test_a_new_key_written_over_the_file_is_not_adopted(
    make_app: Callable[..., Flask], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(mfa_key_reload_seconds=0.0)
    amy = create_user(app, "amy")
    secret, _ = enable_mfa(app, amy.id)
    key_path = tmp_path / "data" / ".mfa_key"
    (working,) = read_key_file(key_path)

    write_key_file(key_path, [Fernet.generate_key()])  # someone "fixes" the key file
    with caplog.at_level(logging.ERROR, logger="qpki.auth.keys"):
        ben = create_user(app, "ben")
        enable_mfa(app, ben.id)  # enrols under the working key, not the stray one
        client = app.test_client()
        assert login_with_mfa(client, "amy", next_step_code(secret)).status_code == 302
    assert client.get("/auth/profile").status_code == 200
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(key_path) in errors[0]
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        stored = s.scalar(select(User.totp_secret).where(User.id == ben.id))
    assert stored is not None
    Fernet(working).decrypt(stored.encode())


@pytest.mark.parametrize("what", ["pending setup", "backup codes only"])
def test_deleted_key_is_not_replaced_when_only_other_tokens_exist(
    make_app: Callable[..., Flask], tmp_path: Path, what: str
) -> None:
    """Start-up looks at pending setups and backup codes too, not only TOTP secrets."""
    app = make_app()
    amy = create_user(app, "amy")
    if what == "pending setup":
        app.auth_manager.start_mfa_setup(amy.id)  # type: ignore[attr-defined]
    else:
        enable_mfa(app, amy.id)
        with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
            s.execute(update(User).where(User.id == amy.id).values(totp_secret=None))
    key_path = tmp_path / "data" / ".mfa_key"
    key_path.unlink()
    with pytest.raises(KeyFileError, match="is missing but the database holds encrypted"):
        make_app()
    assert not key_path.exists()  # no new key that could never read the stored tokens


def test_wrong_key_is_refused_at_start_up_with_only_a_pending_setup(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app()
    app.auth_manager.start_mfa_setup(create_user(app, "amy").id)  # type: ignore[attr-defined]
    with pytest.raises(KeyFileError, match="cannot decrypt"):
        make_app(mfa_key=Fernet.generate_key().decode())


def test_expired_setups_do_not_block_start_up(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """A stale pending setup is garbage, not data: it must not keep the server down."""
    app = make_app()
    app.auth_manager.start_mfa_setup(create_user(app, "amy").id)  # type: ignore[attr-defined]
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        s.execute(update(MFASetupSession).values(expires_at=utcnow() - timedelta(minutes=1)))
    (tmp_path / "data" / ".mfa_key").unlink()
    make_app()
    assert (tmp_path / "data" / ".mfa_key").exists()
