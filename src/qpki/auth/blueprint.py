"""The /auth blueprint and what its route modules share (headers, step-up hints)."""

from __future__ import annotations

from datetime import datetime

from flask import (
    Blueprint,
)
from flask_login import current_user
from werkzeug.wrappers import Response

from qpki.web.services import services
from qpki.web.session_auth import (
    current_session_row,
)

bp = Blueprint("auth", __name__, url_prefix="/auth")

Page = str | Response | tuple[str, int] | tuple[str, int, dict[str, str]]


def retry_headers(retry_at: datetime | None) -> dict[str, str]:
    if retry_at is None:
        return {}
    wait = (retry_at - services().clock()).total_seconds()
    return {"Retry-After": str(max(1, int(wait + 0.999)))}


def needs_code() -> bool:
    """Whether the step-up forms on this page must ask for a code (the service decides)."""
    return services().step_up.needs_code(current_user, current_session_row())
