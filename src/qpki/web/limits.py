"""Per-client-address rate limits (Flask-Limiter), in memory or shared through Redis.

If Redis is configured but unreachable, Flask-Limiter falls back to in-memory counting and we
log a warning: the per-account throttle in the database still applies, so the fallback never
leaves the second factor unthrottled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

# Generous enough for an office behind one NAT address at 9 a.m.; the per-account throttle
# (in the database) is what protects each account.
LOGIN_LIMIT = "60 per minute;1000 per hour"
VERIFY_LIMIT = "60 per minute;1000 per hour"
SETUP_LIMIT = "20 per minute"
REGENERATE_LIMIT = "10 per minute"

limiter = Limiter(key_func=get_remote_address, default_limits=[], headers_enabled=True)


def _switched_off() -> bool:
    """QPKI_RATE_LIMITS=0, read from the app serving the request (not the last one built)."""
    return not current_app.config["QPKI_RATE_LIMITS"]


def per_address(limit: str, methods: list[str] | None = None) -> Callable[[Any], Any]:
    """A per-client-address limit on a view, honouring this app's QPKI_RATE_LIMITS."""
    return limiter.limit(limit, methods=methods, exempt_when=_switched_off)
