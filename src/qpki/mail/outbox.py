"""The outbox sender: claim due mails atomically, send them, retry with back-off, give up.

Claiming is one conditional UPDATE per row ("set status to sending, with my claim token and a
lease, where it is still pending and due, or its lease ran out"). The database lets exactly one
transaction win it, on SQLite (writers serialise) and PostgreSQL (the UPDATE re-checks its WHERE
after taking the row lock), so any number of threads, worker processes and machines can drain
one outbox and each mail is sent once. A sender that dies after claiming leaves a lease that
expires; the mail is then sent by someone else. The one window left is a crash after the relay
accepted the mail and before it was marked sent: that mail is sent again (at least once, never
lost), which is the right way round for a security alert.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from jinja2 import TemplateError
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from qpki.clock import Clock
from qpki.db.manager import DatabaseManager
from qpki.mail.alerts import kind_from_name
from qpki.mail.models import MailStatus, OutboxMessage
from qpki.mail.render import MailRenderer
from qpki.mail.transport import DeliveryError, Transport, build_message

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8  # 30 s, 1, 2, 4, 8, 16, 32 min between tries: about an hour in all
BASE_DELAY = timedelta(seconds=30)
MAX_DELAY = timedelta(hours=1)
LEASE = timedelta(minutes=5)  # far longer than one SMTP conversation (30 s timeout)
SENT_RETENTION = timedelta(days=30)


def retry_delay(attempts: int) -> timedelta:
    """How long to wait after the ``attempts``-th failed try (doubling, capped)."""
    exponent = min(max(0, attempts - 1), 16)  # 2**16 * 30 s is far past the cap already
    return min(BASE_DELAY * 2**exponent, MAX_DELAY)


@dataclass(frozen=True)
class DeliveryReport:
    """What one pass over the outbox did."""

    sent: int = 0
    retrying: int = 0
    failed: int = 0
    lost_races: int = 0  # rows another sender claimed first


@dataclass(frozen=True)
class OutboxStatus:
    pending: int
    sending: int
    failed: int
    sent: int
    next_attempt_at: datetime | None
    last_error: str  # the newest error of a mail not sent yet


@dataclass(frozen=True)
class _Claim:
    id: int
    kind: str
    recipient: str
    context: str
    attempts: int
    token: str


class OutboxSender:
    """Delivers what the Notifier queued."""

    def __init__(
        self,
        db: DatabaseManager,
        transport: Transport,
        renderer: MailRenderer,
        clock: Clock,
        *,
        sender: str,
        max_attempts: int = MAX_ATTEMPTS,
        lease: timedelta = LEASE,
    ) -> None:
        self.db = db
        self.transport = transport
        self.renderer = renderer
        self.clock = clock
        self.sender = sender
        self.max_attempts = max_attempts
        self.lease = lease

    @staticmethod
    def _claimable(now: datetime) -> ColumnElement[bool]:
        pending_due = (OutboxMessage.status == MailStatus.PENDING.value) & (
            OutboxMessage.next_attempt_at <= now
        )
        lease_over = (OutboxMessage.status == MailStatus.SENDING.value) & (
            OutboxMessage.lease_until < now
        )
        return or_(pending_due, lease_over)

    def deliver_due(self, limit: int = 100) -> DeliveryReport:
        """Send every mail due now (up to ``limit``); safe to run anywhere concurrently."""
        now = self.clock()
        with self.db.transaction(write=False) as s:
            ids = list(
                s.scalars(
                    select(OutboxMessage.id)
                    .where(self._claimable(now))
                    .order_by(OutboxMessage.id)
                    .limit(limit)
                )
            )
        sent = retrying = failed = lost = 0
        for outbox_id in ids:
            claim = self._claim(outbox_id)
            if claim is None:
                lost += 1
                continue
            outcome = self._deliver(claim)
            if outcome is MailStatus.SENT:
                sent += 1
            elif outcome is MailStatus.FAILED:
                failed += 1
            else:
                retrying += 1
        return DeliveryReport(sent, retrying, failed, lost)

    def _claim(self, outbox_id: int) -> _Claim | None:
        now = self.clock()
        token = secrets.token_hex(16)
        with self.db.transaction() as s:
            result = s.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == outbox_id, self._claimable(now))
                .values(
                    status=MailStatus.SENDING.value,
                    claim_token=token,
                    lease_until=now + self.lease,
                    attempts=OutboxMessage.attempts + 1,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            row = s.execute(
                select(
                    OutboxMessage.kind,
                    OutboxMessage.recipient,
                    OutboxMessage.context,
                    OutboxMessage.attempts,
                ).where(OutboxMessage.id == outbox_id)
            ).one()
        return _Claim(outbox_id, row.kind, row.recipient, row.context, row.attempts, token)

    def _deliver(self, claim: _Claim) -> MailStatus:
        try:
            kind = kind_from_name(claim.kind)
            mail = self.renderer.render(kind, json.loads(claim.context))
        except (TemplateError, LookupError, ValueError, TypeError) as exc:
            # A template bug or a corrupt row: retrying cannot help, so give up loudly.
            log.exception("mail %d (%s) cannot be rendered", claim.id, claim.kind)
            return self._finish(claim, MailStatus.FAILED, f"render error: {type(exc).__name__}")
        message = build_message(
            mail, sender=self.sender, recipient=claim.recipient, at=self.clock(), outbox_id=claim.id
        )
        try:
            self.transport.send(message)
        except DeliveryError as exc:
            reason = str(exc)
            if claim.attempts >= self.max_attempts:
                log.error(
                    "mail %d to %s failed %d times, giving up: %s",
                    claim.id,
                    claim.recipient,
                    claim.attempts,
                    reason,
                )
                return self._finish(claim, MailStatus.FAILED, reason)
            delay = retry_delay(claim.attempts)
            log.warning(
                "mail %d to %s not sent (try %d of %d), retrying in %s: %s",
                claim.id,
                claim.recipient,
                claim.attempts,
                self.max_attempts,
                delay,
                reason,
            )
            return self._finish(claim, MailStatus.PENDING, reason, retry_in=delay)
        log.info("mail %d (%s) sent to %s", claim.id, claim.kind, claim.recipient)
        return self._finish(claim, MailStatus.SENT, "")

    def _finish(
        self,
        claim: _Claim,
        status: MailStatus,
        error: str,
        *,
        retry_in: timedelta | None = None,
    ) -> MailStatus:
        """Record the outcome, but only while the claim is still ours (lease not taken over)."""
        now = self.clock()
        values: dict[str, object] = {
            "status": status.value,
            "claim_token": None,
            "lease_until": None,
            "last_error": error[:500],
        }
        if status is MailStatus.SENT:
            values.update(sent_at=now, context="{}")  # the link must not outlive delivery
        if retry_in is not None:
            values["next_attempt_at"] = now + retry_in
        with self.db.transaction() as s:
            s.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == claim.id, OutboxMessage.claim_token == claim.token)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        return status

    # -- operations (qpki mail status / retry, cleanup) ------------------------------------
    def status(self) -> OutboxStatus:
        with self.db.transaction(write=False) as s:
            grouped = s.execute(
                select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status)
            )
            counts: dict[str, int] = {str(status): int(n) for status, n in grouped}
            next_at = s.scalar(
                select(func.min(OutboxMessage.next_attempt_at)).where(
                    OutboxMessage.status == MailStatus.PENDING.value
                )
            )
            error = s.scalar(
                select(OutboxMessage.last_error)
                .where(
                    OutboxMessage.status.in_([MailStatus.FAILED.value, MailStatus.PENDING.value]),
                    OutboxMessage.last_error != "",
                )
                .order_by(OutboxMessage.id.desc())
                .limit(1)
            )
        return OutboxStatus(
            pending=counts.get(MailStatus.PENDING.value, 0),
            sending=counts.get(MailStatus.SENDING.value, 0),
            failed=counts.get(MailStatus.FAILED.value, 0),
            sent=counts.get(MailStatus.SENT.value, 0),
            next_attempt_at=next_at,
            last_error=error or "",
        )

    def next_due_at(self) -> datetime | None:
        """When the next pending (or leased) mail becomes claimable, None if there is none."""
        with self.db.transaction(write=False) as s:
            pending = s.scalar(
                select(func.min(OutboxMessage.next_attempt_at)).where(
                    OutboxMessage.status == MailStatus.PENDING.value
                )
            )
            leased = s.scalar(
                select(func.min(OutboxMessage.lease_until)).where(
                    OutboxMessage.status == MailStatus.SENDING.value
                )
            )
        candidates = [t for t in (pending, leased) if t is not None]
        return min(candidates) if candidates else None

    def make_all_due(self, *, include_failed: bool = True) -> int:
        """`qpki mail retry`: every pending mail is due now; failed ones get a fresh count."""
        now = self.clock()
        with self.db.transaction() as s:
            moved = s.execute(
                update(OutboxMessage)
                .where(OutboxMessage.status == MailStatus.PENDING.value)
                .values(next_attempt_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if include_failed:
                moved += s.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.status == MailStatus.FAILED.value)
                    .values(status=MailStatus.PENDING.value, attempts=0, next_attempt_at=now)
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
        return int(moved or 0)

    def purge_sent(self, older_than: timedelta = SENT_RETENTION) -> int:
        """Delete sent mails older than ``older_than`` (their content is already emptied)."""
        cutoff = self.clock() - older_than
        with self.db.transaction() as s:
            result = s.execute(
                delete(OutboxMessage).where(
                    OutboxMessage.status == MailStatus.SENT.value, OutboxMessage.sent_at < cutoff
                )
            )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
