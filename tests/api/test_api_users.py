"""Users through the API: list with filters and cursor, one user's state, and each change
through the same services as the admin pages (audited with the key as actor)."""

from __future__ import annotations

from collections.abc import Callable

from api_helpers import audit_rows, bearer, problem
from flask import Flask
from flask.testing import FlaskClient

from helpers import create_user, enable_mfa, login
from qpki.clock import SteppedClock


def test_list_filters_by_role_and_2fa_and_pages_with_a_cursor(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    key = bearer(make_key("users:read"))
    for i in range(5):
        create_user(api_app, f"user{i}", role="operator" if i % 2 else "viewer")
    enable_mfa(api_app, api_app.auth_manager.get_user(username="user1").id, at=clock())  # type: ignore[attr-defined]
    names: list[str] = []
    cursor = None
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = api.get("/api/v1/users", query_string=query, headers=key).get_json()
        names += [u["username"] for u in body["users"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert names == [f"user{i}" for i in range(5)]
    operators = api.get("/api/v1/users?role=operator", headers=key).get_json()["users"]
    assert [u["username"] for u in operators] == ["user1", "user3"]
    with_2fa = api.get("/api/v1/users?two_factor=enabled", headers=key).get_json()["users"]
    assert [(u["username"], u["methods"]) for u in with_2fa] == [
        ("user1", ["totp", "backup_codes"])
    ]
    bad = api.get("/api/v1/users?role=root", headers=key)
    assert bad.status_code == 400 and problem(bad)["errors"][0]["loc"] == ["role"]


def test_one_user_shows_methods_codes_left_lock_state_and_last_sign_in(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    user = create_user(api_app, "carol")
    _secret, codes = enable_mfa(api_app, user.id, at=clock())
    api_app.auth_manager.verify_mfa_code(user.id, codes[0])  # type: ignore[attr-defined]
    for _ in range(5):
        login(api_app.test_client(), "carol", "wrong password")
    body = api.get(f"/api/v1/users/{user.id}", headers=bearer(make_key("users:read"))).get_json()
    assert body["two_factor_enabled"] is True
    assert body["methods"] == ["totp", "backup_codes"]
    assert body["backup_codes_remaining"] == 7
    assert body["failed_attempts"] == 5 and body["throttled_until"] is not None
    assert body["locked"] is False and body["last_sign_in_at"] is None
    missing = api.get("/api/v1/users/999999", headers=bearer(make_key("users:read")))
    assert missing.status_code == 404 and problem(missing)["type"] == "urn:qpki:problem:not-found"


def test_create_change_role_deactivate_reactivate_unlock_and_reset(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    key = bearer(make_key("users:write", "users:read", name="hr"))
    made = api.post(
        "/api/v1/users", json={"username": "dave", "email": "d@example.org"}, headers=key
    )
    assert made.status_code == 201
    created = made.get_json()
    temporary = created["temporary_password"]
    assert temporary and created["user"]["must_change_password"] is True
    user_id = created["user"]["id"]
    dup = api.post("/api/v1/users", json={"username": "DAVE"}, headers=key)
    assert dup.status_code == 400 and "already exists" in problem(dup)["detail"]

    role = api.post(f"/api/v1/users/{user_id}/role", json={"role": "operator"}, headers=key)
    assert role.status_code == 200 and role.get_json()["role"] == "operator"

    web = api_app.test_client()
    assert login(web, "dave", temporary).status_code == 302
    off = api.post(f"/api/v1/users/{user_id}/deactivate", headers=key)
    assert off.status_code == 200 and off.get_json()["is_active"] is False
    assert web.get("/auth/profile").status_code == 302  # the session ended
    on = api.post(f"/api/v1/users/{user_id}/reactivate", headers=key)
    assert on.get_json()["is_active"] is True

    for _ in range(5):
        login(api_app.test_client(), "dave", "wrong password")
    unlocked = api.post(f"/api/v1/users/{user_id}/unlock", headers=key)
    assert unlocked.status_code == 200 and unlocked.get_json() == {"was_locked": True}

    not_on = api.post(f"/api/v1/users/{user_id}/mfa/reset", json={"reason": "lost"}, headers=key)
    assert not_on.status_code == 409
    enable_mfa(api_app, user_id, at=clock())
    reset = api.post(
        f"/api/v1/users/{user_id}/mfa/reset", json={"reason": "lost phone, ID checked"}, headers=key
    )
    assert reset.status_code == 200 and reset.get_json()["two_factor_enabled"] is False
    no_reason = api.post(f"/api/v1/users/{user_id}/mfa/reset", json={}, headers=key)
    assert no_reason.status_code == 400

    for event in (
        "user_created",
        "user_changed",
        "user_deactivated",
        "user_reactivated",
        "account_unlocked",
        "mfa_admin_disabled",
    ):
        assert audit_rows(api_app, event)[-1].actor_name == "api:hr", event
    assert '"lost phone, ID checked"' in audit_rows(api_app, "mfa_admin_disabled")[-1].details


def test_audit_events_with_the_page_filters_cursor_and_chain_status(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str]
) -> None:
    key = bearer(make_key("audit:read"))
    for i in range(4):
        create_user(api_app, f"aud{i}")
    first = api.get("/api/v1/audit/events?event=user_created&limit=3", headers=key).get_json()
    assert [e["target"] for e in first["events"]] == ["aud3", "aud2", "aud1"]
    assert first["total"] == 4 and first["next_before"] is not None
    rest = api.get(
        f"/api/v1/audit/events?event=user_created&limit=3&before={first['next_before']}",
        headers=key,
    ).get_json()
    assert [e["target"] for e in rest["events"]] == ["aud0"] and rest["next_before"] is None
    by_user = api.get("/api/v1/audit/events?user=aud2", headers=key).get_json()
    assert {e["target"] for e in by_user["events"]} == {"aud2"}
    bad = api.get("/api/v1/audit/events?since=2026-13-01", headers=key)
    assert bad.status_code == 400 and "date" in problem(bad)["detail"]
    chain = api.get("/api/v1/audit/chain", headers=key).get_json()
    assert chain["ok"] is True and chain["checked"] >= 5
