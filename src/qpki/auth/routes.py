"""/auth pages: parse the form, call AuthManager, render. No rules live here."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime
from functools import wraps

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
    SecretUnavailable,
)
from qpki.auth.forms import (
    ChangePasswordForm,
    DisableMFAForm,
    LoginForm,
    PostForm,
    ReauthForm,
    RegenerateForm,
    SetupConfirmForm,
    VerifyForm,
)
from qpki.auth.services.code_check import LOW_BACKUP_CODES
from qpki.auth.services.factors import SetupInfo
from qpki.web.client import client, set_device_cookie
from qpki.web.limits import LOGIN_LIMIT, REGENERATE_LIMIT, SETUP_LIMIT, VERIFY_LIMIT, per_address
from qpki.web.notices import mfa_off_message
from qpki.web.remember import remember_cookie, set_remember_cookie
from qpki.web.security import is_safe_next
from qpki.web.services import services
from qpki.web.session_auth import (
    NEXT_KEY,
    auth_manager,
    current_session_row,
    pending_session_row,
    session_token,
    start_session,
    take_signin_username,
)
from qpki.web.step_up import step_up_required

bp = Blueprint("auth", __name__, url_prefix="/auth")

Page = str | Response | tuple[str, int] | tuple[str, int, dict[str, str]]


def _retry_headers(retry_at: datetime | None) -> dict[str, str]:
    if retry_at is None:
        return {}
    wait = (retry_at - services().clock()).total_seconds()
    return {"Retry-After": str(max(1, int(wait + 0.999)))}


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
        form.username.data = take_signin_username() or None  # kept after a timed-out sign-in
    if not form.validate_on_submit():
        status = 400 if request.method == "POST" else 200
        return render_template("auth/login.html", form=form), status
    next_url = form.next.data if is_safe_next(form.next.data) else None
    try:
        result = services().signin.login(
            form.username.data,
            form.password.data,
            client=client(),
            replaces_token=session_token(),
            remember_cookie=remember_cookie(),
        )
    except AccountThrottled as exc:
        flash(exc.message, "error")
        return render_template("auth/login.html", form=form), 429, _retry_headers(exc.retry_at)
    except (AccountLocked, InvalidCredentials) as exc:
        flash(exc.message, "error")
        return render_template("auth/login.html", form=form), 200
    start_session(result.token, next_url)
    if result.mfa_required:
        return set_remember_cookie(
            redirect(url_for("auth.mfa_verify")), None, forget=result.forget_remember_cookie
        )
    return set_remember_cookie(
        set_device_cookie(_after_login(), result.device_token), result.remember_cookie
    )


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
    pending = pending_session_row()
    remember_days = services().policy.remember_days_for(pending.user_id) if pending else 0
    account = services().accounts.get_user(user_id=pending.user_id) if pending else None
    page = {
        "form": form,
        "remember_days": remember_days,
        "username": account.username if account else "",
        "backup_mode": request.values.get("backup") == "1",
    }
    if not form.validate_on_submit():
        form.code.data = ""
        return render_template("auth/mfa_verify.html", **page), (
            400 if request.method == "POST" else 200
        )
    result = services().signin.complete_second_step(
        token,
        form.code.data,
        client=client(),
        remember_device=bool(request.form.get("remember_device")) and remember_days > 0,
    )
    if not result.success:
        form.code.data = ""  # never echo a submitted code back into the page
        flash(result.message, "error")
        status = 429 if result.retry_at else 403 if result.locked else 200
        return (
            render_template("auth/mfa_verify.html", **page),
            status,
            _retry_headers(result.retry_at),
        )
    next_url = session.get(NEXT_KEY)
    start_session(result.token or "", next_url)
    if result.backup_codes_remaining is not None:
        low = result.backup_codes_remaining <= LOW_BACKUP_CODES
        flash(result.message, "warning" if low else "info")
        if low:
            return set_remember_cookie(
                set_device_cookie(redirect(url_for("auth.backup_codes")), result.device_token),
                result.remember_cookie,
            )
    return set_remember_cookie(
        set_device_cookie(_after_login(), result.device_token), result.remember_cookie
    )


@bp.route("/reauth", methods=["GET", "POST"])
@login_required
@per_address(VERIFY_LIMIT, methods=["POST"])
def reauth() -> Page:
    """Step-up: prove it is still you (password and a second factor), then go back."""
    form = ReauthForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
    target = form.next.data if is_safe_next(form.next.data) else url_for("auth.profile")
    status = 200
    if form.validate_on_submit():
        outcome = services().step_up.reauthenticate(
            session_token() or "",
            form.password.data,
            form.code.data or None,
            client=client(),
            always_ask_code=True,
        )
        if outcome.success:
            return redirect(target)
        flash(outcome.message, "error")
        status = 429 if outcome.retry_at else 403 if outcome.locked else 400
    elif request.method == "POST":
        status = 400
    form.code.data = ""
    return (
        render_template("auth/reauth.html", form=form, has_2fa=current_user.two_factor_enabled),
        status,
        _retry_headers(None),
    )


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
        needs_code=_needs_code(),
    )


def _needs_code() -> bool:
    """Whether the step-up forms on this page must ask for a code (the service decides)."""
    return services().step_up.needs_code(current_user, current_session_row())


def _change_password_step_up(view: Callable[[], Page]) -> Callable[[], Page]:
    """Step-up for a password change. The form's current password is the password part
    (checked and throttled by the service); a user with 2FA whose session is not fresh
    proves a second factor on the reauth page first. The forced change of a temporary
    password needs neither: the user has just proved that password."""

    @wraps(view)
    @login_required
    def wrapped() -> Page:
        if not current_user.must_change_password and _needs_code():
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
                _retry_headers(getattr(exc, "retry_at", None)),
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
    return _setup_page(form, pending, status, _retry_headers(outcome.retry_at))


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


# -- self-service by mail: forgot password, reset link, change of email address ------------------
# (imports kept with the pages they serve; the rules live in auth.services.password_reset)
from qpki.auth.mail_forms import (  # noqa: E402
    ChangeEmailForm,
    ConfirmForm,
    ForgotPasswordForm,
    ResetPasswordForm,
)
from qpki.auth.services.password_reset import LinkRejected  # noqa: E402
from qpki.mail.setup import mail_components  # noqa: E402

# Per client address, whether or not the account exists (so the limit reveals nothing); the
# per-account limit is the service's and is silent.
FORGOT_LIMIT = "5 per minute;30 per hour"


def _no_store(page: str, status: int = 200) -> Response:
    """Pages under a link with a token are never cached (said here too, not only by the
    app-wide headers, because caching one would keep the token in a shared cache)."""
    response = make_response(page, status)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/password/forgot", methods=["GET", "POST"])
@per_address(FORGOT_LIMIT, methods=["POST"])
def password_forgot() -> Page:
    form = ForgotPasswordForm()
    if not form.validate_on_submit():
        status = 400 if request.method == "POST" else 200
        return render_template("auth/password_forgot.html", form=form, answer=None), status
    answer = mail_components().password_reset.request_reset(form.login.data, ip=client().ip)
    return render_template("auth/password_forgot.html", form=None, answer=answer)


@bp.route("/password/reset/<token>", methods=["GET", "POST"])
def password_reset(token: str) -> Response:
    service = mail_components().password_reset
    form = ResetPasswordForm()
    status = 200
    if request.method == "POST":
        status = 400
        if form.validate_on_submit():
            who = client()
            try:
                service.reset_password(
                    token,
                    form.new_password.data,
                    form.confirm_password.data,
                    ip=who.ip,
                    user_agent=who.user_agent,
                )
            except LinkRejected as exc:
                page = render_template("auth/password_link_invalid.html", message=exc.message)
                return _no_store(page, 400)
            except AuthError as exc:
                flash(exc.message, "error")
            else:
                session.clear()
                flash(
                    "Your password has been changed and every session was signed out. Sign in "
                    "with the new password.",
                    "success",
                )
                return redirect(url_for("auth.login"))
    try:
        info = service.check_link(token)
    except LinkRejected as exc:
        page = render_template("auth/password_link_invalid.html", message=exc.message)
        return _no_store(page, 400)
    page = render_template("auth/password_reset.html", form=form, info=info, token=token)
    return _no_store(page, status)


@bp.get("/email")
@login_required
def change_email() -> Page:
    return render_template(
        "auth/email_change.html",
        form=ChangeEmailForm(),
        reauth_form=ReauthForm(),
        needs_code=_needs_code(),
    )


@bp.post("/email")
@step_up_required(lambda: url_for("auth.change_email"))
def change_email_submit() -> Page:
    form = ChangeEmailForm()
    if not form.validate_on_submit():
        return render_template(
            "auth/email_change.html",
            form=form,
            reauth_form=ReauthForm(),
            needs_code=_needs_code(),
        ), 400
    try:
        address = mail_components().email_change.request_change(
            current_user.id, form.new_email.data, ip=client().ip
        )
    except AuthError as exc:
        flash(exc.message, "error")
        return render_template(
            "auth/email_change.html",
            form=form,
            reauth_form=ReauthForm(),
            needs_code=_needs_code(),
        ), 400
    flash(
        f"A confirmation link was sent to {address}. Your address changes when you open it.",
        "success",
    )
    return redirect(url_for("auth.profile"))


@bp.route("/email/confirm/<token>", methods=["GET", "POST"])
def confirm_email(token: str) -> Response:
    """GET only shows the button: mail scanners open links, and must not confirm anything."""
    service = mail_components().email_change
    form = ConfirmForm()
    if request.method == "POST" and form.validate_on_submit():
        who = client()
        try:
            info = service.confirm(token, ip=who.ip, user_agent=who.user_agent)
        except LinkRejected as exc:
            page = render_template("auth/password_link_invalid.html", message=exc.message)
            return _no_store(page, 400)
        flash(f"The email address of {info.username} is now {info.new_email}.", "success")
        return redirect(url_for("auth.profile" if current_user.is_authenticated else "auth.login"))
    try:
        info = service.check_link(token)
    except LinkRejected as exc:
        page = render_template("auth/password_link_invalid.html", message=exc.message)
        return _no_store(page, 400)
    return _no_store(render_template("auth/email_confirm.html", form=form, info=info, token=token))


# -- passkeys and security keys (pages and ceremonies in their own module) ------------------------
from qpki.auth.webauthn_routes import bp as webauthn_bp  # noqa: E402

bp.register_blueprint(webauthn_bp)
