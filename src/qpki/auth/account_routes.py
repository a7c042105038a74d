"""/auth account pages: the account overview, password change, sessions, remembered devices."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from flask import (
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from qpki.auth.blueprint import Page, bp, needs_code, retry_headers
from qpki.auth.errors import (
    AccountLocked,
    AccountThrottled,
    AuthError,
    SecretUnavailable,
)
from qpki.auth.forms import (
    ChangePasswordForm,
    DisableMFAForm,
    PostForm,
)
from qpki.web.client import client
from qpki.web.services import services
from qpki.web.session_auth import (
    current_session_row,
    session_token,
    start_session,
)


# -- account page ----------------------------------------------------------------------------------
@bp.get("/profile")
@login_required
def profile() -> Page:
    svc = services()
    codes_info, codes_error = None, None
    if current_user.two_factor_enabled:
        try:
            codes_info = svc.factors.backup_codes_info(current_user.id)
        except SecretUnavailable as exc:
            codes_error = exc.message
    row = current_session_row()
    return render_template(
        "auth/profile.html",
        user=current_user,
        codes_info=codes_info,
        codes_error=codes_error,
        sessions=svc.sessions.list_for_user(current_user.id),
        current_session_id=row.id if row else None,
        events=svc.sessions.recent_security_events(current_user.id),
        attack=svc.sessions.attack_notice(current_user),
        remembered=svc.remembered_devices.list_for_user(current_user.id),
        factor_required=svc.policy.factor_required(current_user),
        disable_form=DisableMFAForm(),
        post_form=PostForm(),
        needs_code=needs_code(),
    )


def _change_password_step_up(view: Callable[[], Page]) -> Callable[[], Page]:
    """Step-up for a password change. The form's current password is the password part
    (checked and throttled by the service); a user with 2FA whose session is not fresh
    proves a second factor on the reauth page first. The forced change of a temporary
    password needs neither: the user has just proved that password."""

    @wraps(view)
    @login_required
    def wrapped() -> Page:
        if not current_user.must_change_password and needs_code():
            return redirect(url_for("auth.reauth", next=url_for("auth.change_password")))
        return view()

    return wrapped


@bp.route("/change-password", methods=["GET", "POST"])
@_change_password_step_up
def change_password() -> Page:
    form = ChangePasswordForm()
    if form.validate_on_submit():
        try:
            new_token = services().accounts.change_password(
                current_user.id,
                form.current_password.data,
                form.new_password.data,
                client=client(),
                current_token=session_token(),
            )
        except (AccountThrottled, AccountLocked) as exc:
            flash(exc.message, "error")
            return (
                render_template("auth/change_password.html", form=form),
                429,
                retry_headers(getattr(exc, "retry_at", None)),
            )
        except AuthError as exc:
            flash(exc.message, "error")
        else:
            if new_token:
                start_session(new_token)
            flash("Your password has been changed. Other sessions were signed out.", "success")
            return redirect(url_for("auth.profile"))
    status = 400 if request.method == "POST" else 200
    return render_template("auth/change_password.html", form=form), status


@bp.post("/sessions/<int:session_id>/end")
@login_required
def end_session(session_id: int) -> Response:
    if PostForm().validate_on_submit():
        if services().sessions.end_one(current_user.id, session_id):
            flash("That session has been signed out.", "success")
        else:
            flash("That session was not found or has already ended.", "error")
    return redirect(url_for("auth.profile"))


@bp.post("/sessions/end-others")
@login_required
def end_other_sessions() -> Response:
    if PostForm().validate_on_submit():
        ended = services().sessions.end_others(current_user.id, session_token() or "")
        flash(
            f"Signed out {ended} other session{'s' if ended != 1 else ''}; "
            "remembered devices were forgotten.",
            "success",
        )
    return redirect(url_for("auth.profile"))


@bp.post("/remembered-devices/<int:device_id>/forget")
@login_required
def forget_remembered_device(device_id: int) -> Response:
    if PostForm().validate_on_submit():
        if services().remembered_devices.forget(current_user, current_user.id, device_id):
            flash("That device will be asked for a code again.", "success")
        else:
            flash("That device was not found or was already forgotten.", "error")
    return redirect(url_for("auth.profile"))


@bp.post("/remembered-devices/forget-all")
@login_required
def forget_remembered_devices() -> Response:
    if PostForm().validate_on_submit():
        forgotten = services().remembered_devices.forget(current_user, current_user.id)
        flash(f"Forgot {forgotten} remembered device{'s' if forgotten != 1 else ''}.", "success")
    return redirect(url_for("auth.profile"))
