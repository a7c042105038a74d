"""Who is logged in: resolve the session token in Flask's signed cookie against the database.

The cookie carries only ``sid``, a random token (and Flask-WTF's CSRF token). Flask-Login's
``login_user`` is not used, so no user id is ever written into the cookie; instead the
request loader resolves ``sid`` on every request. A pending (password-only) session yields no
user: protected pages then send the browser to the verify page.
"""

from __future__ import annotations

from flask import Flask, current_app, flash, g, redirect, request, session, url_for
from flask_login import LoginManager
from werkzeug.wrappers import Response

from qpki.auth.auth_manager import AuthManager
from qpki.auth.models import User, UserSession
from qpki.auth.services.audit_trail import AuditTrailService

SESSION_KEY = "sid"
NEXT_KEY = "next"


def auth_manager() -> AuthManager:
    return current_app.auth_manager  # type: ignore[attr-defined]


def audit_trail() -> AuditTrailService:
    """The audit trail use cases over this app's database and AuditLog.

    Built per call (it holds no state) until the services are registered in app.extensions.
    """
    manager = auth_manager()
    return AuditTrailService(manager.db, manager.audit, manager.services.clock)


def current_session_row() -> UserSession | None:
    """The live, fully authenticated session row of this request, if any."""
    return g.get("session_row")


def pending_session_row() -> UserSession | None:
    """The password-only session of this request, if the second factor is still due."""
    return g.get("pending_row")


def session_token() -> str | None:
    token = session.get(SESSION_KEY)
    return token if isinstance(token, str) else None


def start_session(token: str, next_url: str | None = None) -> None:
    """Replace the whole cookie session: a new id at every change of authentication level."""
    session.clear()
    session[SESSION_KEY] = token
    if next_url:
        session[NEXT_KEY] = next_url


def install_login_manager(app: Flask) -> LoginManager:
    manager = LoginManager()
    manager.session_protection = None  # the server-side session record does this job
    manager.login_view = "auth.login"

    @manager.request_loader
    def _load(_request: object) -> User | None:
        token = session_token()
        if not token:
            return None
        resolved = auth_manager().resolve_session(token)
        if resolved is None:
            session.pop(SESSION_KEY, None)
            g.session_expired = True
            return None
        user, row = resolved
        if row.mfa_passed:
            g.session_row = row
            return user
        g.pending_row = row
        return None

    @manager.unauthorized_handler
    def _unauthorized() -> Response:
        from flask_login import current_user  # resolves the loader first

        _ = current_user.is_authenticated
        if pending_session_row() is not None:
            return redirect(url_for("auth.mfa_verify"))
        if g.get("session_expired"):
            flash("Your session has ended. Please sign in again.", "info")
        target = request.full_path if request.method == "GET" else None
        if target and target.endswith("?"):
            target = target[:-1]
        return redirect(url_for("auth.login", next=target) if target else url_for("auth.login"))

    manager.init_app(app)
    return manager
