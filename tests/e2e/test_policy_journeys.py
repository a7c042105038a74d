"""Real-browser journeys of the role policies and remembered devices (issue 12).

6. A new administrator is sent to enrol at their first sign-in and reaches the admin pages
   only after it.
7. A viewer whose role now requires 2FA sees the grace banner with its deadline, dismisses it
   for the session, and enrols from its link.
8. A viewer ticks "Don't ask for a code on this device", signs in again without a code, finds
   the device on the account page and forgets it; the next sign-in asks for a code again.

They share the journeys' `qpki run` server; journey 7 puts the viewer policy back when it
ends, so the other journeys' users never see it.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect
from test_journeys import enter_code, flashes, next_step_code, oathtool, sign_in, sign_out, submit

pytestmark = pytest.mark.e2e


def _enrol_here(page: Any, password: str) -> None:
    """On the setup page: confirm the password, read the key, type the code, keep the codes."""
    expect(page).to_have_url(re.compile(r"/auth/mfa/setup$"))
    if page.locator("#password").count():
        page.locator("#password").fill(password)
    submit(page, page.locator("#mfa-setup-start"))
    secret = re.sub(r"\s+", "", page.locator("#mfa-secret").inner_text())
    page.locator("#code").fill(oathtool(secret))
    submit(page, page.get_by_role("button", name=re.compile("Verify")))
    expect(page.locator("#backup-codes")).to_be_visible()
    submit(page, page.locator("#codes-saved"))


def test_journey6_new_admin_enrols_at_first_sign_in(journey: Any, live_app: Any) -> None:
    person = live_app.create_user("ada", role="admin")
    j = journey("journey6-admin-forced-enrolment", live_app)
    page = j.new_page()
    sign_in(page, person.username, person.password)
    expect(page).to_have_url(re.compile(r"/auth/mfa/setup$"))
    assert "grace period is over" in flashes(page)
    j.step(page, "sent-to-enrol")
    page.goto("/admin/users")  # typed into the address bar: still enrolment
    expect(page).to_have_url(re.compile(r"/auth/mfa/setup$"))
    _enrol_here(page, person.password)
    j.step(page, "enrolled")
    submit(page, page.get_by_role("navigation", name="Main").get_by_role("link", name="Policies"))
    expect(page.locator("#compliance-table")).to_be_visible()
    expect(page.locator("tr[data-role=admin] .count-overdue")).to_have_text("0")
    j.step(page, "admin-policy-page")
    j.finish()


def test_journey7_viewer_in_grace(journey: Any, live_app: Any) -> None:
    policy = live_app.flask_app.extensions["qpki"].policy
    policy.set_policy("viewer", actor=None, actor_name="e2e", require_2fa=True, grace_hours=48)
    try:
        person = live_app.create_user("gina")
        j = journey("journey7-viewer-in-grace", live_app)
        page = j.new_page()
        sign_in(page, person.username, person.password)
        banner = page.locator("#policy-banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("UTC")
        j.step(page, "grace-banner")
        submit(page, page.locator("#policy-banner-dismiss"))
        expect(page.locator("#policy-banner")).to_have_count(0)
        nav = page.get_by_role("navigation", name="Main")
        submit(page, nav.get_by_role("link", name="Account"))
        expect(page.locator("#policy-banner")).to_have_count(0)
        j.step(page, "banner-dismissed")
        sign_out(page)
        sign_in(page, person.username, person.password)  # a new session: the banner is back
        submit(page, page.locator("#policy-banner-enrol"))
        _enrol_here(page, person.password)
        expect(page.locator("#policy-banner")).to_have_count(0)
        j.step(page, "enrolled-from-banner")
        j.finish()
    finally:
        policy.set_policy("viewer", actor=None, actor_name="e2e", require_2fa=False)


def test_journey8_remember_this_device(journey: Any, live_app: Any) -> None:
    person = live_app.create_user("remy", mfa=True)
    assert person.secret
    j = journey("journey8-remember-device", live_app)
    page = j.new_page()
    sign_in(page, person.username, person.password)
    box = page.locator("input[name=remember_device]")
    expect(box).to_be_visible()
    expect(page.locator("label[for=remember_device]")).to_contain_text("30 days")
    box.check()
    j.step(page, "verify-with-remember-box")
    enter_code(page, next_step_code(person.secret))
    sign_out(page)

    sign_in(page, person.username, person.password)
    expect(page).to_have_url(re.compile(r"/$"))  # no code asked on this browser
    j.step(page, "signed-in-without-code")
    submit(page, page.get_by_role("navigation", name="Main").get_by_role("link", name="Account"))
    devices = page.locator("#remembered-devices .remembered-device")
    expect(devices).to_have_count(1)
    expect(devices.first).to_contain_text("Chrome")
    j.step(page, "remembered-devices-listed")
    submit(page, page.locator("#forget-all-devices"))
    expect(page.locator("#remembered-devices")).to_contain_text("No remembered devices")
    j.step(page, "devices-forgotten")
    sign_out(page)

    sign_in(page, person.username, person.password)
    expect(page).to_have_url(re.compile(r"/auth/mfa/verify$"))
    j.step(page, "code-asked-again")
    j.finish()
