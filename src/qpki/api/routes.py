"""``/api/v1``: the blueprint and its URL rules; the views are in :mod:`qpki.api.views`.

The rules are registered when the app is built (Flask allows no new rule once it has served
a request), each with a :class:`qpki.api.lazy.LazyView` that imports :mod:`qpki.api.views` —
and with it spectree, pydantic and the schemas — on the first request that reaches one of
them, so gunicorn workers do not carry them from start-up (see :mod:`qpki.api.lazy`).
Everything before a view runs (the problem-details error answers of ``/api/``, 404 and 405,
``/metrics``, the health checks) needs none of them.
"""

from __future__ import annotations

from flask import Blueprint

from qpki.api.lazy import LazyView

bp = Blueprint("api", __name__, url_prefix="/api/v1")

VIEWS_MODULE = "qpki.api.views"

# (rule, method, view function in VIEWS_MODULE — also the endpoint, as with @bp.get)
RULES: tuple[tuple[str, str, str], ...] = (
    ("/verify", "POST", "verify"),
    ("/users", "GET", "list_users"),
    ("/users/<int(min=1):user_id>", "GET", "get_user"),
    ("/users", "POST", "create_user"),
    ("/users/<int(min=1):user_id>/role", "POST", "set_role"),
    ("/users/<int(min=1):user_id>/deactivate", "POST", "deactivate"),
    ("/users/<int(min=1):user_id>/reactivate", "POST", "reactivate"),
    ("/users/<int(min=1):user_id>/unlock", "POST", "unlock"),
    ("/users/<int(min=1):user_id>/mfa/reset", "POST", "reset_mfa"),
    ("/audit/events", "GET", "audit_events"),
    ("/audit/chain", "GET", "audit_chain"),
    ("/openapi.json", "GET", "openapi_json"),
    ("/docs", "GET", "reference"),
)

for _rule, _method, _name in RULES:
    bp.add_url_rule(_rule, _name, LazyView(f"{VIEWS_MODULE}.{_name}"), methods=[_method])
