"""Fixtures of the mail tests: an app on a stepped clock whose mail goes to a real SMTP sink.

The background delivery thread is off (``mail_worker=False``): each test drains the outbox
itself with ``sender.deliver_due()``, so what was sent when is decided by the test, not by a
thread's timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from flask import Flask
from mail_helpers import BASE_URL

from harness.services import SmtpSink, smtp_sink
from qpki.app import create_app
from qpki.clock import SteppedClock
from qpki.config import Settings
from qpki.mail.setup import MailComponents, mail_components


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock(datetime(2026, 11, 30, 12, 0, tzinfo=UTC))


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with smtp_sink() as running:
        yield running


@pytest.fixture
def make_mail_app(
    make_settings: Callable[..., Settings], clock: SteppedClock
) -> Iterator[Callable[..., Flask]]:
    """Migrated apps on ``clock`` with mail settings; keyword arguments override settings."""
    apps: list[Flask] = []

    def factory(database_url: str | None = None, **overrides: object) -> Flask:
        values: dict[str, object] = {"mail_worker": False, "base_url": BASE_URL}
        values.update(overrides)
        app = create_app(make_settings(database_url, **values), clock=clock)
        app.db_manager.migrate_database()  # type: ignore[attr-defined]
        apps.append(app)
        return app

    yield factory
    for app in apps:
        mail_components(app).dispatcher.stop()
        app.db_manager.dispose()  # type: ignore[attr-defined]


@pytest.fixture
def mail_app(make_mail_app: Callable[..., Flask], sink: SmtpSink) -> Flask:
    """An SQLite app whose mail goes to the SMTP sink."""
    return make_mail_app(smtp_url=sink.url)


@pytest.fixture
def mail(mail_app: Flask) -> MailComponents:
    return mail_components(mail_app)
