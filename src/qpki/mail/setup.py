"""Wire mail into an application: notifier, sender, delivery thread, reset and email services.

``create_app`` calls :func:`build_mail` (the account services take its notifier) and then
:func:`install_mail`; :func:`mail_components` returns what was installed, and installs it on
first use for an app made without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app

from qpki.clock import Clock, system_clock
from qpki.config import Settings
from qpki.mail.dispatcher import MailDispatcher
from qpki.mail.notifier import Notifier
from qpki.mail.outbox import OutboxSender
from qpki.mail.render import MailRenderer
from qpki.mail.smtp_url import parse_smtp_url
from qpki.mail.transport import EmlDirectoryTransport, SmtpTransport, Transport

log = logging.getLogger(__name__)

EXTENSION_KEY = "qpki_mail"


@dataclass
class MailComponents:
    """Everything mail-related one app holds."""

    notifier: Notifier
    sender: OutboxSender
    dispatcher: MailDispatcher
    transport: Transport
    password_reset: Any  # qpki.auth.services.password_reset.PasswordResetService
    email_change: Any  # qpki.auth.services.password_reset.EmailChangeService


def make_transport(settings: Settings) -> Transport:
    """SMTP when QPKI_SMTP_URL is set, else .eml files under the data directory."""
    if settings.smtp_url:
        return SmtpTransport(parse_smtp_url(settings.smtp_url))
    return EmlDirectoryTransport(settings.data_dir / "outbox")


def build_mail(
    settings: Settings,
    db: Any,
    *,
    clock: Clock = system_clock,
    audit: Any,
    passwords: Any,
    sessions: Any,
) -> MailComponents:
    """Build the mail components over the app's collaborators (no Flask needed)."""
    from qpki.auth.services.password_reset import EmailChangeService, PasswordResetService

    transport = make_transport(settings)
    sender = OutboxSender(
        db, transport, MailRenderer(settings.issuer), clock, sender=settings.mail_from
    )
    dispatcher = MailDispatcher(sender, enabled=settings.mail_worker)
    notifier = Notifier(clock, wake=dispatcher.wake)
    base_url = settings.base_url
    reset = PasswordResetService(db, audit, clock, passwords, sessions, notifier, base_url=base_url)
    email = EmailChangeService(db, audit, clock, notifier, base_url=base_url)
    return MailComponents(notifier, sender, dispatcher, transport, reset, email)


def install_mail(app: Flask, components: MailComponents | None = None) -> MailComponents:
    """Register mail on ``app`` and start delivery on its requests.

    ``create_app`` builds the components first with :func:`build_mail` (the account services
    need the notifier) and passes them here; without them they are built over the app's
    services.
    """
    from qpki.auth.sessions import SessionPolicy, SessionStore
    from qpki.web.services import services_of

    existing: MailComponents | None = app.extensions.get(EXTENSION_KEY)
    if existing is not None:
        return existing
    settings: Settings = app.settings  # type: ignore[attr-defined]
    if components is None:
        services = services_of(app)
        components = build_mail(
            settings,
            services.db,
            clock=services.clock,
            audit=services.audit,
            passwords=services.passwords,
            # Only end_all is used, which does not depend on the lifetimes of the policy.
            sessions=SessionStore(SessionPolicy()),
        )
    app.extensions[EXTENSION_KEY] = components
    log.info("mail: delivering through %s", components.transport.describe())
    if not settings.smtp_url:
        log.warning(
            "QPKI_SMTP_URL is not set: mails are written as .eml files to %s",
            settings.data_dir / "outbox",
        )
    if not getattr(app, "_got_first_request", False):
        app.before_request(components.dispatcher.nudge)
    return components


def mail_components(app: Flask | None = None) -> MailComponents:
    """The mail components of ``app`` (default: the app serving this request)."""
    target = app or current_app._get_current_object()  # type: ignore[attr-defined]
    found: MailComponents | None = target.extensions.get(EXTENSION_KEY)
    return found if found is not None else install_mail(target)
