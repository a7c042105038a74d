"""What the pages tell a person whose two-factor authentication is off, and why.

After an administrator's emergency reset the person did not turn 2FA off themself; the pages
say who did and when, and what to do ("Set it up again"), instead of the spec's terse
"MFA not enabled" (which stays the message of the seed API and the service layer).
"""

from __future__ import annotations

import json
import math
from datetime import datetime

from flask import Flask

from qpki.audit.events import AuditEvent
from qpki.audit.models import AuditEventRecord
from qpki.auth import errors
from qpki.auth.models import User
from qpki.auth.services.audit_trail import AuditFilters
from qpki.web.services import services
from qpki.web.session_auth import audit_trail

MFA_OFF = "Two-factor authentication is off for your account."


def admin_reset_at(user: User) -> datetime | None:
    """When an administrator last turned the user's 2FA off, if 2FA has stayed off since
    (no enrolment after it); else ``None``."""
    if user.two_factor_enabled:
        return None
    trail = audit_trail()

    def latest(event: AuditEvent) -> AuditEventRecord | None:
        # The name filter matches the user as actor too (an administrator who reset others);
        # only events about the user count. Such actions need the actor's own 2FA on, so they
        # are older than a reset of the actor's own, and a short page finds it.
        page = trail.page(AuditFilters(event=event.value, username=user.username), limit=20)
        return next((e for e in page.events if e.target_user_id == user.id), None)

    reset = latest(AuditEvent.MFA_ADMIN_DISABLED)
    if reset is None:
        return None
    enabled = latest(AuditEvent.MFA_ENABLED)  # ids order events, even within one second
    return reset.occurred_at if enabled is None or enabled.id < reset.id else None


def admin_reset_message(at: datetime) -> str:
    return (
        "An administrator turned off two-factor authentication for your account on "
        f"{at.day} {at:%B %Y}. Set it up again."
    )


def mfa_off_message(user: User) -> str:
    """The sentence for a page where the user's 2FA is off (in place of "MFA not enabled")."""
    at = admin_reset_at(user)
    return admin_reset_message(at) if at is not None else MFA_OFF


def audit_details(text: str | None) -> list[tuple[str, str]]:
    """An audit record's details (stored as a JSON object) as readable pairs: "reason" →
    "Lost phone", nested values as compact JSON. Text that is not a JSON object is shown as it
    is, under "details"."""
    if not text or text == "{}":
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return [("details", text)]
    if not isinstance(data, dict):
        return [("details", text)]
    pairs = []
    for key, value in data.items():
        if isinstance(value, bool):
            shown = "yes" if value else "no"
        elif isinstance(value, str | int | float):
            shown = str(value)
        elif value is None:
            shown = "—"
        else:
            shown = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
        pairs.append((str(key).replace("_", " "), shown))
    # The reason (an administrator's words) first; the rest as stored (sorted by key).
    return sorted(pairs, key=lambda pair: pair[0] != "reason")


def minutes_until(at: datetime) -> int:
    """Whole minutes left until ``at`` (rounded up; 0 once it has passed), by the app's clock:
    "expires in 15 minutes" reads right in any time zone, a UTC clock time does not."""
    seconds = (at - services().clock()).total_seconds()
    return max(0, math.ceil(seconds / 60))


# Refusals of a submitted code (shown next to the code field; anything else, such as a wrong
# password, goes next to the password field).
CODE_ERRORS = frozenset({errors.INVALID_CODE, errors.CODE_JUST_USED, errors.BACKUP_CODE_USED})


def install_notices(app: Flask) -> None:
    """Template globals (so imported macros see them too): ``admin_reset_at(user)``,
    ``admin_reset_message(at)`` and ``mfa_off_message(user)`` (the queries run only when a
    page calls them), ``audit_details(text)``, ``minutes_until(at)``, ``current_time()`` (the
    app's clock) and ``CODE_ERRORS``."""
    app.jinja_env.globals.update(
        admin_reset_at=admin_reset_at,
        admin_reset_message=admin_reset_message,
        mfa_off_message=mfa_off_message,
        audit_details=audit_details,
        minutes_until=minutes_until,
        current_time=lambda: services().clock(),
        CODE_ERRORS=CODE_ERRORS,
    )
