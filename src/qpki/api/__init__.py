"""The JSON API for other services (``/api/v1``), its service keys and ``/metrics``.

:func:`install_api` wires it into an app built by ``create_app``: the key service (keyed
hashes under the app's secret keys), the blueprints (CSRF-exempt: no cookie authenticates
here), request metrics, and problem-details error answers for every ``/api/`` path — also for
the errors raised before any view is found (404, 405) or outside the views (413, a 429 of
the limiter, a database that went away). The views, and spectree and pydantic with them, are
imported by the first request that reaches one (:mod:`qpki.api.lazy`), not while the app is
built, so gunicorn workers do not all carry them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from qpki.api.auth import API_KEYS_EXTENSION, api_keys_of
from qpki.api.problems import from_http_exception, problem_response
from qpki.auth.services.api_keys import ApiKeyService, hash_key_from_secret
from qpki.db.manager import DatabaseUnavailable
from qpki.web.services import services_of

log = logging.getLogger(__name__)

__all__ = ["api_keys_of", "install_api"]

Handler = Callable[[Any], Any]


def _is_api_request() -> bool:
    return request.path.startswith("/api/") or request.path == "/metrics"


def _api_or_page(app: Flask, exc_class: type[Exception], api: Handler) -> None:
    """Answer ``exc_class`` with ``api`` on API paths and with the app's page handler else."""
    page: Handler | None = app.error_handler_spec[None][None].get(exc_class)

    def handler(exc: Any) -> Any:
        if _is_api_request() or page is None:
            return api(exc)
        return page(exc)

    app.register_error_handler(exc_class, handler)


def _unexpected(exc: BaseException) -> Response:
    log.exception("unhandled error in the JSON API", exc_info=exc)
    return problem_response("internal")


def _database_down(exc: BaseException) -> Response:
    log.error("database unavailable: %s", exc.__class__.__name__)
    return problem_response("unavailable", headers={"Retry-After": "5"})


def install_api(app: Flask) -> None:
    """Add the JSON API, its key service, ``/metrics`` and API error answers to ``app``.

    Call after the app's own error handlers are installed and before the first request.
    """
    from qpki.api.metrics import bp as metrics_bp
    from qpki.api.metrics import count_request
    from qpki.api.routes import bp as api_bp

    settings = app.settings  # type: ignore[attr-defined]
    secrets_newest_first = [settings.secret_key, *reversed(settings.secret_key_fallbacks)]
    svc = services_of(app)
    app.extensions[API_KEYS_EXTENSION] = ApiKeyService(
        svc.db, svc.audit, svc.clock, [hash_key_from_secret(k) for k in secrets_newest_first]
    )
    app.register_blueprint(api_bp)
    app.register_blueprint(metrics_bp)
    csrf = app.extensions.get("csrf")
    if csrf is not None:
        csrf.exempt(api_bp)
    app.after_request(count_request)
    _api_or_page(app, HTTPException, from_http_exception)
    _api_or_page(app, DatabaseUnavailable, _database_down)
    _api_or_page(app, Exception, _unexpected)
