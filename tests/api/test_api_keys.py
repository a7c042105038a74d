"""Service keys: entropy and prefix, keyed hash only, scopes, expiry, revocation, last use;
every scope boundary of every operation; the admin page (step-up) and the CLI lifecycle."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from api_helpers import audit_rows, bearer, problem
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from helpers import admin_client, create_user, enable_mfa, page
from qpki.api import api_keys_of
from qpki.api.models import ApiKey
from qpki.auth.errors import ValidationFailed
from qpki.auth.services.api_keys import SCOPES, ApiKeyService, hash_key_from_secret
from qpki.clock import SteppedClock

# Every operation with the one scope it needs, and a body it accepts.
OPERATIONS: list[tuple[str, str, str, dict[str, object] | None]] = [
    ("POST", "/api/v1/verify", "verify", {"username": "nobody", "code": "123456"}),
    ("GET", "/api/v1/users", "users:read", None),
    ("GET", "/api/v1/users/1", "users:read", None),
    (
        "POST",
        "/api/v1/users",
        "users:write",
        {"username": "newbie", "password": "a long enough passphrase"},
    ),
    ("POST", "/api/v1/users/1/role", "users:write", {"role": "operator"}),
    ("POST", "/api/v1/users/1/deactivate", "users:write", None),
    ("POST", "/api/v1/users/1/reactivate", "users:write", None),
    ("POST", "/api/v1/users/1/unlock", "users:write", None),
    ("POST", "/api/v1/users/1/mfa/reset", "users:write", {"reason": "lost phone"}),
    ("GET", "/api/v1/audit/events", "audit:read", None),
    ("GET", "/api/v1/audit/chain", "audit:read", None),
    ("GET", "/metrics", "metrics", None),
]


def _call(api: FlaskClient, method: str, path: str, body: object, key: str | None) -> object:
    headers = bearer(key) if key else {}
    return api.open(path, method=method, json=body, headers=headers)


def test_a_key_has_256_random_bits_a_visible_prefix_and_only_a_keyed_hash_is_stored(
    api_app: Flask,
) -> None:
    service = api_keys_of(api_app)
    created = service.create("billing", "verify", actor_name="test")
    other = service.create("crm", "verify", actor_name="test")
    assert re.fullmatch(r"qpki_[A-Za-z0-9_-]{43}", created.secret)  # 43 chars = 256 bits
    assert created.secret != other.secret
    assert created.info.prefix == created.secret[:13]
    with api_app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        row = s.scalar(select(ApiKey).where(ApiKey.name == "billing"))
        assert row is not None
        stored = " ".join(str(v) for v in vars(row).values())
    assert created.secret not in stored
    assert created.secret[13:] not in stored  # not even the secret part
    assert re.fullmatch(r"[0-9a-f]{64}", row.key_hash)
    # keyed: the plain SHA-256 of the key is not what is stored
    import hashlib

    assert row.key_hash != hashlib.sha256(created.secret.encode()).hexdigest()
    created_event = audit_rows(api_app, "api_key_created")[-1]
    assert created.secret not in created_event.details


@pytest.mark.parametrize("method,path,scope,body", OPERATIONS)
def test_every_operation_needs_its_scope_and_a_key(
    api_app: Flask,
    api: FlaskClient,
    make_key: Callable[..., str],
    method: str,
    path: str,
    scope: str,
    body: dict[str, object] | None,
    clock: SteppedClock,
) -> None:
    target = create_user(api_app, "target")
    enable_mfa(api_app, target.id, at=clock())
    others = [s for s in SCOPES if s != scope]
    without = _call(api, method, path, body, make_key(*others))
    assert without.status_code == 403  # type: ignore[attr-defined]
    assert problem(without)["type"] == "urn:qpki:problem:missing-scope"
    assert problem(without)["scope"] == scope
    anonymous = _call(api, method, path, body, None)
    assert anonymous.status_code == 401  # type: ignore[attr-defined]
    allowed = _call(api, method, path, body, make_key(scope))
    assert allowed.status_code in (200, 201), allowed.get_data(as_text=True)  # type: ignore[attr-defined]


def test_missing_wrong_revoked_and_expired_keys_get_the_same_401_without_detail(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    good = make_key("users:read", name="good")
    revoked = make_key("users:read", name="revoked")
    expiring = make_key("users:read", name="expiring", expires_days=1)
    api_keys_of(api_app).revoke("revoked", actor_name="test")
    assert api.get("/api/v1/users", headers=bearer(expiring)).status_code == 200
    clock.advance(days=1)
    bodies = set()
    for headers in (
        {},
        {"Authorization": "Basic Zm9vOmJhcg=="},
        bearer("qpki_" + "A" * 43),
        bearer(good[:-1] + ("A" if good[-1] != "A" else "B")),
        bearer(revoked),
        bearer(expiring),
        {"Authorization": "Bearer"},
    ):
        r = api.get("/api/v1/users", headers=headers)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="qpki-api"'
        body = problem(r)
        assert "detail" not in body
        bodies.add(r.get_data())
    assert len(bodies) == 1
    assert api.get("/api/v1/users", headers=bearer(good)).status_code == 200


def test_a_cookie_session_is_no_key(api_app: Flask, clock: SteppedClock) -> None:
    """An administrator signed in to the pages gets 401 from the API: cookies are not used."""
    client, _admin, _secret = admin_client(api_app, clock=clock)
    assert client.get("/api/v1/users").status_code == 401


def test_last_use_is_recorded_to_the_minute(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    key = make_key("audit:read", name="reader")
    assert api_keys_of(api_app).list_keys()[0].last_used_at is None
    api.get("/api/v1/audit/chain", headers=bearer(key))
    first = clock()
    assert api_keys_of(api_app).list_keys()[0].last_used_at == first
    clock.advance(seconds=20)
    api.get("/api/v1/audit/chain", headers=bearer(key))
    assert api_keys_of(api_app).list_keys()[0].last_used_at == first  # same minute: no write
    clock.advance(seconds=50)
    api.get("/api/v1/audit/chain", headers=bearer(key))
    assert api_keys_of(api_app).list_keys()[0].last_used_at == clock()


def test_keys_survive_a_rolling_secret_key_rotation(api_app: Flask) -> None:
    """A key hashed under the old QPKI_SECRET_KEY works while it is a fallback, and moves."""
    services = api_keys_of(api_app)
    old = ApiKeyService(
        services.db, services.audit, services.clock, [hash_key_from_secret("o" * 40)]
    )
    secret = old.create("legacy", "verify", actor_name="test").secret
    rotated = ApiKeyService(
        services.db,
        services.audit,
        services.clock,
        [hash_key_from_secret("n" * 40), hash_key_from_secret("o" * 40)],
    )
    assert rotated.authenticate(secret) is not None
    only_new = ApiKeyService(
        services.db, services.audit, services.clock, [hash_key_from_secret("n" * 40)]
    )
    assert only_new.authenticate(secret) is not None  # re-hashed under the new key at use
    assert old.authenticate(secret) is None


def test_bad_names_scopes_and_expiry_are_refused_and_change_nothing(api_app: Flask) -> None:
    service = api_keys_of(api_app)
    for name, scopes, days in (
        ("", "verify", None),
        ("has space", "verify", None),
        ("ok", "verify,admin", None),
        ("ok", "", None),
        ("ok", "verify", 0),
    ):
        with pytest.raises(ValidationFailed):
            service.create(name, scopes, expires_days=days, actor_name="test")
    service.create("ok", "verify", actor_name="test")
    with pytest.raises(ValidationFailed, match="exists"):
        service.create("ok", "audit:read", actor_name="test")
    assert [k.name for k in service.list_keys()] == ["ok"]


def test_admin_page_creates_with_step_up_lists_and_revokes(
    api_app: Flask, clock: SteppedClock
) -> None:
    client, admin, _secret = admin_client(api_app, clock=clock)
    listing = client.get("/admin/api-keys")
    assert listing.status_code == 200
    created = client.post(
        "/admin/api-keys", data={"name": "crm", "scopes": ["verify", "users:read"]}
    )
    assert created.status_code == 200, created.get_data(as_text=True)[:500]
    secret = page(created).find(id="api-key-secret").get_text(strip=True)
    assert secret.startswith("qpki_")
    assert api_app.test_client().get("/api/v1/users", headers=bearer(secret)).status_code == 200
    assert audit_rows(api_app, "api_key_created")[-1].actor_name == admin.username
    rows = page(client.get("/admin/api-keys")).select("#api-keys .api-key")
    assert [r["data-name"] for r in rows] == ["crm"]
    assert secret not in client.get("/admin/api-keys").get_data(as_text=True)
    revoked = client.post("/admin/api-keys/crm/revoke")
    assert revoked.status_code == 302
    assert api_app.test_client().get("/api/v1/users", headers=bearer(secret)).status_code == 401
    state = page(client.get("/admin/api-keys")).select_one(".api-key .api-key-state")
    assert state is not None and state.get_text(strip=True) == "revoked"


def test_admin_page_without_fresh_step_up_goes_to_reauth(
    api_app: Flask, clock: SteppedClock
) -> None:
    client, _admin, _secret = admin_client(api_app, clock=clock)
    clock.advance(minutes=15)  # past the 10-minute step-up window, within the idle limit
    r = client.post("/admin/api-keys", data={"name": "late", "scopes": ["verify"]})
    assert r.status_code == 302 and "/auth/reauth" in r.headers["Location"]
    assert api_keys_of(api_app).list_keys() == []


def test_non_admins_cannot_reach_the_key_page(api_app: Flask) -> None:
    create_user(api_app, "viewer1")
    from helpers import login

    client = api_app.test_client()
    login(client, "viewer1")
    assert client.get("/admin/api-keys").status_code in (302, 403)
    assert client.post("/admin/api-keys", data={"name": "x", "scopes": ["verify"]}).status_code in (
        302,
        403,
    )
    assert api_keys_of(api_app).list_keys() == []


def _qpki(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qpki", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_key_lifecycle_through_the_cli(
    tmp_path: Path, make_app: Callable[..., Flask], make_settings: Callable[..., object]
) -> None:
    """create prints the key alone on stdout; list shows it without the key; revoke ends it."""
    data = tmp_path / "cli-data"
    env = {
        **os.environ,
        "QPKI_DATA_DIR": str(data),
        "QPKI_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "QPKI_SECRET_KEY": "cli-secret-key-" + "z" * 40,
        "QPKI_LOG_LEVEL": "WARNING",
    }
    made = _qpki(
        env, "api-keys", "create", "billing", "--scope", "verify,users:read", "--expires-days", "30"
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert made.stdout == secret + "\n"
    assert re.fullmatch(r"qpki_[A-Za-z0-9_-]{43}", secret)
    assert "shown only this once" in made.stderr

    listed = _qpki(env, "api-keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert "billing" in listed.stdout and secret[:13] in listed.stdout
    assert secret not in listed.stdout and "active" in listed.stdout

    from qpki.app import create_app
    from qpki.config import Settings

    app = create_app(Settings.from_env(env))
    assert app.test_client().get("/api/v1/users", headers=bearer(secret)).status_code == 200

    bad = _qpki(env, "api-keys", "create", "x", "--scope", "root")
    assert bad.returncode != 0 and bad.stdout == "" and "Unknown scope" in bad.stderr

    gone = _qpki(env, "api-keys", "revoke", "billing")
    assert gone.returncode == 0, gone.stderr
    assert app.test_client().get("/api/v1/users", headers=bearer(secret)).status_code == 401
    assert "revoked" in _qpki(env, "api-keys", "list").stdout
    again = _qpki(env, "api-keys", "revoke", "billing")
    assert again.returncode != 0 and "already revoked" in again.stderr
    app.db_manager.dispose()  # type: ignore[attr-defined]


def test_each_key_has_its_own_rate_limit(
    make_app: Callable[..., Flask], clock: SteppedClock
) -> None:
    """600 requests a minute per key (QPKI_RATE_LIMITS on); another key is not held up."""
    app = make_app(clock=clock, rate_limits_enabled=True)
    busy = api_keys_of(app).create("busy", "users:read", actor_name="test").secret
    calm = api_keys_of(app).create("calm", "users:read", actor_name="test").secret
    client = app.test_client()
    statuses = [
        client.get("/api/v1/users?limit=1", headers=bearer(busy)).status_code for _ in range(601)
    ]
    assert statuses[:600] == [200] * 600
    refused = client.get("/api/v1/users?limit=1", headers=bearer(busy))
    assert statuses[600] == 429 and refused.status_code == 429
    assert problem(refused)["type"] == "urn:qpki:problem:rate-limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert client.get("/api/v1/users?limit=1", headers=bearer(calm)).status_code == 200
