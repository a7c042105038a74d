"""Who is calling: ``Authorization: Bearer <service key>``, its scopes, its rate limit, and the
shape of the body — checked in that order before any operation runs.

Cookies play no part: the API reads no session and sets none, so it needs no CSRF token (the
blueprint is exempt) and sends no CORS headers, so browsers on other sites cannot read it.
A missing, malformed, wrong, revoked or expired key is one answer — 401 with no detail — so a
caller learns nothing about which keys exist. A valid key without the operation's scope gets
403 and the scope's name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import current_app, g, request

from qpki.api.problems import abort_problem
from qpki.auth.services.api_keys import ApiKeyService, ApiPrincipal
from qpki.web.limits import limiter

F = TypeVar("F", bound=Callable[..., Any])

# Per service key, over every operation, in the shared limit storage (Redis when configured,
# else the machine's counter file). Generous for a busy service; each account's second
# factor is protected by the per-account throttle besides.
API_KEY_LIMIT = "600 per minute"
API_KEYS_EXTENSION = "qpki_api_keys"
WWW_AUTHENTICATE = 'Bearer realm="qpki-api"'


def api_keys_of(app: Any) -> ApiKeyService:
    """The app's service-key service (registered by :func:`qpki.api.install_api`)."""
    found = app.extensions.get(API_KEYS_EXTENSION)
    if not isinstance(found, ApiKeyService):
        raise RuntimeError("the JSON API is not installed on this app (use create_app)")
    return found


def current_principal() -> ApiPrincipal:
    """The service key of this request (set by :func:`operation`)."""
    principal: ApiPrincipal = g.api_principal
    return principal


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def authenticate(scope: str) -> ApiPrincipal:
    """The request's key with ``scope``; otherwise the 401 or 403 problem is raised."""
    principal = api_keys_of(current_app).authenticate(_bearer_token())
    if principal is None:
        raise abort_problem("unauthorized", headers={"WWW-Authenticate": WWW_AUTHENTICATE})
    if scope not in principal.scopes:
        raise abort_problem(
            "missing-scope", f"This operation needs the scope '{scope}'.", extra={"scope": scope}
        )
    g.api_principal = principal
    return principal


def _limit_key() -> str:
    principal = g.get("api_principal")
    return f"api-key:{principal.name}" if principal is not None else "api-key:-"


def _limits_off() -> bool:
    return not current_app.config["QPKI_RATE_LIMITS"]


def _check_body(expects_json: bool) -> None:
    """Content type and JSON syntax, before the schema: 415 and 400 with their own types."""
    has_body = bool(request.content_length) or "Transfer-Encoding" in request.headers
    if not expects_json and not has_body:
        return
    if request.mimetype != "application/json":
        raise abort_problem(
            "unsupported-media-type",
            "Send the body as application/json."
            if expects_json
            else "This operation takes no body; send none, or {} as application/json.",
        )
    raw = request.get_data(cache=True)
    try:
        parsed = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        raise abort_problem("bad-json", "The body could not be parsed as JSON.") from None
    if parsed is None and not expects_json:
        return
    if not isinstance(parsed, dict):
        raise abort_problem("invalid-request", "The body must be a JSON object.")
    if not expects_json and parsed:
        raise abort_problem("invalid-request", "This operation takes no fields.")


def operation(scope: str, *, body: bool = False) -> Callable[[F], F]:
    """Guard an API view: key and scope, then the per-key limit, then the body's form.

    Put it above spectree's ``validate`` so the schema is checked only for callers who may
    call at all (no schema hints for strangers).
    """
    limit = limiter.shared_limit(
        API_KEY_LIMIT, scope="api-key", key_func=_limit_key, exempt_when=_limits_off
    )

    def decorator(view: F) -> F:
        @wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            _check_body(body)
            return view(*args, **kwargs)

        limited = limit(checked)

        @wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            authenticate(scope)
            return limited(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorator
