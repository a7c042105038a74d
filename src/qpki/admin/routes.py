"""/admin pages: users, emergency 2FA reset, audit trail. Admins only, checked on every route."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

from flask import Blueprint, Response, flash, redirect, render_template, request, url_for
from flask_login import current_user

from qpki.admin.forms import ActionForm, CreateUserForm, ResetMFAForm, RoleForm
from qpki.audit.events import AuditEvent
from qpki.auth.errors import AuthError
from qpki.web.authz import role_required
from qpki.web.session_auth import auth_manager

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
    rows = auth_manager().list_users(mfa=mfa, search=search, after=after, limit=PAGE_SIZE + 1)
    next_after = rows[PAGE_SIZE - 1].user.username_key if len(rows) > PAGE_SIZE else None
    return render_template(
        "admin/users.html",
        rows=rows[:PAGE_SIZE],
        mfa_filter=mfa_filter,
        search=search,
        next_after=next_after,
        paged=after is not None,
    )


@bp.route("/users/new", methods=["GET", "POST"])
@admin_only
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
        except AuthError as exc:
            flash(exc.message, "error")
        else:
            return render_template("admin/user_created.html", user=user, temporary=temporary)
    status = 400 if request.method == "POST" else 200
    return render_template("admin/user_new.html", form=form), status


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
def deactivate(user_id: int) -> Response:
    if ActionForm().validate_on_submit():
        _run(
            "User deactivated; their sessions have ended.",
            lambda: auth_manager().set_active(current_user, user_id, False),
        )
    return redirect(url_for("admin.user_detail", user_id=user_id))


@bp.post("/users/<int:user_id>/reactivate")
@admin_only
def reactivate(user_id: int) -> Response:
    if ActionForm().validate_on_submit():
        _run("User reactivated.", lambda: auth_manager().set_active(current_user, user_id, True))
    return redirect(url_for("admin.user_detail", user_id=user_id))


@bp.post("/users/<int:user_id>/unlock")
@admin_only
def unlock(user_id: int) -> Response:
    if ActionForm().validate_on_submit():
        _run("Account unlocked.", lambda: auth_manager().unlock_user(current_user, user_id))
    return redirect(url_for("admin.user_detail", user_id=user_id))


@bp.post("/users/<int:user_id>/password-reset")
@admin_only
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


@bp.post("/users/<int:user_id>/mfa/disable")
@admin_only
def disable_mfa(user_id: int) -> Page:
    form = ResetMFAForm()
    if not form.validate_on_submit():
        flash("A reason is required to reset two-factor authentication.", "error")
        return _user_page(user_id, 400)
    try:
        auth_manager().admin_disable_mfa(current_user.id, user_id, form.reason.data)
    except AuthError as exc:
        flash(exc.message, "error")
        return _user_page(user_id, 400)
    flash("Two-factor authentication was reset. All of the user's sessions have ended.", "success")
    return redirect(url_for("admin.user_detail", user_id=user_id))


# -- audit trail -----------------------------------------------------------------------------------
def _parse_day(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        return datetime.strptime(raw, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        flash(f"Ignored the date {raw[:20]!r}: use YYYY-MM-DD.", "error")
        return None


def _audit_filters() -> dict[str, object]:
    event = request.args.get("event", "")
    username = request.args.get("user", "").strip()[:64]
    user_id = None
    if username:
        user = auth_manager().get_user(username=username)
        user_id = user.id if user else -1
    until = _parse_day(request.args.get("until"))
    return {
        "events": [event] if event in {e.value for e in AuditEvent} else None,
        "user_id": user_id,
        "outcome": request.args.get("outcome") or None,
        "since": _parse_day(request.args.get("since")),
        "until": until + timedelta(days=1) if until else None,
    }


@bp.get("/audit")
@admin_only
def audit() -> Page:
    manager = auth_manager()
    before = request.args.get("before", type=int)
    with manager.db.transaction(write=False) as s:
        page = manager.audit.query(s, **_audit_filters(), before_id=before, limit=50)  # type: ignore[arg-type]
    args = {k: v for k, v in request.args.items() if k != "before"}
    return render_template(
        "admin/audit.html", page=page, events=[e.value for e in AuditEvent], args=args
    )


@bp.get("/audit.csv")
@admin_only
def audit_csv() -> Response:
    manager = auth_manager()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "id",
            "time_utc",
            "event",
            "outcome",
            "actor",
            "target",
            "ip",
            "user_agent",
            "details",
            "hash",
        ]
    )
    before = None
    with manager.db.transaction(write=False) as s:
        while True:
            page = manager.audit.query(s, **_audit_filters(), before_id=before, limit=1000)  # type: ignore[arg-type]
            for e in page.events:
                writer.writerow(
                    [
                        e.id,
                        e.occurred_at.isoformat(),
                        e.event,
                        e.outcome,
                        _csv_safe(e.actor_name),
                        _csv_safe(e.target_name),
                        e.ip,
                        _csv_safe(e.user_agent),
                        _csv_safe(e.details),
                        e.hash,
                    ]
                )
            if page.next_before_id is None:
                break
            before = page.next_before_id
    return Response(
        buffer.getvalue(),
        mimetype="text/csv",
        headers={"Content-Disposition": "attachment; filename=qpki-audit.csv"},
    )


def _csv_safe(value: str) -> str:
    """Neutralise spreadsheet formulas in user-controlled cells (CSV injection)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
