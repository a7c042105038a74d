"""Issue 16 through the Flask test client: messages that say what to do, errors next to their
field, the setup and backup-code pages, the admin pages' badges, names and details.

Time runs on a SteppedClock (no sleeping across TOTP steps or the 5-minute pending sign-in).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import unquote

import pytest
from bs4 import BeautifulSoup, Tag
from flask import Flask
from flask.testing import FlaskClient

from helpers import (
    PASSWORD,
    admin_client,
    create_user,
    enable_mfa,
    login,
    login_with_mfa,
    main_text,
    oathtool_code,
    page,
    text_of,
)
from qpki.auth import errors
from qpki.clock import SteppedClock

T0 = datetime(2026, 6, 1, 12, 0, 10, tzinfo=UTC)


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock(T0)


@pytest.fixture
def app(make_app: Callable[..., Flask], clock: SteppedClock) -> Flask:
    return make_app(clock=clock)


def _field(html: BeautifulSoup, field_id: str) -> tuple[Tag, str]:
    """The input and the text of the error tied to it by aria-describedby."""
    field = html.find(id=field_id)
    assert isinstance(field, Tag), field_id
    described = (field.get("aria-describedby") or "").split()
    assert f"{field_id}-error" in described, described
    error = html.find(id=f"{field_id}-error")
    assert isinstance(error, Tag)
    return field, error.get_text(" ", strip=True)


def _invalid(html: BeautifulSoup, field_id: str, message: str) -> None:
    """The error is next to the field, the field is marked invalid and gets the focus."""
    field, error = _field(html, field_id)
    assert message in error, error
    assert field.get("aria-invalid") == "true"
    assert field.has_attr("autofocus")
    first = html.select("[autofocus]")[0]
    assert first.get("id") == field_id, "focus goes to the first field in error"


# -- messages ------------------------------------------------------------------------------------
def test_a_code_used_twice_says_wait_for_the_next_one(app: Flask, clock: SteppedClock) -> None:
    user = create_user(app)
    secret, _ = enable_mfa(app, user.id, at=clock())
    clock.advance(seconds=30)
    code = oathtool_code(secret, clock())
    assert login_with_mfa(app.test_client(), "alice", code).status_code == 302
    replay = login_with_mfa(app.test_client(), "alice", code)
    assert errors.CODE_JUST_USED == "That code was just used. Wait for the next code in your app."
    assert errors.CODE_JUST_USED in main_text(replay)
    assert errors.INVALID_CODE not in main_text(replay)
    # A wrong code keeps the spec's message.
    wrong = login_with_mfa(app.test_client(), "alice", "000000" if code != "000000" else "111111")
    assert errors.INVALID_CODE in main_text(wrong)
    # The seed API keeps the specification's message word for word.
    assert app.auth_manager.verify_mfa_code(user.id, code) == (  # type: ignore[attr-defined]
        False,
        errors.INVALID_CODE,
    )


def test_a_pending_sign_in_times_out_after_5_minutes_keeping_the_name(
    app: Flask, clock: SteppedClock
) -> None:
    user = create_user(app)
    enable_mfa(app, user.id, at=clock())
    client = app.test_client()
    assert login(client, "alice").headers["Location"].endswith("/auth/mfa/verify")
    assert client.get("/auth/mfa/verify").status_code == 200  # the pending sign-in is seen
    clock.advance(minutes=5, seconds=1)
    gone = client.get("/auth/mfa/verify")
    assert gone.status_code == 302 and gone.headers["Location"].endswith("/auth/login")
    with client.session_transaction() as kept:
        assert kept.get("signin_username") == "alice"
        assert "sid" not in kept and "pending_user" not in kept
    landed = client.get("/auth/login")
    assert "Sign-in timed out after 5 minutes. Please sign in again." in main_text(landed)
    assert "Please sign in first" not in main_text(landed)
    refilled = page(landed).find(id="username")
    assert isinstance(refilled, Tag) and refilled.get("value") == "alice"


def test_a_timed_out_sign_in_on_another_page_says_so_too(app: Flask, clock: SteppedClock) -> None:
    user = create_user(app)
    enable_mfa(app, user.id, at=clock())
    client = app.test_client()
    login(client, "alice")
    client.get("/auth/mfa/verify")
    clock.advance(minutes=6)
    gone = client.get("/auth/profile")
    assert gone.status_code == 302 and "/auth/login" in gone.headers["Location"]
    assert gone.headers["Location"].endswith("/auth/login?next=/auth/profile")  # target kept
    assert errors.SIGNIN_EXPIRED in main_text(client.get("/auth/login"))


def test_a_pending_sign_in_cancelled_is_not_called_timed_out(
    app: Flask, clock: SteppedClock
) -> None:
    user = create_user(app)
    enable_mfa(app, user.id, at=clock())
    client = app.test_client()
    login(client, "alice")
    client.get("/auth/mfa/verify")
    app.auth_manager.set_active(None, user.id, False)  # type: ignore[attr-defined]
    client.get("/auth/mfa/verify")
    assert errors.SIGNIN_EXPIRED not in main_text(client.get("/auth/login"))


def test_after_an_admin_reset_the_home_page_says_who_and_when(
    app: Flask, clock: SteppedClock
) -> None:
    admin, _admin_user, _ = admin_client(app, clock=clock)
    vera = create_user(app, "vera")
    enable_mfa(app, vera.id, at=clock())
    reset = admin.post(
        f"/admin/users/{vera.id}/mfa/disable",
        data={"reason": "lost phone, identity checked", "confirm": "y"},
    )
    assert reset.status_code == 302, text_of(reset)
    user = app.test_client()
    assert login(user, "vera").status_code == 302
    home = main_text(user.get("/"))
    expected = (
        f"An administrator turned off two-factor authentication for your account on "
        f"{clock().day} {clock():%B %Y}. Set it up again."
    )
    assert expected in home
    assert "MFA" not in home
    # The administrator who did it sees nothing of the kind on their own home page.
    assert "An administrator turned off" not in main_text(admin.get("/"))


def test_home_names_the_role(app: Flask) -> None:
    create_user(app, "olga", role="operator")
    client = app.test_client()
    login(client, "olga")
    assert "Role: Operator" in main_text(client.get("/"))


# -- 2FA setup -----------------------------------------------------------------------------------
def _start_setup(client: FlaskClient) -> BeautifulSoup:
    assert client.post("/auth/mfa/setup/start", data={"password": PASSWORD}).status_code == 302
    return page(client.get("/auth/mfa/setup"))


def test_setup_page_marks_one_step_and_says_how_long_and_what_the_app_shows(
    app: Flask, clock: SteppedClock
) -> None:
    create_user(app)
    client = app.test_client()
    login(client, "alice")
    start = page(client.get("/auth/mfa/setup"))
    assert [li.get_text(" ", strip=True) for li in start.select(".steps [aria-current]")] == [
        "1 Start"
    ]
    html = _start_setup(client)
    current = html.select(".steps li.current")
    assert len(current) == 1 and current[0].get("aria-current") == "step"
    assert "Add to your app" in current[0].get_text()
    expiry = html.find(id="setup-expiry").get_text(" ", strip=True)
    assert "expires in 15 minutes" in expiry and "UTC" not in expiry
    assert html.find(id="mfa-account-name").get_text() == "qPKI: alice"
    link = html.find(id="open-in-app")
    assert link is not None and link["href"].startswith("otpauth://totp/")
    assert unquote(link["href"]).startswith("otpauth://totp/qPKI:alice?")
    assert html.find(id="copy-secret").has_attr("hidden")  # app.js shows it
    clock.advance(minutes=14, seconds=30)
    assert "expires in 1 minute." in text_of(client.get("/auth/mfa/setup"))


def test_wrong_setup_code_is_shown_next_to_the_field(app: Flask) -> None:
    create_user(app)
    client = app.test_client()
    login(client, "alice")
    _start_setup(client)
    html = page(client.post("/auth/mfa/setup", data={"code": "000000"}))
    _invalid(html, "code", errors.INVALID_CODE)
    assert html.find(attrs={"data-replaces-flash": True}) is not None


# -- backup codes --------------------------------------------------------------------------------
def test_new_codes_page_dates_the_codes_and_the_file_says_what_it_is(
    app: Flask, clock: SteppedClock
) -> None:
    create_user(app)
    client = app.test_client()
    login(client, "alice")
    html = _start_setup(client)
    secret = re.sub(r"\s+", "", html.find(id="mfa-secret").get_text())
    done = page(client.post("/auth/mfa/setup", data={"code": oathtool_code(secret, clock())}))
    assert done.find(id="codes-generated").get_text(strip=True) == "2026-06-01 12:00 UTC"
    href = done.find(id="download-codes")["href"]
    text = unquote(href.split(",", 1)[1])
    codes = [li.get_text(strip=True) for li in done.select("#backup-codes li")]
    assert text.startswith("qPKI backup codes\nAccount: alice\nGenerated: 2026-06-01 12:00 UTC\n")
    assert "Sign in at: http://localhost/auth/login\n" in text
    assert all(f"\n{code}\n" in text for code in codes)
    assert "&amp;" not in text
    for button in ("copy-codes", "print-codes"):
        assert done.find(id=button).has_attr("hidden"), button  # until app.js wires it
    assert [li.get("aria-current") for li in done.select(".steps li")] == [None, None, "step"]


def test_regenerate_form_has_no_pop_up_and_shows_the_servers_messages(
    app: Flask, clock: SteppedClock
) -> None:
    user = create_user(app)
    secret, _ = enable_mfa(app, user.id, at=clock())
    clock.advance(seconds=30)
    client = app.test_client()
    assert login_with_mfa(client, "alice", oathtool_code(secret, clock())).status_code == 302
    html = page(client.get("/auth/mfa/backup-codes"))
    form = html.find("form", action="/auth/mfa/backup-codes/regenerate")
    assert form.has_attr("novalidate")
    assert not form.select("[data-confirm]")


# -- forced password change ----------------------------------------------------------------------
def test_forced_change_keeps_the_temporary_password_after_a_mismatch(
    app: Flask, clock: SteppedClock
) -> None:
    admin, _, _ = admin_client(app, clock=clock)
    created = admin.post(
        "/admin/users/new", data={"username": "nora", "email": "", "role": "viewer"}
    )
    temporary = page(created).find(id="temporary-password").get_text(strip=True)
    client = app.test_client()
    login(client, "nora", temporary)
    mismatch = page(
        client.post(
            "/auth/change-password",
            data={
                "current_password": temporary,
                "new_password": "a brand new passphrase",
                "confirm_password": "a brand new passphrase!",
            },
        )
    )
    _invalid(mismatch, "confirm_password", "The passwords differ.")
    assert mismatch.find(id="current_password")["value"] == temporary
    assert mismatch.find(id="new_password").get("value", "") == ""

    wrong = page(
        client.post(
            "/auth/change-password",
            data={
                "current_password": "not the temporary one",
                "new_password": "a brand new passphrase",
                "confirm_password": "a brand new passphrase",
            },
        )
    )
    field, _error = _field(wrong, "current_password")
    assert field.get("value", "") == ""  # a wrong password is never echoed back
    assert field.get("aria-invalid") == "true"


# -- step-up page --------------------------------------------------------------------------------
def test_reauth_puts_each_refusal_next_to_its_field(app: Flask, clock: SteppedClock) -> None:
    client, _admin, secret = admin_client(app, clock=clock)
    wrong_password = page(
        client.post(
            "/auth/reauth",
            data={"password": "not my password", "code": oathtool_code(secret, clock())},
        )
    )
    _invalid(wrong_password, "password", "Password is incorrect.")
    clock.advance(seconds=30)
    wrong_code = page(client.post("/auth/reauth", data={"password": PASSWORD, "code": "000000"}))
    _invalid(wrong_code, "code", errors.INVALID_CODE)
    assert wrong_code.find(id="password").get("aria-invalid") is None


# -- admin pages ---------------------------------------------------------------------------------
def test_create_user_shows_every_mistake_after_one_submit(
    app: Flask, clock: SteppedClock
) -> None:
    admin, _, _ = admin_client(app, clock=clock)
    answer = admin.post(
        "/admin/users/new",
        data={"username": "x", "email": "not-an-address", "role": "viewer", "password": "short"},
    )
    text = main_text(answer)
    assert "Username must be 3-64 characters" in text
    assert "Email address is not valid." in text
    assert "at least 12 characters" in text
    assert app.auth_manager.get_user(username="x") is None  # type: ignore[attr-defined]


def test_user_pages_use_one_badge_style_and_a_dangerous_deactivate(
    app: Flask, clock: SteppedClock
) -> None:
    admin, _, _ = admin_client(app, clock=clock)
    vera = create_user(app, "vera")
    enable_mfa(app, vera.id, at=clock())
    users = page(admin.get("/admin/users"))
    row = users.select_one('#users-table tr[data-username="vera"]')
    badges = [b.get_text(strip=True) for b in row.select(".badge")]
    assert badges[:2] == ["Active", "Enabled"]
    assert row.select_one(".mfa-status").get_text(strip=True) == "Enabled"
    assert "sortable" in users.find(id="users-table")["class"]
    detail = page(admin.get(f"/admin/users/{vera.id}"))
    assert detail.find(id="mfa-status").get_text(strip=True) == "Enabled"
    assert "badge" in detail.find(id="mfa-status")["class"]
    assert "danger" in detail.find(id="deactivate-user")["class"]
    assert not detail.select("#admin-disable-2fa-form [data-confirm]")


def test_events_show_seconds_human_names_and_readable_details(
    app: Flask, clock: SteppedClock
) -> None:
    admin, _, _ = admin_client(app, clock=clock)
    vera = create_user(app, "vera")
    enable_mfa(app, vera.id, at=clock())
    clock.advance(seconds=7)
    reason = "Lost phone; identity checked by a call"
    admin.post(f"/admin/users/{vera.id}/mfa/disable", data={"reason": reason, "confirm": "y"})
    detail = page(admin.get(f"/admin/users/{vera.id}"))
    event = detail.select_one('#user-events tr[data-event="mfa_admin_disabled"]')
    assert re.search(r"\d{2}:\d{2}:\d{2}", event.get_text(" ", strip=True))
    assert "2FA admin disabled" in event.get_text(" ", strip=True)
    first = event.select_one(".kv div")
    assert (first.dt.get_text(), first.dd.get_text()) == ("reason", reason)

    audit = admin.get("/admin/audit")
    html = page(audit)
    row = html.select_one('tr.audit-event[data-event="mfa_admin_disabled"]')
    cells = row.find_all("td")
    assert cells[1].get_text(strip=True) == "2FA admin disabled"
    pairs = {
        dt.get_text(strip=True): dd.get_text(strip=True)
        for dt, dd in zip(row.select(".kv dt"), row.select(".kv dd"), strict=True)
    }
    assert pairs["reason"] == reason and pairs["sessions ended"] == "0"
    assert "{" not in cells[-1].get_text()
    total = int(re.match(r"([\d,]+) events?", html.find(id="audit-count").get_text()).group(1))
    assert total >= 5
    options = {o["value"]: o.get_text(strip=True) for o in html.select("#event option")}
    assert options["mfa_verify_failure"] == "2FA verify failure"
    assert "wide" in html.find(id="event").find_parent(class_="field")["class"]
    filtered = page(admin.get("/admin/audit?event=mfa_admin_disabled"))
    assert filtered.find(id="audit-count").get_text(" ", strip=True).startswith(
        "1 event matches the filter"
    )


def test_setting_up_a_new_phone_keeps_the_backup_codes_out_of_the_steps(
    app: Flask, clock: SteppedClock
) -> None:
    user = create_user(app)
    secret, _ = enable_mfa(app, user.id, at=clock())
    clock.advance(seconds=30)
    client = app.test_client()
    assert login_with_mfa(client, "alice", oathtool_code(secret, clock())).status_code == 302
    start = page(client.get("/auth/mfa/setup"))
    assert start.h1.get_text(strip=True) == "Set up your authenticator app"
    html = _start_setup(client)
    assert html.h1.get_text(strip=True) == "Set up your authenticator app"
    assert [li.get_text(" ", strip=True) for li in html.select(".steps li")][-1].endswith(
        "Add to your app"
    )
    assert "backup codes" not in html.find(id="verify-title").find_parent("section").get_text()


# -- the sign-in and verify pages ---------------------------------------------------------------
def test_verify_page_names_the_account_and_offers_a_backup_code_field(
    app: Flask, clock: SteppedClock
) -> None:
    user = create_user(app)
    _secret, codes = enable_mfa(app, user.id, at=clock())
    client = app.test_client()
    login(client, "alice")
    html = page(client.get("/auth/mfa/verify"))
    assert "Signing in as alice" in html.get_text(" ", strip=True)
    code = html.find(id="code")
    assert isinstance(code, Tag) and code.get("inputmode") == "numeric"
    switch = html.find(id="use-backup-code")
    assert isinstance(switch, Tag)
    backup = page(client.get(str(switch["href"])))
    field = backup.find(id="code")
    assert isinstance(field, Tag) and field.get("inputmode") == "text"
    assert "backup codes" in backup.get_text(" ", strip=True)
    done = client.post(str(switch["href"]), data={"code": codes[0]})
    assert done.status_code == 302


def test_wrong_password_is_shown_inside_the_card_next_to_the_field(app: Flask) -> None:
    create_user(app)
    response = login(app.test_client(), "alice", "not the right password")
    _invalid(page(response), "password", errors.INVALID_CREDENTIALS)


def test_account_page_says_devices_and_events_in_words(app: Flask, clock: SteppedClock) -> None:
    """Sessions name the browser ("Chrome 120 on Linux"), the admin's own events name the
    other person ("You reset ... for vera"), and success is not repeated as a badge."""
    admin, _admin_user, _secret = admin_client(app, clock=clock)
    vera = create_user(app, "vera")
    enable_mfa(app, vera.id, at=clock())
    chrome = (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/120.0.0.0 Safari/537.36"
    )
    browser = app.test_client()
    browser.post(
        "/auth/login",
        data={"username": "vera", "password": PASSWORD},
        headers={"User-Agent": chrome},
    )
    done = admin.post(
        f"/admin/users/{vera.id}/mfa/disable",
        data={"reason": "lost phone, identity checked", "confirm": "y"},
    )
    assert done.status_code == 302
    account = page(admin.get("/auth/profile"))
    events = account.select(".event-list li")
    texts = [li.get_text(" ", strip=True) for li in events]
    assert any("You reset two-factor authentication for vera" in t for t in texts), texts
    assert not any("Success" in t for t in texts), texts
    assert not any("password accepted" in t.lower() for t in texts), texts
    vera_browser = app.test_client()
    vera_browser.post(
        "/auth/login",
        data={"username": "vera", "password": PASSWORD},
        headers={"User-Agent": chrome},
    )
    vera_page = page(vera_browser.get("/auth/profile", headers={"User-Agent": chrome}))
    device = vera_page.select_one("td.ua")
    assert device is not None and device.get_text(strip=True) == "Chrome 120 on Linux"
    vera_events = [li.get_text(" ", strip=True) for li in vera_page.select(".event-list li")]
    assert any("reset by root-admin" in t for t in vera_events), vera_events
