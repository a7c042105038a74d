"""/auth self-service by mail: forgot password, the reset link, changing the email address."""

from __future__ import annotations

from flask import (
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

from qpki.auth.blueprint import Page, bp, needs_code
from qpki.auth.errors import (
    AuthError,
)
from qpki.auth.forms import ReauthForm
from qpki.auth.mail_forms import (
    ChangeEmailForm,
    ConfirmForm,
    ForgotPasswordForm,
    ResetPasswordForm,
)
from qpki.auth.services.password_reset import LinkRejected
from qpki.mail.setup import mail_components
from qpki.web.client import client
from qpki.web.limits import per_address
from qpki.web.step_up import step_up_required

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
        needs_code=needs_code(),
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
            needs_code=needs_code(),
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
            needs_code=needs_code(),
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
