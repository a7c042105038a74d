"""The web side of the role policies: the gate every request passes, and the grace banner.

The rule — who must have a second factor, and since when — is the PolicyService's. Here:
- an overdue user reaches only enrolment (TOTP setup, security keys, the reauth page those
  need), sign-out and static assets; every other page sends them to enrol, and a JSON path
  answers 403 with the reason;
- a user in grace sees a banner with the deadline and a link to enrol on every page, until
  they dismiss it for this session.

Which pages count as enrolment is not a hard-coded list of today's routes alone: a view marked
with :func:`enrolment_page` is one too, so a page added later is closed unless it says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Flask, current_app, flash, g, redirect, request, session, url_for
from flask_login import current_user
from werkzeug.wrappers import Response

from qpki.auth.policy import Status
from qpki.web.health import ENDPOINTS as HEALTH_ENDPOINTS
from qpki.web.security import is_safe_next
from qpki.web.services import services
from qpki.web.session_auth import current_session_row

F = TypeVar("F", bound=Callable[..., Any])

ENROLMENT_MARK = "_qpki_enrolment_page"
BANNER_DISMISSED = "policy_banner_dismissed"
# Always open: enrolment itself, the step-up it needs, signing out, static files, health.
OPEN_ENDPOINTS = frozenset(
    {
        "auth.mfa_setup",
        "auth.mfa_setup_start",
        "auth.reauth",
        "auth.logout",
        "policy.dismiss_banner",
        "static",
        *HEALTH_ENDPOINTS,
    }
)

bp = Blueprint("policy", __name__)


def enrolment_page(view: F) -> F:
    """Mark a view as part of enrolment: open to a user whose grace period is over."""
    setattr(view, ENROLMENT_MARK, True)
    return view


def is_open(app: Flask, endpoint: str | None) -> bool:
    """Whether ``endpoint`` stays reachable for an overdue user."""
    if endpoint is None or endpoint in OPEN_ENDPOINTS:
        return True
    view = app.view_functions.get(endpoint)
    return bool(view is not None and getattr(view, ENROLMENT_MARK, False))


def enrol_url(status: Status) -> str:
    """Where to enrol: the security keys page when a key is required (and exists)."""
    if status.requires_phishing_resistant:
        for endpoint in ("auth.webauthn.security_keys",):
            if endpoint in current_app.view_functions:
                return url_for(endpoint)
    return url_for("auth.mfa_setup")


def _status() -> Status | None:
    """The signed-in user's standing (computed once per request), or ``None``."""
    if "policy_status" not in g:
        row = current_session_row()
        g.policy_status = (
            services().policy.status(
                current_user, session_method=row.auth_method if row is not None else None
            )
            if current_user.is_authenticated
            else None
        )
    found: Status | None = g.policy_status
    return found


def _gate() -> Response | None:
    """Send an overdue user to enrolment (before_request)."""
    if is_open(current_app, request.endpoint):
        return None
    if not current_user.is_authenticated:
        return None
    if current_user.must_change_password and request.endpoint == "auth.change_password":
        return None  # the temporary password first, then enrolment
    status = _status()
    if status is None or not status.overdue:
        return None
    message = services().policy.overdue_message(status)
    if request.path.startswith("/api/"):
        from qpki.api.problems import problem_response

        return problem_response("enrolment-overdue", message)
    if request.method == "GET":
        flash(message, "warning")
    return redirect(enrol_url(status))


def _banner() -> dict[str, object]:
    """The grace banner for templates: the deadline and where to enrol, unless dismissed."""
    if request.endpoint is None or request.endpoint == "static":
        return {}
    if session.get(BANNER_DISMISSED) or not current_user.is_authenticated:
        return {}
    status = _status()
    if status is None or not status.in_grace or status.deadline is None:
        return {}
    return {"policy_banner": {"deadline": status.deadline, "enrol_url": enrol_url(status)}}


@bp.post("/auth/policy-banner/dismiss")
def dismiss_banner() -> Response:
    """Hide the grace banner for the rest of this session (the deadline does not move)."""
    from qpki.auth.forms import PostForm

    if PostForm().validate_on_submit():
        session[BANNER_DISMISSED] = True
    target = request.form.get("next", "")
    return redirect(target if is_safe_next(target) else url_for("main.index"))


def install_policy_gate(app: Flask) -> None:
    """Register the gate, the banner and its dismiss route."""
    app.register_blueprint(bp)
    app.before_request(_gate)
    app.context_processor(_banner)
