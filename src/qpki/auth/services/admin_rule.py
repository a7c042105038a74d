"""The one rule for administrators acting on other accounts, and its audited refusal.

An administrator acts on other accounts only with a second factor of their own: one phished
admin password must not hand over every account (checklist §12.4). Every administrator use
case asks :func:`refused_as_admin` inside its own transaction, so the refusal is recorded in
the same place, the same way, and commits before the use case raises.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth import errors
from qpki.auth.models import User
from qpki.auth.services.common import actor_fields


def admin_denial(s: Session, actor: User, target_user_id: int | None) -> str | None:
    """Why ``actor`` may not act on another account, or ``None`` when they may."""
    current = s.get(User, actor.id)
    if current is None or not current.is_active or not current.is_admin:
        return "Only administrators can do this."
    if target_user_id != actor.id and not current.two_factor_enabled:
        return errors.ADMIN_NEEDS_2FA
    return None


def refused_as_admin(
    s: Session,
    audit: AuditLog,
    actor: User | None,
    target_user_id: int | None,
    action: str,
    now: datetime,
) -> str | None:
    """:func:`admin_denial`, with the refusal audited as ``access_denied`` in ``s``.

    ``actor=None`` is a non-user actor (the command line, an API key), authorised by its own
    means; it is never refused here.
    """
    if actor is None:
        return None
    denied = admin_denial(s, actor, target_user_id)
    if denied is not None:
        audit.record(
            s,
            AuditEvent.ACCESS_DENIED,
            Outcome.FAILURE,
            **actor_fields(actor),
            target_user_id=target_user_id,
            details={"action": action, "reason": denied},
            at=now,
        )
    return denied
