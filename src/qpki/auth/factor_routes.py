"""/auth second-factor pages: enrolling an authenticator app, backup codes, turning 2FA off."""

from __future__ import annotations

import base64

from flask import (
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from qpki.auth.blueprint import Page, bp, needs_code, retry_headers
from qpki.auth.errors import (
    AuthError,
    SecretUnavailable,
)
from qpki.auth.forms import (
    DisableMFAForm,
    PostForm,
    RegenerateForm,
    SetupConfirmForm,
)
from qpki.auth.services.factors import SetupInfo
from qpki.web.limits import REGENERATE_LIMIT, SETUP_LIMIT, per_address
from qpki.web.notices import mfa_off_message
from qpki.web.services import services
from qpki.web.session_auth import (
    current_session_row,
    session_token,
)
from qpki.web.step_up import step_up_required


# -- enrolment -------------------------------------------------------------------------------------
def _setup_page(
    form: SetupConfirmForm,
    setup: SetupInfo,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> tuple[str, int, dict[str, str]]:
    form.code.data = ""  # never echo a submitted code back into the page
    qr = base64.b64encode(setup.qr_png).decode()
    page = render_template("auth/mfa_setup.html", form=form, setup=setup, qr_data=qr)
    return page, status, headers or {}


@bp.route("/mfa/setup", methods=["GET", "POST"])
@login_required
@per_address(SETUP_LIMIT, methods=["POST"])
def mfa_setup() -> Page:
    """GET shows the pending setup (the same secret every time) or the form that starts one;
    POST confirms it with a code. Nothing here changes state on GET. With 2FA already on
    this reconfigures the app (a new phone) or adds it next to a security key; the old app
    keeps working until the new one is confirmed."""
    factors = services().factors
    form = SetupConfirmForm()
    pending = factors.pending_setup(current_user.id)
    if request.method == "GET":
        if pending is None:
            return render_template(
                "auth/mfa_setup_start.html", form=PostForm(), needs_password=_needs_password()
            )
        return _setup_page(form, pending)
    if pending is None:
        return render_template("auth/mfa_setup_expired.html"), 400
    if not form.validate_on_submit():
        return _setup_page(form, pending, 400)
    outcome = factors.confirm_setup(
        current_user.id, form.code.data, keep_session_token=session_token()
    )
    if outcome.codes == []:  # 2FA was on already: the backup codes stay as they were
        flash("Your authenticator app is set up. Codes from the old app no longer work.", "success")
        return redirect(url_for("auth.profile"))
    if outcome.codes is not None:
        flash("Two-factor authentication is now enabled.", "success")
        return _codes_page(outcome.codes, first_time=True)
    if outcome.expired:
        return render_template("auth/mfa_setup_expired.html", message=outcome.message), 400
    flash(outcome.message, "error")
    status = 429 if outcome.retry_at else 403 if outcome.locked else 400
    return _setup_page(form, pending, status, retry_headers(outcome.retry_at))


def _needs_password() -> bool:
    return not services().step_up.is_fresh(current_session_row())


@bp.post("/mfa/setup/start")
@per_address(SETUP_LIMIT)
@step_up_required(lambda: url_for("auth.mfa_setup"))
def mfa_setup_start() -> Response:
    """Start (or restart) an enrolment: a step-up action, as it binds a new authenticator."""
    if not PostForm().validate_on_submit():
        return redirect(url_for("auth.mfa_setup"))
    services().factors.start_setup(current_user.id)
    return redirect(url_for("auth.mfa_setup"))


def _codes_page(codes: list[str], *, first_time: bool) -> Response:
    response = make_response(
        render_template("auth/backup_codes_new.html", codes=codes, first_time=first_time)
    )
    response.headers["Cache-Control"] = "no-store"
    return response


# -- backup codes and disabling --------------------------------------------------------------------
@bp.get("/mfa/backup-codes")
@login_required
def backup_codes() -> Page:
    if not current_user.two_factor_enabled:
        flash(mfa_off_message(current_user), "info")
        return redirect(url_for("auth.profile"))
    try:
        info = services().factors.backup_codes_info(current_user.id)
    except SecretUnavailable as exc:
        return render_template(
            "auth/backup_codes.html",
            info=None,
            error=exc.message,
            form=RegenerateForm(),
            needs_code=needs_code(),
        ), 500
    return render_template(
        "auth/backup_codes.html",
        info=info,
        error=None,
        form=RegenerateForm(),
        needs_code=needs_code(),
    )


@bp.post("/mfa/backup-codes/regenerate")
@per_address(REGENERATE_LIMIT)
@step_up_required(lambda: url_for("auth.backup_codes"))
def regenerate_backup_codes() -> Page:
    if not RegenerateForm().validate_on_submit():
        flash("Enter your password to regenerate backup codes.", "error")
        return redirect(url_for("auth.backup_codes"))
    try:
        codes = services().factors.regenerate_backup_codes(
            current_user.id, keep_session_token=session_token()
        )
    except AuthError as exc:
        flash(exc.message, "error")
        return redirect(url_for("auth.backup_codes"))
    flash("New backup codes generated. The old codes no longer work.", "success")
    return _codes_page(codes, first_time=False)


@bp.post("/mfa/disable")
@step_up_required(lambda: url_for("auth.profile"))
def mfa_disable() -> Response:
    if not DisableMFAForm().validate_on_submit():
        flash("Enter your password to disable two-factor authentication.", "error")
        return redirect(url_for("auth.profile"))
    try:
        services().factors.disable(current_user.id, keep_session_token=session_token())
    except AuthError as exc:
        flash(exc.message, "error")
    else:
        flash(
            "Two-factor authentication has been disabled. We recommend turning it back on.",
            "warning",
        )
    return redirect(url_for("auth.profile"))
