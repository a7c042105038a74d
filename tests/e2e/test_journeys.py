"""Real-browser journeys (Chromium via Playwright) against a real `qpki run` server.

Each journey is one person's story through the pages, done the way a person does it: clicking
links and buttons, reading the QR code from the pixels on screen, typing the codes an
authenticator (Debian's oathtool) shows. Every page passes the checks of ``Journey.step``
(labels, code inputs, heading order, no horizontal scrolling at 375 px) and is screenshotted to
``test-artifacts/screenshots/<journey>/NN-step.png``.

Journeys 1-4 run against one `qpki run` server over plain HTTP on 127.0.0.1 (journey 2 on a
375 px wide phone screen, the others at 1280 px); journey 5 goes through Debian's nginx with
TLS, configured by the documented deploy/nginx.conf.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.e2e

PHONE = {"width": 375, "height": 800}
INVALID_CODE = "Invalid verification code"
CODE_JUST_USED = "That code was just used. Wait for the next code in your app."
HOME = re.compile(r"^http://127\.0\.0\.1:\d+/$")


# -- an authenticator and a camera, as independent programs ----------------------------------------
def oathtool(secret: str, at: datetime | None = None) -> str:
    """The code Debian's oathtool shows for ``secret`` at ``at`` (default: now)."""
    cmd = ["oathtool", "--totp", "-b"]
    if at is not None:
        cmd += ["-N", at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")]
    out = subprocess.run([*cmd, secret], check=True, capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def next_step_code(secret: str) -> str:
    """The code of the next 30 s step: accepted now (±1 step window) and not used yet.

    A code is accepted once per user; the code that enabled 2FA (or the last sign-in) used the
    current step, so the next sign-in uses the next one instead of waiting up to 30 s.
    """
    return oathtool(secret, datetime.now(UTC) + timedelta(seconds=30))


def wrong_code(secret: str) -> str:
    """Six digits that are valid in no step near now."""
    now = datetime.now(UTC).timestamp()
    totp = pyotp.TOTP(secret)
    valid = {totp.at(now + delta) for delta in (-60, -30, 0, 30, 60)}
    candidate = int(totp.at(now))
    while f"{candidate:06d}" in valid:
        candidate = (candidate + 111_111) % 1_000_000
    return f"{candidate:06d}"


def decode_qr(png: Path) -> str:
    """Read a QR code from pixels, as a phone camera would (zbarimg)."""
    out = subprocess.run(
        ["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, f"zbarimg could not decode {png}: {out.stderr or out.returncode}"
    return out.stdout.strip()


# -- page actions ----------------------------------------------------------------------------------
def submit(page: Any, button: Any) -> Any:
    """Click a submit button (or link); wait for the page it leads to and return its response."""
    with page.expect_navigation() as navigation:
        button.click()
    return navigation.value


def sign_in(page: Any, username: str, password: str) -> None:
    page.goto("/auth/login")
    page.locator("#username").fill(username)
    page.locator("#password").fill(password)
    submit(page, page.get_by_role("button", name="Sign in", exact=True))


def sign_in_admin(page: Any, live_app: Any) -> None:
    """The administrator signs in with the password and a code from their app."""
    sign_in(page, live_app.admin_name, live_app.admin_password)
    enter_code(page, live_app.admin_code())


def start_setup(page: Any, password: str) -> None:
    """On the setup page, confirm the password and press "Start setup" (a step-up action)."""
    expect(page.locator("#mfa-setup-start")).to_be_visible()
    if page.locator("#password").count():
        page.locator("#password").fill(password)
    submit(page, page.locator("#mfa-setup-start"))
    expect(page).to_have_url(re.compile(r"/auth/mfa/setup$"))


def enter_code(page: Any, code: str) -> Any:
    expect(page).to_have_url(re.compile(r"/auth/mfa/verify$"))
    page.locator("#code").fill(code)
    return submit(page, page.get_by_role("button", name="Verify", exact=True))


def sign_out(page: Any) -> None:
    submit(page, page.get_by_role("button", name=re.compile(r"^(Sign out|Cancel and sign out)$")))
    expect(page).to_have_url(re.compile(r"/auth/login$"))


def flashes(page: Any) -> str:
    return " ".join(page.locator(".flashes .flash").all_inner_texts())


def tab_to(page: Any, element_id: str, limit: int = 20) -> None:
    """Move the keyboard focus with Tab until it reaches ``#element_id``."""
    for _ in range(limit):
        if page.evaluate("() => document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} was not reached with {limit} presses of Tab")


def focus_ring(page: Any, element_id: str) -> dict[str, str]:
    """The computed focus indicator of ``#element_id`` while it has keyboard focus."""
    tab_to(page, element_id, limit=40)
    return page.evaluate(
        """(id) => { const s = getComputedStyle(document.getElementById(id));
           return {outline: s.outlineColor + ' ' + s.outlineStyle + ' ' + s.outlineWidth,
                   shadow: s.boxShadow}; }""",
        element_id,
    )


def rows_as_cards(page: Any, selector: str) -> bool:
    """At phone width: the table's rows are stacked cards (display block), not a table row."""
    return page.evaluate(
        """(sel) => { const row = document.querySelector(sel);
           return !!row && getComputedStyle(row).display === 'block'; }""",
        selector,
    )


def backup_codes_on_page(page: Any) -> list[str]:
    codes = [c.strip() for c in page.locator("#backup-codes .backup-code").all_inner_texts()]
    assert len(codes) == 8, codes
    assert all(re.fullmatch(r"[2-9A-HJKMNP-Z]{4}-[2-9A-HJKMNP-Z]{4}", c) for c in codes), codes
    return codes


def download(page: Any, link: Any) -> tuple[str, str]:
    """Click a download link; return (suggested file name, text) from the download event."""
    with page.expect_download() as info:
        link.click()
    dl = info.value
    assert dl.failure() is None, dl.failure()
    return dl.suggested_filename, Path(dl.path()).read_text(encoding="utf-8")


# -- journey 1 -------------------------------------------------------------------------------------
def test_journey1_new_user(journey: Any, live_app: Any) -> None:
    """Admin creates a user; the user sets a password, enables 2FA from the QR, signs in again."""
    j = journey("journey1-new-user", live_app)

    # The administrator creates the account, leaving the password empty.
    admin = j.new_page()
    admin.goto("/auth/login")
    j.step(admin, "admin-sign-in")
    sign_in_admin(admin, live_app)
    expect(admin).to_have_url(HOME)
    j.step(admin, "admin-home")
    submit(admin, admin.get_by_role("navigation", name="Main").get_by_role("link", name="Users"))
    j.step(admin, "admin-users")
    submit(admin, admin.get_by_role("link", name="Create user"))
    expect(admin).to_have_url(re.compile(r"/admin/users/new$"))
    j.step(admin, "admin-create-user-form")
    admin.locator("#username").fill("nora")
    admin.locator("#email").fill("nora@example.org")
    admin.locator("#role").select_option("operator")
    submit(admin, admin.get_by_role("button", name="Create user"))
    expect(admin.locator("h1")).to_have_text("User created")
    temporary = admin.locator("#temporary-password").inner_text().strip()
    assert len(temporary) >= 12
    j.step(admin, "admin-user-created")

    # Nora signs in with the temporary password and must choose her own first.
    user = j.new_page()
    sign_in(user, "nora", temporary)
    expect(user).to_have_url(re.compile(r"/auth/change-password$"))
    j.step(user, "user-must-change-password")
    new_password = "nora's own long passphrase"
    user.locator("#current_password").fill(temporary)
    user.locator("#new_password").fill(new_password)
    user.locator("#confirm_password").fill(new_password)
    submit(user, user.get_by_role("button", name="Change password"))
    expect(user.locator(".flash.success")).to_contain_text("Your password has been changed")
    j.step(user, "user-password-changed")

    # Profile → Account Security → Enable 2FA, by clicking.
    submit(user, user.get_by_role("navigation", name="Main").get_by_role("link", name="Account"))
    expect(user).to_have_url(re.compile(r"/auth/profile$"))
    security = user.locator("#account-security")
    expect(security.get_by_role("heading", name="Account Security")).to_be_visible()
    expect(user.locator("#mfa-status")).to_have_text("Disabled")
    j.step(user, "user-account-security")
    submit(user, user.locator("#enable-2fa"))
    expect(user).to_have_url(re.compile(r"/auth/mfa/setup$"))
    j.step(user, "user-setup-start")
    start_setup(user, new_password)
    qr = user.locator("#mfa-qr")
    expect(qr).to_be_visible()
    expect(user.locator("#mfa-account-name")).to_have_text("qPKI: nora")
    expect(user.locator("#setup-expiry")).to_contain_text("This setup expires in 15 minutes.")
    expect(user.locator(".steps [aria-current=step]")).to_have_count(1)
    # Buttons' focus ring: yellow with a dark ring outside it (3:1 on any background).
    ring = focus_ring(user, "copy-secret")
    assert ring["outline"].startswith("rgb(255, 191, 71) solid"), ring
    assert "rgb(11, 12, 12)" in ring["shadow"], ring
    j.step(user, "user-setup-scan")

    # The phone: a picture of the QR exactly as rendered, decoded from its pixels.
    qr_png = j.path("qr-as-rendered")
    qr.screenshot(path=qr_png)
    uri = decode_qr(qr_png)
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp"), uri
    assert unquote(parts.path) == "/qPKI:nora", uri
    assert query["issuer"] == ["qPKI"], uri
    secret = query["secret"][0]
    shown_key = re.sub(r"\s+", "", user.locator("#mfa-secret").inner_text())
    assert shown_key == secret, "the manual key differs from the key in the QR code"

    # The authenticator app: oathtool computes the code from the scanned secret.
    user.locator("#code").fill(oathtool(secret))
    submit(user, user.get_by_role("button", name="Verify and enable"))
    expect(user.locator("h1")).to_have_text("Save your backup codes")
    codes = backup_codes_on_page(user)
    j.step(user, "user-backup-codes")

    name, text = download(user, user.locator("#download-codes"))
    assert name.endswith(".txt"), name
    assert [c for c in codes if c in text] == codes, "the downloaded file lacks some codes"
    assert text.startswith("qPKI backup codes\nAccount: nora\nGenerated: "), text
    assert f"Sign in at: {live_app.url}/auth/login" in text, text
    expect(user.locator("#codes-generated")).to_contain_text(" UTC")
    expect(user.locator("#copy-codes")).to_be_visible()  # shown because app.js runs
    expect(user.locator("#print-codes")).to_be_visible()

    submit(user, user.locator("#codes-saved"))
    expect(user).to_have_url(re.compile(r"/auth/profile$"))
    expect(user.locator("#mfa-status")).to_have_text("Enabled")
    expect(user.locator("#account-security")).to_contain_text("8 of 8")
    j.step(user, "user-2fa-enabled")

    sign_out(user)
    j.step(user, "user-signed-out")

    # Sign in again with the keyboard alone: Tab to each field, type, press Enter.
    user.goto("/auth/login")
    tab_to(user, "username")
    user.keyboard.type("nora")
    user.keyboard.press("Tab")
    assert user.evaluate("() => document.activeElement.id") == "password"
    user.keyboard.type(new_password)
    with user.expect_navigation():
        user.keyboard.press("Enter")
    expect(user).to_have_url(re.compile(r"/auth/mfa/verify$"))
    j.step(user, "user-verify")
    tab_to(user, "code")
    user.keyboard.type(next_step_code(secret))
    with user.expect_navigation():
        user.keyboard.press("Enter")
    expect(user).to_have_url(HOME)
    expect(user.locator("#mfa-ok-title")).to_have_text("Two-factor authentication is on")
    j.step(user, "user-signed-in-with-2fa")
    j.finish()


# -- journey 2 -------------------------------------------------------------------------------------
def test_journey2_lost_phone(journey: Any, live_app: Any) -> None:
    """On a phone-sized screen: sign in with a backup code, see what is left, regenerate."""
    person = live_app.create_user("olga", mfa=True)
    j = journey("journey2-lost-phone", live_app)
    page = j.new_page(PHONE)

    sign_in(page, person.username, person.password)
    j.step(page, "verify")
    typed = person.codes[0].lower()  # as typed from a sheet of paper: dash kept, lower case
    assert "-" in typed
    enter_code(page, typed)
    expect(page).to_have_url(HOME)
    assert "Backup code accepted. 7 backup codes remaining." in flashes(page)
    j.step(page, "signed-in-with-backup-code")

    submit(page, page.get_by_role("navigation", name="Main").get_by_role("link", name="Account"))
    expect(page.locator("#account-security")).to_contain_text("7 of 8")
    j.step(page, "account-security")
    submit(page, page.get_by_role("link", name="Backup Codes"))
    expect(page).to_have_url(re.compile(r"/auth/mfa/backup-codes$"))
    expect(page.locator("#backup-codes-remaining")).to_have_text("7")
    j.step(page, "backup-codes-remaining")

    page.locator("#password").fill(person.password)
    code_field = page.locator("#code")
    if code_field.count():  # asked only when the sign-in is older than 10 minutes
        code_field.fill(next_step_code(person.secret))
    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    submit(page, page.get_by_role("button", name="Regenerate backup codes"))
    assert not dialogs, f"a pop-up repeated what the page says: {dialogs}"
    new_codes = backup_codes_on_page(page)
    assert not set(new_codes) & set(person.codes)
    j.step(page, "new-backup-codes")
    submit(page, page.locator("#codes-saved"))
    sign_out(page)

    # The old codes no longer work; a new one does.
    sign_in(page, person.username, person.password)
    enter_code(page, person.codes[1])
    expect(page.locator(".flash.error")).to_contain_text(INVALID_CODE)
    expect(page).to_have_url(re.compile(r"/auth/mfa/verify$"))
    j.step(page, "old-code-refused")
    enter_code(page, new_codes[0])
    expect(page).to_have_url(HOME)
    assert "7 backup codes remaining" in flashes(page)
    j.step(page, "signed-in-with-new-code")
    j.finish()


# -- journey 3 -------------------------------------------------------------------------------------
def test_journey3_admin_resets_2fa(journey: Any, live_app: Any) -> None:
    """An admin resets a user's 2FA with a reason: the user's session ends, the audit shows it."""
    person = live_app.create_user("pavel", mfa=True)
    reason = "Lost phone and backup codes; identity checked by video call"
    j = journey("journey3-admin-reset", live_app)

    user = j.new_page()
    sign_in(user, person.username, person.password)
    enter_code(user, next_step_code(person.secret))
    expect(user).to_have_url(HOME)
    j.step(user, "user-signed-in")

    admin = j.new_page()
    sign_in_admin(admin, live_app)
    admin.goto("/admin/users")
    row = admin.locator(f'#users-table tr[data-username="{person.username}"]')
    expect(row.locator(".mfa-status")).to_have_text("Enabled")
    j.step(admin, "admin-users")
    submit(admin, row.get_by_role("link", name=person.username))
    expect(admin).to_have_url(re.compile(rf"/admin/users/{person.id}$"))
    expect(admin.locator("#mfa-status")).to_have_text("Enabled")
    j.step(admin, "admin-user-detail")

    form = admin.locator("#admin-disable-2fa-form")
    form.locator("#reason").fill(reason)
    form.locator("#confirm").check()
    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    admin.on("dialog", accept)
    submit(admin, form.get_by_role("button", name="Disable 2FA"))
    assert not dialogs, f"a pop-up repeated what the page says: {dialogs}"
    expect(admin.locator(".flash.success")).to_contain_text("sessions have ended")
    expect(admin.locator("#mfa-status")).to_have_text("Disabled")
    j.step(admin, "admin-2fa-reset")

    # The user's open browser session has ended: the next navigation lands on the sign-in page.
    user.goto("/auth/profile")
    expect(user).to_have_url(re.compile(r"/auth/login(\?.*)?$"))
    expect(user.locator("h1")).to_have_text("Sign in")
    expect(user.locator(".flashes")).to_contain_text("Your session has ended")
    j.step(user, "user-session-ended")

    # The audit log shows the reset with its reason and who did it.
    submit(
        admin, admin.get_by_role("navigation", name="Main").get_by_role("link", name="Audit log")
    )
    event = admin.locator('tr.audit-event[data-event="mfa_admin_disabled"]').first
    expect(event).to_contain_text(person.username)
    expect(event).to_contain_text(live_app.admin_name)
    expect(event).to_contain_text(reason)
    expect(event.locator("td").nth(1)).to_have_text("2FA admin disabled")
    expect(event.locator(".kv dt").first).to_have_text("reason")
    expect(admin.locator("#audit-count")).to_contain_text(re.compile(r"^\d[\d,]* events"))
    admin.set_viewport_size(PHONE)
    j.check(admin, rows_as_cards(admin, "#audit-table tbody tr"), "audit rows are not cards")
    admin.set_viewport_size({"width": 1280, "height": 800})
    j.step(admin, "admin-audit-log")
    admin.locator("#event").select_option("mfa_admin_disabled")
    submit(admin, admin.get_by_role("button", name="Filter"))
    rows = admin.locator("tr.audit-event")
    expect(rows).to_have_count(1)
    j.step(admin, "admin-audit-filtered")

    name, text = download(admin, admin.locator("#export-csv"))
    assert name.endswith(".csv"), name
    records = list(csv.DictReader(io.StringIO(text)))
    resets = [r for r in records if r["event"] == "mfa_admin_disabled"]
    assert len(resets) == 1, records
    assert resets[0]["target"] == person.username
    assert resets[0]["actor"] == live_app.admin_name
    assert reason in resets[0]["details"]

    # The user now signs in with the password alone and is invited to enrol again.
    sign_in(user, person.username, person.password)
    expect(user).to_have_url(HOME)
    expect(user.locator("#mfa-nudge-title")).to_be_visible()
    expect(user.locator("#mfa-reset-notice")).to_have_text(
        re.compile(
            r"^An administrator turned off two-factor authentication for your account on "
            r"\d{1,2} [A-Z][a-z]+ \d{4}\. Set it up again\.$"
        )
    )
    j.step(user, "user-signed-in-without-2fa")
    j.finish()


# -- journey 4 -------------------------------------------------------------------------------------
def test_journey4_errors(journey: Any, live_app: Any) -> None:
    """What people see when things go wrong: expired setup, wrong code, reused code, throttling."""
    j = journey("journey4-errors", live_app)
    page = j.new_page()

    # Expired setup: the 15 minutes pass between opening the page and typing the code.
    quinn = live_app.create_user("quinn")
    sign_in(page, quinn.username, quinn.password)
    page.goto("/auth/profile")
    submit(page, page.locator("#enable-2fa"))
    start_setup(page, quinn.password)
    expect(page.locator("#mfa-qr")).to_be_visible()
    j.step(page, "setup-started")
    secret = re.sub(r"\s+", "", page.locator("#mfa-secret").inner_text())
    assert live_app.expire_setup_session(quinn.id) == 1
    page.locator("#code").fill(oathtool(secret))
    submit(page, page.get_by_role("button", name="Verify and enable"))
    expect(page.locator("h1")).to_have_text("Setup session expired")
    j.step(page, "setup-expired")
    submit(page, page.get_by_role("button", name="Start again"))
    expect(page.locator("#mfa-qr")).to_be_visible()
    new_secret = re.sub(r"\s+", "", page.locator("#mfa-secret").inner_text())
    assert new_secret != secret
    j.step(page, "setup-started-again")
    # In dark mode too the QR code must scan (dark modules on a light quiet zone).
    page.emulate_media(color_scheme="dark")
    j.step(page, "setup-dark-mode")
    dark_qr = j.path("qr-dark-mode")
    page.locator("#mfa-qr").screenshot(path=dark_qr)
    assert f"secret={new_secret}" in decode_qr(dark_qr)
    page.emulate_media(color_scheme="light")
    sign_out(page)

    # A wrong code, then a backup code used twice.
    rosa = live_app.create_user("rosa", mfa=True)
    sign_in(page, rosa.username, rosa.password)
    enter_code(page, wrong_code(rosa.secret))
    expect(page.locator(".flash.error")).to_have_text(re.compile(INVALID_CODE))
    # Invariant 3: a submitted code never comes back in the page (nor does a backup code).
    typed = page.locator("#code").input_value()
    j.check(page, typed == "", f"the wrong code {typed!r} is echoed back in the code field")
    j.step(page, "wrong-code")
    enter_code(page, rosa.codes[0])
    expect(page).to_have_url(HOME)
    sign_out(page)
    sign_in(page, rosa.username, rosa.password)
    enter_code(page, rosa.codes[0])
    expect(page.locator(".flash.error")).to_contain_text("Backup code already used")
    j.check(page, rosa.codes[0] not in page.content(), "the submitted backup code is echoed back")
    j.step(page, "backup-code-already-used")
    sign_out(page)

    # A code used twice within its 30 seconds: the page says to wait for the next one.
    tina = live_app.create_user("tina", mfa=True)
    code = next_step_code(tina.secret)
    sign_in(page, tina.username, tina.password)
    enter_code(page, code)
    expect(page).to_have_url(HOME)
    sign_out(page)
    sign_in(page, tina.username, tina.password)
    enter_code(page, code)
    expect(page.locator("main")).to_contain_text(CODE_JUST_USED)
    j.step(page, "code-just-used")
    sign_out(page)

    # Throttling: after five wrong codes even the right one must wait, and the page says how long.
    sam = live_app.create_user("sam", mfa=True)
    sign_in(page, sam.username, sam.password)
    for _ in range(5):
        enter_code(page, wrong_code(sam.secret))
        expect(page.locator(".flash.error")).to_contain_text(INVALID_CODE)
    response = enter_code(page, next_step_code(sam.secret))
    assert response.status == 429
    assert int(response.headers["retry-after"]) in range(1, 31)
    expect(page).to_have_url(re.compile(r"/auth/mfa/verify$"))
    expect(page.locator(".flash.error")).to_contain_text(
        re.compile(r"Too many failed attempts\. Try again in \d+ seconds\.")
    )
    # The wait counts down on screen (app.js), quietly for screen readers.
    counter = page.locator(".flash.error .countdown")
    expect(counter).to_have_attribute("aria-live", "off")
    first = counter.inner_text()
    expect(counter).not_to_have_text(first, timeout=5_000)
    assert re.fullmatch(r"in \d+ seconds?\.|now\.", counter.inner_text()), counter.inner_text()
    j.step(page, "throttled")
    j.finish()


# -- journey 5 -------------------------------------------------------------------------------------
def test_journey5_behind_tls_proxy(journey: Any, tls_app: Any) -> None:
    """Over HTTPS through nginx (deploy/nginx.conf): secure cookie, HSTS, copy key, 2FA sign-in."""
    person = tls_app.create_user("tess")
    j = journey("journey5-https-proxy", tls_app)
    page = j.new_page(  # the certificate is self-signed, made by the test
        ignore_https_errors=True, permissions=["clipboard-read", "clipboard-write"]
    )
    home = tls_app.public_url + "/"

    # Typing the plain http:// address ends up on https://, and the app asks for HSTS.
    response = page.goto(tls_app.plain_http_url + "/auth/login")
    assert page.url == tls_app.public_url + "/auth/login"
    assert response.headers["strict-transport-security"].startswith("max-age=")
    j.step(page, "sign-in-over-https")
    sign_in(page, person.username, person.password)
    expect(page).to_have_url(home)
    session_cookies = [c for c in page.context.cookies() if "qpki_session" in c["name"]]
    assert [c["name"] for c in session_cookies] == ["__Host-qpki_session"], session_cookies
    cookie = session_cookies[0]
    assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
        True,
        True,
        "Lax",
        "/",
    ), cookie
    j.step(page, "home-over-https")

    # On a secure page the "Copy key" button uses the clipboard API.
    page.goto("/auth/profile")
    submit(page, page.locator("#enable-2fa"))
    start_setup(page, person.password)
    assert page.evaluate("() => window.isSecureContext")
    page.locator("#copy-secret").click()
    expect(page.locator("#copy-status")).to_have_text("Copied")
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied == re.sub(r"\s+", "", page.locator("#mfa-secret").inner_text())
    j.step(page, "setup-key-copied")
    qr_png = j.path("qr-as-rendered")
    page.locator("#mfa-qr").screenshot(path=qr_png)
    assert parse_qs(urlsplit(decode_qr(qr_png)).query)["secret"] == [copied]

    page.locator("#code").fill(oathtool(copied))
    submit(page, page.get_by_role("button", name="Verify and enable"))
    codes = backup_codes_on_page(page)
    _, text = download(page, page.locator("#download-codes"))
    assert all(code in text for code in codes)
    j.step(page, "backup-codes")
    submit(page, page.locator("#codes-saved"))
    sign_out(page)

    sign_in(page, person.username, person.password)
    expect(page).to_have_url(tls_app.public_url + "/auth/mfa/verify")
    enter_code(page, next_step_code(copied))
    expect(page).to_have_url(home)
    expect(page.locator("#mfa-ok-title")).to_be_visible()
    j.step(page, "signed-in-with-2fa")
    j.finish()
