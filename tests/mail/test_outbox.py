"""The outbox: retried while the relay is down or refuses, given up after N tries, claimed
atomically so that several processes send each mail once, written as .eml without a relay."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select

from harness.services import SmtpSink, wait_until
from helpers import create_user
from qpki.auth.models import User
from qpki.clock import SteppedClock
from qpki.mail import Alert
from qpki.mail.models import MailStatus, OutboxMessage
from qpki.mail.outbox import MAX_ATTEMPTS, retry_delay
from qpki.mail.setup import MailComponents, mail_components


def _queue(
    app: Flask, mail: MailComponents, count: int = 1, alert: Alert = Alert.PASSWORD_CHANGED
) -> None:
    user = User(username="x", username_key="x")  # replaced below by a real row
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        user = s.scalars(select(User).order_by(User.id).limit(1)).one()
        for _ in range(count):
            mail.notifier.security_alert(s, user, Alert.PASSWORD_CHANGED)


def _rows(app: Flask) -> list[OutboxMessage]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return list(s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def test_a_relay_that_is_down_delays_the_mail_and_loses_nothing(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, clock: SteppedClock
) -> None:
    create_user(mail_app, "alice")
    sink.stop()
    _queue(mail_app, mail)
    report = mail.sender.deliver_due()
    assert (report.sent, report.retrying) == (0, 1)
    [row] = _rows(mail_app)
    assert row.status == MailStatus.PENDING and row.attempts == 1
    assert "Connection" in row.last_error or "refused" in row.last_error.lower()
    assert row.next_attempt_at == clock() + retry_delay(1)
    state = mail.sender.status()
    assert (state.pending, state.failed) == (1, 0) and state.last_error

    sink.start()
    assert mail.sender.deliver_due().sent == 0  # not due yet: the back-off holds
    clock.advance(seconds=31)
    assert mail.sender.deliver_due().sent == 1
    assert len(sink.wait_for(1)) == 1
    [row] = _rows(mail_app)
    assert row.status == MailStatus.SENT and row.attempts == 2 and row.last_error == ""
    clock.advance(hours=2)
    assert mail.sender.deliver_due().sent == 0
    assert len(sink.messages) == 1  # sent once


def test_a_relay_that_refuses_is_retried(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, clock: SteppedClock
) -> None:
    create_user(mail_app, "alice")
    sink.refuse = "451 4.3.0 Try again later"
    _queue(mail_app, mail)
    assert mail.sender.deliver_due().retrying == 1
    assert "451" in _rows(mail_app)[0].last_error
    sink.refuse = None
    clock.advance(seconds=30)
    assert mail.sender.deliver_due().sent == 1
    assert len(sink.wait_for(1)) == 1


def test_after_max_attempts_the_mail_is_failed_and_retry_sends_it(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, clock: SteppedClock
) -> None:
    create_user(mail_app, "alice")
    sink.stop()
    _queue(mail_app, mail)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        report = mail.sender.deliver_due()
        assert report.retrying + report.failed == 1, attempt
        clock.advance(seconds=retry_delay(attempt).total_seconds())
    [row] = _rows(mail_app)
    assert row.status == MailStatus.FAILED and row.attempts == MAX_ATTEMPTS
    clock.advance(days=1)
    assert mail.sender.deliver_due().sent == 0  # failed mails are not retried on their own
    sink.start()
    assert mail.sender.make_all_due() == 1
    assert mail.sender.deliver_due().sent == 1
    assert len(sink.wait_for(1)) == 1


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, clock: SteppedClock
) -> None:
    create_user(mail_app, "alice")
    _queue(mail_app, mail)
    [row] = _rows(mail_app)
    claim = mail.sender._claim(row.id)  # a sender that then dies without finishing
    assert claim is not None
    assert mail.sender.deliver_due().sent == 0  # its lease is live
    assert mail.sender._claim(row.id) is None
    clock.advance(minutes=6)
    assert mail.sender.deliver_due().sent == 1
    # The dead sender's late outcome no longer applies: the claim token changed.
    mail.sender._finish(claim, MailStatus.FAILED, "late")
    assert _rows(mail_app)[0].status == MailStatus.SENT


def test_without_smtp_url_mails_are_eml_files_and_the_log_says_where(
    make_mail_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="qpki.mail"):
        app = make_mail_app()
        mail = mail_components(app)
        create_user(app, "alice")
        _queue(app, mail)
        assert mail.sender.deliver_due().sent == 1
    outbox = app.settings.data_dir / "outbox"  # type: ignore[attr-defined]
    [eml] = list(outbox.glob("*.eml"))
    assert eml.stat().st_mode & 0o777 == 0o600
    content = eml.read_text()
    assert "To: alice@example.org" in content and "Your password was changed" in content
    assert f"mails are written as .eml files to {outbox}" in caplog.text
    assert f"written to {eml}" in caplog.text


def test_the_background_thread_sends_after_commit_and_then_stops(
    make_mail_app: Callable[..., Flask], sink: SmtpSink
) -> None:
    app = make_mail_app(smtp_url=sink.url, mail_worker=True)
    mail = mail_components(app)
    create_user(app, "alice")
    started = time.monotonic()
    _queue(app, mail)  # returns as soon as the transaction commits
    assert time.monotonic() - started < 1.0
    assert len(sink.wait_for(1, timeout=10)) == 1
    # nothing pending: the thread ends by itself
    wait_until(lambda: mail.dispatcher._thread is None, what="the sender thread to end")
    _queue(app, mail)  # and a new commit starts it again
    assert len(sink.wait_for(2, timeout=10)) == 2


def test_mail_status_and_retry_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink: SmtpSink
) -> None:
    from qpki.app import create_app
    from qpki.cli import main
    from qpki.config import Settings

    monkeypatch.setenv("QPKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("QPKI_DATABASE_URL", raising=False)
    monkeypatch.delenv("QPKI_MFA_KEY", raising=False)
    monkeypatch.setenv("QPKI_SMTP_URL", sink.url)
    app = create_app(Settings.from_env(mail_worker=False, argon2_profile="fast"))
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    mail = mail_components(app)
    create_user(app, "alice")
    sink.stop()
    _queue(app, mail, count=2)
    mail.sender.deliver_due()

    result = CliRunner().invoke(main, ["mail", "status"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Outbox: 2 pending" in result.output and f"127.0.0.1:{sink.port}" in result.output

    result = CliRunner().invoke(main, ["mail", "retry"], catch_exceptions=False)
    assert result.exit_code == 1 and "2 to retry later" in result.output
    assert len(sink.messages) == 0

    sink.start()
    result = CliRunner().invoke(main, ["mail", "retry"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "sent 2" in result.output and "Outbox now: 0 pending, 0 failed" in result.output
    assert len(sink.wait_for(2)) == 2
    app.db_manager.dispose()  # type: ignore[attr-defined]


_DRAIN = """
import json, pathlib, sys
from qpki.clock import system_clock
from qpki.db.manager import DatabaseManager
from qpki.mail.outbox import OutboxSender
from qpki.mail.render import MailRenderer
from qpki.mail.smtp_url import parse_smtp_url
from qpki.mail.transport import SmtpTransport

db_url, smtp_url, ready = sys.argv[1:4]
db = DatabaseManager(db_url)
sender = OutboxSender(db, SmtpTransport(parse_smtp_url(smtp_url)), MailRenderer("qPKI"),
                      system_clock, sender="qPKI <qpki@example.org>")
pathlib.Path(ready).touch()
sys.stdin.readline()  # blocks until the test says go: both senders start together
total = {"sent": 0, "lost_races": 0, "retrying": 0, "failed": 0}
while True:
    report = sender.deliver_due(limit=5)
    for key in total:
        total[key] += getattr(report, key)
    if not (report.sent or report.lost_races or report.retrying or report.failed):
        break
print(json.dumps(total))
"""


def test_two_processes_draining_one_outbox_send_each_mail_once(
    make_mail_app: Callable[..., Flask], db_url: str, sink: SmtpSink, tmp_path: Path
) -> None:
    count = 60
    app = make_mail_app(db_url, smtp_url=sink.url)
    mail = mail_components(app)
    create_user(app, "alice")
    _queue(app, mail, count=count)
    sink.delay = 0.01  # each mail takes a while, so the two senders overlap
    procs, ready = [], []
    for n in range(2):
        flag = tmp_path / f"ready-{n}"
        ready.append(flag)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _DRAIN, db_url, sink.url, str(flag)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )

    def started() -> bool:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        return all(f.exists() for f in ready)

    wait_until(started, timeout=60, what="the senders to start")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    totals = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        totals.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(t["sent"] for t in totals) == count
    assert all(t["sent"] > 0 for t in totals), totals  # both really took part
    assert sum(t["retrying"] + t["failed"] for t in totals) == 0
    messages = sink.wait_for(count)  # both senders have exited: nothing more can arrive
    assert len(sink.messages) == count  # nothing sent twice
    ids = {m["Message-ID"].split(".qpki-")[1] for m in messages}
    assert len(ids) == count
    assert {r.status for r in _rows(app)} == {MailStatus.SENT.value}


def test_cleanup_removes_old_sent_mail_and_expired_links_only(
    mail_app: Flask, mail: MailComponents, sink: SmtpSink, clock: SteppedClock
) -> None:
    create_user(mail_app, "alice")
    _queue(mail_app, mail)
    mail.sender.deliver_due()
    mail.password_reset.request_reset("alice")  # a pending link mail and a token
    assert mail.sender.purge_sent() == 0
    assert mail.password_reset.purge_expired_links() == 0
    clock.advance(days=31)
    assert mail.sender.purge_sent() == 1  # the delivered alert; the link mail is still pending
    assert mail.password_reset.purge_expired_links() == 1
    assert [r.kind for r in _rows(mail_app)] == ["password_reset_link"]


def test_a_process_that_exits_right_after_queueing_still_hands_over_its_mail(
    make_mail_app: Callable[..., Flask], sink: SmtpSink
) -> None:
    """What a `qpki` command does: commit, then exit at once (atexit stops the thread)."""
    app = make_mail_app(smtp_url=sink.url, mail_worker=True)
    mail = mail_components(app)
    create_user(app, "alice")
    _queue(app, mail)
    mail.dispatcher.stop()  # the atexit hook of a process that is ending
    assert len(sink.messages) == 1
    assert mail.sender.status().sent == 1
