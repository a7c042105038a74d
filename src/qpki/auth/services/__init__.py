"""The service layer: one service per concern, composed over explicit dependencies.

``build_services`` wires them once per application (``create_app`` stores the result under
``app.extensions["qpki"]``; ``qpki.web.services.services()`` is the typed accessor). No
service inherits from another; each sees only the collaborators it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from qpki.audit.log import AuditLog
from qpki.auth.mfa import MFAManager
from qpki.auth.passwords import Passwords
from qpki.auth.services.accounts import AccountService
from qpki.auth.services.code_check import CodeChecker
from qpki.auth.services.common import ThrottleGate
from qpki.auth.services.devices import KnownDevices
from qpki.auth.services.factors import SETUP_LIFETIME, FactorService
from qpki.auth.services.policy import KeyClause, PolicyService, has_webauthn_credential
from qpki.auth.services.remembered_devices import RememberedDeviceService
from qpki.auth.services.sessions import SessionService
from qpki.auth.services.signin import SignInService
from qpki.auth.services.step_up import DEFAULT_WINDOW, StepUpService
from qpki.auth.services.webauthn import WebAuthnService
from qpki.auth.sessions import SessionPolicy, SessionStore
from qpki.auth.throttle_store import AccountThrottle
from qpki.auth.webauthn import RelyingParty
from qpki.clock import Clock, system_clock
from qpki.db.manager import DatabaseManager
from qpki.mail.notifier import Notifier


@dataclass(frozen=True)
class Services:
    """Every service of one application, built by :func:`build_services`."""

    db: DatabaseManager
    audit: AuditLog
    clock: Clock
    mfa: MFAManager
    passwords: Passwords
    accounts: AccountService
    signin: SignInService
    factors: FactorService
    step_up: StepUpService
    sessions: SessionService
    notifier: Notifier
    webauthn: WebAuthnService
    policy: PolicyService
    remembered_devices: RememberedDeviceService


def build_services(
    db: DatabaseManager,
    mfa: MFAManager,
    audit: AuditLog,
    notifier: Notifier,
    *,
    clock: Clock = system_clock,
    passwords: Passwords | None = None,
    session_policy: SessionPolicy | None = None,
    reauth_window: timedelta = DEFAULT_WINDOW,
    setup_lifetime: timedelta | None = None,
    security_key_clause: KeyClause = has_webauthn_credential,
    webauthn_rp: RelyingParty | None = None,
) -> Services:
    """Compose the services over one database, audit log, clock and key ring."""
    passwords = passwords or Passwords()
    store = SessionStore(session_policy or SessionPolicy())
    gate = ThrottleGate(AccountThrottle(), audit, notifier)
    checker = CodeChecker(mfa, audit, gate, notifier)
    devices = KnownDevices()
    policy = PolicyService(db, audit, clock, security_key_clause=security_key_clause)
    factors = FactorService(
        db,
        audit,
        clock,
        mfa,
        gate,
        store,
        notifier,
        setup_lifetime=setup_lifetime or SETUP_LIFETIME,
        policy=policy,
    )
    signin = SignInService(
        db, audit, clock, passwords, gate, store, checker, devices, notifier, policy=policy
    )
    step_up = StepUpService(
        db, audit, clock, passwords, gate, checker, devices, policy, window=reauth_window
    )
    webauthn = WebAuthnService(
        db,
        audit,
        clock,
        notifier,
        rp=webauthn_rp or RelyingParty(),
        mfa=mfa,
        sessions=store,
        signin=signin,
        step_up=step_up,
        gate=gate,
        devices=devices,
        policy=policy,
    )
    return Services(
        webauthn=webauthn,
        db=db,
        audit=audit,
        clock=clock,
        mfa=mfa,
        passwords=passwords,
        accounts=AccountService(db, audit, clock, passwords, gate, store, devices, notifier),
        signin=signin,
        factors=factors,
        step_up=step_up,
        sessions=SessionService(db, audit, clock, store),
        notifier=notifier,
        policy=policy,
        remembered_devices=RememberedDeviceService(db, audit, clock),
    )
