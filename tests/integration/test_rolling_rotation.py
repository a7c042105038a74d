"""Rolling rotation of QPKI_MFA_KEY and QPKI_SECRET_KEY across two instances (issue 17 item 1).

The documented procedure (deploy/README.md, "Rotating keys"): add the new key as a decrypt-only
key / fallback on every instance, then promote it to primary on every instance, then
`qpki keys rotate --reencrypt-only`, then retire the old key -- restarting one instance at a
time. Two apps share one database (SQLite and PostgreSQL); one browser goes through a "load
balancer" that sends each request to whichever instance the test says, so a cookie, a CSRF
token or an encrypted secret made by one instance is always checked by the other. At every
stage a user enrols with a setup started on one instance and confirmed on the other, then signs
in across both; every earlier user signs in again with a backup code. No sign-in may fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bs4 import BeautifulSoup
from cryptography.fernet import Fernet
from flask import Flask
from sqlalchemy import select
from werkzeug.test import Client, TestResponse

from helpers import PASSWORD, create_user, next_step_code, oathtool_code
from qpki.auth.models import MFASetupSession, User
from qpki.config import Settings

KEY_A, KEY_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()
SECRET_A, SECRET_B = "a" * 20 + os.urandom(16).hex(), "b" * 20 + os.urandom(16).hex()
AUDIT_KEY = os.urandom(32).hex()  # the same on every instance, untouched by this rotation


@dataclass(frozen=True)
class Keys:
    """One instance's key settings at one moment of the rollout."""

    mfa: str
    mfa_decrypt: str | None
    secret: str
    fallbacks: tuple[str, ...] = ()


OLD = Keys(KEY_A, None, SECRET_A)
ADDED = Keys(KEY_A, KEY_B, SECRET_A, (SECRET_B,))  # step 1: new key only decrypts
PROMOTED = Keys(KEY_B, KEY_A, SECRET_B, (SECRET_A,))  # step 2: new key encrypts and signs
RETIRED = Keys(KEY_B, None, SECRET_B)  # step 4: old key gone


class Balancer:
    """A WSGI front that sends each request to the instance chosen by the test."""

    def __init__(self) -> None:
        self.apps: dict[str, Flask] = {}
        self.to = ""

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return self.apps[self.to].wsgi_app(environ, start_response)


@dataclass
class Browser:
    """One user's browser: a single cookie jar, whichever instance answers."""

    balancer: Balancer
    client: Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = Client(self.balancer)

    def get(self, instance: str, path: str) -> TestResponse:
        self.balancer.to = instance
        return self.client.get(path)

    def post_form(self, instance: str, path: str, page: TestResponse, **data: str) -> TestResponse:
        """Submit the form of ``page`` (with its CSRF token) to ``instance``."""
        token = BeautifulSoup(page.get_data(as_text=True), "html.parser").find(
            "input", {"name": "csrf_token"}
        )
        assert token is not None, page.get_data(as_text=True)[:300]
        self.balancer.to = instance
        return self.client.post(path, data={"csrf_token": token["value"], **data})


def sign_in(balancer: Balancer, username: str, code: str, first: str, second: str) -> None:
    """Password and code through the pages, every step answered by alternating instances."""
    browser = Browser(balancer)
    form = browser.get(first, "/auth/login")
    assert form.status_code == 200
    sent = browser.post_form(second, "/auth/login", form, username=username, password=PASSWORD)
    assert sent.status_code == 302, (username, sent.status_code, sent.get_data(as_text=True)[:500])
    assert sent.headers["Location"].endswith("/auth/mfa/verify"), sent.headers["Location"]
    verify = browser.get(first, "/auth/mfa/verify")
    assert verify.status_code == 200, (username, verify.status_code)
    done = browser.post_form(second, "/auth/mfa/verify", verify, code=code)
    assert done.status_code == 302, (username, done.status_code, _text(done))
    for instance in (first, second):
        profile = browser.get(instance, "/auth/profile")
        assert profile.status_code == 200, (username, instance, profile.status_code)


def _text(response: TestResponse) -> str:
    soup = BeautifulSoup(response.get_data(as_text=True), "html.parser")
    main = soup.find("main")
    return re.sub(r"\s+", " ", (main or soup).get_text(" ")).strip()[:300]


def test_rolling_rotation_of_every_key(
    make_settings: Callable[..., Settings], db_url: str, tmp_path: Path
) -> None:
    from qpki.app import create_app

    started: list[Flask] = []

    def start(keys: Keys) -> Flask:
        settings = make_settings(
            db_url,
            mfa_key=keys.mfa,
            mfa_decrypt_keys=keys.mfa_decrypt,
            secret_key=keys.secret,
            secret_key_fallbacks=keys.fallbacks,
            audit_key=AUDIT_KEY,
            csrf_enabled=True,
        )
        app = create_app(settings)
        started.append(app)
        return app

    balancer = Balancer()
    balancer.apps = {"A": start(OLD), "B": start(OLD)}
    balancer.apps["A"].db_manager.migrate_database()  # type: ignore[attr-defined]
    enrolled: list[tuple[str, list[str]]] = []
    checked: list[str] = []

    def check(stage: str) -> None:
        """Enrol across the instances both ways, sign in across them, reuse earlier users."""
        for setup_on, confirm_on in (("A", "B"), ("B", "A")):
            name = f"user{len(enrolled)}"
            user = create_user(balancer.apps[setup_on], name)
            setup = balancer.apps[setup_on].auth_manager.start_mfa_setup(user.id)  # type: ignore[attr-defined]
            codes = balancer.apps[confirm_on].auth_manager.confirm_mfa_setup(  # type: ignore[attr-defined]
                user.id, oathtool_code(setup.secret)
            )
            sign_in(balancer, name, next_step_code(setup.secret), setup_on, confirm_on)
            enrolled.append((name, codes))
        for index, (name, codes) in enumerate(enrolled[:-2]):
            first, second = ("A", "B") if index % 2 else ("B", "A")
            sign_in(balancer, name, codes.pop(), first, second)
        checked.append(stage)

    def restart(instance: str, keys: Keys) -> None:
        balancer.apps[instance] = start(keys)

    check("both old")
    restart("A", ADDED)
    check("A added")
    restart("B", ADDED)
    check("both added")
    restart("A", PROMOTED)
    check("A promoted, B added")
    restart("B", PROMOTED)
    check("both promoted")

    env = {k: v for k, v in os.environ.items() if not k.startswith("QPKI_")}
    env.update(
        QPKI_DATA_DIR=str(tmp_path / "data"),  # the instances' data dir (audit key)
        QPKI_DATABASE_URL=db_url,
        QPKI_MFA_KEY=PROMOTED.mfa,
        QPKI_MFA_DECRYPT_KEYS=PROMOTED.mfa_decrypt or "",
        QPKI_SECRET_KEY=PROMOTED.secret,
        QPKI_SECRET_KEY_FALLBACKS=",".join(PROMOTED.fallbacks),
        QPKI_AUDIT_KEY=AUDIT_KEY,
    )
    done = subprocess.run(
        [sys.executable, "-m", "qpki", "keys", "rotate", "--reencrypt-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    with balancer.apps["A"].db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        tokens = [t for u in s.scalars(select(User)) for t in (u.totp_secret, u.backup_codes) if t]
        tokens += [p.secret for p in s.scalars(select(MFASetupSession))]
    for token in tokens:
        Fernet(KEY_B.encode()).decrypt(token.encode())
    assert f"verified: all {len(tokens)} stored secrets" in done.stdout
    check("re-encrypted")

    restart("A", RETIRED)
    check("A retired, B promoted")
    restart("B", RETIRED)
    check("both retired")
    assert len(checked) == 8 and len(enrolled) == 16
    for app in started:
        app.db_manager.dispose()  # type: ignore[attr-defined]
