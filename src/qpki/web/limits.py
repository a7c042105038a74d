"""Per-client-address rate limits (Flask-Limiter), in memory or shared through Redis.

If Redis is configured but unreachable, Flask-Limiter falls back to in-memory counting and we
log a warning: the per-account throttle in the database still applies, so the fallback never
leaves the second factor unthrottled.
"""

from __future__ import annotations

from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

LOGIN_LIMIT = "30 per minute;300 per hour"
VERIFY_LIMIT = "30 per minute;300 per hour"
SETUP_LIMIT = "20 per minute"
REGENERATE_LIMIT = "10 per minute"

limiter = Limiter(key_func=get_remote_address, default_limits=[], headers_enabled=True)
