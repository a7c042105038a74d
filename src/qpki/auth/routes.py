"""/auth pages: signing in (password, second step, step-up, sign-out). Parse the form, call a
service, render; no rules live here. The other /auth pages are in account_routes,
factor_routes, mail_routes and webauthn_routes, registered on the same blueprint below."""

from __future__ import annotations

from flask import (
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from qpki.auth.blueprint import Page, bp, retry_headers
from qpki.auth.errors import (
    AccountLocked,
    AccountThrottled,
    InvalidCredentials,
)
from qpki.auth.forms import (
    LoginForm,
    PostForm,
    ReauthForm,
    VerifyForm,
)
from qpki.auth.services.code_check import LOW_BACKUP_CODES
from qpki.auth.services.signin import MFAResult
from qpki.web.client import client, set_device_cookie
from qpki.web.limits import LOGIN_LIMIT, VERIFY_LIMIT, per_address
from qpki.web.remember import remember_cookie, set_remember_cookie
from qpki.web.security import is_safe_next
from qpki.web.services import services
from qpki.web.session_auth import (
    NEXT_KEY,
    auth_manager,
    pending_session_row,
    resolve_in_full,
    second_step_unread,
    session_token,
    signin_timed_out,
    start_pending_session,
    start_session,
    take_signin_username,
)


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
        return render_template("auth/login.html", form=form), 429, retry_headers(exc.retry_at)
    except (AccountLocked, InvalidCredentials) as exc:
        flash(exc.message, "error")
        return render_template("auth/login.html", form=form), 200
    if result.mfa_required:
        start_pending_session(result.token, result.user.username, result.pending_until, next_url)
    else:
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
    token = session_token()
    unread = second_step_unread()  # a code on a cookie marked pending: claimed, not read first
    if not unread:
        if current_user.is_authenticated:
            return redirect(url_for("main.index"))
        if pending_session_row() is None or token is None:
            return _no_pending_sign_in()
    form = VerifyForm()
    status = 400 if request.method == "POST" else 200
    retry_at = None
    if form.validate_on_submit():
        # The service remembers the browser only where the role's policy allows it.
        result = services().signin.complete_second_step(
            token or "",
            form.code.data,
            client=client(),
            remember_device=bool(request.form.get("remember_device")),
        )
        if result.success:
            return _second_step_passed(result)
        if result.expired and unread:
            return _no_pending_sign_in()  # say why, as a read of the cookie would have
        flash(result.message, "error")
        status = 429 if result.retry_at else 403 if result.locked else 200
        retry_at = result.retry_at
    if unread:
        resolve_in_full()  # the page needs the pending row (the claim gave it back)
    pending = pending_session_row()
    if pending is None:
        return _no_pending_sign_in()
    form.code.data = ""  # never echo a submitted code back into the page
    # Read only to draw the page (a passed second step never needs them).
    account = services().accounts.get_user(user_id=pending.user_id)
    page = {
        "form": form,
        "remember_days": services().policy.remember_days_for(pending.user_id),
        "username": account.username if account else "",
        "backup_mode": request.values.get("backup") == "1",
    }
    return render_template("auth/mfa_verify.html", **page), status, retry_headers(retry_at)


def _no_pending_sign_in() -> Response:
    """No pending sign-in to finish: already signed in, timed out (say so), or none at all."""
    if second_step_unread():
        resolve_in_full()
    if current_user.is_authenticated:
        return redirect(url_for("main.index"))
    timed_out = signin_timed_out()
    if timed_out is not None:
        return timed_out
    flash("Please sign in first.", "info")
    return redirect(url_for("auth.login"))


def _second_step_passed(result: MFAResult) -> Response:
    """The full session replaces the pending one; low on backup codes → show them."""
    start_session(result.token or "", session.get(NEXT_KEY))
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
        retry_headers(None),
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


# The other /auth pages register themselves on ``bp`` when imported.
from qpki.auth import account_routes, factor_routes, mail_routes  # noqa: E402, F401
from qpki.auth.webauthn_routes import bp as webauthn_bp  # noqa: E402

bp.register_blueprint(webauthn_bp)
