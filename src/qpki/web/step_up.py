"""The web side of step-up: a decorator that sends a stale session to ``/auth/reauth``, or
accepts the password (and code) posted inline by the same form. The rule — what "fresh"
means, what must be proved — lives in :class:`qpki.auth.services.step_up.StepUpService`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import flash, redirect, request, url_for
from flask_login import current_user, login_required

from qpki.web.client import client
from qpki.web.security import is_safe_next
from qpki.web.services import services
from qpki.web.session_auth import current_session_row, session_token

F = TypeVar("F", bound=Callable[..., Any])
ReturnTo = Callable[..., str]


def _back_path(return_to: ReturnTo | None, kwargs: dict[str, Any]) -> str:
    """Where to come back after re-authenticating: the page that hosts the form."""
    if request.method == "GET":
        return request.full_path.rstrip("?")
    if return_to is not None:
        return return_to(**kwargs)
    referrer = urlsplit(request.referrer or "")
    path = referrer.path + (f"?{referrer.query}" if referrer.query else "")
    return path if referrer.path and is_safe_next(path) else url_for("auth.profile")


def step_up_required(
    return_to: ReturnTo | None = None, *, inline: bool = True
) -> Callable[[F], F]:
    """Require a recent re-authentication for this view (checklist §12.4).

    With ``inline``, a form that already asks for the password (and ``code``) re-
    authenticates in place; when the session also needs a code the form did not carry, the
    user is sent to the reauth page and comes back. Without it (forms whose ``password``
    field means something else, like a new user's password) only the reauth page counts.
    """

    def decorator(view: F) -> F:
        @wraps(view)
        @login_required
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            step_up = services().step_up
            token = session_token() or ""
            back = _back_path(return_to, kwargs)
            if inline and request.method == "POST" and request.form.get("password"):
                outcome = step_up.reauthenticate(
                    token,
                    request.form.get("password", ""),
                    request.form.get("code") or None,
                    client=client(),
                )
                if outcome.reason == "code_missing" and "code" not in request.form:
                    return redirect(url_for("auth.reauth", next=back))
                if not outcome.success:
                    flash(outcome.message, "error")
                    return redirect(back)
            elif not step_up.is_fresh(current_session_row()):
                return redirect(url_for("auth.reauth", next=back))
            response = view(*args, **kwargs)
            step_up.consume(token)
            return response

        return wrapped  # type: ignore[return-value]

    return decorator


def admin_action(return_to: ReturnTo) -> Callable[[F], F]:
    """An administrator's action on another account: the admin needs 2FA, then step-up."""

    def decorator(view: F) -> F:
        guarded = step_up_required(return_to, inline=False)(view)

        @wraps(view)
        @login_required
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            denied = services().step_up.admin_may_act(current_user)
            if denied is not None:
                flash(denied, "error")
                return redirect(return_to(**kwargs))
            return guarded(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorator
