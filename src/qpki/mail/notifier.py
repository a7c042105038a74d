"""Notifier: put a mail in the outbox inside the caller's transaction.

The mail row commits with the change it reports, or not at all: no mail about a password
change that was rolled back, and no change without its mail. Nothing here talks to a mail
server, so a server that is down never fails or slows the action (the outbox sender delivers
after the commit). The Notifier also owns the rules about what may be mailed: no code, secret
or token except the link of a link mail, and at most one "wrong second factor" mail per account
per 15 minutes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from qpki.audit.context import current_context
from qpki.auth.models import User
from qpki.clock import Clock
from qpki.mail.alerts import ALERT_WINDOWS, Alert, LinkMail, MailKind
from qpki.mail.models import MailStatus, OutboxMessage

log = logging.getLogger(__name__)

# Keys a mail's context may never hold, whatever the caller passes (checklist §12.8).
FORBIDDEN_CONTEXT_KEYS = frozenset(
    {
        "password",
        "new_password",
        "code",
        "secret",
        "totp_secret",
        "backup_code",
        "backup_codes",
        "token",
        "key",
        "reason",  # an admin's reason for a 2FA reset is for the audit trail, not the user
    }
)
# Variables some templates use; absent ones are None (templates test them with ``if``).
OPTIONAL_CONTEXT = ("admin_name", "device_name", "remaining", "new_email", "link")
_WAKE_FLAG = "qpki_mail_wake_registered"


class Notifier:
    """Queues mails; ``wake`` is called after a commit that queued one (the sender's cue)."""

    def __init__(self, clock: Clock, *, wake: Callable[[], None] | None = None) -> None:
        self.clock = clock
        self.wake = wake

    # -- the generic entry point ------------------------------------------------------------
    def queue(
        self,
        session: Session,
        user_or_address: User | str,
        kind: MailKind,
        *,
        at: datetime | None = None,
        about: User | None = None,
        **context: Any,
    ) -> OutboxMessage | None:
        """Add one mail of ``kind`` to the outbox in ``session``'s transaction.

        ``user_or_address`` is the account (its address, name and id are used) or a bare
        address; ``about`` names the account a mail to a bare address concerns. Returns the
        row, or None when there is no address to send to (logged).
        """
        leaked = FORBIDDEN_CONTEXT_KEYS.intersection(k.lower() for k in context)
        if leaked:
            raise ValueError(f"a mail must not carry secrets: {sorted(leaked)}")
        if "link" in context and not isinstance(kind, LinkMail):
            raise ValueError(f"only link mails may carry a link, not {kind.value}")
        moment = at or self.clock()
        if isinstance(user_or_address, User):
            user: User | None = user_or_address
            recipient = user_or_address.email
        else:
            user, recipient = about, user_or_address
        context.setdefault("username", user.username if user is not None else recipient)
        for name in OPTIONAL_CONTEXT:
            context.setdefault(name, None)
        recipient = (recipient or "").strip()
        if not recipient:
            log.info(
                "no mail address for %s; %s not mailed",
                user.username if user else "an unnamed recipient",
                kind.value,
            )
            return None
        ctx = current_context()
        context.setdefault("ip", ctx.ip)
        context.setdefault("user_agent", ctx.user_agent)
        context["at"] = moment.isoformat()
        row = OutboxMessage(
            created_at=moment,
            kind=kind.value,
            user_id=user.id if user is not None else None,
            recipient=recipient[:254],
            context=json.dumps(context, sort_keys=True, default=str),
            status=MailStatus.PENDING.value,
            attempts=0,
            next_attempt_at=moment,
            last_error="",
        )
        session.add(row)
        session.flush()
        self._wake_after_commit(session)
        return row

    # -- the typed API the account services call --------------------------------------------
    def security_alert(
        self,
        session: Session,
        user: User,
        alert: Alert,
        *,
        at: datetime | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
        admin_name: str | None = None,
        device_name: str | None = None,
        remaining: int | None = None,
        new_email: str | None = None,
        to_address: str | None = None,
    ) -> OutboxMessage | None:
        """Queue security alert ``alert`` about ``user``'s account, in the caller's transaction.

        ``ip``/``user_agent`` default to the request being served; ``admin_name`` names the
        administrator who acted (never their reason); ``to_address`` overrides the account's
        address (EMAIL_CHANGED goes to the old one). Returns None when not queued: no address,
        or an alert of a rate-limited kind was already queued for the account in its window.
        """
        moment = at or self.clock()
        window = ALERT_WINDOWS.get(alert)
        if window is not None and self._recently_queued(session, user.id, alert, moment - window):
            log.info("%s for %s already mailed within %s", alert.value, user.username, window)
            return None
        context: dict[str, Any] = {}
        for name, value in (
            ("ip", ip),
            ("user_agent", user_agent),
            ("admin_name", admin_name),
            ("device_name", device_name),
            ("remaining", remaining),
            ("new_email", new_email),
        ):
            if value is not None:
                context[name] = value
        if alert is Alert.BACKUP_CODE_USED and remaining is None:
            raise ValueError("BACKUP_CODE_USED needs remaining=<codes left>")
        if alert is Alert.EMAIL_CHANGED and (new_email is None or to_address is None):
            raise ValueError("EMAIL_CHANGED needs new_email and to_address (the old address)")
        target: User | str = user if to_address is None else to_address
        return self.queue(session, target, alert, at=moment, about=user, **context)

    def link_mail(
        self,
        session: Session,
        user: User,
        kind: LinkMail,
        *,
        link: str,
        expires_minutes: int,
        at: datetime | None = None,
        to_address: str | None = None,
        admin_name: str | None = None,
    ) -> OutboxMessage | None:
        """Queue a mail that carries a single-use link (reset, confirm a new address)."""
        target: User | str = to_address if to_address is not None else user
        return self.queue(
            session,
            target,
            kind,
            at=at,
            about=user,
            link=link,
            expires_minutes=expires_minutes,
            admin_name=admin_name,
        )

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _recently_queued(session: Session, user_id: int, alert: Alert, since: datetime) -> bool:
        """Whether the account already has a mail of ``alert`` queued since ``since``.

        Concurrent wrong codes for one account are serialised by the account's throttle row
        (the failure is counted with an UPDATE of that row before the alert is queued), so the
        second transaction sees the first one's mail here.
        """
        found = session.scalar(
            select(OutboxMessage.id)
            .where(
                OutboxMessage.user_id == user_id,
                OutboxMessage.kind == alert.value,
                OutboxMessage.created_at > since,
            )
            .limit(1)
        )
        return found is not None

    def _wake_after_commit(self, session: Session) -> None:
        if self.wake is None or session.info.get(_WAKE_FLAG):
            return
        session.info[_WAKE_FLAG] = True
        wake = self.wake

        def _after_commit(committed: Session) -> None:
            committed.info.pop(_WAKE_FLAG, None)
            wake()

        def _after_rollback(rolled_back: Session, _transaction: object) -> None:
            rolled_back.info.pop(_WAKE_FLAG, None)

        event.listen(session, "after_commit", _after_commit, once=True)
        event.listen(session, "after_soft_rollback", _after_rollback, once=True)
