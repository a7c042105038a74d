"""Who is logged in: resolve the session token in Flask's signed cookie against the database.

The cookie carries ``sid``, a random token (and Flask-WTF's CSRF token; while a sign-in
waits for its second factor, the name typed and when it times out). Flask-Login's
``login_user`` is not used, so no user id is ever written into the cookie; instead the
request loader resolves ``sid`` on every request — except the code's POST on a cookie marked
pending, whose own transaction claims the row (:func:`second_step_unread`). A pending
(password-only) session yields no user: protected pages then send the browser to the verify
page.
"""

from __future__ import annotations

from datetime import datetime

from flask import Flask, current_app, flash, g, redirect, request, session, url_for
from flask_login import LoginManager
from werkzeug.wrappers import Response

from qpki.auth.auth_manager import AuthManager
from qpki.auth.errors import SIGNIN_EXPIRED
from qpki.auth.models import User, UserSession
from qpki.auth.services.audit_trail import AuditTrailService
from qpki.web.services import services

SESSION_KEY = "sid"
NEXT_KEY = "next"
# While a sign-in waits for its second factor: the name typed at the password step, so that a
# sign-in that timed out can say so and keep the name in the form (never a secret; the cookie
# is signed, and start_session clears it at every change of authentication level).
PENDING_USER_KEY = "pending_user"
PENDING_UNTIL_KEY = "pending_until"  # when it times out (POSIX seconds)
# After a pending sign-in timed out: the name for the sign-in form (see take_signin_username).
SIGNIN_USERNAME_KEY = "signin_username"


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


def start_pending_session(
    token: str, username: str, until: datetime | None, next_url: str | None = None
) -> None:
    """After the password step of a 2FA account: the pending session, marked as such (the
    name for a timed-out sign-in's form, and when it times out), as resolving it would."""
    start_session(token, next_url)
    session[PENDING_USER_KEY] = username
    if until is not None:
        session[PENDING_UNTIL_KEY] = until.timestamp()


def second_step_unread() -> bool:
    """This request submits a code on a cookie the server marked pending: it is not
    resolved first. The second step's own transaction claims the pending row with one
    conditional UPDATE that makes every check a read would (live, pending, not expired,
    active account), so the read only doubled the work of the busiest POST. A request for
    which this holds is anonymous (as a pending session is) until :func:`resolve_in_full`.
    The marker is in the signed cookie, and at worst it makes a request less privileged."""
    return (
        request.endpoint == "auth.mfa_verify"
        and request.method == "POST"
        and isinstance(session.get(PENDING_USER_KEY), str)
        and not g.get("resolve_in_full")
    )


def resolve_in_full() -> None:
    """Resolve this request's cookie against the database after all (a second step that
    found no pending row to claim, or a page to draw): sets the pending row, or the user."""
    g.resolve_in_full = True
    g.pop("_login_user", None)  # Flask-Login's cached (anonymous) user of this request
    from flask_login import current_user

    _ = current_user.is_authenticated


def take_signin_username() -> str:
    """The user name to put back into the sign-in form after a timed-out sign-in, once."""
    name = session.pop(SIGNIN_USERNAME_KEY, "")
    return name if isinstance(name, str) else ""


def signin_timed_out(target: str | None = None) -> Response | None:
    """A pending sign-in of this browser ended unfinished (the 5 minutes passed): say so, keep
    the name for the form, and send the browser back to the sign-in page with its target
    (the page asked for at sign-in, else ``target``, the page asked for now).

    Only for a cookie that was pending when last seen; a full session that ended keeps the
    general "Your session has ended" message.
    """
    username = session.get(PENDING_USER_KEY)
    until = session.get(PENDING_UNTIL_KEY)
    if not isinstance(username, str) or not g.get("session_expired"):
        return None
    if not isinstance(until, int | float) or services().clock().timestamp() < until:
        return None  # ended for another reason (deactivated, signed out): the general message
    next_url = session.get(NEXT_KEY) or target
    session.clear()
    session[SIGNIN_USERNAME_KEY] = username
    flash(SIGNIN_EXPIRED, "error")
    if isinstance(next_url, str) and next_url:
        return redirect(url_for("auth.login", next=next_url))
    return redirect(url_for("auth.login"))


def install_login_manager(app: Flask) -> LoginManager:
    manager = LoginManager()
    manager.session_protection = None  # the server-side session record does this job
    manager.login_view = "auth.login"

    @manager.request_loader
    def _load(_request: object) -> User | None:
        token = session_token()
        if not token or second_step_unread():
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
        if session.get(PENDING_USER_KEY) != user.username:
            session[PENDING_USER_KEY] = user.username
            session[PENDING_UNTIL_KEY] = row.expires_at.timestamp()
        return None

    @app.before_request
    def _timed_out_signin() -> Response | None:
        """The second-factor page of a sign-in that timed out (the route itself would only say
        "Please sign in first")."""
        if request.endpoint != "auth.mfa_verify" or PENDING_USER_KEY not in session:
            return None
        if second_step_unread():
            return None  # the route finds out from its own claim (see second_step_unread)
        from flask_login import current_user

        _ = current_user.is_authenticated  # resolves the cookie (sets g.session_expired)
        return signin_timed_out()

    @manager.unauthorized_handler
    def _unauthorized() -> Response:
        from flask_login import current_user  # resolves the loader first

        _ = current_user.is_authenticated
        if pending_session_row() is not None:
            return redirect(url_for("auth.mfa_verify"))
        target = request.full_path if request.method == "GET" else None
        if target and target.endswith("?"):
            target = target[:-1]
        timed_out = signin_timed_out(target)
        if timed_out is not None:
            return timed_out
        if g.get("session_expired"):
            flash("Your session has ended. Please sign in again.", "info")
        return redirect(url_for("auth.login", next=target) if target else url_for("auth.login"))

    manager.init_app(app)
    from qpki.web.notices import install_notices  # it builds on this module

    install_notices(app)  # what pages say about the signed-in user's 2FA being off
    return manager
