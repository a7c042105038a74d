"""Who is asking, as the service layer wants to know it: address, browser, device cookie.

The device cookie (see ``qpki.auth.services.devices``) is a random token of its own, apart
from the session cookie, so signing out does not make the browser a stranger again.
"""

from __future__ import annotations

from datetime import timedelta

from flask import current_app, request
from werkzeug.wrappers import Response

from qpki.auth.services.common import Client

DEVICE_COOKIE_LIFETIME = timedelta(days=365)


def device_cookie_name() -> str:
    return "__Host-qpki_device" if current_app.config["SESSION_COOKIE_SECURE"] else "qpki_device"


def client() -> Client:
    token = request.cookies.get(device_cookie_name())
    return Client(
        ip=request.remote_addr or "",
        user_agent=(request.user_agent.string or "")[:256],
        device_token=token if token and len(token) <= 128 else None,
    )


def set_device_cookie(response: Response, token: str | None) -> Response:
    """Give the browser its device token after a successful sign-in (when it is new)."""
    if token:
        response.set_cookie(
            device_cookie_name(),
            token,
            max_age=int(DEVICE_COOKIE_LIFETIME.total_seconds()),
            path="/",
            secure=bool(current_app.config["SESSION_COOKIE_SECURE"]),
            httponly=True,
            samesite="Lax",
        )
    return response
