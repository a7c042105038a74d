"""The admin 2FA reset needs its "I have verified this person's identity" box ticked.

The review reset a user's 2FA with the box unticked: the checkbox was decoration. Without it
the reset is refused with a message that names the box, and nothing changes — the user keeps
the factor, the backup codes and the open session, and no reset is audited.
"""

from __future__ import annotations

from flask import Flask
from sqlalchemy import func, select

from helpers import create_user, enable_mfa, login, login_with_mfa, next_step_code, page
from qpki.admin.forms import IDENTITY_NOT_CONFIRMED, ResetMFAForm
from qpki.audit.models import AuditEventRecord

REASON = "lost phone and codes; identity checked by a video call"


def _resets_audited(app: Flask) -> int:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        query = select(func.count()).where(AuditEventRecord.event == "mfa_admin_disabled")
        return int(s.scalar(query) or 0)


def _factor(app: Flask, user_id: int) -> tuple[object, ...]:
    user = app.auth_manager.get_user(user_id=user_id)  # type: ignore[attr-defined]
    return user.two_factor_enabled, user.totp_secret, user.backup_codes


def test_the_reset_is_refused_unless_identity_is_confirmed(app: Flask) -> None:
    root = create_user(app, "root-admin", role="admin")
    admin_secret, _codes = enable_mfa(app, root.id)  # an admin acts on others only with 2FA
    target = create_user(app, "tina")
    enable_mfa(app, target.id)
    tina = app.test_client()
    assert login(tina, "tina").status_code == 302  # pending her second factor; a live session
    admin = app.test_client()
    signed_in = login_with_mfa(admin, "root-admin", next_step_code(admin_secret))
    assert signed_in.status_code == 302
    url = f"/admin/users/{target.id}/mfa/disable"

    box = page(admin.get(f"/admin/users/{target.id}")).find("input", attrs={"name": "confirm"})
    assert box is not None and box.has_attr("required")  # the browser asks for it too

    before = _factor(app, target.id)
    for unticked in ({"reason": REASON}, {"reason": REASON, "confirm": ""}):
        refused = admin.post(url, data=unticked)
        assert refused.status_code == 400
        assert "was reset" not in refused.get_data(as_text=True)
        assert _factor(app, target.id) == before
        assert _resets_audited(app) == 0
    assert tina.get("/auth/mfa/verify").status_code == 200  # her session was not ended

    done = admin.post(url, data={"reason": REASON, "confirm": "y"})
    assert done.status_code == 302
    assert _factor(app, target.id) == (False, None, None)
    assert _resets_audited(app) == 1


def test_the_form_names_the_missing_confirmation(app: Flask) -> None:
    with app.test_request_context("/", method="POST", data={"reason": REASON}):
        form = ResetMFAForm()
        assert not form.validate()
        assert form.errors == {"confirm": [IDENTITY_NOT_CONFIRMED]}
    with app.test_request_context("/", method="POST", data={"reason": REASON, "confirm": "y"}):
        assert ResetMFAForm().validate()
