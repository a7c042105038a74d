"""The /admin pages: role checks on every route, user management, emergency 2FA reset and
the audit trail with its CSV export."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from helpers import (
    PASSWORD,
    admin_client,
    create_user,
    enable_mfa,
    enroll,
    location_path,
    login,
    main_text,
    page,
    text_of,
)
from qpki.audit.events import AuditEvent
from qpki.audit.models import AuditEventRecord
from qpki.auth.models import User

NEW_PASSWORD = "another quite long passphrase"

# Every /admin route, as (method, rule). test_route_list_is_complete keeps it honest.
ADMIN_ROUTES: list[tuple[str, str]] = [
    ("GET", "/admin/users"),
    ("GET", "/admin/users/new"),
    ("POST", "/admin/users/new"),
    ("GET", "/admin/users/<int:user_id>"),
    ("POST", "/admin/users/<int:user_id>/role"),
    ("POST", "/admin/users/<int:user_id>/deactivate"),
    ("POST", "/admin/users/<int:user_id>/reactivate"),
    ("POST", "/admin/users/<int:user_id>/unlock"),
    ("POST", "/admin/users/<int:user_id>/password-reset"),
    ("POST", "/admin/users/<int:user_id>/password-reset-link"),
    ("POST", "/admin/users/<int:user_id>/mfa/disable"),
    ("GET", "/admin/audit"),
    ("GET", "/admin/audit.csv"),
    ("GET", "/admin/api-keys"),
    ("POST", "/admin/api-keys"),
    ("POST", "/admin/api-keys/<name>/revoke"),
    ("GET", "/admin/policy"),
    ("POST", "/admin/policy/<role>"),
    ("GET", "/admin/policy/compliance.csv"),
    ("POST", "/admin/users/<int:user_id>/remembered-devices/forget"),
    ("POST", "/admin/users/<int:user_id>/webauthn/<int:key_id>/remove"),
]

# Form data an admin would send, so that the admin's request succeeds (200 or 302).
ROUTE_DATA: dict[str, dict[str, str]] = {
    "/admin/users/new": {
        "username": "newcomer",
        "email": "newcomer@example.org",
        "role": "viewer",
        "password": NEW_PASSWORD,
    },
    "/admin/users/<int:user_id>/role": {"role": "operator"},
    "/admin/api-keys": {"name": "from-admin-test", "scopes": "verify"},
    "/admin/users/<int:user_id>/mfa/disable": {
        "reason": "lost phone, identity checked",
        "confirm": "y",
    },
}


# -- helpers local to this module -----------------------------------------------------------------


def logged_in(app: Flask, username: str, password: str = PASSWORD) -> FlaskClient:
    client = app.test_client()
    response = login(client, username, password)
    assert response.status_code == 302, text_of(response)
    return client


def user_row(app: Flask, user_id: int) -> User:
    user = app.auth_manager.get_user(user_id=user_id)  # type: ignore[attr-defined]
    assert user is not None
    return user


def snapshot(app: Flask, user_id: int) -> tuple[object, ...]:
    u = user_row(app, user_id)
    return (
        u.role,
        u.is_active,
        u.two_factor_enabled,
        u.password_hash,
        u.must_change_password,
        u.totp_secret,
        u.backup_codes,
    )


def user_count(app: Flask) -> int:
    return app.auth_manager.count_users()  # type: ignore[attr-defined]


def audit_rows(app: Flask, event: str) -> list[AuditEventRecord]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return list(
            s.scalars(
                select(AuditEventRecord)
                .where(AuditEventRecord.event == event)
                .order_by(AuditEventRecord.id)
            )
        )


@dataclass
class Cast:
    app: Flask
    admin: User
    target: User
    clients: dict[str, FlaskClient | None]


@pytest.fixture
def cast(app: Flask) -> Cast:
    admin_browser, admin, _secret = admin_client(app)
    create_user(app, "vera", role="viewer")
    create_user(app, "otto", role="operator")
    target = create_user(app, "tina", role="viewer")
    return Cast(
        app=app,
        admin=admin,
        target=target,
        clients={
            "anonymous": app.test_client(),
            "viewer": logged_in(app, "vera"),
            "operator": logged_in(app, "otto"),
            "admin": admin_browser,
        },
    )


def _call(client: FlaskClient, method: str, rule: str, user_id: int) -> TestResponse:
    url = rule.replace("<int:user_id>", str(user_id)).replace("<int:key_id>", "1")
    if method == "GET":
        return client.get(url)
    return client.post(url, data=ROUTE_DATA.get(rule, {}))


# -- role checks ----------------------------------------------------------------------------------
def test_route_list_is_complete(app: Flask) -> None:
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/admin"):
            for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
                found.add((method, rule.rule))
    assert found == set(ADMIN_ROUTES)


@pytest.mark.parametrize(
    ("method", "rule"), ADMIN_ROUTES, ids=[f"{m} {r}" for m, r in ADMIN_ROUTES]
)
def test_every_admin_route_checks_the_role(cast: Cast, method: str, rule: str) -> None:
    app, target = cast.app, cast.target
    if rule.endswith("/mfa/disable"):
        enable_mfa(app, target.id)
    if rule.endswith("/reactivate"):
        app.auth_manager.set_active(None, target.id, False)  # type: ignore[attr-defined]
    before, users_before = snapshot(app, target.id), user_count(app)

    anonymous = _call(cast.clients["anonymous"], method, rule, target.id)  # type: ignore[arg-type]
    assert anonymous.status_code == 302
    assert location_path(anonymous) == "/auth/login"

    for role in ("viewer", "operator"):
        denied = _call(cast.clients[role], method, rule, target.id)  # type: ignore[arg-type]
        assert denied.status_code == 403, role
        assert "Access denied" in main_text(denied)
    assert snapshot(app, target.id) == before, "a refused request changed the user"
    assert user_count(app) == users_before, "a refused request created a user"
    assert len(audit_rows(app, "access_denied")) >= 2

    allowed = _call(cast.clients["admin"], method, rule, target.id)  # type: ignore[arg-type]
    assert allowed.status_code in (200, 302), (allowed.status_code, main_text(allowed)[:300])
    if allowed.status_code == 302:
        assert location_path(allowed) not in ("/auth/login", "/auth/mfa/verify")
    # Unlocking an unlocked account and mailing a reset link change no user column; API keys
    # are no users (their effect is tested in tests/api/test_api_keys.py).
    unchanging = {
        "/admin/users/<int:user_id>/unlock",
        "/admin/users/<int:user_id>/password-reset-link",
        "/admin/api-keys",
        "/admin/api-keys/<name>/revoke",
        # Policies and remembered devices change no user column (tests/web/test_policy_web.py,
        # tests/web/test_remembered_devices.py test their effect).
        "/admin/policy/<role>",
        "/admin/users/<int:user_id>/remembered-devices/forget",
        # Removing one security key changes no user column (tests/web/test_webauthn_web.py).
        "/admin/users/<int:user_id>/webauthn/<int:key_id>/remove",
    }
    if method == "POST" and rule not in unchanging:
        changed = snapshot(app, target.id) != before or user_count(app) != users_before
        assert changed, "the admin's request had no effect"


# -- creating and editing users -------------------------------------------------------------------
def test_admin_creates_a_user_with_a_password(cast: Cast) -> None:
    app, admin = cast.app, cast.clients["admin"]
    assert admin is not None
    form = admin.get("/admin/users/new")
    assert form.status_code == 200
    response = admin.post(
        "/admin/users/new",
        data={
            "username": "carol",
            "email": "carol@example.org",
            "role": "operator",
            "password": NEW_PASSWORD,
        },
    )
    assert response.status_code == 200
    assert page(response).find(id="temporary-password") is None
    carol = app.auth_manager.get_user(username="carol")  # type: ignore[attr-defined]
    assert carol is not None and carol.role == "operator" and not carol.must_change_password
    client = logged_in(app, "carol", NEW_PASSWORD)
    assert client.get("/").status_code == 200
    created = [e for e in audit_rows(app, "user_created") if e.target_name == "carol"]
    assert created and created[-1].actor_name == "root-admin"


def test_admin_creates_a_user_with_a_temporary_password(cast: Cast) -> None:
    app, admin = cast.app, cast.clients["admin"]
    assert admin is not None
    response = admin.post(
        "/admin/users/new", data={"username": "dave", "email": "", "role": "viewer"}
    )
    assert response.status_code == 200
    shown = page(response).find(id="temporary-password")
    assert shown is not None
    temporary = shown.get_text(strip=True)
    assert len(temporary) >= 12
    dave = app.auth_manager.get_user(username="dave")  # type: ignore[attr-defined]
    assert dave is not None and dave.must_change_password
    assert temporary not in text_of(admin.get(f"/admin/users/{dave.id}"))

    client = logged_in(app, "dave", temporary)
    forced = client.get("/")
    assert location_path(forced) == "/auth/change-password"
    changed = client.post(
        "/auth/change-password",
        data={
            "current_password": temporary,
            "new_password": NEW_PASSWORD,
            "confirm_password": NEW_PASSWORD,
        },
    )
    assert changed.status_code == 302
    assert client.get("/").status_code == 200


def test_create_user_refuses_bad_input(cast: Cast) -> None:
    app, admin = cast.app, cast.clients["admin"]
    assert admin is not None
    before = user_count(app)
    taken = admin.post(
        "/admin/users/new", data={"username": "TINA", "role": "viewer", "password": NEW_PASSWORD}
    )
    assert taken.status_code == 400
    assert "already exists" in main_text(taken)
    weak = admin.post(
        "/admin/users/new", data={"username": "erin", "role": "viewer", "password": "password1234"}
    )
    assert weak.status_code == 400
    assert "too common" in main_text(weak)
    assert user_count(app) == before


def test_admin_edits_a_role(cast: Cast) -> None:
    app, admin, target = cast.app, cast.clients["admin"], cast.target
    assert admin is not None
    response = admin.post(
        f"/admin/users/{target.id}/role", data={"role": "admin"}, follow_redirects=True
    )
    assert response.status_code == 200
    assert "Role updated" in main_text(response)
    assert user_row(app, target.id).role == "admin"
    bad = admin.post(f"/admin/users/{target.id}/role", data={"role": "superuser"})
    assert bad.status_code == 302
    assert user_row(app, target.id).role == "admin"
    # The promoted user now reaches the admin pages, after enrolling in 2FA (the admin role
    # requires it from the first sign-in).
    tina = logged_in(app, "tina")
    assert location_path(tina.get("/admin/users")) == "/auth/mfa/setup"
    enroll(tina)
    assert tina.get("/admin/users").status_code == 200


def test_deactivate_ends_sessions_and_reactivate_restores_login(cast: Cast) -> None:
    app, admin, target = cast.app, cast.clients["admin"], cast.target
    assert admin is not None
    tina = logged_in(app, "tina")
    assert tina.get("/").status_code == 200

    response = admin.post(f"/admin/users/{target.id}/deactivate", follow_redirects=True)
    assert response.status_code == 200
    assert not user_row(app, target.id).is_active
    kicked = tina.get("/")
    assert kicked.status_code == 302
    assert location_path(kicked) == "/auth/login"
    refused = login(app.test_client(), "tina")
    assert refused.status_code != 302
    assert "Invalid username or password" in main_text(refused)
    assert audit_rows(app, "user_deactivated")

    admin.post(f"/admin/users/{target.id}/reactivate")
    assert user_row(app, target.id).is_active
    assert logged_in(app, "tina").get("/").status_code == 200


def test_reset_password_shows_a_temporary_password_once(cast: Cast) -> None:
    app, admin, target = cast.app, cast.clients["admin"], cast.target
    assert admin is not None
    tina = logged_in(app, "tina")
    response = admin.post(f"/admin/users/{target.id}/password-reset")
    assert response.status_code == 200
    assert "no-store" in response.headers.get("Cache-Control", "")
    temporary = page(response).find(id="temporary-password").get_text(strip=True)
    assert temporary
    assert temporary not in text_of(admin.get(f"/admin/users/{target.id}"))
    assert temporary not in text_of(admin.get("/admin/audit"))

    kicked = tina.get("/")  # her session ended (not merely sent to change the password)
    assert kicked.status_code == 302
    assert location_path(kicked) == "/auth/login"
    assert login(app.test_client(), "tina", PASSWORD).status_code != 302
    client = logged_in(app, "tina", temporary)
    assert location_path(client.get("/")) == "/auth/change-password"


def test_admin_cannot_lock_themself_out(cast: Cast) -> None:
    app, admin = cast.app, cast.clients["admin"]
    assert admin is not None
    me = cast.admin.id
    response = admin.post(f"/admin/users/{me}/deactivate", follow_redirects=True)
    assert "You cannot deactivate your own account" in main_text(response)
    assert user_row(app, me).is_active
    response = admin.post(f"/admin/users/{me}/role", data={"role": "viewer"}, follow_redirects=True)
    assert "You cannot remove your own admin role" in main_text(response)
    assert user_row(app, me).role == "admin"
    assert admin.get("/admin/users").status_code == 200


def test_unknown_user_page_is_404(cast: Cast) -> None:
    admin = cast.clients["admin"]
    assert admin is not None
    assert admin.get("/admin/users/99999").status_code == 404


# -- emergency 2FA reset --------------------------------------------------------------------------
def test_admin_2fa_reset_needs_a_reason_and_ends_the_users_session(cast: Cast) -> None:
    app, admin, target = cast.app, cast.clients["admin"], cast.target
    assert admin is not None
    tina = logged_in(app, "tina")
    enroll(tina)  # through the pages; her session stays open
    assert user_row(app, target.id).two_factor_enabled
    assert tina.get("/").status_code == 200

    detail = admin.get(f"/admin/users/{target.id}")
    assert page(detail).find("form", action=f"/admin/users/{target.id}/mfa/disable") is not None

    for reason in ("", "   "):
        missing = admin.post(
            f"/admin/users/{target.id}/mfa/disable", data={"reason": reason, "confirm": "y"}
        )
        assert missing.status_code == 400
        assert "reason is required" in main_text(missing)
        assert user_row(app, target.id).two_factor_enabled
    assert tina.get("/").status_code == 200

    reason = "lost phone and codes; identity checked by phone call"
    done = admin.post(
        f"/admin/users/{target.id}/mfa/disable", data={"reason": reason, "confirm": "y"}
    )
    assert done.status_code == 302
    row = user_row(app, target.id)
    assert not row.two_factor_enabled and row.totp_secret is None and row.backup_codes is None
    kicked = tina.get("/")
    assert kicked.status_code == 302
    assert location_path(kicked) == "/auth/login"

    events = audit_rows(app, "mfa_admin_disabled")
    assert len(events) == 1
    assert events[0].actor_name == "root-admin"
    assert events[0].target_user_id == target.id
    assert json.loads(events[0].details)["reason"] == reason
    trail = admin.get("/admin/audit?event=mfa_admin_disabled")
    rows = page(trail).select("tr.audit-event")
    assert len(rows) == 1
    assert reason in rows[0].get_text(" ") and "root-admin" in rows[0].get_text(" ")

    # Password-only login works again for the user.
    after = app.test_client()
    assert location_path(login(after, "tina")) == "/"


def test_users_list_shows_and_filters_2fa_status(cast: Cast) -> None:
    app, admin, target = cast.app, cast.clients["admin"], cast.target
    assert admin is not None
    enable_mfa(app, target.id)

    def statuses(url: str) -> dict[str, str]:
        soup = page(admin.get(url))
        result = {}
        for tr in soup.select("tbody tr"):
            name = tr.get("data-username") or tr.find("th").get_text(strip=True)
            cell = tr.select_one(".mfa-status")
            assert cell is not None, tr
            result[name] = cell.get_text(strip=True)
        return result

    everyone = statuses("/admin/users")
    assert everyone == {
        "root-admin": "Enabled",  # an administrator acts on other accounts only with 2FA
        "vera": "Disabled",
        "otto": "Disabled",
        "tina": "Enabled",
    }
    assert statuses("/admin/users?mfa=enabled") == {"root-admin": "Enabled", "tina": "Enabled"}
    assert set(statuses("/admin/users?mfa=disabled")) == {"vera", "otto"}


# -- audit trail ----------------------------------------------------------------------------------
def _add_events(app: Flask, count: int) -> None:
    audit = app.auth_manager.audit  # type: ignore[attr-defined]
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        for i in range(count):
            audit.record(s, AuditEvent.USER_CHANGED, target_name=f"pg-{i:03d}", details={"seq": i})


def _targets(response: TestResponse) -> list[str]:
    return [
        tr.find_all("td")[4].get_text(strip=True) for tr in page(response).select("tr.audit-event")
    ]


def test_audit_pages_newest_first_with_a_before_cursor(cast: Cast) -> None:
    app, admin = cast.app, cast.clients["admin"]
    assert admin is not None
    _add_events(app, 60)

    first = admin.get("/admin/audit?event=user_changed")
    assert first.status_code == 200
    assert {tr["data-event"] for tr in page(first).select("tr.audit-event")} == {"user_changed"}
    assert _targets(first) == [f"pg-{i:03d}" for i in range(59, 9, -1)]
    older = page(first).find("a", string=lambda s: s and "Older" in s)
    assert older is not None
    query = parse_qs(urlsplit(older["href"]).query)
    assert query["event"] == ["user_changed"] and query["before"]

    second = admin.get(older["href"])
    assert _targets(second) == [f"pg-{i:03d}" for i in range(9, -1, -1)]
    assert page(second).find("a", string=lambda s: s and "Older" in s) is None

    everything = admin.get("/admin/audit")
    times = [t["datetime"] for t in page(everything).select("tr.audit-event time")]
    assert times == sorted(times, reverse=True)
    assert len(times) == 50


def test_audit_filters_by_event_and_user(cast: Cast) -> None:
    app, admin, target = cast.app, cast.clients["admin"], cast.target
    assert admin is not None
    logged_in(app, "tina")
    login(app.test_client(), "tina", "wrong passphrase for tina")
    login(app.test_client(), "vera", "wrong passphrase for vera")

    by_event = page(admin.get("/admin/audit?event=login_failure")).select("tr.audit-event")
    assert len(by_event) == 2
    assert {tr["data-event"] for tr in by_event} == {"login_failure"}

    both = admin.get("/admin/audit?event=login_failure&user=tina")
    assert _targets(both) == ["tina"]

    by_user = page(admin.get("/admin/audit?user=TINA")).select("tr.audit-event")
    assert by_user and all("tina" in tr.get_text(" ") for tr in by_user)
    assert {tr["data-event"] for tr in by_user} >= {
        "user_created",
        "login_success",
        "login_failure",
    }
    assert all(tr["data-event"] != "login_failure" or "tina" in tr.get_text(" ") for tr in by_user)
    vera_only = page(admin.get("/admin/audit?user=vera")).select("tr.audit-event")
    assert vera_only and not any("tina" in tr.get_text(" ") for tr in vera_only)
    assert target.id

    nobody = admin.get("/admin/audit?user=nobody-at-all")
    assert page(nobody).select("tr.audit-event") == []


def test_audit_csv_export_is_complete_and_neutralises_formulas(cast: Cast) -> None:
    app, admin = cast.app, cast.clients["admin"]
    assert admin is not None
    formula = '=HYPERLINK("http://evil.example","x")'
    login(app.test_client(), formula, "whatever passphrase here")
    login(app.test_client(), "+cmd|' /C calc'!A0", "whatever passphrase here")
    _add_events(app, 3)

    response = admin.get("/admin/audit.csv")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert "attachment" in response.headers.get("Content-Disposition", "")
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    header, body = rows[0], rows[1:]
    assert header[:4] == ["id", "time_utc", "event", "outcome"]
    assert "actor" in header and "target" in header
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        total = len(list(s.scalars(select(AuditEventRecord.id))))
    assert len(body) == total
    ids = [int(r[0]) for r in body]
    assert ids == sorted(ids, reverse=True)

    target = header.index("target")
    targets = [r[target] for r in body]
    assert "'" + formula in targets
    assert "'+cmd|' /C calc'!A0" in targets
    for row in body:
        for cell in row:
            assert not cell.startswith(("=", "+", "@")), cell

    only = admin.get("/admin/audit.csv?event=login_failure")
    rows = list(csv.reader(io.StringIO(only.get_data(as_text=True))))[1:]
    assert len(rows) == 2 and {r[2] for r in rows} == {"login_failure"}
