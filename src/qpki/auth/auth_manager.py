"""AuthManager: the seed's Python API, a thin facade over the composed services.

The specification's entry points keep their names — ``get_user(user_id=...)``,
``verify_mfa_code(user_id, code) -> (bool, str)``, the README's use cases — and each one
delegates to the service that owns the rule (``qpki.auth.services``). Nothing here decides
anything; it only translates the seed's signatures (``now=``, ``ip=``, raised errors) into
the services' ones.
"""

from __future__ import annotations

from datetime import datetime

from qpki.audit.log import AuditLog
from qpki.audit.models import AuditEventRecord
from qpki.auth import errors
from qpki.auth.errors import (
    AccountLocked,
    AccountThrottled,
    MFAError,
    NotFound,
    ValidationFailed,
)
from qpki.auth.mfa import MFAManager
from qpki.auth.models import User, UserSession
from qpki.auth.passwords import Passwords
from qpki.auth.services import Services
from qpki.auth.services.accounts import UserSummary
from qpki.auth.services.code_check import LOW_BACKUP_CODES
from qpki.auth.services.common import Client
from qpki.auth.services.factors import SETUP_LIFETIME, BackupCodesInfo, SetupInfo
from qpki.auth.services.signin import LoginResult, MFAResult
from qpki.db.manager import DatabaseManager

__all__ = [
    "LOW_BACKUP_CODES",
    "SETUP_LIFETIME",
    "AuthManager",
    "BackupCodesInfo",
    "LoginResult",
    "MFAResult",
    "SetupInfo",
    "UserSummary",
]


class AuthManager:
    """The seed's service API (``app.auth_manager``), delegating to :class:`Services`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.db: DatabaseManager = services.db
        self.audit: AuditLog = services.audit
        self.mfa: MFAManager = services.mfa
        self.passwords: Passwords = services.passwords

    # -- accounts -----------------------------------------------------------------------------
    def get_user(
        self, user_id: int | None = None, username: str | None = None, email: str | None = None
    ) -> User | None:
        return self.services.accounts.get_user(user_id=user_id, username=username, email=email)

    def count_users(self) -> int:
        return self.services.accounts.count_users()

    def list_users(self, **filters: object) -> list[UserSummary]:
        return self.services.accounts.list_users(**filters)  # type: ignore[arg-type]

    def create_user(
        self,
        username: str,
        password: str,
        email: str = "",
        role: str = "viewer",
        *,
        actor: User | None = None,
        actor_name: str = "",
        must_change_password: bool = False,
    ) -> User:
        return self.services.accounts.create_user(
            username,
            password,
            email,
            role,
            actor=actor,
            actor_name=actor_name,
            must_change_password=must_change_password,
        )

    def set_role(self, actor: User, user_id: int, role: str) -> User:
        return self.services.accounts.set_role(actor, user_id, role)

    def set_active(
        self, actor: User | None, user_id: int, active: bool, *, actor_name: str = ""
    ) -> User:
        return self.services.accounts.set_active(actor, user_id, active, actor_name=actor_name)

    def generate_temporary_password(self) -> str:
        return self.services.accounts.generate_temporary_password()

    def admin_reset_password(
        self, actor: User | None, user_id: int, *, actor_name: str = ""
    ) -> str:
        return self.services.accounts.admin_reset_password(actor, user_id, actor_name=actor_name)

    def unlock_user(self, actor: User | None, user_id: int, *, actor_name: str = "") -> bool:
        return self.services.accounts.unlock_user(actor, user_id, actor_name=actor_name)

    def change_password(
        self,
        user_id: int,
        current_password: str,
        new_password: str,
        *,
        keep_session_token: str | None = None,
        now: datetime | None = None,
    ) -> str | None:
        return self.services.accounts.change_password(
            user_id, current_password, new_password, current_token=keep_session_token, now=now
        )

    # -- signing in ---------------------------------------------------------------------------
    def authenticate(self, username: str, password: str, *, now: datetime | None = None) -> User:
        return self.services.signin.check_password(username, password, now=now)

    def login(
        self,
        username: str,
        password: str,
        *,
        ip: str = "",
        user_agent: str = "",
        now: datetime | None = None,
    ) -> LoginResult:
        return self.services.signin.login(
            username, password, client=Client(ip, user_agent), now=now
        )

    def complete_mfa_login(
        self,
        pending_token: str,
        code: str,
        *,
        ip: str = "",
        user_agent: str = "",
        now: datetime | None = None,
    ) -> MFAResult:
        return self.services.signin.complete_second_step(
            pending_token, code, client=Client(ip, user_agent), now=now
        )

    def verify_mfa_code(
        self, user_id: int, code: str, *, now: datetime | None = None
    ) -> tuple[bool, str]:
        """Check a TOTP or backup code: ``(success, message)`` as in the seed API.

        The seed's messages are kept word for word: a code used a second time is "Invalid
        verification code" here (the pages say "That code was just used" instead).
        """
        outcome = self.services.signin.verify_code(user_id, code, now=now)
        message = (
            errors.INVALID_CODE if outcome.message == errors.CODE_JUST_USED else outcome.message
        )
        return outcome.success, message

    # -- factors ------------------------------------------------------------------------------
    def start_mfa_setup(self, user_id: int, *, now: datetime | None = None) -> SetupInfo:
        return self.services.factors.start_setup(user_id, now=now)

    def get_pending_setup(self, user_id: int, *, now: datetime | None = None) -> SetupInfo | None:
        return self.services.factors.pending_setup(user_id, now=now)

    def confirm_mfa_setup(
        self, user_id: int, code: str, *, now: datetime | None = None
    ) -> list[str]:
        """The seed's raising form of FactorService.confirm_setup (raised after the commit)."""
        outcome = self.services.factors.confirm_setup(user_id, code, now=now)
        if outcome.codes is not None:
            return outcome.codes
        if outcome.locked:
            raise AccountLocked()
        if outcome.retry_at is not None:
            raise AccountThrottled(outcome.message, outcome.retry_at)
        raise MFAError(outcome.message)

    def get_backup_codes_info(self, user_id: int) -> BackupCodesInfo:
        return self.services.factors.backup_codes_info(user_id)

    def regenerate_backup_codes(
        self,
        user_id: int,
        password: str,
        code: str | None = None,
        *,
        mfa_verified_at: datetime | None = None,
        keep_session_token: str | None = None,
        now: datetime | None = None,
    ) -> list[str]:
        self._prove(user_id, password, code, mfa_verified_at, now)
        return self.services.factors.regenerate_backup_codes(
            user_id, keep_session_token=keep_session_token, now=now
        )

    def disable_mfa(
        self,
        user_id: int,
        password: str,
        code: str | None = None,
        *,
        mfa_verified_at: datetime | None = None,
        keep_session_token: str | None = None,
        now: datetime | None = None,
    ) -> None:
        self._prove(user_id, password, code, mfa_verified_at, now)
        self.services.factors.disable(user_id, keep_session_token=keep_session_token, now=now)

    def admin_disable_mfa(
        self,
        admin_id: int | None,
        user_id: int,
        reason: str,
        *,
        actor_name: str = "",
        identity_confirmed: bool = True,
        now: datetime | None = None,
    ) -> None:
        actor = None
        if admin_id is not None:
            actor = self.get_user(user_id=admin_id)
            if actor is None:
                raise NotFound("User not found.")
        self.services.factors.admin_disable(
            actor,
            user_id,
            reason,
            identity_confirmed=identity_confirmed,
            actor_name=actor_name,
            now=now,
        )

    def has_encrypted_data(self) -> bool:
        return self.services.factors.has_encrypted_data()

    def _prove(
        self,
        user_id: int,
        password: str,
        code: str | None,
        mfa_verified_at: datetime | None,
        now: datetime | None,
    ) -> None:
        """Step-up without a web session: the password, and a code unless ``mfa_verified_at``
        is within the step-up window."""
        step_up = self.services.step_up
        moment = now or self.services.clock()
        fresh = mfa_verified_at is not None and moment - mfa_verified_at <= step_up.window
        outcome = step_up.prove(user_id, password, code, code_required=not fresh, now=moment)
        if outcome.success:
            return
        if outcome.locked:
            raise AccountLocked()
        if outcome.retry_at is not None:
            raise AccountThrottled(outcome.message, outcome.retry_at)
        if outcome.reason in ("password", "code_missing"):
            raise ValidationFailed(outcome.message)
        raise MFAError(outcome.message)

    # -- sessions -----------------------------------------------------------------------------
    def resolve_session(
        self, token: str, *, now: datetime | None = None
    ) -> tuple[User, UserSession] | None:
        return self.services.sessions.resolve(token, now=now)

    def logout(self, token: str, *, now: datetime | None = None) -> None:
        self.services.sessions.logout(token, now=now)

    def list_sessions(self, user_id: int, *, now: datetime | None = None) -> list[UserSession]:
        return self.services.sessions.list_for_user(user_id, now=now)

    def end_session(self, user_id: int, session_id: int, *, now: datetime | None = None) -> bool:
        return self.services.sessions.end_one(user_id, session_id, now=now)

    def end_other_sessions(
        self, user_id: int, keep_token: str, *, now: datetime | None = None
    ) -> int:
        return self.services.sessions.end_others(user_id, keep_token, now=now)

    def cleanup(self, *, now: datetime | None = None) -> dict[str, int]:
        return self.services.sessions.cleanup(now=now)

    def record_access_denied(self, user: User, *, required_roles: tuple[str, ...]) -> None:
        self.services.sessions.record_access_denied(user, required_roles=required_roles)

    def recent_security_events(self, user_id: int, limit: int = 10) -> list[AuditEventRecord]:
        return self.services.sessions.recent_security_events(user_id, limit)
