"""Passkeys and security keys in a real browser: Chromium's virtual authenticators (CDP
``WebAuthn.addVirtualAuthenticator``) against a real `qpki run` server at
``http://localhost:PORT`` (Chromium refuses 127.0.0.1 as an RP ID).

One person's story: register a platform passkey (resident key, user verification) and a USB
security key (non-resident), sign in with the key as the second factor, sign in with the
passkey alone (with the sign-in page's autofill request pending, which the button must abort),
step up with a key, see a cloned key refused, remove a key; then an administrator resets 2FA.
Every step is checked (accessibility, 375 px) and screenshotted by :class:`Journey`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.e2e

USER_PASSWORD = "a long enough passphrase"  # as in conftest (seeded users)

PLATFORM = {
    "protocol": "ctap2",
    "transport": "internal",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
    "automaticPresenceSimulation": True,
}
USB_KEY = {
    "protocol": "ctap2",
    "transport": "usb",
    "hasResidentKey": False,
    "hasUserVerification": True,
    "isUserVerified": True,
    "automaticPresenceSimulation": True,
}


class AtLocalhost:
    """The shared live app, addressed as http://localhost:PORT (where WebAuthn works with no
    settings) instead of 127.0.0.1; everything else is the app's own."""

    def __init__(self, live: Any) -> None:
        self._live = live

    @property
    def url(self) -> str:
        return f"http://localhost:{self._live.server.port}"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live, name)


@pytest.fixture
def key_app(live_app: Any) -> Iterator[Any]:
    yield AtLocalhost(live_app)


class Authenticator:
    """A virtual authenticator attached to one page through the DevTools protocol."""

    def __init__(self, page: Any, options: dict[str, Any]) -> None:
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.send("WebAuthn.enable", {"enableUI": False})
        self.id = self.cdp.send("WebAuthn.addVirtualAuthenticator", {"options": options})[
            "authenticatorId"
        ]

    def credentials(self) -> list[dict[str, Any]]:
        return list(
            self.cdp.send("WebAuthn.getCredentials", {"authenticatorId": self.id})["credentials"]
        )

    def add(self, credential: dict[str, Any]) -> None:
        self.cdp.send(
            "WebAuthn.addCredential", {"authenticatorId": self.id, "credential": credential}
        )

    def remove(self) -> None:
        self.cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": self.id})


def submit(page: Any, button: Any) -> None:
    with page.expect_navigation():
        button.click()


def sign_in_password(page: Any, username: str, password: str = USER_PASSWORD) -> None:
    page.goto("/auth/login")
    page.locator("#username").fill(username)
    page.locator("#password").fill(password)
    submit(page, page.get_by_role("button", name="Sign in", exact=True))


def add_key(j: Any, page: Any, name: str, label: str) -> None:
    page.locator("#webauthn-name").fill(name)
    page.locator("#webauthn-register").click()
    expect(page.locator("main")).to_contain_text(f"“{name}” was added", timeout=15_000)
    j.step(page, label)


def test_passkeys_and_security_keys_journey(key_app: Any, journey: Any) -> None:
    j = journey("journey-webauthn", key_app)
    kate = key_app.create_user("kate")
    page = j.new_page()
    page.on("dialog", lambda dialog: dialog.accept())

    # 1. A platform passkey (resident key, user verification) from the account page.
    sign_in_password(page, "kate")
    page.goto("/auth/profile")
    j.step(page, "profile-without-2fa")
    submit(page, page.locator("#add-security-key"))
    expect(page).to_have_url(re.compile(r"/auth/security-keys$"))
    j.step(page, "security-keys-empty")
    platform = Authenticator(page, PLATFORM)
    page.locator("#webauthn-name").fill("Laptop passkey")
    with page.expect_navigation(url=re.compile(r"/auth/reauth")):
        page.locator("#webauthn-register").click()  # a step-up action: confirm it is you
    j.step(page, "step-up-before-adding")
    page.locator("#password").fill(USER_PASSWORD)
    submit(page, page.get_by_role("button", name="Confirm"))
    expect(page).to_have_url(re.compile(r"/auth/security-keys$"))
    add_key(j, page, "Laptop passkey", "passkey-added-with-backup-codes")
    expect(page.locator("#backup-codes .backup-code")).to_have_count(8)
    passkey = platform.credentials()
    assert len(passkey) == 1 and passkey[0]["isResidentCredential"]

    # 2. A USB security key (no resident key) next to it.
    platform.remove()
    usb = Authenticator(page, USB_KEY)
    page.reload()
    add_key(j, page, "USB key", "usb-key-added")
    page.reload()
    names = page.locator("#webauthn-credentials .webauthn-credential .webauthn-credential-name")
    expect(names).to_have_text(["Laptop passkey", "USB key"])
    assert not usb.credentials()[0]["isResidentCredential"]
    j.step(page, "two-keys-listed")

    # 3. The USB key as the second factor after the password.
    submit(page, page.get_by_role("button", name="Sign out"))
    sign_in_password(page, "kate")
    expect(page).to_have_url(re.compile(r"/auth/mfa/verify$"))
    expect(page.locator("#webauthn-verify")).to_be_visible()
    expect(page.locator("#code")).to_be_visible()
    j.step(page, "verify-page-offers-the-key")
    with page.expect_navigation(url=re.compile(r"/$")):
        page.locator("#webauthn-verify").click()
    j.step(page, "signed-in-with-usb-key")
    snapshot = usb.credentials()[0]  # the key as it is now (counter 1)

    # 4. Passwordless with the passkey, in another browser; the autofill request is pending
    #    and the button must abort it first ("A request is already pending" otherwise).
    other = j.new_page()
    other.on("dialog", lambda dialog: dialog.accept())  # "Remove …?" in step 7
    other.goto("/auth/login")  # no authenticator yet: the autofill request stays pending
    expect(other.locator("#username")).to_have_attribute("autocomplete", "username webauthn")
    conditional = other.evaluate(
        "() => PublicKeyCredential.isConditionalMediationAvailable"
        " ? PublicKeyCredential.isConditionalMediationAvailable() : false"
    )
    assert conditional is True, "Chromium offers passkey autofill (conditional mediation)"
    expect(other.locator("#passkey-signin")).to_be_visible()
    j.step(other, "login-page-with-passkey-button")
    other_key = Authenticator(other, PLATFORM)
    other_key.add(passkey[0])
    with other.expect_navigation(url=re.compile(r"/$")):
        other.locator("#passkey-signin").click()
    j.step(other, "signed-in-with-passkey-button")
    # Autofill: with the passkey on this device, the sign-in page's conditional request is
    # answered (Chromium's virtual authenticator picks the one passkey, as a person would in
    # the username field's suggestions) and the person is signed in without a password.
    # Signing out lands on the sign-in page, whose autofill request the passkey answers at
    # once: wait for that navigation home from the click on (a second load of the page could
    # race the first page's ceremony).
    with other.expect_navigation(url=re.compile(r"/$")):
        other.get_by_role("button", name="Sign out").click()
    j.step(other, "signed-in-by-passkey-autofill")

    # 5. Step-up with a key on the reauth page.
    other.goto("/auth/reauth?next=/auth/security-keys")
    expect(other.locator("#webauthn-reauth")).to_be_visible()
    j.step(other, "reauth-with-a-key")
    with other.expect_navigation(url=re.compile(r"/auth/security-keys$")):
        other.locator("#webauthn-reauth").click()

    # 6. A copy of the USB key with an old counter is refused as a clone.
    submit(page, page.get_by_role("button", name="Sign out"))
    sign_in_password(page, "kate")
    with page.expect_navigation(url=re.compile(r"/$")):
        page.locator("#webauthn-verify").click()  # the real key: counter 2 now
    clone_page = j.new_page()
    clone = Authenticator(clone_page, USB_KEY)
    clone.add(snapshot)  # counter 1: its next use says 2, which is not more than 2
    sign_in_password(clone_page, "kate")
    clone_page.locator("#webauthn-verify").click()
    expect(clone_page.locator("#webauthn-status")).to_contain_text("copied", timeout=15_000)
    expect(clone_page).to_have_url(re.compile(r"/auth/mfa/verify$"))
    j.step(clone_page, "cloned-key-refused")
    # The refusal is a 400 answer to the page's fetch, which Chromium logs; expected here.
    refused = [e for e in j.page_errors if "status of 400" in e and "/auth/mfa/verify" in e]
    assert len(refused) == 1, j.page_errors
    j.page_errors.remove(refused[0])

    # 7. Removing the USB key (the passkey stays, so 2FA stays on).
    other.goto("/auth/security-keys")
    usb_item = other.locator(".webauthn-credential", has_text="USB key")
    submit(other, usb_item.locator(".webauthn-remove"))
    expect(other.locator(".flashes")).to_contain_text("was removed")
    expect(other.locator("#webauthn-credentials .webauthn-credential")).to_have_count(1)
    j.step(other, "usb-key-removed")
    other.goto("/auth/profile")
    expect(other.locator("#security-key-count")).to_have_text("1")
    expect(other.locator("#mfa-status")).to_contain_text("Enabled")
    j.step(other, "profile-two-factor-methods")

    # 8. The administrator sees the methods and resets 2FA: every key goes.
    admin = j.new_page()
    admin.on("dialog", lambda dialog: dialog.accept())
    sign_in_password(admin, key_app.admin_name, key_app.admin_password)
    admin.locator("#code").fill(key_app.admin_code())
    submit(admin, admin.get_by_role("button", name="Verify", exact=True))
    admin.goto("/admin/users")
    expect(admin.locator('tr[data-username="kate"] .mfa-methods')).to_contain_text("Laptop passkey")
    j.step(admin, "admin-user-list-methods")
    admin.goto(f"/admin/users/{kate.id}")
    expect(admin.locator("#admin-security-keys")).to_contain_text("Laptop passkey")
    j.step(admin, "admin-user-detail-keys")
    admin.locator("#reason").fill("lost laptop, identity checked by phone")
    admin.locator("#confirm").check()
    submit(admin, admin.locator("#admin-disable-2fa-form button[type=submit]"))
    expect(admin.locator("#method-keys")).to_have_text("0")
    j.step(admin, "admin-reset-removed-every-key")
    j.finish()
