"""Error pages that never show a stack trace or exception text."""

from __future__ import annotations

import logging

from flask import Flask, current_app, g, render_template
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from qpki.db.manager import DatabaseUnavailable

log = logging.getLogger(__name__)

MESSAGES = {
    400: ("Bad request", "The request could not be understood. Please go back and try again."),
    403: ("Access denied", "You do not have permission to open this page."),
    404: ("Page not found", "There is no page at this address."),
    405: ("Method not allowed", "This page cannot be used that way."),
    413: ("Request too large", "The request was larger than this server accepts."),
    414: ("Address too long", "The address of this request is longer than this server accepts."),
    416: ("Range not satisfiable", "The requested part of the file does not exist."),
    429: ("Too many requests", "Too many attempts from your address. Please wait and try again."),
    500: ("Something went wrong", "An unexpected error happened. It has been logged."),
    503: ("Service unavailable", "The service is temporarily unavailable. Please try again soon."),
}


# For a status without its own entry: werkzeug's reason phrase and a neutral sentence. The
# exception's description is never shown (some carry parser or library text).
GENERIC_MESSAGE = "The request could not be completed."
# Headers of an HTTPException that describe the error and must survive the error page
# (405 Allow, 416 Content-Range, 401 WWW-Authenticate, Retry-After); its Content-Type does not.
_PAGE_OWN_HEADERS = {"content-type"}

Page = tuple[str, int, list[tuple[str, str]]]


def _page(
    code: int, detail: str | None = None, headers: list[tuple[str, str]] | None = None
) -> Page:
    if code >= 500:
        # Rendering asks Flask-Login for the user; when the database is what failed, that
        # would fail again inside this handler. Render the page as anonymous instead.
        g._login_user = current_app.login_manager.anonymous_user()  # type: ignore[attr-defined]
    title, message = MESSAGES.get(code) or (
        HTTP_STATUS_CODES.get(code, "Error"),
        GENERIC_MESSAGE if code < 500 else MESSAGES[500][1],
    )
    return (
        render_template("errors/error.html", code=code, title=title, message=detail or message),
        code,
        headers or [],
    )


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(CSRFError)
    def _csrf(_exc: CSRFError) -> Page:
        return _page(
            400,
            "This form has expired or was not sent from this site. "
            "Go back, reload the page and try again.",
        )

    @app.errorhandler(DatabaseUnavailable)
    def _db_down(exc: DatabaseUnavailable) -> Page:
        log.error("database unavailable: %s", exc.__class__.__name__)
        return _page(503)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Page:
        """Keep the real status of every HTTP error (a 416 from a static file stays 416)."""
        code = exc.code or 500
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() not in _PAGE_OWN_HEADERS]
        return _page(code, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Page:
        log.exception("unhandled error", exc_info=exc)
        return _page(500)
