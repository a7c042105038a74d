"""Role policies (checklist §12.5): forced enrolment, grace, the gate on every route, no
lock-outs, the admin page, the compliance view and the command line.

Every test runs on a stepped clock: grace periods pass by moving it, never by sleeping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select
from werkzeug.routing import IntegerConverter

from helpers import (
    PASSWORD,
    admin_client,
    create_user,
    enable_mfa,
    enroll,
    location_path,
    login,
    oathtool_code,
    page,
    text_of,
)
from qpki.audit.models import AuditEventRecord
from qpki.auth.errors import PermissionDenied
from qpki.auth.models import User
from qpki.auth.policy import ComplianceState
from qpki.auth.services.policy import PolicyService
from qpki.clock import SteppedClock
from qpki.policy.models import PolicyGrace
from qpki.web.policy_gate import is_open
from qpki.web.services import services_of

T0 = datetime(2026, 6, 1, 9, 0, 5, tzinfo=UTC)


def policy_of(app: Flask) -> PolicyService:
    return services_of(app).policy


def events(app: Flask, name: str) -> list[AuditEventRecord]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return list(s.scalars(select(AuditEventRecord).where(AuditEventRecord.event == name)))


def details(record: AuditEventRecord) -> dict[str, object]:
    return json.loads(record.details) if isinstance(record.details, str) else record.details


def require_for_viewers(app: Flask, hours: int = 48) -> None:
    policy_of(app).set_policy(
        "viewer", actor=None, actor_name="test", require_2fa=True, grace_hours=hours
    )


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock(T0)


@pytest.fixture
def capp(make_app: Callable[..., Flask], clock: SteppedClock) -> Flask:
    return make_app(clock=clock)


# -- fresh install ---------------------------------------------------------------------------------
def test_fresh_install_requires_2fa_for_admins_only(capp: Flask) -> None:
    by_role = {p.role: p for p in policy_of(capp).policies()}
    assert by_role["admin"].require_2fa and by_role["admin"].grace_hours == 0
    assert by_role["admin"].remember_allowed_days == 0
    for role in ("viewer", "operator"):
        assert not by_role[role].require_2fa and by_role[role].remember_allowed_days == 30


def test_new_admin_enrols_at_first_sign_in(capp: Flask, clock: SteppedClock) -> None:
    create_user(capp, "first-admin", role="admin")
    client = capp.test_client()
    assert location_path(login(client, "first-admin")) == "/"
    for path in ("/", "/auth/profile", "/admin/users", "/admin/policy", "/admin/audit"):
        sent = client.get(path)
        assert location_path(sent) == "/auth/mfa/setup", path
    setup = client.get("/auth/mfa/setup")
    assert setup.status_code == 200
    assert "grace period is over" in text_of(setup)
    enroll(client, at=clock.now)
    assert client.get("/admin/users").status_code == 200
    grace = events(capp, "policy_grace_started")
    assert len(grace) == 1 and grace[0].target_name == "first-admin"


# -- grace -----------------------------------------------------------------------------------------
def test_viewer_in_grace_sees_a_banner_then_must_enrol(capp: Flask, clock: SteppedClock) -> None:
    require_for_viewers(capp, hours=48)
    create_user(capp, "vera")
    client = capp.test_client()
    login(client, "vera")
    home = client.get("/")
    assert home.status_code == 200
    banner = page(home).find(id="policy-banner")
    assert banner is not None and "2026-06-03 09:00 UTC" in banner.get_text(" ")
    assert page(home).find(id="policy-banner-enrol")["href"] == "/auth/mfa/setup"

    dismissed = client.post("/auth/policy-banner/dismiss", data={"next": "/auth/profile"})
    assert location_path(dismissed) == "/auth/profile"
    assert page(client.get("/")).find(id="policy-banner") is None, "dismissed for the session"

    clock.advance(hours=47, minutes=59)
    login(client, "vera")  # (the session itself has long expired)
    assert client.get("/").status_code == 200
    clock.advance(minutes=1)
    assert location_path(client.get("/")) == "/auth/mfa/setup"


def test_grace_does_not_restart(capp: Flask, clock: SteppedClock) -> None:
    require_for_viewers(capp, hours=48)
    create_user(capp, "vera")
    client = capp.test_client()
    login(client, "vera")
    assert client.get("/").status_code == 200
    clock.advance(hours=30)
    # Off and on again, and a second sign-in: the grace still ends 48 h after the first.
    policy_of(capp).set_policy("viewer", actor=None, require_2fa=False)
    policy_of(capp).set_policy("viewer", actor=None, require_2fa=True)
    clock.advance(hours=18)
    client = capp.test_client()
    login(client, "vera")
    assert location_path(client.get("/")) == "/auth/mfa/setup"
    assert len(events(capp, "policy_grace_started")) == 1


def test_shorter_grace_applies_at_once_to_running_graces(capp: Flask, clock: SteppedClock) -> None:
    require_for_viewers(capp, hours=72)
    create_user(capp, "vera")
    client = capp.test_client()
    login(client, "vera")
    clock.advance(hours=25)
    login(client, "vera")
    assert client.get("/").status_code == 200
    require_for_viewers(capp, hours=24)
    assert location_path(client.get("/")) == "/auth/mfa/setup"


def test_admin_reset_under_the_policy_means_enrol_at_next_sign_in(
    capp: Flask, clock: SteppedClock
) -> None:
    require_for_viewers(capp, hours=72)
    vera = create_user(capp, "vera")
    _secret, _codes = enable_mfa(capp, vera.id, at=clock.now)
    capp.auth_manager.admin_disable_mfa(None, vera.id, "lost phone, identity checked")  # type: ignore[attr-defined]
    client = capp.test_client()
    login(client, "vera")
    assert location_path(client.get("/")) == "/auth/mfa/setup", "no new grace"
    enroll(client, at=clock.now)
    assert client.get("/").status_code == 200
    with capp.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        assert s.get(PolicyGrace, vera.id).enrol_now is False


def test_temporary_password_first_then_enrolment(capp: Flask) -> None:
    newadmin = create_user(capp, "newadmin", role="admin")
    temporary = capp.auth_manager.admin_reset_password(None, newadmin.id)  # type: ignore[attr-defined]
    client = capp.test_client()
    login(client, "newadmin", temporary)
    assert location_path(client.get("/")) == "/auth/change-password"
    assert location_path(client.get("/auth/mfa/setup")) == "/auth/change-password"
    changed = client.post(
        "/auth/change-password",
        data={
            "current_password": temporary,
            "new_password": "another long passphrase",
            "confirm_password": "another long passphrase",
        },
    )
    assert changed.status_code == 302
    assert location_path(client.get("/")) == "/auth/mfa/setup"


# -- the gate on every route -----------------------------------------------------------------------
def _sample_url(app: Flask, rule: object) -> str:
    values: dict[str, object] = {}
    for name, converter in rule._converters.items():  # type: ignore[attr-defined]
        values[name] = 1 if isinstance(converter, IntegerConverter) else "sample"
    with app.test_request_context():
        from flask import url_for

        return url_for(rule.endpoint, **values)  # type: ignore[attr-defined]


def test_no_route_lets_an_overdue_user_through(capp: Flask) -> None:
    """Every route of the app (taken from its URL map, so routes added later are covered)
    sends an overdue user to enrolment, or answers 403 on the JSON API; nothing changes."""
    create_user(capp, "boss", role="admin")
    victim = create_user(capp, "victim")
    client = capp.test_client()
    login(client, "boss")
    checked = 0
    for rule in capp.url_map.iter_rules():
        if is_open(capp, rule.endpoint):
            continue
        url = _sample_url(capp, rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            response = client.open(url, method=method, data={"password": PASSWORD})
            checked += 1
            if url.startswith("/api/"):
                assert response.status_code == 403, (method, url)
                assert response.get_json()["type"].endswith("enrolment-overdue"), url
            else:
                assert response.status_code == 302, (method, url, response.status_code)
                assert location_path(response) == "/auth/mfa/setup", (method, url)
    assert checked >= 40, checked
    boss = capp.auth_manager.get_user(username="boss")  # type: ignore[attr-defined]
    assert not boss.two_factor_enabled and boss.role == "admin"
    after = capp.auth_manager.get_user(user_id=victim.id)  # type: ignore[attr-defined]
    assert after.is_active and after.role == "viewer"
    assert client.get("/auth/mfa/setup").status_code == 200  # enrolment stays open
    assert location_path(client.post("/auth/logout")) == "/auth/login"


def test_open_endpoints_are_only_enrolment_logout_and_static(capp: Flask) -> None:
    opened = sorted(r.endpoint for r in capp.url_map.iter_rules() if is_open(capp, r.endpoint))
    allowed = re.compile(
        r"^(auth\.(mfa_setup|mfa_setup_start|reauth|logout)|static|health\..*|"
        r"policy\.dismiss_banner|auth\.(security_keys|webauthn).*|webauthn\..*)$"
    )
    assert [e for e in opened if not allowed.match(e)] == []


def test_the_service_check_names_why_an_overdue_user_must_enrol(capp: Flask) -> None:
    create_user(capp, "boss", role="admin")
    login(capp.test_client(), "boss")  # the first sign-in starts the (zero) grace
    signin = services_of(capp).signin
    checked = signin.verify_for_service("boss", "123456", actor_name="api:test")
    assert checked.outcome is None and checked.overdue is not None
    assert "two-factor" in checked.overdue
    boss = capp.auth_manager.get_user(username="boss")  # type: ignore[attr-defined]
    assert policy_of(capp).overdue(boss)
    create_user(capp, "vera")
    checked = signin.verify_for_service("VERA", "123456", actor_name="api:test")
    assert checked.overdue is None and checked.outcome is not None  # checked: no 2FA, refused
    assert not checked.outcome.success
    assert signin.verify_for_service("nobody", "123456", actor_name="api:test").unknown_user


def test_api_verify_answers_403_for_an_overdue_user(capp: Flask) -> None:
    from qpki.api import api_keys_of

    key = api_keys_of(capp).create("policy-test", "verify", actor_name="test").secret
    create_user(capp, "boss", role="admin")
    api = capp.test_client()
    body = {"username": "boss", "code": "123456"}
    headers = {"Authorization": f"Bearer {key}"}
    before = api.post("/api/v1/verify", json=body, headers=headers)
    assert before.status_code == 200, "not signed in under the policy yet: a plain reject"
    login(capp.test_client(), "boss")  # the first sign-in starts a grace of 0 hours
    after = api.post("/api/v1/verify", json=body, headers=headers)
    assert after.status_code == 403
    problem = after.get_json(force=True)
    assert problem["type"] == "urn:qpki:problem:enrolment-overdue"
    assert "two-factor" in problem["detail"]


# -- no lock-outs ----------------------------------------------------------------------------------
def test_member_cannot_remove_the_last_factor(capp: Flask, clock: SteppedClock) -> None:
    client, admin, secret = admin_client(capp, clock=clock)
    profile = client.get("/auth/profile")
    assert page(profile).find(id="factor-required") is not None
    assert page(profile).find(id="disable-2fa-form") is None
    refused = client.post(
        "/auth/mfa/disable",
        data={"password": PASSWORD, "code": oathtool_code(secret, clock.now)},
    )
    assert location_path(refused) == "/auth/profile"
    assert "cannot turn it off" in text_of(client.get("/auth/profile"))
    assert capp.auth_manager.get_user(user_id=admin.id).two_factor_enabled  # type: ignore[attr-defined]
    failures = [e for e in events(capp, "mfa_disabled") if e.outcome == "failure"]
    assert len(failures) == 1 and details(failures[0])["reason"] == "required_by_policy"
    # Where 2FA is optional, it can still be turned off.
    policy_of(capp).set_policy("admin", actor=None, require_2fa=False)
    services_of(capp).factors.disable(admin.id)


def test_admin_cannot_require_what_they_lack_for_their_own_role(
    capp: Flask, clock: SteppedClock
) -> None:
    _client, admin, _secret = admin_client(capp, clock=clock)
    with pytest.raises(PermissionDenied, match="passkey or security key"):
        policy_of(capp).set_policy("admin", actor=admin, require_phishing_resistant=True)
    assert not policy_of(capp).policy("admin").require_phishing_resistant
    # Another role, or the command line, may.
    policy_of(capp).set_policy("operator", actor=admin, require_phishing_resistant=True)
    policy_of(capp).set_policy("admin", actor=None, require_phishing_resistant=True)
    assert policy_of(capp).policy("admin").require_phishing_resistant
    denied = [e for e in events(capp, "access_denied") if details(e).get("action") == "set_policy"]
    assert len(denied) == 1


def test_phishing_resistant_role_without_a_key_is_sent_to_enrol(
    capp: Flask, clock: SteppedClock
) -> None:
    client, admin, _secret = admin_client(capp, clock=clock)
    assert client.get("/admin/users").status_code == 200
    policy_of(capp).set_policy("admin", actor=None, require_phishing_resistant=True)
    sent = client.get("/admin/users")
    assert sent.status_code == 302 and "/admin/" not in sent.headers["Location"]
    status = policy_of(capp).standing(admin)
    assert status.overdue and status.requires_phishing_resistant, "TOTP is not enough"
    assert "passkey or security key" in policy_of(capp).overdue_message(status)


def test_bad_policy_input_changes_nothing(capp: Flask) -> None:
    service = policy_of(capp)
    before = service.policies()
    for kwargs in ({"grace_hours": -1}, {"remember_days": 400}, {"grace_hours": 10**6}):
        with pytest.raises(Exception, match="between"):
            service.set_policy("viewer", actor=None, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="Unknown role"):
        service.set_policy("root", actor=None, require_2fa=True)
    assert service.policies() == before
    assert events(capp, "policy_changed") == []


# -- the admin page, compliance and the user list --------------------------------------------------
def test_admin_sets_a_policy_with_step_up_and_audit(capp: Flask, clock: SteppedClock) -> None:
    client, _admin, secret = admin_client(capp, clock=clock)
    shown = client.get("/admin/policy")
    assert shown.status_code == 200 and page(shown).find(id="policy-viewer") is not None
    form = {
        "viewer-require_2fa": "y",
        "viewer-grace_hours": "24",
        "viewer-remember_days": "7",
    }
    clock.advance(minutes=11)  # no longer fresh: step-up first
    sent = client.post("/admin/policy/viewer", data=form)
    assert location_path(sent) == "/auth/reauth"
    clock.advance(seconds=30)
    client.post(
        "/auth/reauth",
        data={
            "password": PASSWORD,
            "code": oathtool_code(secret, clock.now),
            "next": "/admin/policy",
        },
    )
    saved = client.post("/admin/policy/viewer", data=form)
    assert location_path(saved) == "/admin/policy"
    viewer = policy_of(capp).policy("viewer")
    assert viewer.require_2fa and viewer.grace_hours == 24 and viewer.remember_days == 7
    assert not viewer.new_device_2fa
    changed = events(capp, "policy_changed")
    assert len(changed) == 1 and changed[0].actor_name == "root-admin"
    assert details(changed[0])["changes"]["grace_hours"] == {"from": 72, "to": 24}

    bad = client.post("/admin/policy/viewer", data={**form, "viewer-grace_hours": "-3"})
    assert bad.status_code == 400 and policy_of(capp).policy("viewer").grace_hours == 24
    assert client.post("/admin/policy/nobody", data=form).status_code == 302


def test_compliance_view_counts_filter_and_csv(capp: Flask, clock: SteppedClock) -> None:
    require_for_viewers(capp, hours=48)
    done = create_user(capp, "done")
    enable_mfa(capp, done.id, at=clock.now)
    create_user(capp, "waits")
    create_user(capp, "late")
    create_user(capp, "soon")
    login(capp.test_client(), "late")
    clock.advance(hours=40)
    login(capp.test_client(), "soon")
    clock.advance(hours=10)  # late: 50 h in (overdue); soon: 10 h in (in grace)
    client, _admin, _secret = admin_client(capp, clock=clock)

    by_role = {c.policy.role: c for c in policy_of(capp).compliance()}
    viewer = by_role["viewer"]
    assert viewer.counts[ComplianceState.COMPLIANT] == 1
    assert viewer.counts[ComplianceState.WAITING] == 1
    assert viewer.counts[ComplianceState.IN_GRACE] == 1
    assert viewer.counts[ComplianceState.OVERDUE] == 1
    assert [e.username for e in viewer.in_grace] == ["soon"]
    assert viewer.in_grace[0].deadline == T0 + timedelta(hours=40 + 48)
    assert [e.username for e in viewer.overdue] == ["late"]
    assert by_role["admin"].counts[ComplianceState.COMPLIANT] == 1

    shown = client.get("/admin/policy")
    row = page(shown).find("tr", attrs={"data-role": "viewer"})
    assert row.find(class_="count-overdue").get_text(strip=True) == "1"

    for state, names in (("overdue", ["late"]), ("in_grace", ["soon"]), ("waiting", ["waits"])):
        listed = client.get(f"/admin/users?compliance={state}")
        assert [tr["data-username"] for tr in page(listed).select("#users-table tbody tr")] == names
    assert client.get("/admin/users?compliance=bogus").status_code == 200

    csv_text = client.get("/admin/policy/compliance.csv").get_data(as_text=True)
    lines = csv_text.strip().splitlines()
    assert lines[0] == "username,email,role,state,two_factor,deadline_utc"
    rows = {line.split(",")[0]: line.split(",") for line in lines[1:]}
    assert rows["late"][3] == "overdue" and rows["soon"][3] == "in_grace"
    assert rows["done"][3] == "compliant" and rows["waits"][3] == "waiting"
    assert rows["root-admin"][3] == "compliant"


# -- new devices -----------------------------------------------------------------------------------
def test_new_device_sign_in_is_audited_and_listed(capp: Flask) -> None:
    create_user(capp, "vera")
    first = capp.test_client()
    login(first, "vera")
    assert events(capp, "new_device_sign_in") == [], "the very first browser is no surprise"
    other = capp.test_client()
    login(other, "vera")  # a second browser: no device cookie
    found = events(capp, "new_device_sign_in")
    assert len(found) == 1 and found[0].target_name == "vera"
    assert "Signed in from a new browser" in text_of(other.get("/auth/profile"))
    login(first, "vera")  # the first browser again: known
    assert len(events(capp, "new_device_sign_in")) == 1


def test_policy_may_require_2fa_on_a_new_device(capp: Flask, clock: SteppedClock) -> None:
    policy_of(capp).set_policy("viewer", actor=None, new_device_2fa=True)
    create_user(capp, "vera")
    known = capp.test_client()
    login(known, "vera")
    assert known.get("/").status_code == 200, "the first browser of the account"
    login(known, "vera")
    assert known.get("/").status_code == 200, "a known browser: 2FA stays optional"
    stranger = capp.test_client()
    login(stranger, "vera")
    sent = stranger.get("/")
    assert location_path(sent) == "/auth/mfa/setup"
    assert "new browser" in text_of(stranger.get("/auth/mfa/setup"))
    enroll(stranger, at=clock.now)
    assert stranger.get("/").status_code == 200


# -- two instances on one PostgreSQL database ------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_instances_share_the_policy(
    make_app: Callable[..., Flask], db_url: str, clock: SteppedClock
) -> None:
    one, two = make_app(db_url, clock=clock), make_app(db_url, clock=clock)
    create_user(one, "vera")
    require_for_viewers(one, hours=0)
    client = two.test_client()
    login(client, "vera")
    assert location_path(client.get("/")) == "/auth/mfa/setup"
    assert policy_of(two).policy("viewer").require_2fa
    policy_of(two).set_policy("viewer", actor=None, require_2fa=False)
    again = one.test_client()
    login(again, "vera")
    assert again.get("/").status_code == 200


# -- the command line ------------------------------------------------------------------------------
def test_cli_policy_show_and_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qpki.cli import main

    monkeypatch.setenv("QPKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("QPKI_DATABASE_URL", raising=False)
    monkeypatch.delenv("QPKI_MFA_KEY", raising=False)
    runner = CliRunner()
    shown = runner.invoke(main, ["policy", "show"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    admin_line = next(line for line in shown.output.splitlines() if line.startswith("admin"))
    assert "required" in admin_line and "0h" in admin_line and "never" in admin_line
    done = runner.invoke(
        main,
        ["policy", "set", "admin", "--no-require-2fa", "--grace-hours", "12"],
        catch_exceptions=False,
    )
    assert done.exit_code == 0, done.output
    admin_line = next(line for line in done.output.splitlines() if line.startswith("admin"))
    assert "optional" in admin_line and "12h" in admin_line
    bad = runner.invoke(main, ["policy", "set", "root", "--require-2fa"])
    assert bad.exit_code == 1 and "Unknown role" in bad.output
    bad = runner.invoke(main, ["policy", "set", "viewer", "--remember-days", "999"])
    assert bad.exit_code == 1 and "between" in bad.output


def test_users_under_a_policy_keep_their_role_data(capp: Flask) -> None:
    """The policy tables hold no copy of the role: a role change applies the new policy."""
    create_user(capp, "vera")
    client = capp.test_client()
    login(client, "vera")
    assert client.get("/").status_code == 200
    with capp.db_manager.transaction() as s:  # type: ignore[attr-defined]
        s.scalar(select(User).where(User.username == "vera")).role = "admin"
    assert location_path(client.get("/")) == "/auth/mfa/setup"


# -- phishing-resistant roles with a key ----------------------------------------------------------
def _give_key(app: Flask, user_id: int) -> None:
    """A registered key as the policy sees it (public data only; the ceremonies have their
    own tests in tests/web/test_webauthn_web.py)."""
    from qpki.auth.webauthn_models import WebAuthnCredential

    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        s.add(
            WebAuthnCredential(
                user_id=user_id,
                credential_id="policy-test-key",
                public_key=b"\x00" * 32,
                name="Test key",
            )
        )


def test_a_key_holder_of_a_key_role_cannot_use_an_app_code(
    capp: Flask, clock: SteppedClock
) -> None:
    vera = create_user(capp, "vera")
    secret, codes = enable_mfa(capp, vera.id, at=clock.now)
    _give_key(capp, vera.id)
    policy_of(capp).set_policy("viewer", actor=None, require_phishing_resistant=True)
    assert policy_of(capp).standing(vera).state is ComplianceState.COMPLIANT
    client = capp.test_client()
    login(client, "vera")
    clock.advance(seconds=30)
    refused = client.post("/auth/mfa/verify", data={"code": oathtool_code(secret, clock.now)})
    assert refused.status_code == 200 and "use your key" in text_of(refused)
    assert location_path(client.get("/")) == "/auth/mfa/verify", "still pending"
    failures = [e for e in events(capp, "mfa_verify_failure")]
    assert details(failures[-1])["reason"] == "key_required"
    done = client.post("/auth/mfa/verify", data={"code": codes[0]})
    assert done.status_code == 302, "a backup code still lets them in"
    assert client.get("/").status_code == 200
