"""Audit trail use cases: the admin audit page, the CSV export, chain verification.

Routes and the CLI call these and open no transaction themselves. Every filter value from a
request is bounded here (:meth:`AuditFilters.parse`), so an absurd id or date is refused with a
message instead of overflowing a date or a database integer (an HTTP 500 before).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog, VerifyResult
from qpki.audit.models import AuditEventRecord
from qpki.auth.errors import ValidationFailed
from qpki.auth.models import User
from qpki.auth.throttle import account_key
from qpki.clock import Clock
from qpki.db.manager import DatabaseManager

PAGE_SIZE = 50
EXPORT_BATCH = 1000
# Dates outside this range are refused: no event can carry them, and the day after the last
# representable date does not exist (``until=9999-12-31`` overflowed).
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(2999, 12, 31)
MAX_EVENT_ID = 2**63 - 1  # the largest id a BIGINT column holds
CSV_HEADER = (
    "id",
    "time_utc",
    "event",
    "outcome",
    "actor",
    "target",
    "ip",
    "user_agent",
    "details",
    "hash",
)


class InvalidAuditFilter(ValidationFailed):
    """A filter value out of range or malformed; ``message`` says which and what is allowed."""


def _day(raw: str, name: str) -> date:
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise InvalidAuditFilter(
            f"The {name} date {raw[:20]!r} is not a date: use YYYY-MM-DD."
        ) from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise InvalidAuditFilter(
            f"The {name} date must be between {FIRST_DAY.isoformat()} and {LAST_DAY.isoformat()}."
        )
    return day


@dataclass(frozen=True)
class AuditFilters:
    """What the admin asked for. ``until`` is inclusive (the whole day)."""

    event: str | None = None
    username: str | None = None
    outcome: str | None = None
    since: date | None = None
    until: date | None = None

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> AuditFilters:
        """From query-string values; unknown event or outcome names mean "all" (as the
        select boxes offer no other), malformed or out-of-range dates are refused."""
        event = args.get("event", "")
        outcome = args.get("outcome", "")
        username = args.get("user", "").strip()[:64]
        since = _day(args["since"], "from") if args.get("since") else None
        until = _day(args["until"], "to") if args.get("until") else None
        return cls(
            event=event if event in {e.value for e in AuditEvent} else None,
            username=username or None,
            outcome=outcome if outcome in {o.value for o in Outcome} else None,
            since=since,
            until=until,
        )


def parse_before(raw: str | None) -> int | None:
    """The keyset cursor: an event id, or None for the newest page."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 19 or not 1 <= int(raw) <= MAX_EVENT_ID:
        raise InvalidAuditFilter("'before' must be an event id (a whole number from 1 up).")
    return int(raw)


# The most matching events a page counts: a count walks every match, and a filter matching
# most of a million events made the page 2-19 times slower than on a small database (B5);
# beyond it the page says "500+" (ten pages' worth).
COUNT_CAP = 500


@dataclass(frozen=True)
class AuditTrailPage:
    """One page, newest first; ``total`` counts the events matching the filters, up to
    :data:`COUNT_CAP` (``total_capped``: there are more)."""

    events: list[AuditEventRecord]
    next_before_id: int | None
    total: int
    total_capped: bool = False


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


class AuditTrailService:
    """Read side of the audit trail, over the database, the audit log and a clock."""

    def __init__(self, db: DatabaseManager, audit: AuditLog, clock: Clock) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock

    def _where(self, s: Session, f: AuditFilters) -> list[ColumnElement[bool]]:
        """SQL conditions for ``f``; a user name that does not exist matches nothing."""
        conds: list[ColumnElement[bool]] = []
        if f.event:
            conds.append(AuditEventRecord.event == f.event)
        if f.outcome:
            conds.append(AuditEventRecord.outcome == f.outcome)
        if f.username:
            user_id = s.scalar(select(User.id).where(User.username_key == account_key(f.username)))
            uid = -1 if user_id is None else user_id
            conds.append(
                or_(AuditEventRecord.target_user_id == uid, AuditEventRecord.actor_id == uid)
            )
        if f.since:
            conds.append(AuditEventRecord.occurred_at >= _midnight(f.since))
        if f.until:
            conds.append(AuditEventRecord.occurred_at < _midnight(f.until) + timedelta(days=1))
        return conds

    def page(
        self, filters: AuditFilters, before_id: int | None = None, limit: int = PAGE_SIZE
    ) -> AuditTrailPage:
        """The admin audit page: events matching ``filters`` older than ``before_id``."""
        limit = max(1, min(limit, EXPORT_BATCH))
        with self.db.transaction(write=False) as s:
            conds = self._where(s, filters)
            stmt = select(AuditEventRecord).where(*conds)
            if before_id is not None:
                stmt = stmt.where(AuditEventRecord.id < before_id)
            rows = list(s.scalars(stmt.order_by(AuditEventRecord.id.desc()).limit(limit + 1)))
            if before_id is None and len(rows) <= limit:
                total = len(rows)  # the first page holds every match: nothing more to count
            else:
                matches = (
                    select(AuditEventRecord.id).where(*conds).limit(COUNT_CAP + 1).subquery()
                )
                total = int(s.scalar(select(func.count()).select_from(matches)) or 0)
        next_before = rows[limit - 1].id if len(rows) > limit else None
        capped = total > COUNT_CAP
        return AuditTrailPage(rows[:limit], next_before, min(total, COUNT_CAP), capped)

    def export_csv(self, filters: AuditFilters) -> Iterator[str]:
        """CSV lines (header first), newest event first, produced as they are read.

        Each batch is read in its own short transaction, so a slow download holds no database
        connection while the client reads, and memory stays at one batch however long the
        trail. Keyset paging by id means events added meanwhile cannot shift later batches.
        """
        yield _csv_line(CSV_HEADER)
        before: int | None = None
        while True:
            with self.db.transaction(write=False) as s:
                stmt = select(AuditEventRecord).where(*self._where(s, filters))
                if before is not None:
                    stmt = stmt.where(AuditEventRecord.id < before)
                batch = list(
                    s.scalars(stmt.order_by(AuditEventRecord.id.desc()).limit(EXPORT_BATCH))
                )
            for e in batch:
                yield _csv_line(
                    (
                        str(e.id),
                        e.occurred_at.isoformat(),
                        e.event,
                        e.outcome,
                        _csv_safe(e.actor_name),
                        _csv_safe(e.target_name),
                        e.ip,
                        _csv_safe(e.user_agent),
                        _csv_safe(e.details),
                        e.hash,
                    )
                )
            if len(batch) < EXPORT_BATCH:
                return
            before = batch[-1].id

    def verify(self) -> VerifyResult:
        """Walk the chain and compare it with the head (``qpki audit verify``)."""
        with self.db.transaction(write=False) as s:
            return self.audit.verify(s)


def _csv_line(cells: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue()


def _csv_safe(value: str) -> str:
    """Neutralise spreadsheet formulas in user-controlled cells (CSV injection)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
