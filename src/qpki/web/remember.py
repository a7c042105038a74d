"""The remembered-device cookie: its own cookie, apart from the session and device cookies.

HttpOnly (no script reads it), Secure and ``__Host-`` under HTTPS, SameSite=Strict (it is only
needed by the sign-in form, a same-site POST), and it lives as long as the device may be
remembered. The value is opaque here; the service checks and rotates it.
"""

from __future__ import annotations

from flask import current_app, request
from werkzeug.wrappers import Response

from qpki.auth.services.remembered_devices import MAX_COOKIE_LENGTH

MAX_AGE_SECONDS = 366 * 24 * 3600  # the service enforces the policy's days; this only bounds


def remember_cookie_name() -> str:
    secure = current_app.config["SESSION_COOKIE_SECURE"]
    return "__Host-qpki_remember" if secure else "qpki_remember"


def remember_cookie() -> str | None:
    """The value this browser presents, if any (over-long values are ignored)."""
    value = request.cookies.get(remember_cookie_name())
    return value if value and len(value) <= MAX_COOKIE_LENGTH else None


def set_remember_cookie(response: Response, value: str | None, *, forget: bool = False) -> Response:
    """Store a new (or rotated) value; with ``forget`` drop a dead one from the browser."""
    secure = bool(current_app.config["SESSION_COOKIE_SECURE"])
    if value:
        response.set_cookie(
            remember_cookie_name(),
            value,
            max_age=MAX_AGE_SECONDS,
            path="/",
            secure=secure,
            httponly=True,
            samesite="Strict",
        )
    elif forget:
        response.delete_cookie(
            remember_cookie_name(), path="/", secure=secure, httponly=True, samesite="Strict"
        )
    return response
