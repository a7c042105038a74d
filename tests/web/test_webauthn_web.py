"""The passkey pages and JSON ceremonies through the Flask test client, with a software
authenticator: the DESIGN.md contract (ids, routes), CSRF in a header, JSON only, and clear
4xx answers — never a 500 — for malformed or hostile ceremony data."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from helpers import (
    PASSWORD,
    admin_client,
    create_user,
    location_path,
    login,
    page,
    text_of,
)
from qpki.web.services import services_of
from webauthn_softkey import SoftKey

ORIGIN = "http://localhost"


def post_json(client: FlaskClient, url: str, body: object, **headers: str) -> Any:
    return client.post(url, data=json.dumps(body), content_type="application/json", headers=headers)


def signed_in_fresh(app: Flask, username: str) -> tuple[FlaskClient, Any]:
    """A user without 2FA, signed in and just re-authenticated (so adding a key is allowed)."""
    user = create_user(app, username)
    client = app.test_client()
    assert login(client, username).status_code == 302
    assert client.post("/auth/reauth", data={"password": PASSWORD, "next": "/"}).status_code == 302
    return client, user


def add_key(client: FlaskClient, key: SoftKey, name: str = "My key") -> Any:
    begun = post_json(client, "/auth/webauthn/register/begin", {"name": name})
    assert begun.status_code == 200, begun.get_json()
    options = begun.get_json()["publicKey"]
    return post_json(
        client, "/auth/webauthn/register/finish", {"credential": key.create(options, origin=ORIGIN)}
    )


def test_security_keys_page_registers_a_key_and_shows_it(app: Flask) -> None:
    client, _user = signed_in_fresh(app, "alice")
    empty = page(client.get("/auth/security-keys"))
    assert empty.find(id="webauthn-credentials") is not None
    assert empty.find(id="webauthn-name") is not None and empty.find(id="webauthn-register")
    done = add_key(client, SoftKey(backed_up=True, backup_eligible=True), "Laptop passkey")
    body = done.get_json()
    assert done.status_code == 200 and body["ok"] and len(body["backup_codes"]) == 8
    shown = page(client.get("/auth/security-keys"))
    items = shown.select("#webauthn-credentials .webauthn-credential")
    assert len(items) == 1 and "Laptop passkey" in items[0].get_text()
    assert "Synced passkey" in items[0].get_text()
    assert items[0].select_one(".webauthn-remove") is not None
    profile = page(client.get("/auth/profile"))
    assert profile.find(id="mfa-status").get_text(strip=True) == "Enabled"
    assert profile.find(id="security-key-count").get_text(strip=True) == "1"
    assert profile.find(id="add-app") is not None  # no app yet: offered, not "Reconfigure"
    assert "8 of 8" in profile.find(id="method-backup-codes").get_text()
    assert profile.select_one("details#disable-2fa #disable-2fa-form") is not None


def test_registration_without_step_up_answers_403_with_the_reauth_link(app: Flask) -> None:
    create_user(app, "bob")
    client = app.test_client()
    login(client, "bob")
    refused = post_json(client, "/auth/webauthn/register/begin", {"name": "Key"})
    assert refused.status_code == 403
    assert refused.get_json()["reauth"].startswith("/auth/reauth?next=")


def test_key_as_second_factor_then_verify_page_and_sign_in(app: Flask) -> None:
    client, _user = signed_in_fresh(app, "carol")
    key = SoftKey(resident=False, uv=False)
    add_key(client, key)
    other = app.test_client()
    assert location_path(login(other, "carol")) == "/auth/mfa/verify"
    verify = page(other.get("/auth/mfa/verify"))
    button = verify.find(id="webauthn-verify")
    assert button is not None and verify.find(id="code") is not None  # the code field stays
    # The key option comes before the code form.
    html = str(verify)
    assert html.index('id="webauthn-verify"') < html.index('name="code"')
    options = post_json(other, button["data-begin"], {}).get_json()["publicKey"]
    done = post_json(other, button["data-finish"], {"credential": key.get(options, origin=ORIGIN)})
    assert done.status_code == 200 and done.get_json() == {"ok": True, "redirect": "/"}
    assert other.get("/auth/profile").status_code == 200


def test_verify_page_has_no_key_button_without_a_key(app: Flask) -> None:
    from helpers import enable_mfa

    user = create_user(app, "dora")
    enable_mfa(app, user.id)
    client = app.test_client()
    login(client, "dora")
    assert page(client.get("/auth/mfa/verify")).find(id="webauthn-verify") is None


def test_login_page_offers_passkeys_and_passwordless_sign_in_works(app: Flask) -> None:
    client, _user = signed_in_fresh(app, "erin")
    key = SoftKey(resident=True, uv=True)
    add_key(client, key)
    fresh = app.test_client()
    login_page = page(fresh.get("/auth/login"))
    assert login_page.find(id="username")["autocomplete"] == "username webauthn"
    button = login_page.find(id="passkey-signin")
    options = post_json(fresh, button["data-begin"], {}).get_json()["publicKey"]
    done = post_json(
        fresh,
        button["data-finish"],
        {"credential": key.get(options, origin=ORIGIN), "next": "/auth/profile"},
    )
    assert done.status_code == 200 and done.get_json()["redirect"] == "/auth/profile"
    assert fresh.get("/auth/profile").status_code == 200


def test_step_up_with_a_key_on_the_reauth_page(app: Flask, make_app: Callable[..., Flask]) -> None:
    keyed = make_app(reauth_minutes=0)  # "always ask": every sensitive action steps up
    client, _user = signed_in_fresh(keyed, "fay")
    key = SoftKey(uv=True)
    add_key(client, key)
    reauth = page(client.get("/auth/reauth?next=/auth/security-keys"))
    button = reauth.find(id="webauthn-reauth")
    assert button is not None and reauth.find(id="code") is None  # keys only: no code field
    options = post_json(client, button["data-begin"], {}).get_json()["publicKey"]
    done = post_json(
        client,
        button["data-finish"],
        {"credential": key.get(options, origin=ORIGIN), "next": "/auth/security-keys"},
    )
    assert done.get_json() == {"ok": True, "redirect": "/auth/security-keys"}
    second = post_json(client, "/auth/webauthn/register/begin", {"name": "Another"})
    assert second.status_code == 200


def test_removing_keys_is_a_step_up_action_and_the_last_needs_confirmation(app: Flask) -> None:
    client, user = signed_in_fresh(app, "gus")
    add_key(client, SoftKey())
    key_id = services_of(app).webauthn.keys_of(user.id)[0].id
    shown = page(client.get("/auth/security-keys"))
    assert shown.find(id=f"confirm-last-{key_id}") is not None
    refused = client.post(f"/auth/security-keys/{key_id}/remove", follow_redirects=True)
    assert "last second factor" in text_of(refused)
    assert len(services_of(app).webauthn.keys_of(user.id)) == 1
    done = client.post(f"/auth/security-keys/{key_id}/remove", data={"confirm_last": "1"})
    assert location_path(done) == "/auth/profile"
    assert services_of(app).webauthn.keys_of(user.id) == []


def test_renaming_by_form(app: Flask) -> None:
    client, user = signed_in_fresh(app, "hana")
    add_key(client, SoftKey(), "Old")
    key_id = services_of(app).webauthn.keys_of(user.id)[0].id
    client.post(f"/auth/security-keys/{key_id}/rename", data={"name": "New name"})
    assert services_of(app).webauthn.keys_of(user.id)[0].name == "New name"


@pytest.mark.parametrize(
    "endpoint",
    [
        "/auth/webauthn/register/finish",
        "/auth/webauthn/verify/finish",
        "/auth/webauthn/passwordless/finish",
        "/auth/webauthn/reauth/finish",
    ],
)
def test_hostile_ceremony_data_gets_a_clear_4xx(app: Flask, endpoint: str) -> None:
    client, _user = signed_in_fresh(app, "ivan")
    add_key(client, SoftKey())
    if "verify" in endpoint:
        client = app.test_client()
        login(client, "ivan")
    for begin in ("register/begin", "verify/begin", "passwordless/begin", "reauth/begin"):
        post_json(client, f"/auth/webauthn/{begin}", {"name": "X"})
    bodies: list[object] = [
        [],
        "text",
        {},
        {"credential": None},
        {"credential": "x" * 30_000},
        {"credential": {"id": "AAAA", "rawId": "AAAA", "type": "public-key", "response": {}}},
        {"credential": {"response": {"clientDataJSON": "!!!"}}},
        {"credential": {"id": 1, "rawId": [1], "response": {"clientDataJSON": "e30"}}},
    ]
    for body in bodies:
        answer = post_json(client, endpoint, body)
        assert 400 <= answer.status_code < 500, (body, answer.status_code)
        assert answer.get_json()["ok"] is False
    not_json = client.post(endpoint, data={"credential": "x"})
    assert not_json.status_code == 415
    huge = client.post(endpoint, data="{" + " " * 70_000 + "}", content_type="application/json")
    assert huge.status_code == 413


def test_ceremonies_need_the_csrf_token_in_a_header(make_app: Callable[..., Flask]) -> None:
    app = make_app(csrf_enabled=True)
    client = app.test_client()
    login_page = client.get("/auth/login").get_data(as_text=True)
    token = re.search(r'id="webauthn-csrf" value="([^"]+)"', login_page)
    assert token is not None
    assert post_json(client, "/auth/webauthn/passwordless/begin", {}).status_code == 400
    ok = post_json(client, "/auth/webauthn/passwordless/begin", {}, **{"X-CSRFToken": token[1]})
    assert ok.status_code == 200 and ok.get_json()["publicKey"]["challenge"]


def test_admin_sees_methods_removes_one_key_and_resets(app: Flask) -> None:
    admin, _admin_user, _secret = admin_client(app)
    client, user = signed_in_fresh(app, "kim")
    add_key(client, SoftKey(), "Lost key")
    add_key(client, SoftKey(), "Kept key")
    listing = page(admin.get("/admin/users"))
    row = listing.select_one('tr[data-username="kim"] .mfa-methods')
    assert row is not None and "app: no" in row.get_text() and "Lost key" in row.get_text()
    detail = page(admin.get(f"/admin/users/{user.id}"))
    assert detail.find(id="method-app").get_text(strip=True) == "No"
    assert detail.find(id="method-keys").get_text(strip=True) == "2"
    lost = next(k for k in services_of(app).webauthn.keys_of(user.id) if k.name == "Lost key")
    done = admin.post(f"/admin/users/{user.id}/webauthn/{lost.id}/remove")
    assert location_path(done) == f"/admin/users/{user.id}"
    assert [k.name for k in services_of(app).webauthn.keys_of(user.id)] == ["Kept key"]
    admin.post(
        f"/admin/users/{user.id}/mfa/disable", data={"reason": "lost everything", "confirm": "y"}
    )
    assert services_of(app).webauthn.keys_of(user.id) == []


def test_remember_this_device_counts_for_a_key_too(app: Flask) -> None:
    services_of(app).policy.set_policy("viewer", actor=None, remember_days=30)
    client, _user = signed_in_fresh(app, "lena")
    key = SoftKey()
    add_key(client, key)
    other = app.test_client()
    login(other, "lena")
    assert page(other.get("/auth/mfa/verify")).find(id="remember_device") is not None
    options = post_json(other, "/auth/webauthn/verify/begin", {}).get_json()["publicKey"]
    done = post_json(
        other,
        "/auth/webauthn/verify/finish",
        {"credential": key.get(options, origin=ORIGIN), "remember_device": True},
    )
    assert done.status_code == 200
    assert "qpki_remember=" in " ".join(done.headers.getlist("Set-Cookie"))


def test_adding_the_app_next_to_a_key_and_reconfiguring_keep_the_backup_codes(app: Flask) -> None:
    from helpers import oathtool_code

    client, user = signed_in_fresh(app, "mona")
    codes = add_key(client, SoftKey()).get_json()["backup_codes"]
    for round_ in ("add the app", "reconfigure it"):
        assert client.post("/auth/mfa/setup/start").status_code == 302, round_
        setup = page(client.get("/auth/mfa/setup"))
        secret = re.sub(r"\s+", "", setup.find(id="mfa-secret").get_text())
        done = client.post("/auth/mfa/setup", data={"code": oathtool_code(secret)})
        assert location_path(done) == "/auth/profile", round_
        profile = page(client.get("/auth/profile"))
        assert profile.find(id="reconfigure-app") is not None
        assert "8 of 8" in profile.find(id="method-backup-codes").get_text()
    # The codes issued with the key still work: neither step replaced them.
    assert services_of(app).signin.verify_code(user.id, codes[0]).success
    assert services_of(app).factors.backup_codes_info(user.id).remaining == 7


def test_a_key_only_user_gets_invalid_code_for_a_code_and_can_use_a_backup_code(
    app: Flask,
) -> None:
    client, _user = signed_in_fresh(app, "nils")
    codes = add_key(client, SoftKey()).get_json()["backup_codes"]
    other = app.test_client()
    login(other, "nils")
    wrong = other.post("/auth/mfa/verify", data={"code": "123456"})
    assert wrong.status_code == 200 and "Invalid verification code" in text_of(wrong)
    assert location_path(other.post("/auth/mfa/verify", data={"code": codes[0]})) != (
        "/auth/mfa/verify"
    )
    assert other.get("/auth/profile").status_code == 200
