"""Error pages that never show a stack trace or exception text."""

from __future__ import annotations

import logging

from flask import Flask, current_app, g, render_template
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from qpki.db.manager import DatabaseUnavailable

log = logging.getLogger(__name__)

MESSAGES = {
    400: ("Bad request", "The request could not be understood. Please go back and try again."),
    403: ("Access denied", "You do not have permission to open this page."),
    404: ("Page not found", "There is no page at this address."),
    405: ("Method not allowed", "This page cannot be used that way."),
    413: ("Request too large", "The request was larger than this server accepts."),
    429: ("Too many requests", "Too many attempts from your address. Please wait and try again."),
    500: ("Something went wrong", "An unexpected error happened. It has been logged."),
    503: ("Service unavailable", "The service is temporarily unavailable. Please try again soon."),
}


def _page(code: int, detail: str | None = None) -> tuple[str, int]:
    if code >= 500:
        # Rendering asks Flask-Login for the user; when the database is what failed, that
        # would fail again inside this handler. Render the page as anonymous instead.
        g._login_user = current_app.login_manager.anonymous_user()  # type: ignore[attr-defined]
    title, message = MESSAGES.get(code, MESSAGES[500])
    return render_template(
        "errors/error.html", code=code, title=title, message=detail or message
    ), code


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(CSRFError)
    def _csrf(_exc: CSRFError) -> tuple[str, int]:
        return _page(
            400,
            "This form has expired or was not sent from this site. "
            "Go back, reload the page and try again.",
        )

    @app.errorhandler(DatabaseUnavailable)
    def _db_down(exc: DatabaseUnavailable) -> tuple[str, int]:
        log.error("database unavailable: %s", exc.__class__.__name__)
        return _page(503)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[str, int]:
        code = exc.code or 500
        return _page(code if code in MESSAGES else 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[str, int]:
        log.exception("unhandled error", exc_info=exc)
        return _page(500)
