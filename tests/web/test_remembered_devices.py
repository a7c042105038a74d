"""Remembered devices (checklist §12.6): the checkbox at the second step, the cookie, rotation
on every use, theft detection, and revocation by every event that must end them.

A stepped clock drives the TOTP steps and the device lifetimes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from helpers import (
    PASSWORD,
    admin_client,
    create_user,
    enable_mfa,
    location_path,
    login,
    oathtool_code,
    page,
    text_of,
)
from qpki.audit.models import AuditEventRecord
from qpki.auth.models import User, UserSession
from qpki.clock import SteppedClock
from qpki.policy.models import RememberedDevice
from qpki.web.services import services_of

T0 = datetime(2026, 6, 1, 9, 0, 5, tzinfo=UTC)
COOKIE = "qpki_remember"
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock(T0)


@pytest.fixture
def capp(make_app: Callable[..., Flask], clock: SteppedClock) -> Flask:
    return make_app(clock=clock)


def events(app: Flask, name: str) -> list[AuditEventRecord]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return list(s.scalars(select(AuditEventRecord).where(AuditEventRecord.event == name)))


def details(record: AuditEventRecord) -> dict[str, object]:
    return json.loads(record.details) if isinstance(record.details, str) else record.details


def device_count(app: Flask) -> int:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return int(s.scalar(select(func.count(RememberedDevice.id))) or 0)


def browser(app: Flask) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = CHROME
    return client


def cookie_of(client: FlaskClient) -> str | None:
    found = client.get_cookie(COOKIE)
    return found.value if found is not None else None


def second_step(client: FlaskClient, clock: SteppedClock, secret: str, *, remember: bool) -> None:
    clock.advance(seconds=30)  # a fresh TOTP step (the previous one is spent)
    data = {"code": oathtool_code(secret, clock.now)}
    if remember:
        data["remember_device"] = "1"
    done = client.post("/auth/mfa/verify", data=data)
    assert done.status_code == 302, text_of(done)


def remembered(app: Flask, clock: SteppedClock, secret: str, username: str = "vera") -> FlaskClient:
    """A browser that signed in with a code and ticked the box."""
    client = browser(app)
    assert location_path(login(client, username)) == "/auth/mfa/verify"
    second_step(client, clock, secret, remember=True)
    assert cookie_of(client), "the device cookie was set"
    client.post("/auth/logout")
    return client


@pytest.fixture
def vera(capp: Flask, clock: SteppedClock) -> tuple[User, str]:
    user = create_user(capp, "vera")
    secret, _codes = enable_mfa(capp, user.id, at=clock.now)
    return user, secret


# -- the checkbox and the cookie -------------------------------------------------------------------
def test_box_is_offered_and_the_cookie_is_strict(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    _user, secret = vera
    client = browser(capp)
    login(client, "vera")
    form = client.get("/auth/mfa/verify")
    box = page(form).find("input", attrs={"name": "remember_device"})
    assert box is not None and box["type"] == "checkbox"
    assert "for 30 days" in text_of(form)
    clock.advance(seconds=30)
    done = client.post(
        "/auth/mfa/verify",
        data={"code": oathtool_code(secret, clock.now), "remember_device": "1"},
    )
    header = next(h for h in done.headers.getlist("Set-Cookie") if h.startswith(COOKIE + "="))
    attrs = {p.strip().split("=")[0].lower(): p for p in header.split(";")[1:]}
    assert "httponly" in attrs and "samesite" in attrs and "Strict" in attrs["samesite"]
    assert "secure" not in attrs  # plain HTTP here; see the HTTPS test below
    value = cookie_of(client)
    assert value and len(value) > 40
    with capp.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        row = s.scalar(select(RememberedDevice))
        assert row is not None and value.split(".")[1] not in (row.token_hash, row.series)
    assert len(events(capp, "remembered_device_added")) == 1


def test_https_cookie_is_secure_and_host_prefixed(
    make_app: Callable[..., Flask], clock: SteppedClock
) -> None:
    app = make_app(clock=clock, https=True)
    user = create_user(app, "vera")
    secret, _codes = enable_mfa(app, user.id, at=clock.now)
    client = app.test_client()
    client.post(
        "/auth/login",
        data={"username": "vera", "password": PASSWORD},
        base_url="https://localhost",
    )
    clock.advance(seconds=30)
    done = client.post(
        "/auth/mfa/verify",
        data={"code": oathtool_code(secret, clock.now), "remember_device": "1"},
        base_url="https://localhost",
    )
    header = next(
        h for h in done.headers.getlist("Set-Cookie") if h.startswith("__Host-qpki_remember=")
    )
    assert "Secure" in header and "HttpOnly" in header and "SameSite=Strict" in header


def test_without_the_box_nothing_is_remembered(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    _user, secret = vera
    client = browser(capp)
    login(client, "vera")
    second_step(client, clock, secret, remember=False)
    assert cookie_of(client) is None and device_count(capp) == 0


# -- using it --------------------------------------------------------------------------------------
def test_a_remembered_device_skips_the_code_and_rotates(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    user, secret = vera
    client = remembered(capp, clock, secret)
    first = cookie_of(client)
    clock.advance(days=2)
    signed_in = login(client, "vera")
    assert location_path(signed_in) == "/", "no code asked"
    second = cookie_of(client)
    assert second and second != first, "rotated on use"
    assert second.split(".")[0] == first.split(".")[0], "same series"  # type: ignore[union-attr]
    with capp.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        methods = list(
            s.scalars(select(UserSession.auth_method).where(UserSession.user_id == user.id))
        )
    assert "remembered_device" in methods
    assert client.get("/").status_code == 200
    # The session is not fresh for step-up: a sensitive action still asks for a code.
    assert location_path(client.get("/auth/change-password")) == "/auth/reauth"
    success = [
        e
        for e in events(capp, "login_success")
        if details(e)["second_factor"] == "remembered_device"
    ]
    assert len(success) == 1


def test_it_never_skips_the_password(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    _user, secret = vera
    client = remembered(capp, clock, secret)
    refused = login(client, "vera", "a wrong passphrase")
    assert refused.status_code == 200 and client.get("/").status_code == 302
    assert device_count(capp) == 1


def test_a_stale_cookie_revokes_the_device(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    _user, secret = vera
    owner = remembered(capp, clock, secret)
    stolen = cookie_of(owner)
    assert location_path(login(owner, "vera")) == "/"  # the owner uses it: rotated
    owner.post("/auth/logout")

    thief = browser(capp)
    thief.set_cookie(COOKIE, stolen or "")
    sent = login(thief, "vera")
    assert location_path(sent) == "/auth/mfa/verify", "the copy does not skip the code"
    assert cookie_of(thief) is None, "the dead cookie is dropped"
    assert device_count(capp) == 0, "revoked"
    reuse = events(capp, "remembered_device_reused")
    assert len(reuse) == 1 and reuse[0].outcome == "failure" and details(reuse[0])["revoked"]
    # The owner's current cookie no longer works either: the device is gone.
    assert location_path(login(owner, "vera")) == "/auth/mfa/verify"


def test_it_expires(capp: Flask, clock: SteppedClock, vera: tuple[User, str]) -> None:
    _user, secret = vera
    client = remembered(capp, clock, secret)
    clock.advance(days=30, seconds=1)
    assert location_path(login(client, "vera")) == "/auth/mfa/verify"
    assert device_count(capp) == 0


def test_never_for_a_role_whose_policy_forbids_it(capp: Flask, clock: SteppedClock) -> None:
    client, admin, secret = admin_client(capp, clock=clock)
    client.post("/auth/logout")
    login(client, "root-admin")
    form = client.get("/auth/mfa/verify")
    assert page(form).find("input", attrs={"name": "remember_device"}) is None
    second_step(client, clock, secret, remember=True)  # posted anyway: ignored
    assert cookie_of(client) is None and device_count(capp) == 0
    _ = admin


def test_a_policy_change_forgets_and_refuses_them(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    _user, secret = vera
    client = remembered(capp, clock, secret)
    services_of(capp).policy.set_policy("viewer", actor=None, remember_days=0)
    assert device_count(capp) == 0
    assert location_path(login(client, "vera")) == "/auth/mfa/verify"
    changed = events(capp, "policy_changed")
    assert details(changed[-1])["remembered_devices_forgotten"] == 1


def test_a_key_requirement_stops_remembered_devices(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    _user, secret = vera
    client = remembered(capp, clock, secret)
    services_of(capp).policy.set_policy("viewer", actor=None, require_phishing_resistant=True)
    assert location_path(login(client, "vera")) == "/auth/mfa/verify"


# -- revocation by every event ---------------------------------------------------------------------
def _password_change(app: Flask, user: User, _secret: str, clock: SteppedClock) -> str:
    services_of(app).accounts.change_password(user.id, PASSWORD, "another long passphrase")
    return "password_changed"


def _disable(app: Flask, user: User, _secret: str, clock: SteppedClock) -> str:
    services_of(app).factors.disable(user.id)
    return "mfa_disabled"


def _regenerate(app: Flask, user: User, _secret: str, clock: SteppedClock) -> str:
    services_of(app).factors.regenerate_backup_codes(user.id)
    return "backup_codes_regenerated"


def _new_app(app: Flask, user: User, _secret: str, clock: SteppedClock) -> str:
    factors = services_of(app).factors
    setup = factors.start_setup(user.id)
    clock.advance(seconds=30)
    assert factors.confirm_setup(user.id, oathtool_code(setup.secret, clock.now)).success
    return "mfa_enabled"


def _admin_reset(app: Flask, user: User, _secret: str, clock: SteppedClock) -> str:
    services_of(app).factors.admin_disable(None, user.id, "lost phone", actor_name="test")
    return "mfa_admin_disabled"


def _admin_password_reset(app: Flask, user: User, _secret: str, clock: SteppedClock) -> str:
    services_of(app).accounts.admin_reset_password(None, user.id, actor_name="test")
    return "password_reset"


def _sign_out_everywhere(app: Flask, user: User, _secret: str, clock: SteppedClock) -> str:
    services_of(app).sessions.end_others(user.id, "")
    return "session_ended"


def _reset_by_mail(app: Flask, user: User, _secret: str, clock: SteppedClock) -> str:
    from qpki.mail.setup import mail_components

    mail = mail_components(app)
    mail.dispatcher.stop()  # deliver here, not racing the background thread
    mail.dispatcher.enabled = False
    mail.password_reset.request_reset(user.username)
    mail.sender.make_all_due()
    mail.sender.deliver_due(limit=100)
    outbox = app.settings.data_dir / "outbox"  # type: ignore[attr-defined]
    text = "".join(p.read_text() for p in outbox.glob("*.eml"))
    token = re.findall(r"/auth/password/reset/([A-Za-z0-9_-]{40,})", text.replace("=\n", ""))[-1]
    mail.password_reset.reset_password(token, "another long passphrase", "another long passphrase")
    return "password_reset_completed"


@pytest.mark.parametrize(
    "event",
    [
        _password_change,
        _disable,
        _regenerate,
        _new_app,
        _admin_reset,
        _admin_password_reset,
        _sign_out_everywhere,
        _reset_by_mail,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_every_event_forgets_all_devices(
    capp: Flask,
    clock: SteppedClock,
    vera: tuple[User, str],
    event: Callable[[Flask, User, str, SteppedClock], str],
) -> None:
    user, secret = vera
    remembered(capp, clock, secret)
    remembered(capp, clock, secret)
    assert device_count(capp) == 2
    name = event(capp, user, secret, clock)
    assert device_count(capp) == 0
    record = events(capp, name)[-1]
    assert details(record)["remembered_devices_forgotten"] == 2


# -- the profile and the admin pages ---------------------------------------------------------------
def test_profile_lists_and_forgets_them(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    _user, secret = vera
    remembered(capp, clock, secret)
    client = remembered(capp, clock, secret)
    login(client, "vera")  # signed in through the remembered device
    profile = client.get("/auth/profile")
    listing = page(profile).find(id="remembered-devices")
    rows = listing.select(".remembered-device")
    assert len(rows) == 2
    assert "Chrome 120 on Windows 10" in rows[0].get_text(" ")
    assert "2026-06-01" in rows[0].get_text(" ")
    one = rows[1]["data-device-id"]
    forgot = client.post(f"/auth/remembered-devices/{one}/forget")
    assert location_path(forgot) == "/auth/profile" and device_count(capp) == 1
    assert client.post("/auth/remembered-devices/99999/forget").status_code == 302
    assert device_count(capp) == 1
    client.post("/auth/remembered-devices/forget-all")
    assert device_count(capp) == 0
    assert "No remembered devices" in text_of(client.get("/auth/profile"))
    revoked = events(capp, "remembered_device_revoked")
    assert [details(e)["scope"] for e in revoked] == ["one", "all"]


def test_a_user_cannot_forget_someone_elses_device(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    _user, secret = vera
    remembered(capp, clock, secret)
    create_user(capp, "mallory")
    other = capp.test_client()
    login(other, "mallory")
    with capp.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        device_id = s.scalar(select(RememberedDevice.id))
    other.post(f"/auth/remembered-devices/{device_id}/forget")
    other.post("/auth/remembered-devices/forget-all")
    assert device_count(capp) == 1


def test_admin_sees_and_revokes_them(
    capp: Flask, clock: SteppedClock, vera: tuple[User, str]
) -> None:
    user, secret = vera
    remembered(capp, clock, secret)
    remembered(capp, clock, secret)
    admin, _admin_user, _admin_secret = admin_client(capp, clock=clock)
    detail = admin.get(f"/admin/users/{user.id}")
    assert detail.status_code == 200
    rows = page(detail).select("#remembered-devices .remembered-device")
    assert len(rows) == 2
    one = rows[0]["data-device-id"]
    done = admin.post(f"/admin/users/{user.id}/remembered-devices/forget", data={"device_id": one})
    assert location_path(done) == f"/admin/users/{user.id}" and device_count(capp) == 1
    admin.post(f"/admin/users/{user.id}/remembered-devices/forget")
    assert device_count(capp) == 0
    revoked = events(capp, "remembered_device_revoked")
    assert all(e.actor_name == "root-admin" and e.target_name == "vera" for e in revoked)


# -- two instances on one PostgreSQL database ------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_instances_share_remembered_devices(
    make_app: Callable[..., Flask], db_url: str, clock: SteppedClock
) -> None:
    one, two = make_app(db_url, clock=clock), make_app(db_url, clock=clock)
    user = create_user(one, "vera")
    secret, _codes = enable_mfa(one, user.id, at=clock.now)
    client = remembered(one, clock, secret)
    cookie = cookie_of(client)
    other = browser(two)
    other.set_cookie(COOKIE, cookie or "")
    assert location_path(login(other, "vera")) == "/", "instance two honours it"
    # The first instance's copy is now stale: using it revokes the device everywhere.
    assert location_path(login(client, "vera")) == "/auth/mfa/verify"
    assert location_path(login(other, "vera")) == "/auth/mfa/verify"
    assert len(events(two, "remembered_device_reused")) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_one_cookie_used_twice_at_once_skips_the_code_once(
    make_app: Callable[..., Flask], db_url: str, clock: SteppedClock
) -> None:
    """Owner and thief present the same value at the same moment on two instances: one
    rotation wins, the other is a stale value — the device is revoked either way."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    one, two = make_app(db_url, clock=clock), make_app(db_url, clock=clock)
    user = create_user(one, "vera")
    secret, _codes = enable_mfa(one, user.id, at=clock.now)
    cookie = cookie_of(remembered(one, clock, secret))
    barrier = Barrier(2)

    def sign_in(app: Flask) -> bool:
        barrier.wait()
        result = services_of(app).signin.login("vera", PASSWORD, remember_cookie=cookie)
        return not result.mfa_required

    with ThreadPoolExecutor(2) as pool:
        skipped = list(pool.map(sign_in, (one, two)))
    assert skipped.count(True) == 1, skipped
    assert device_count(one) == 0
    assert len(events(one, "remembered_device_reused")) == 1
