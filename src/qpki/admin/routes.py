"""/admin pages: users, emergency 2FA reset, audit trail. Admins only, checked on every route."""

from __future__ import annotations

from flask import (
    Blueprint,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask_login import current_user
from werkzeug.wrappers import Response

from qpki.admin.forms import ActionForm, CreateUserForm, ResetMFAForm, RoleForm
from qpki.admin.policy_forms import PolicyForm
from qpki.api.auth import api_keys_of
from qpki.api.forms import CreateApiKeyForm
from qpki.audit.events import AuditEvent
from qpki.auth.errors import AuthError, ValidationFailed
from qpki.auth.policy import ComplianceState
from qpki.auth.services.audit_trail import (
    AuditFilters,
    AuditTrailPage,
    InvalidAuditFilter,
    parse_before,
)
from qpki.auth.services.policy import ROLES
from qpki.mail.setup import mail_components
from qpki.web.authz import role_required
from qpki.web.client import client
from qpki.web.services import services
from qpki.web.session_auth import audit_trail, auth_manager
from qpki.web.step_up import admin_action

bp = Blueprint("admin", __name__, url_prefix="/admin")
admin_only = role_required("admin")
PAGE_SIZE = 50

Page = str | Response | tuple[str, int]


@bp.get("/users")
@admin_only
def users() -> Page:
    mfa_filter = request.args.get("mfa", "")
    mfa = {"enabled": True, "disabled": False}.get(mfa_filter)
    search = request.args.get("q", "")[:64]
    after = request.args.get("after", "")[:64] or None
    compliance = request.args.get("compliance", "")
    state = _compliance_state(compliance)
    where = services().policy.state_clause(state) if state is not None else None
    rows = auth_manager().list_users(
        mfa=mfa, search=search, after=after, limit=PAGE_SIZE + 1, where=where
    )
    next_after = rows[PAGE_SIZE - 1].user.username_key if len(rows) > PAGE_SIZE else None
    return render_template(
        "admin/users.html",
        keys=services().webauthn.keys_of_users([r.user.id for r in rows[:PAGE_SIZE]]),
        rows=rows[:PAGE_SIZE],
        mfa_filter=mfa_filter,
        compliance_filter=compliance if state is not None else "",
        compliance_states=COMPLIANCE_LABELS,
        search=search,
        next_after=next_after,
        paged=after is not None,
    )


@bp.route("/users/new", methods=["GET", "POST"])
@admin_only
@admin_action(lambda: url_for("admin.users"))
def create_user() -> Page:
    form = CreateUserForm()
    if form.validate_on_submit():
        manager = auth_manager()
        temporary = None
        password = form.password.data
        if not password:
            temporary = manager.generate_temporary_password()
            password = temporary
        try:
            user = manager.create_user(
                form.username.data,
                password,
                form.email.data or "",
                form.role.data,
                actor=current_user,
                must_change_password=temporary is not None,
            )
        except ValidationFailed as exc:
            # Every mistake at once, each next to its field; the rest as one message.
            for name, message in exc.fields.items():
                getattr(form, name).errors.append(message)
            if not exc.fields:
                flash(exc.message, "error")
        except AuthError as exc:
            flash(exc.message, "error")
        else:
            return render_template("admin/user_created.html", user=user, temporary=temporary)
    status = 400 if request.method == "POST" else 200
    return render_template("admin/user_new.html", form=form), status


def _user_page_url(user_id: int) -> str:
    return url_for("admin.user_detail", user_id=user_id)


def _user_page(user_id: int, status: int = 200) -> Page:
    user = auth_manager().get_user(user_id=user_id)
    if user is None:
        return render_template(
            "errors/error.html", code=404, title="User not found", message="There is no such user."
        ), 404
    summary = next(iter(auth_manager().list_users(user_id=user.id)), None)
    role_form = RoleForm(role=user.role)
    return render_template(
        "admin/user_detail.html",
        user=user,
        summary=summary,
        role_form=role_form,
        reset_form=ResetMFAForm(),
        action_form=ActionForm(),
        events=auth_manager().recent_security_events(user.id, limit=20),
        cannot_act=services().step_up.admin_may_act(current_user),
        remembered=services().remembered_devices.list_for_user(user.id),
        keys=services().webauthn.keys_of(user.id),
        standing=services().policy.standing(user),
    ), status


@bp.get("/users/<int:user_id>")
@admin_only
def user_detail(user_id: int) -> Page:
    return _user_page(user_id)


def _run(action: str, call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except AuthError as exc:
        flash(exc.message, "error")
    else:
        flash(action, "success")


@bp.post("/users/<int:user_id>/role")
@admin_only
@admin_action(_user_page_url)
def set_role(user_id: int) -> Response:
    form = RoleForm()
    if form.validate_on_submit():
        _run(
            "Role updated.", lambda: auth_manager().set_role(current_user, user_id, form.role.data)
        )
    else:
        flash("Choose a valid role.", "error")
    return redirect(url_for("admin.user_detail", user_id=user_id))


@bp.post("/users/<int:user_id>/deactivate")
@admin_only
@admin_action(_user_page_url)
def deactivate(user_id: int) -> Response:
    if ActionForm().validate_on_submit():
        _run(
            "User deactivated; their sessions have ended.",
            lambda: auth_manager().set_active(current_user, user_id, False),
        )
    return redirect(url_for("admin.user_detail", user_id=user_id))


@bp.post("/users/<int:user_id>/reactivate")
@admin_only
@admin_action(_user_page_url)
def reactivate(user_id: int) -> Response:
    if ActionForm().validate_on_submit():
        _run("User reactivated.", lambda: auth_manager().set_active(current_user, user_id, True))
    return redirect(url_for("admin.user_detail", user_id=user_id))


@bp.post("/users/<int:user_id>/unlock")
@admin_only
@admin_action(_user_page_url)
def unlock(user_id: int) -> Response:
    if ActionForm().validate_on_submit():
        _run("Account unlocked.", lambda: auth_manager().unlock_user(current_user, user_id))
    return redirect(url_for("admin.user_detail", user_id=user_id))


@bp.post("/users/<int:user_id>/password-reset")
@admin_only
@admin_action(_user_page_url)
def reset_password(user_id: int) -> Page:
    if not ActionForm().validate_on_submit():
        return redirect(url_for("admin.user_detail", user_id=user_id))
    try:
        temporary = auth_manager().admin_reset_password(current_user, user_id)
    except AuthError as exc:
        flash(exc.message, "error")
        return redirect(url_for("admin.user_detail", user_id=user_id))
    user = auth_manager().get_user(user_id=user_id)
    return render_template("admin/password_reset.html", user=user, temporary=temporary)


@bp.post("/users/<int:user_id>/password-reset-link")
@admin_only
@admin_action(_user_page_url)
def send_reset_link(user_id: int) -> Response:
    """Mail the user a single-use reset link instead of reading out a temporary password."""
    if ActionForm().validate_on_submit():
        try:
            address = mail_components().password_reset.admin_send_reset_link(
                current_user, user_id, ip=client().ip
            )
        except AuthError as exc:
            flash(exc.message, "error")
        else:
            flash(f"A reset link was mailed to {address}; it works for 30 minutes.", "success")
    return redirect(url_for("admin.user_detail", user_id=user_id))


@bp.post("/users/<int:user_id>/mfa/disable")
@admin_only
@admin_action(_user_page_url)
def disable_mfa(user_id: int) -> Page:
    form = ResetMFAForm()
    if not form.validate_on_submit():
        flash(" ".join(e for errors in form.errors.values() for e in errors), "error")
        return _user_page(user_id, 400)
    try:
        auth_manager().admin_disable_mfa(
            current_user.id,
            user_id,
            form.reason.data,
            identity_confirmed=bool(form.confirm.data),
        )
    except AuthError as exc:
        flash(exc.message, "error")
        return _user_page(user_id, 400)
    flash("Two-factor authentication was reset. All of the user's sessions have ended.", "success")
    return redirect(url_for("admin.user_detail", user_id=user_id))


def _user_page_of_key(user_id: int, key_id: int) -> str:
    return _user_page_url(user_id)


@bp.post("/users/<int:user_id>/webauthn/<int:key_id>/remove")
@admin_only
@admin_action(_user_page_of_key)
def remove_security_key(user_id: int, key_id: int) -> Response:
    """Remove one named security key of a user (a lost key); audited and mailed."""
    if ActionForm().validate_on_submit():
        try:
            removed = services().webauthn.admin_remove(current_user, user_id, key_id)
        except AuthError as exc:
            flash(exc.message, "error")
        else:
            flash(f"Security key “{removed.name}” was removed.", "success")
            if removed.two_factor_off:
                flash("It was the user's last second factor: 2FA is now off for them.", "warning")
    return redirect(url_for("admin.user_detail", user_id=user_id))


# -- audit trail -----------------------------------------------------------------------------------
def _audit_query() -> tuple[AuditFilters, int | None]:
    """The filters and cursor of this request; InvalidAuditFilter when one is out of range."""
    return AuditFilters.parse(request.args), parse_before(request.args.get("before"))


@bp.get("/audit")
@admin_only
def audit() -> Page:
    args = {k: v for k, v in request.args.items() if k != "before"}
    events = [e.value for e in AuditEvent]
    try:
        filters, before = _audit_query()
    except InvalidAuditFilter as exc:
        flash(exc.message, "error")
        empty = AuditTrailPage(events=[], next_before_id=None, total=0)
        return render_template("admin/audit.html", page=empty, events=events, args=args), 400
    page = audit_trail().page(filters, before_id=before)
    return render_template("admin/audit.html", page=page, events=events, args=args)


@bp.get("/audit.csv")
@admin_only
def audit_csv() -> Response:
    try:
        filters, _before = _audit_query()
    except InvalidAuditFilter as exc:
        return Response(exc.message + "\n", status=400, mimetype="text/plain")
    return Response(
        stream_with_context(audit_trail().export_csv(filters)),
        mimetype="text/csv",
        headers={"Content-Disposition": "attachment; filename=qpki-audit.csv"},
    )


# -- API service keys ------------------------------------------------------------------------------
def _api_keys_url(**_kwargs: object) -> str:
    return url_for("admin.api_keys")


def _api_keys_page(form: CreateApiKeyForm | None = None, status: int = 200) -> Page:
    return render_template(
        "admin/api_keys.html",
        form=form or CreateApiKeyForm(),
        keys=api_keys_of(current_app).list_keys(),
        now=services().clock(),
    ), status


@bp.get("/api-keys")
@admin_only
def api_keys() -> Page:
    return _api_keys_page()


@bp.post("/api-keys")
@admin_only
@admin_action(_api_keys_url)
def create_api_key() -> Page:
    form = CreateApiKeyForm()
    if not form.validate_on_submit():
        flash(" ".join(e for errors in form.errors.values() for e in errors), "error")
        return _api_keys_page(form, 400)
    try:
        created = api_keys_of(current_app).create(
            form.name.data or "",
            form.scopes.data or [],
            expires_days=form.expires_days.data,
            actor=current_user,
        )
    except AuthError as exc:
        flash(exc.message, "error")
        return _api_keys_page(form, 400)
    return render_template("admin/api_key_created.html", key=created.info, secret=created.secret)


@bp.post("/api-keys/<name>/revoke")
@admin_only
@admin_action(_api_keys_url)
def revoke_api_key(name: str) -> Response:
    if ActionForm().validate_on_submit():
        _run(
            f"API key {name!r} revoked.",
            lambda: api_keys_of(current_app).revoke(name, actor=current_user),
        )
    return redirect(url_for("admin.api_keys"))


# -- role policies and compliance ------------------------------------------------------------------
COMPLIANCE_LABELS: dict[str, str] = {
    ComplianceState.COMPLIANT.value: "Compliant",
    ComplianceState.IN_GRACE.value: "In grace",
    ComplianceState.WAITING.value: "Grace not started",
    ComplianceState.OVERDUE.value: "Overdue",
    ComplianceState.NOT_REQUIRED.value: "Not required",
}


def _compliance_state(value: str) -> ComplianceState | None:
    try:
        return ComplianceState(value) if value else None
    except ValueError:
        return None


def _policy_url(**_kwargs: object) -> str:
    return url_for("admin.policy")


def _policy_forms(failed: tuple[str, PolicyForm] | None = None) -> dict[str, PolicyForm]:
    """One form per role, filled from its policy; a form that failed keeps what was typed."""
    forms: dict[str, PolicyForm] = {}
    for p in services().policy.policies():
        if failed is not None and failed[0] == p.role:
            forms[p.role] = failed[1]
            continue
        forms[p.role] = PolicyForm(
            prefix=p.role,
            formdata=None,
            require_2fa=p.require_2fa,
            grace_hours=p.grace_hours,
            require_phishing_resistant=p.require_phishing_resistant,
            new_device_2fa=p.new_device_2fa,
            remember_days=p.remember_days,
        )
    return forms


def _policy_page(failed: tuple[str, PolicyForm] | None = None, status: int = 200) -> Page:
    svc = services()
    return render_template(
        "admin/policy.html",
        forms=_policy_forms(failed),
        policies={p.role: p for p in svc.policy.policies()},
        compliance=svc.policy.compliance(),
        labels=COMPLIANCE_LABELS,
        cannot_act=svc.step_up.admin_may_act(current_user),
    ), status


@bp.get("/policy")
@admin_only
def policy() -> Page:
    return _policy_page()


@bp.post("/policy/<role>")
@admin_only
@admin_action(_policy_url)
def set_policy(role: str) -> Page:
    if role not in ROLES:
        flash("There is no such role.", "error")
        return redirect(url_for("admin.policy"))
    form = PolicyForm(prefix=role)
    if not form.validate_on_submit():
        flash(" ".join(e for errors in form.errors.values() for e in errors), "error")
        return _policy_page((role, form), 400)
    try:
        services().policy.set_policy(
            role,
            actor=current_user,
            require_2fa=bool(form.require_2fa.data),
            grace_hours=form.grace_hours.data,
            require_phishing_resistant=bool(form.require_phishing_resistant.data),
            new_device_2fa=bool(form.new_device_2fa.data),
            remember_days=form.remember_days.data,
        )
    except AuthError as exc:
        flash(exc.message, "error")
        return _policy_page((role, form), 400)
    flash(f"The {role} policy was saved.", "success")
    return redirect(url_for("admin.policy"))


@bp.get("/policy/compliance.csv")
@admin_only
def compliance_csv() -> Response:
    return Response(
        stream_with_context(services().policy.compliance_csv()),
        mimetype="text/csv",
        headers={"Content-Disposition": "attachment; filename=qpki-compliance.csv"},
    )


@bp.post("/users/<int:user_id>/remembered-devices/forget")
@admin_only
@admin_action(_user_page_url)
def forget_remembered_devices(user_id: int) -> Response:
    """Revoke every remembered device of a user (or one, with ``device_id``)."""
    if ActionForm().validate_on_submit():
        device = request.form.get("device_id", "")
        device_id = int(device) if device.isdigit() and len(device) < 19 else None
        _run(
            "Remembered devices revoked; the user will be asked for a code again.",
            lambda: services().remembered_devices.forget(current_user, user_id, device_id),
        )
    return redirect(url_for("admin.user_detail", user_id=user_id))
