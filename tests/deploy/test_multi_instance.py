"""Several processes, one truth: two `qpki run --workers 2` instances on one PostgreSQL + Redis.

The deployment of deploy/README.md, on loopback: instances A and B are separate server
processes (two gunicorn workers each) with separate data directories, sharing only what the
guide says must be shared — QPKI_DATABASE_URL, QPKI_REDIS_URL, QPKI_SECRET_KEY and
QPKI_MFA_KEY. Whatever a user does on one instance must hold on the other: sessions, pending
second factors, setup sessions, replay guards, spent backup codes, throttling, revocation and
the audit chain. Then the shared services fail: Redis goes away (the apps keep serving and say
so in the log) and PostgreSQL stops and restarts (clean 503 pages, then service again).
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest

from harness.services import AppServer, PostgresServer, RedisServer, app_server
from qpki.app import create_app
from qpki.config import Settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

PASSWORD = "deployment test passphrase 7431"


@dataclass
class Account:
    username: str
    user_id: int
    secret: str | None = None
    backup_codes: list[str] = field(default_factory=list)

    def totp(self) -> pyotp.TOTP:
        assert self.secret is not None
        return pyotp.TOTP(self.secret)

    def next_code(self) -> str:
        """A code of the next time step: accepted (±1 step) and later than any used so far."""
        return self.totp().at(time.time() + 30)

    def wrong_code(self) -> str:
        """A well-formed code that is not valid anywhere near now."""
        now = time.time()
        valid = {self.totp().at(now + delta) for delta in (-60, -30, 0, 30, 60)}
        return next(c for c in (f"{n:06d}" for n in itertools.count(100000)) if c not in valid)


@dataclass
class Deployment:
    env: dict[str, str]
    a: AppServer
    b: AppServer
    postgres: PostgresServer
    redis: RedisServer
    service: Any  # the test's own create_app() on the same database: the service API
    names: Iterator[int] = field(default_factory=itertools.count)

    def account(self, prefix: str, *, mfa: bool) -> Account:
        """A fresh user (unique name), created through the service API, 2FA on if ``mfa``."""
        manager = self.service.auth_manager
        name = f"{prefix}{next(self.names)}"
        user = manager.create_user(name, PASSWORD, f"{name}@example.org", "viewer")
        account = Account(username=name, user_id=user.id)
        if mfa:
            setup = manager.start_mfa_setup(user.id)
            account.secret = setup.secret
            account.backup_codes = manager.confirm_mfa_setup(
                user.id, pyotp.TOTP(setup.secret).now()
            )
        return account

    def logs(self) -> str:
        return self.a.log_text() + self.b.log_text()


@pytest.fixture(scope="module")
def deployment(
    deploy_postgres: PostgresServer,
    deploy_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    from cryptography.fernet import Fernet

    root = tmp_path_factory.mktemp("multi-instance")
    env = {
        "QPKI_DATABASE_URL": deploy_postgres.url,
        "QPKI_REDIS_URL": deploy_redis.url,
        "QPKI_SECRET_KEY": secrets.token_urlsafe(48),
        "QPKI_MFA_KEY": Fernet.generate_key().decode(),
        # A shared database needs every key explicit and identical (else start-up refuses).
        "QPKI_AUDIT_KEY": secrets.token_urlsafe(32),
        "QPKI_HTTPS": "0",
        "QPKI_PROXY_FIX": "0",
        "QPKI_RATE_LIMITS": "1",
        "QPKI_LOG_LEVEL": "INFO",
    }
    # The test's own view of the deployment: the service API on the same database and keys.
    service = create_app(Settings.from_env({**env, "QPKI_DATA_DIR": str(root / "service")}))
    service.db_manager.migrate_database()  # type: ignore[attr-defined]
    with ExitStack() as stack:
        stack.callback(service.db_manager.dispose)  # type: ignore[attr-defined]
        servers = [
            stack.enter_context(
                app_server(
                    {**env, "QPKI_DATA_DIR": str(root / f"data-{name}")},
                    workers=2,
                    log_dir=root / f"logs-{name}",
                )
            )
            for name in ("a", "b")
        ]
        yield Deployment(env, servers[0], servers[1], deploy_postgres, deploy_redis, service)


@pytest.fixture
def clients(deployment: Deployment, web: Callable[..., Any]) -> tuple[Any, Any]:
    """A browser stand-in for each instance (separate cookie jars)."""
    return web(deployment.a.url), web(deployment.b.url)


def _location(response: Any) -> str:
    assert response.status_code in (302, 303), (response.status_code, response.text[:800])
    return str(response.headers["Location"])


# -- sessions and second factors across instances ---------------------------------------------
def test_password_on_a_then_second_factor_on_b(
    deployment: Deployment, clients: tuple[Any, Any], web: Any
) -> None:
    a, b = clients
    alice = deployment.account("cross", mfa=True)

    assert _location(a.login(alice.username, PASSWORD)).endswith("/auth/mfa/verify")
    b.take_cookies_from(a)  # the load balancer sends the next request elsewhere
    done = b.verify(alice.next_code())
    assert _location(done).endswith("/"), web.text(done)

    home = b.get("/")
    assert home.status_code == 200 and alice.username in web.text(home)
    a.take_cookies_from(b)  # the new full session works on A too
    assert a.get("/auth/profile").status_code == 200


def test_totp_code_accepted_on_a_is_refused_on_b(
    deployment: Deployment, clients: tuple[Any, Any], web: Any
) -> None:
    a, b = clients
    bob = deployment.account("replay", mfa=True)
    code = bob.next_code()

    a.login(bob.username, PASSWORD)
    assert _location(a.verify(code)).endswith("/")

    assert _location(b.login(bob.username, PASSWORD)).endswith("/auth/mfa/verify")
    replay = b.verify(code)
    assert replay.status_code == 200
    assert "That code was just used. Wait for the next code in your app." in web.text(replay)
    assert b.get("/auth/profile").status_code == 302  # still not signed in on B


def test_backup_code_spent_on_b_is_already_used_on_a(
    deployment: Deployment, clients: tuple[Any, Any], web: Any
) -> None:
    a, b = clients
    carol = deployment.account("backup", mfa=True)
    code = carol.backup_codes[0]

    b.login(carol.username, PASSWORD)
    spent = b.verify(code)
    assert _location(spent).endswith("/")
    assert "7 backup codes remaining" in web.text(b.get("/"))

    a.login(carol.username, PASSWORD)
    again = a.verify(code.lower())
    assert "Backup code already used" in web.text(again)
    assert a.get("/auth/profile").status_code == 302


def test_throttling_counted_on_a_applies_on_b(
    deployment: Deployment, clients: tuple[Any, Any], web: Any
) -> None:
    a, b = clients
    dave = deployment.account("throttle", mfa=True)
    assert _location(b.login(dave.username, PASSWORD)).endswith("/auth/mfa/verify")
    assert _location(a.login(dave.username, PASSWORD)).endswith("/auth/mfa/verify")

    for attempt in range(5):
        wrong = a.verify(dave.wrong_code())
        assert "Invalid verification code" in web.text(wrong), attempt

    right = b.verify(dave.next_code())
    assert right.status_code == 429, web.text(right)
    assert "Try again in" in web.text(right)
    assert int(right.headers["Retry-After"]) > 0
    assert b.get("/auth/profile").status_code == 302


def test_per_address_limits_are_counted_once_for_all_instances(
    deployment: Deployment, clients: tuple[Any, Any]
) -> None:
    """Flask-Limiter's counters live in Redis: A and B (and their workers) share one budget."""
    a, b = clients
    for _try in range(3):  # a fixed window may roll over between two requests; try again then
        seen = []
        for client in (a, b, a, b):
            response = client.login("nobody-at-all", "not the password at all")
            seen.append(
                (
                    int(response.headers["X-RateLimit-Remaining"]),
                    response.headers["X-RateLimit-Reset"],
                )
            )
        if len({reset for _, reset in seen}) == 1:
            break
    remaining = [left for left, _ in seen]
    assert remaining == [remaining[0] - i for i in range(4)], seen


def test_session_revoked_on_a_is_refused_on_b(
    deployment: Deployment, clients: tuple[Any, Any], web: Any
) -> None:
    a, b = clients
    erin = deployment.account("revoke", mfa=True)
    laptop, phone = a, b  # two sessions of one user: the first signed in on A, the other on B

    laptop.login(erin.username, PASSWORD)
    assert _location(laptop.verify(erin.next_code())).endswith("/")
    phone.login(erin.username, PASSWORD)
    assert _location(phone.verify(erin.backup_codes[0])).endswith("/")
    assert phone.get("/auth/profile").status_code == 200

    ended = laptop.post("/auth/sessions/end-others", csrf_from="/auth/profile")
    assert _location(ended).endswith("/auth/profile")
    assert "Signed out 1 other session" in web.text(laptop.get("/auth/profile"))

    refused = phone.get("/auth/profile")  # on B
    assert "/auth/login" in _location(refused)
    phone_on_a = web(deployment.a.url)
    phone_on_a.take_cookies_from(phone)
    assert "/auth/login" in _location(phone_on_a.get("/auth/profile"))

    # Logging out on A ends the laptop session on B as well (a replayed cookie is refused).
    laptop_on_b = web(deployment.b.url)
    laptop_on_b.take_cookies_from(laptop)
    assert laptop_on_b.get("/auth/profile").status_code == 200
    assert "/auth/login" in _location(laptop.logout())
    assert "/auth/login" in _location(laptop_on_b.get("/auth/profile"))


def test_mfa_setup_started_on_a_is_confirmed_on_b(
    deployment: Deployment, clients: tuple[Any, Any], web: Any
) -> None:
    a, b = clients
    frank = deployment.account("setup", mfa=False)
    assert _location(a.login(frank.username, PASSWORD)).endswith("/")

    start = a.get("/auth/mfa/setup")  # GET starts nothing: "Start setup" is a POST
    started = a.post(
        "/auth/mfa/setup/start",
        {"password": PASSWORD},
        token=a.csrf_in(start),
        headers={"Referer": a.url("/auth/mfa/setup")},
    )
    assert _location(started).endswith("/auth/mfa/setup"), web.text(started)
    setup = a.get("/auth/mfa/setup")
    assert setup.status_code == 200
    secret = re.sub(r"\s+", "", web.page(setup).find(id="mfa-secret").get_text())
    token = a.csrf_in(setup)

    b.take_cookies_from(a)
    done = b.post(
        "/auth/mfa/setup",
        {"code": pyotp.TOTP(secret).now()},
        token=token,
        headers={"Referer": a.url("/auth/mfa/setup")},
    )
    assert done.status_code == 200, web.text(done)
    codes = web.page(done).select("#backup-codes .backup-code")
    assert len(codes) == 8
    user = deployment.service.auth_manager.get_user(user_id=frank.user_id)
    assert user.two_factor_enabled


# -- failures of the shared services ----------------------------------------------------------
def test_redis_outage_keeps_serving_and_logs_a_warning(
    deployment: Deployment, clients: tuple[Any, Any], web: Any
) -> None:
    """Per-address limits fall back to each process's memory (with a warning in the log);
    the per-account throttle lives in PostgreSQL and is unaffected."""
    grace = deployment.account("noredis", mfa=False)
    deployment.redis.stop()
    try:
        for client in clients:
            assert client.get("/auth/login").status_code == 200
            signed_in = client.login(grace.username, PASSWORD)
            assert _location(signed_in).endswith("/")
            assert client.get("/").status_code == 200
            assert client.logout().status_code == 302

        # The per-account throttle still holds (it never needed Redis).
        dave = deployment.account("noredis-throttle", mfa=False)
        a = clients[0]
        for _ in range(5):
            assert "Invalid username or password" in web.text(a.login(dave.username, "wrong!"))
        throttled = a.login(dave.username, PASSWORD)
        assert throttled.status_code == 429 and "Try again in" in web.text(throttled)

        logs = deployment.logs()
        assert re.search(r"(?i)WARNING.*rate.?limit storage", logs), (
            "no warning about the unreachable rate-limit storage in the app log:\n" + logs[-3000:]
        )
    finally:
        deployment.redis.start()
    assert deployment.redis.is_running()
    for client in clients:
        assert client.get("/auth/login").status_code == 200


def _profile_status(client: Any) -> tuple[int | None, str]:
    import requests

    try:
        response = client.get("/auth/profile")
    except requests.RequestException as exc:
        return None, repr(exc)
    return response.status_code, response.text


def _assert_clean(results: list[tuple[int | None, str]], allowed: set[int | None]) -> None:
    for status, body in results:
        assert status in allowed, (status, body[:1500])
        assert "Traceback" not in body and "psycopg" not in body.lower(), body[:1500]
        if status == 503:
            assert "Service unavailable" in body, body[:1500]


def test_postgres_outage_and_restart(
    deployment: Deployment, clients: tuple[Any, Any], web: Any
) -> None:
    a, b = clients
    grace = deployment.account("pgrestart", mfa=False)
    assert _location(a.login(grace.username, PASSWORD)).endswith("/")
    b.take_cookies_from(a)
    for client in (a, b):
        assert client.get("/auth/profile").status_code == 200
    log_offsets = (len(deployment.a.log_text()), len(deployment.b.log_text()))

    # Database down: every page that needs it answers a clean 503, on both instances; the
    # liveness probe still says the process is alive, the readiness probe takes it out.
    deployment.postgres.stop()
    try:
        down = [_profile_status(client) for client in (a, b, a, b, a, b)]
        probes = [(c.get("/healthz").status_code, c.get("/readyz")) for c in (a, b)]
    finally:
        deployment.postgres.start()
    _assert_clean(down, {503})
    for live, ready in probes:
        assert live == 200
        assert ready.status_code == 503, ready.text
        assert ready.json() == {"status": "unavailable", "reason": "database unreachable"}
    for client in (a, b):
        assert client.get("/readyz").status_code == 200

    # A restart while requests keep coming: each one succeeds or fails cleanly.
    during: list[tuple[int | None, str]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            during.extend(_profile_status(client) for client in (a, b))

    worker = threading.Thread(target=hammer, daemon=True)
    worker.start()
    try:
        time.sleep(0.3)
        deployment.postgres.restart()
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert during
    _assert_clean(during, {200, 503})

    # Afterwards everything works again, on every worker of both instances.
    after = [_profile_status(client) for client in (a, b) * 4]
    _assert_clean(after, {200})
    new_logs = deployment.a.log_text()[log_offsets[0] :] + deployment.b.log_text()[log_offsets[1] :]
    assert "database unavailable" in new_logs
    assert "unhandled error" not in new_logs and "Traceback" not in new_logs, new_logs[-3000:]


def test_audit_chain_written_by_both_instances_verifies(deployment: Deployment) -> None:
    """Runs last: every event above, written by four processes, forms one intact chain."""
    with deployment.service.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        events = deployment.service.auth_manager.audit.count(s)
    assert events > 50
    data_dir = Path(deployment.a.log_path).parent / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "qpki", "audit", "verify"],
        env={**os.environ, **deployment.env, "QPKI_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Audit chain intact: \d+ events verified", result.stdout), result.stdout
    checked = int(re.search(r"(\d+) events", result.stdout).group(1))  # type: ignore[union-attr]
    assert checked >= events
