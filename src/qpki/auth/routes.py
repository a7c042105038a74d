"""/auth pages: parse the form, call AuthManager, render. No rules live here."""

from __future__ import annotations

import base64
from datetime import datetime

from flask import (
    Blueprint,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from qpki.auth.errors import (
    AccountLocked,
    AccountThrottled,
    AuthError,
    InvalidCredentials,
    MFAError,
    SecretUnavailable,
)
from qpki.auth.forms import (
    ChangePasswordForm,
    DisableMFAForm,
    LoginForm,
    PostForm,
    RegenerateForm,
    SetupConfirmForm,
    VerifyForm,
)
from qpki.db.base import utcnow
from qpki.web.limits import LOGIN_LIMIT, REGENERATE_LIMIT, SETUP_LIMIT, VERIFY_LIMIT, per_address
from qpki.web.security import is_safe_next
from qpki.web.session_auth import (
    NEXT_KEY,
    auth_manager,
    current_session_row,
    mfa_verified_at,
    pending_session_row,
    session_token,
    start_session,
)

bp = Blueprint("auth", __name__, url_prefix="/auth")

Page = str | Response | tuple[str, int] | tuple[str, int, dict[str, str]]


def _client() -> dict[str, str]:
    return {"ip": request.remote_addr or "", "user_agent": request.user_agent.string or ""}


def _retry_headers(retry_at: datetime | None) -> dict[str, str]:
    if retry_at is None:
        return {}
    return {"Retry-After": str(max(1, int((retry_at - utcnow()).total_seconds() + 0.999)))}


def _after_login() -> Response:
    target = session.pop(NEXT_KEY, None)
    return redirect(target if is_safe_next(target) else url_for("main.index"))


# -- login, second factor, logout ------------------------------------------------------------------
@bp.route("/login", methods=["GET", "POST"])
@per_address(LOGIN_LIMIT, methods=["POST"])
def login() -> Page:
    if current_user.is_authenticated and request.method == "GET":
        return redirect(url_for("main.index"))
    form = LoginForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
    if not form.validate_on_submit():
        status = 400 if request.method == "POST" else 200
        return render_template("auth/login.html", form=form), status
    next_url = form.next.data if is_safe_next(form.next.data) else None
    try:
        result = auth_manager().login(form.username.data, form.password.data, **_client())
    except AccountThrottled as exc:
        flash(exc.message, "error")
        return render_template("auth/login.html", form=form), 429, _retry_headers(exc.retry_at)
    except (AccountLocked, InvalidCredentials) as exc:
        flash(exc.message, "error")
        return render_template("auth/login.html", form=form), 200
    start_session(result.token, next_url)
    if result.mfa_required:
        return redirect(url_for("auth.mfa_verify"))
    return _after_login()


@bp.route("/mfa/verify", methods=["GET", "POST"])
@per_address(VERIFY_LIMIT, methods=["POST"])
def mfa_verify() -> Page:
    _ = current_user.is_authenticated  # resolve the session (fills the pending row)
    if current_user.is_authenticated:
        return redirect(url_for("main.index"))
    token = session_token()
    if pending_session_row() is None or token is None:
        flash("Please sign in first.", "info")
        return redirect(url_for("auth.login"))
    form = VerifyForm()
    if not form.validate_on_submit():
        form.code.data = ""
        return render_template("auth/mfa_verify.html", form=form), (
            400 if request.method == "POST" else 200
        )
    result = auth_manager().complete_mfa_login(token, form.code.data, **_client())
    if not result.success:
        form.code.data = ""  # never echo a submitted code back into the page
        flash(result.message, "error")
        status = 429 if result.retry_at else 403 if result.locked else 200
        return (
            render_template("auth/mfa_verify.html", form=form),
            status,
            _retry_headers(result.retry_at),
        )
    next_url = session.get(NEXT_KEY)
    start_session(result.token or "", next_url)
    if result.backup_codes_remaining is not None:
        flash(result.message, "warning" if result.backup_codes_remaining <= 3 else "info")
        if result.backup_codes_remaining <= 3:
            return redirect(url_for("auth.backup_codes"))
    return _after_login()


@bp.post("/logout")
def logout() -> Response:
    form = PostForm()
    if not form.validate_on_submit():
        return redirect(url_for("auth.login"))
    token = session_token()
    if token:
        auth_manager().logout(token)
    session.clear()
    flash("You have been signed out.", "info")
    return redirect(url_for("auth.login"))


# -- account page ----------------------------------------------------------------------------------
@bp.get("/profile")
@login_required
def profile() -> Page:
    manager = auth_manager()
    codes_info, codes_error = None, None
    if current_user.two_factor_enabled:
        try:
            codes_info = manager.get_backup_codes_info(current_user.id)
        except SecretUnavailable as exc:
            codes_error = exc.message
    row = current_session_row()
    return render_template(
        "auth/profile.html",
        user=current_user,
        codes_info=codes_info,
        codes_error=codes_error,
        sessions=manager.list_sessions(current_user.id),
        current_session_id=row.id if row else None,
        events=manager.recent_security_events(current_user.id),
        disable_form=DisableMFAForm(),
        post_form=PostForm(),
        needs_code=_needs_code(),
    )


def _needs_code() -> bool:
    """Whether the step-up forms on this page must ask for a code (the service decides)."""
    return auth_manager().step_up_needs_code(current_user, mfa_verified_at())


@bp.route("/change-password", methods=["GET", "POST"])
@login_required
def change_password() -> Page:
    form = ChangePasswordForm()
    if form.validate_on_submit():
        try:
            auth_manager().change_password(
                current_user.id,
                form.current_password.data,
                form.new_password.data,
                keep_session_token=session_token(),
            )
        except AuthError as exc:
            flash(exc.message, "error")
        else:
            flash("Your password has been changed. Other sessions were signed out.", "success")
            return redirect(url_for("auth.profile"))
    status = 400 if request.method == "POST" else 200
    return render_template("auth/change_password.html", form=form), status


@bp.post("/sessions/<int:session_id>/end")
@login_required
def end_session(session_id: int) -> Response:
    if PostForm().validate_on_submit():
        if auth_manager().end_session(current_user.id, session_id):
            flash("That session has been signed out.", "success")
        else:
            flash("That session was not found or has already ended.", "error")
    return redirect(url_for("auth.profile"))


@bp.post("/sessions/end-others")
@login_required
def end_other_sessions() -> Response:
    if PostForm().validate_on_submit():
        ended = auth_manager().end_other_sessions(current_user.id, session_token() or "")
        flash(f"Signed out {ended} other session{'s' if ended != 1 else ''}.", "success")
    return redirect(url_for("auth.profile"))


# -- enrolment -------------------------------------------------------------------------------------
def _setup_page(form: SetupConfirmForm, setup: object, status: int = 200) -> Page:
    form.code.data = ""  # never echo a submitted code back into the page
    qr = base64.b64encode(setup.qr_png).decode()  # type: ignore[attr-defined]
    return render_template("auth/mfa_setup.html", form=form, setup=setup, qr_data=qr), status


@bp.route("/mfa/setup", methods=["GET", "POST"])
@login_required
@per_address(SETUP_LIMIT, methods=["POST"])
def mfa_setup() -> Page:
    manager = auth_manager()
    if current_user.two_factor_enabled:
        flash(
            "Two-factor authentication is already on. To move it to a new device, disable it "
            "and enable it again.",
            "info",
        )
        return redirect(url_for("auth.profile"))
    form = SetupConfirmForm()
    if request.method == "GET":
        return _setup_page(form, manager.start_mfa_setup(current_user.id))
    if not form.validate_on_submit():
        pending = manager.get_pending_setup(current_user.id)
        if pending is None:
            return render_template("auth/mfa_setup_expired.html"), 400
        return _setup_page(form, pending, 400)
    try:
        codes = manager.confirm_mfa_setup(current_user.id, form.code.data)
    except (AccountThrottled, AccountLocked) as exc:
        flash(exc.message, "error")
        pending = manager.get_pending_setup(current_user.id)
        if pending is None:
            return render_template("auth/mfa_setup_expired.html"), 429
        page, _ = _setup_page(form, pending)  # type: ignore[misc]
        return page, 429, _retry_headers(getattr(exc, "retry_at", None))
    except MFAError as exc:
        pending = manager.get_pending_setup(current_user.id)
        if pending is None:
            return render_template("auth/mfa_setup_expired.html", message=exc.message), 400
        flash(exc.message, "error")
        return _setup_page(form, pending, 400)
    flash("Two-factor authentication is now enabled.", "success")
    return _codes_page(codes, first_time=True)


def _codes_page(codes: list[str], *, first_time: bool) -> Response:
    text = "\n".join(
        [f"{current_user.username} — qPKI backup codes", "Each code works once.", "", *codes, ""]
    )
    response = make_response(
        render_template(
            "auth/backup_codes_new.html", codes=codes, first_time=first_time, download_text=text
        )
    )
    response.headers["Cache-Control"] = "no-store"
    return response


# -- backup codes and disabling --------------------------------------------------------------------
@bp.get("/mfa/backup-codes")
@login_required
def backup_codes() -> Page:
    if not current_user.two_factor_enabled:
        flash("MFA not enabled", "info")
        return redirect(url_for("auth.profile"))
    try:
        info = auth_manager().get_backup_codes_info(current_user.id)
    except SecretUnavailable as exc:
        return render_template(
            "auth/backup_codes.html",
            info=None,
            error=exc.message,
            form=RegenerateForm(),
            needs_code=_needs_code(),
        ), 500
    return render_template(
        "auth/backup_codes.html",
        info=info,
        error=None,
        form=RegenerateForm(),
        needs_code=_needs_code(),
    )


@bp.post("/mfa/backup-codes/regenerate")
@login_required
@per_address(REGENERATE_LIMIT)
def regenerate_backup_codes() -> Page:
    form = RegenerateForm()
    if form.validate_on_submit():
        try:
            codes = auth_manager().regenerate_backup_codes(
                current_user.id,
                form.password.data,
                form.code.data or None,
                mfa_verified_at=mfa_verified_at(),
                keep_session_token=session_token(),
            )
        except AuthError as exc:
            flash(exc.message, "error")
        else:
            flash("New backup codes generated. The old codes no longer work.", "success")
            return _codes_page(codes, first_time=False)
    else:
        flash("Enter your password to regenerate backup codes.", "error")
    return redirect(url_for("auth.backup_codes"))


@bp.post("/mfa/disable")
@login_required
def mfa_disable() -> Response:
    form = DisableMFAForm()
    if form.validate_on_submit():
        try:
            auth_manager().disable_mfa(
                current_user.id,
                form.password.data,
                form.code.data or None,
                mfa_verified_at=mfa_verified_at(),
                keep_session_token=session_token(),
            )
        except AuthError as exc:
            flash(exc.message, "error")
        else:
            flash(
                "Two-factor authentication has been disabled. We recommend turning it back on.",
                "warning",
            )
    else:
        flash("Enter your password to disable two-factor authentication.", "error")
    return redirect(url_for("auth.profile"))
