"""Helpers shared by integration tests: authenticator codes, page parsing, common flows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyotp
from bs4 import BeautifulSoup
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from harness.services import require_component
from qpki.auth.models import User
from qpki.clock import SteppedClock

PASSWORD = "a long enough passphrase"


def oathtool_code(secret: str, at: datetime | float | None = None) -> str:
    """The code an independent authenticator (Debian's oathtool) shows at ``at``."""
    if shutil.which("oathtool") is None:
        require_component(
            "oathtool", "the oathtool program is not installed (apt-get install oathtool)"
        )
    moment = at.timestamp() if isinstance(at, datetime) else (at if at is not None else time.time())
    stamp = datetime.fromtimestamp(int(moment), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = subprocess.run(
        ["oathtool", "--totp", "-b", "-N", stamp, secret.replace(" ", "")],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def next_step_code(secret: str) -> str:
    """A valid code for the next time step (accepted within the ±1 window, unused so far)."""
    return pyotp.TOTP(secret).at(time.time() + 30)


def page(response: TestResponse) -> BeautifulSoup:
    return BeautifulSoup(response.get_data(as_text=True), "html.parser")


def text_of(response: TestResponse) -> str:
    return page(response).get_text(" ", strip=True)


def create_user(
    app: Flask, username: str = "alice", role: str = "viewer", password: str = PASSWORD
) -> User:
    return app.auth_manager.create_user(username, password, f"{username}@example.org", role)  # type: ignore[attr-defined]


def enable_mfa(app: Flask, user_id: int, *, at: datetime | None = None) -> tuple[str, list[str]]:
    """Enable 2FA through the service API with an oathtool code; returns (secret, codes).

    ``at`` is the app's time when it runs on a SteppedClock (the code is computed for it).
    """
    manager = app.auth_manager  # type: ignore[attr-defined]
    setup = manager.start_mfa_setup(user_id, now=at)
    return setup.secret, manager.confirm_mfa_setup(user_id, oathtool_code(setup.secret, at), now=at)


def login(
    client: FlaskClient, username: str, password: str = PASSWORD, **extra: str
) -> TestResponse:
    return client.post("/auth/login", data={"username": username, "password": password, **extra})


def enroll(
    client: FlaskClient, password: str = PASSWORD, *, at: datetime | None = None
) -> tuple[str, list[str]]:
    """Enable 2FA through the pages for the logged-in user; returns (secret, backup codes).

    The setup page starts nothing on GET: the user presses "Start setup" (a step-up action,
    so the password goes with it), then the page shows the QR code and the key.
    """
    setup = client.get("/auth/mfa/setup")
    assert setup.status_code == 200, setup.status_code
    if page(setup).find(id="mfa-secret") is None:
        started = client.post("/auth/mfa/setup/start", data={"password": password})
        assert started.status_code == 302, text_of(started)
        setup = client.get("/auth/mfa/setup")
    secret = re.sub(r"\s+", "", page(setup).find(id="mfa-secret").get_text())
    done = client.post("/auth/mfa/setup", data={"code": oathtool_code(secret, at)})
    assert done.status_code == 200, text_of(done)
    codes = [li.get_text(strip=True) for li in page(done).select("#backup-codes .backup-code")]
    assert len(codes) == 8
    return secret, codes


def login_with_mfa(
    client: FlaskClient, username: str, code: str, password: str = PASSWORD
) -> TestResponse:
    first = login(client, username, password)
    assert first.status_code == 302 and first.headers["Location"].endswith("/auth/mfa/verify")
    return client.post("/auth/mfa/verify", data={"code": code})


def main_text(response: TestResponse) -> str:
    main = page(response).find("main")
    assert main is not None, response.get_data(as_text=True)[:500]
    return main.get_text(" ", strip=True)


def location_target(response: TestResponse) -> str:
    """The redirect target (path and query), asserting it stays on this site."""
    assert response.status_code in (301, 302, 303, 307, 308), response.status_code
    target = response.headers["Location"]
    parts = urlsplit(target)
    assert parts.scheme in ("", "http"), target
    assert parts.netloc in ("", "localhost"), target
    assert not parts.path.startswith(("//", "/\\")), target
    assert "\\" not in target, target
    return parts.path + (f"?{parts.query}" if parts.query else "")


def location_path(response: TestResponse) -> str:
    """The redirect target's path, asserting it stays on this site."""
    return location_target(response).split("?", 1)[0]


def admin_client(
    app: Flask, username: str = "root-admin", *, clock: SteppedClock | None = None
) -> tuple[FlaskClient, User, str]:
    """An administrator with 2FA, signed in with both factors (so fresh for step-up).

    With the app's ``clock``, codes are computed for its time and the clock is moved one
    step on, so the test's next code is a fresh one. Returns (client, admin, TOTP secret).
    """
    admin = create_user(app, username, role="admin")
    at = clock.now if clock else None
    secret, _codes = enable_mfa(app, admin.id, at=at)
    client = app.test_client()
    if clock is not None:
        clock.advance(seconds=30)
    code = oathtool_code(secret, clock.now) if clock else next_step_code(secret)
    done = login_with_mfa(client, username, code)
    assert done.status_code == 302, text_of(done)
    return client, admin, secret


def optional_2fa_for_admins(app: Flask) -> None:
    """Lift the fresh-install policy (admins enrol at first sign-in) for a test about
    something else, as ``qpki policy set admin --no-require-2fa`` does."""
    from qpki.web.services import services_of

    services_of(app).policy.set_policy("admin", actor=None, actor_name="test", require_2fa=False)


def run_fresh_app_process(script: str, *args: str, data_dir: Path, **env: str) -> Any:
    """Run ``script`` (``python -c``) in a fresh interpreter with a data directory of its own
    and none of this run's database, key, metrics or Redis settings, as ``qpki run`` starts
    on a machine; the JSON its last line of output prints. For what only a new process
    shows (which modules start-up imports, a first request)."""
    environ = {**os.environ, "QPKI_DATA_DIR": str(data_dir), **env}
    for name in ("QPKI_DATABASE_URL", "QPKI_MFA_KEY", "PROMETHEUS_MULTIPROC_DIR", "QPKI_REDIS_URL"):
        environ.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])
