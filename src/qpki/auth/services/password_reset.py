"""Self-service by mail: forgot password (a single-use reset link) and change of email address
(a confirmation link to the new address). Checklist §12.7.

A link carries a random 256-bit token; only its SHA-256 digest is stored, so a database reader
cannot use a pending link. A reset link lives 30 minutes and dies when used or when a newer one
is requested. Asking for a reset gives the same answer whether or not the account exists, and
per account at most a few links are mailed per hour (silently: a different answer would tell
which accounts exist); the per-address limit is the route's. Resetting a password ends every
session and forgets the account's known devices, but leaves two-factor authentication as it
is: the next sign-in still asks for the second factor.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.log import AuditLog
from qpki.auth.errors import AuthError, NotFound, PermissionDenied, ValidationFailed
from qpki.auth.models import KnownDevice, User
from qpki.auth.passwords import PasswordPolicyError, Passwords, check_password_policy
from qpki.auth.services import remembered_devices
from qpki.auth.services.admin_rule import refused_as_admin
from qpki.auth.sessions import SessionStore
from qpki.auth.throttle import account_key
from qpki.clock import Clock
from qpki.db.base import affected_rows
from qpki.db.manager import DatabaseManager
from qpki.mail.alerts import Alert, LinkMail
from qpki.mail.models import MailedToken, TokenPurpose
from qpki.mail.notifier import Notifier

RESET_LIFETIME = timedelta(minutes=30)
EMAIL_CHANGE_LIFETIME = timedelta(minutes=60)
LINKS_PER_ACCOUNT = 3  # reset mails per account per LINK_WINDOW; further requests are dropped
LINK_WINDOW = timedelta(hours=1)
MAX_ACCOUNTS_PER_ADDRESS = 5  # accounts sharing one email address that get a link each
MAX_TOKEN_LENGTH = 128

FORGOT_ANSWER = (
    "If an account matches what you entered and has an email address, a link to choose a new "
    "password is on its way. It works once, for 30 minutes."
)
LINK_INVALID = "This link is not valid. Check that you copied all of it, or ask for a new one."
LINK_EXPIRED = "This link has expired. Ask for a new one."
LINK_USED = "This link has already been used. Ask for a new one if you still need it."
LINK_SUPERSEDED = "A newer link was sent after this one; use the most recent mail."
PASSWORDS_DIFFER = "The two passwords differ. Type the same new password twice."
EMAIL_INVALID = "Enter a valid email address, such as name@example.org."
EMAIL_UNCHANGED = "That is already the email address of your account."

_EMAIL = re.compile(r"^[^@\s<>\"',;]+@[^@\s<>\"',;]+\.[^@\s<>\"',;]+$")


class LinkRejected(AuthError):
    """A mailed link cannot be used (unknown, tampered, expired, used or superseded)."""


@dataclass(frozen=True)
class LinkInfo:
    """What a valid link is for, to show on its page."""

    username: str
    expires_at: datetime
    new_email: str | None = None


def token_digest(token: str) -> str:
    """What is stored for a mailed token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _why_unusable(row: MailedToken | None, now: datetime) -> tuple[str, str] | None:
    """(message, audit reason) when the link cannot be used, else None."""
    if row is None:
        return LINK_INVALID, "unknown"
    if row.used_at is not None:
        return LINK_USED, "used"
    if row.voided_at is not None:
        return LINK_SUPERSEDED, "superseded"
    if now >= row.expires_at:
        return LINK_EXPIRED, "expired"
    return None


class _MailedLinks:
    """Issue, look up and consume ``mailed_tokens`` rows of one purpose (in the caller's tx)."""

    def __init__(self, purpose: TokenPurpose, lifetime: timedelta, base_url: str, path: str):
        self.purpose = purpose
        self.lifetime = lifetime
        self.base_url = base_url.rstrip("/")
        self.path = path

    def issue(
        self, s: Session, user: User, now: datetime, ip: str, new_email: str | None = None
    ) -> str:
        """A new token for ``user`` (voiding the older ones); returns the link to mail."""
        self.void(s, user.id, now)
        token = secrets.token_urlsafe(32)  # 256 bits
        s.add(
            MailedToken(
                token_hash=token_digest(token),
                purpose=self.purpose.value,
                user_id=user.id,
                new_email=new_email,
                created_at=now,
                expires_at=now + self.lifetime,
                requested_ip=ip[:64],
            )
        )
        return f"{self.base_url}{self.path}{token}"

    def void(self, s: Session, user_id: int, now: datetime) -> None:
        s.execute(
            update(MailedToken)
            .where(
                MailedToken.user_id == user_id,
                MailedToken.purpose == self.purpose.value,
                MailedToken.used_at.is_(None),
                MailedToken.voided_at.is_(None),
            )
            .values(voided_at=now)
            .execution_options(synchronize_session=False)
        )

    def find(self, s: Session, token: str) -> MailedToken | None:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        return s.scalar(
            select(MailedToken).where(
                MailedToken.token_hash == token_digest(token),
                MailedToken.purpose == self.purpose.value,
            )
        )

    def consume(self, s: Session, row: MailedToken, now: datetime) -> bool:
        """Mark used if still usable; exactly one of two concurrent uses wins."""
        result = s.execute(
            update(MailedToken)
            .where(
                MailedToken.id == row.id,
                MailedToken.used_at.is_(None),
                MailedToken.voided_at.is_(None),
                MailedToken.expires_at > now,
            )
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )
        return affected_rows(result) == 1

    def issued_since(self, s: Session, user_id: int, since: datetime) -> int:
        return int(
            s.scalar(
                select(func.count()).where(
                    MailedToken.user_id == user_id,
                    MailedToken.purpose == self.purpose.value,
                    MailedToken.created_at > since,
                )
            )
            or 0
        )


class PasswordResetService:
    """Forgot password, the reset link, and an administrator's "send a reset link"."""

    def __init__(
        self,
        db: DatabaseManager,
        audit: AuditLog,
        clock: Clock,
        passwords: Passwords,
        sessions: SessionStore,
        notifier: Notifier,
        *,
        base_url: str,
        lifetime: timedelta = RESET_LIFETIME,
    ) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.passwords = passwords
        self.sessions = sessions
        self.notifier = notifier
        self.links = _MailedLinks(
            TokenPurpose.PASSWORD_RESET, lifetime, base_url, "/auth/password/reset/"
        )

    def purge_expired_links(self, older_than: timedelta = timedelta(days=1)) -> int:
        """Delete mailed tokens (of every purpose) that expired more than ``older_than`` ago;
        for ``qpki cleanup``. Recent ones are kept so a late click still says "expired"."""
        cutoff = self.clock() - older_than
        with self.db.transaction() as s:
            result = s.execute(
                delete(MailedToken)
                .where(MailedToken.expires_at < cutoff)
                .execution_options(synchronize_session=False)
            )
        return affected_rows(result)

    # -- asking for a link -----------------------------------------------------------------
    def request_reset(self, login: str, *, ip: str = "") -> str:
        """Mail a reset link to the account named by ``login`` (username or email), if any.

        Returns :data:`FORGOT_ANSWER` in every case, so that the page cannot tell whether an
        account exists; what really happened is in the audit trail.
        """
        now = self.clock()
        typed = login.strip()[:254]
        with self.db.transaction() as s:
            accounts = self._accounts_for(s, typed) if typed else []
            if not accounts:
                self._audit_request(s, None, typed, now, "no_account")
            for user in accounts:
                self._send_link(s, user, now, ip=ip, admin=None, typed=typed)
        return FORGOT_ANSWER

    def admin_send_reset_link(
        self, admin: User | None, user_id: int, *, actor_name: str = "", ip: str = ""
    ) -> str:
        """An administrator mails the user a reset link; returns the address it went to.

        Unlike the temporary password, the administrator never learns a password, and the
        user's current password keeps working until the link is used.
        """
        now = self.clock()
        with self.db.transaction() as s:  # a refusal is audited like every admin refusal
            denied = refused_as_admin(s, self.audit, admin, user_id, "password_reset_link", now)
        if denied is not None:
            raise PermissionDenied(denied)
        with self.db.transaction() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound("User not found.")
            if not user.is_active:
                raise ValidationFailed("This account is deactivated; reactivate it first.")
            if not user.email.strip():
                raise ValidationFailed(
                    "This user has no email address. Set one, or give a temporary password."
                )
            self._send_link(s, user, now, ip=ip, admin=admin, actor_name=actor_name)
            return user.email

    def _accounts_for(self, s: Session, typed: str) -> list[User]:
        by_name = s.scalar(select(User).where(User.username_key == account_key(typed)))
        if by_name is not None:
            return [by_name]
        if "@" not in typed:
            return []
        return list(
            s.scalars(
                select(User)
                .where(func.lower(User.email) == typed.lower())
                .order_by(User.id)
                .limit(MAX_ACCOUNTS_PER_ADDRESS)
            )
        )

    def _send_link(
        self,
        s: Session,
        user: User,
        now: datetime,
        *,
        ip: str,
        admin: User | None,
        typed: str = "",
        actor_name: str = "",
    ) -> None:
        if not user.is_active:
            self._audit_request(s, user, typed, now, "inactive")
            return
        if not user.email.strip():
            self._audit_request(s, user, typed, now, "no_address")
            return
        if admin is None and not actor_name:
            recent = self.links.issued_since(s, user.id, now - LINK_WINDOW)
            if recent >= LINKS_PER_ACCOUNT:
                self._audit_request(s, user, typed, now, "throttled")
                return
        link = self.links.issue(s, user, now, ip)
        self.notifier.link_mail(
            s,
            user,
            LinkMail.PASSWORD_RESET_LINK,
            link=link,
            expires_minutes=int(self.links.lifetime.total_seconds() // 60),
            at=now,
            admin_name=admin.username if admin is not None else (actor_name or None),
        )
        by_admin = admin is not None or bool(actor_name)
        actor = (
            {"actor_id": admin.id, "actor_name": admin.username}
            if admin is not None
            else {"actor_id": None, "actor_name": actor_name}
        )
        self.audit.record(
            s,
            AuditEvent.PASSWORD_RESET_REQUESTED,
            Outcome.SUCCESS,
            **actor,
            target_user_id=user.id,
            target_name=user.username,
            details={"result": "mailed", "by_admin": by_admin},
            at=now,
        )

    def _audit_request(
        self, s: Session, user: User | None, typed: str, now: datetime, result: str
    ) -> None:
        self.audit.record(
            s,
            AuditEvent.PASSWORD_RESET_REQUESTED,
            Outcome.FAILURE,
            target_user_id=user.id if user is not None else None,
            target_name=user.username if user is not None else typed[:64],
            details={"result": result},
            at=now,
        )

    # -- using the link --------------------------------------------------------------------
    def check_link(self, token: str) -> LinkInfo:
        """What the link of ``token`` is for; LinkRejected with a plain message if unusable."""
        now = self.clock()
        with self.db.transaction(write=False) as s:
            row = self.links.find(s, token)
            problem = _why_unusable(row, now)
            if problem is not None:
                raise LinkRejected(problem[0])
            assert row is not None
            user = s.get(User, row.user_id)
            if user is None or not user.is_active:
                raise LinkRejected(LINK_INVALID)
            return LinkInfo(user.username, row.expires_at)

    def reset_password(
        self,
        token: str,
        new_password: str,
        confirm_password: str,
        *,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> str:
        """Set a new password through a reset link; returns the username.

        Bad input (an unusable link, passwords that differ or break the rules) raises with a
        message to show and changes nothing; the link stays usable after a typing mistake.
        """
        info = self._check_or_record(token)
        if new_password != confirm_password:
            raise ValidationFailed(PASSWORDS_DIFFER)
        try:
            check_password_policy(new_password, info.username)
        except PasswordPolicyError as exc:
            raise ValidationFailed(str(exc)) from None
        password_hash = self.passwords.hash(new_password)  # slow: outside the transaction
        now = self.clock()
        with self.db.transaction() as s:
            row = self.links.find(s, token)
            user = s.get(User, row.user_id) if row is not None else None
            if row is None or user is None or not self.links.consume(s, row, now):
                # Used by a concurrent request, or expired, between the check and now.
                self._audit_rejected(s, user, now, "race")
                rejected = True
            else:
                rejected = False
                self._apply_reset(s, user, password_hash, now, ip=ip, user_agent=user_agent)
        if rejected:
            raise LinkRejected(LINK_USED)
        return info.username

    def _apply_reset(
        self,
        s: Session,
        user: User,
        password_hash: str,
        now: datetime,
        *,
        ip: str | None,
        user_agent: str | None,
    ) -> None:
        user.password_hash = password_hash
        user.password_changed_at = now
        user.must_change_password = False
        self.links.void(s, user.id, now)
        ended = self.sessions.end_all(s, user.id, "password_reset", now)
        forgotten = affected_rows(
            s.execute(
                delete(KnownDevice)
                .where(KnownDevice.user_id == user.id)
                .execution_options(synchronize_session=False)
            )
        )
        self.audit.record(
            s,
            AuditEvent.PASSWORD_RESET_COMPLETED,
            Outcome.SUCCESS,
            actor_id=user.id,
            actor_name=user.username,
            target_user_id=user.id,
            target_name=user.username,
            details={
                "sessions_ended": ended,
                "devices_forgotten": int(forgotten or 0),
                "remembered_devices_forgotten": remembered_devices.forget_all(s, user.id),
            },
            at=now,
        )
        self.notifier.security_alert(
            s, user, Alert.PASSWORD_RESET, at=now, ip=ip, user_agent=user_agent
        )

    def _check_or_record(self, token: str) -> LinkInfo:
        """check_link, recording a refused link in the audit trail before raising."""
        try:
            return self.check_link(token)
        except LinkRejected:
            now = self.clock()
            with self.db.transaction() as s:
                row = self.links.find(s, token)
                user = s.get(User, row.user_id) if row is not None else None
                problem = _why_unusable(row, now)
                self._audit_rejected(s, user, now, problem[1] if problem else "inactive")
            raise

    def _audit_rejected(self, s: Session, user: User | None, now: datetime, reason: str) -> None:
        self.audit.record(
            s,
            AuditEvent.PASSWORD_RESET_REJECTED,
            Outcome.FAILURE,
            target_user_id=user.id if user is not None else None,
            target_name=user.username if user is not None else "",
            details={"reason": reason},
            at=now,
        )


class EmailChangeService:
    """Change of email address: confirmed from the new address, announced to the old one."""

    def __init__(
        self,
        db: DatabaseManager,
        audit: AuditLog,
        clock: Clock,
        notifier: Notifier,
        *,
        base_url: str,
        lifetime: timedelta = EMAIL_CHANGE_LIFETIME,
    ) -> None:
        self.db = db
        self.audit = audit
        self.clock = clock
        self.notifier = notifier
        self.links = _MailedLinks(
            TokenPurpose.EMAIL_CHANGE, lifetime, base_url, "/auth/email/confirm/"
        )
        self.reset_links = _MailedLinks(TokenPurpose.PASSWORD_RESET, RESET_LIFETIME, base_url, "")

    def request_change(self, user_id: int, new_email: str, *, ip: str = "") -> str:
        """Mail a confirmation link to ``new_email`` (the caller has stepped up); returns it.

        Nothing changes on the account until the link is opened.
        """
        address = new_email.strip()
        if len(address) > 254 or not _EMAIL.match(address):
            raise ValidationFailed(EMAIL_INVALID)
        now = self.clock()
        with self.db.transaction() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound("User not found.")
            if address.lower() == (user.email or "").strip().lower():
                raise ValidationFailed(EMAIL_UNCHANGED)
            link = self.links.issue(s, user, now, ip, new_email=address)
            self.notifier.link_mail(
                s,
                user,
                LinkMail.EMAIL_CHANGE_CONFIRM,
                link=link,
                expires_minutes=int(self.links.lifetime.total_seconds() // 60),
                at=now,
                to_address=address,
            )
            self.audit.record(
                s,
                AuditEvent.EMAIL_CHANGE_REQUESTED,
                actor_id=user.id,
                actor_name=user.username,
                target_user_id=user.id,
                target_name=user.username,
                details={"new_email": address},
                at=now,
            )
        return address

    def check_link(self, token: str) -> LinkInfo:
        now = self.clock()
        with self.db.transaction(write=False) as s:
            row = self.links.find(s, token)
            problem = _why_unusable(row, now)
            if problem is not None:
                raise LinkRejected(problem[0])
            assert row is not None
            user = s.get(User, row.user_id)
            if user is None or not user.is_active:
                raise LinkRejected(LINK_INVALID)
            return LinkInfo(user.username, row.expires_at, row.new_email)

    def confirm(
        self, token: str, *, ip: str | None = None, user_agent: str | None = None
    ) -> LinkInfo:
        """Make the link's new address the account's; the old address is told."""
        now = self.clock()
        with self.db.transaction() as s:
            row = self.links.find(s, token)
            user = s.get(User, row.user_id) if row is not None else None
            problem = _why_unusable(row, now)
            if problem is None and (user is None or not user.is_active):
                problem = (LINK_INVALID, "inactive")
            if problem is None and row is not None and not self.links.consume(s, row, now):
                problem = (LINK_USED, "race")
            if problem is not None or row is None or user is None:
                self.audit.record(
                    s,
                    AuditEvent.EMAIL_CHANGE_REJECTED,
                    Outcome.FAILURE,
                    target_user_id=user.id if user is not None else None,
                    target_name=user.username if user is not None else "",
                    details={"reason": problem[1] if problem else "unknown"},
                    at=now,
                )
                message = problem[0] if problem else LINK_INVALID
            else:
                message = ""
                old = (user.email or "").strip()
                new = row.new_email or ""
                user.email = new
                self.links.void(s, user.id, now)
                self.reset_links.void(s, user.id, now)  # reset links went to the old address
                self.audit.record(
                    s,
                    AuditEvent.EMAIL_CHANGED,
                    actor_id=user.id,
                    actor_name=user.username,
                    target_user_id=user.id,
                    target_name=user.username,
                    details={"old_email": old, "new_email": new},
                    at=now,
                )
                if old:
                    self.notifier.security_alert(
                        s,
                        user,
                        Alert.EMAIL_CHANGED,
                        at=now,
                        ip=ip,
                        user_agent=user_agent,
                        new_email=new,
                        to_address=old,
                    )
                info = LinkInfo(user.username, row.expires_at, new)
        if message:
            raise LinkRejected(message)
        return info
