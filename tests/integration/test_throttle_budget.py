"""Reserve, then verify: the per-account guessing budget holds under real concurrency.

Each test asserts the *budget* — how many attempts were actually checked (audited with a
checking reason) — not only that no attempt succeeded. On the old check-then-act code, 30
simultaneous wrong passwords on a fresh account had 29–30 checked; the policy allows 5.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from flask import Flask
from sqlalchemy import select

from helpers import PASSWORD, create_user, enable_mfa
from qpki.app import create_app
from qpki.audit.models import AuditEventRecord
from qpki.auth.errors import AccountThrottled, InvalidCredentials, MFAError
from qpki.auth.throttle import FREE_FAILURES
from qpki.config import Settings
from qpki.db.base import utcnow

BURST = 30


def _burst(count: int, attempt: Callable[[], object]) -> list[object]:
    barrier = threading.Barrier(count)
    results: list[object] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            outcome: object = attempt()
        except Exception as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _reasons(app: Flask, event: str) -> list[str]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        rows = s.scalars(select(AuditEventRecord).where(AuditEventRecord.event == event))
        return [str(row.details) for row in rows]


def _checked_passwords(app: Flask) -> int:
    return sum('"bad_password"' in d for d in _reasons(app, "login_failure"))


def _throttled_passwords(app: Flask) -> int:
    return sum('"throttled"' in d for d in _reasons(app, "login_failure"))


def test_simultaneous_wrong_passwords_check_only_the_free_allowance(any_app: Flask) -> None:
    create_user(any_app, "victim")
    now = utcnow()
    results = _burst(
        BURST,
        lambda: any_app.auth_manager.authenticate("victim", "wrong password!!", now=now),  # type: ignore[attr-defined]
    )
    assert all(isinstance(r, InvalidCredentials | AccountThrottled) for r in results), results
    assert _checked_passwords(any_app) == FREE_FAILURES
    # every refused attempt is audited too (issue 10 item 8)
    assert _throttled_passwords(any_app) == BURST - FREE_FAILURES


def test_at_the_moment_the_back_off_opens_one_attempt_is_checked(any_app: Flask) -> None:
    create_user(any_app, "victim")
    manager = any_app.auth_manager  # type: ignore[attr-defined]
    start = utcnow()
    for _ in range(FREE_FAILURES):
        with pytest.raises(InvalidCredentials):
            manager.authenticate("victim", "wrong password!!", now=start)
    opened = start + timedelta(seconds=31)
    _burst(20, lambda: manager.authenticate("victim", "wrong password!!", now=opened))
    assert _checked_passwords(any_app) == FREE_FAILURES + 1


def test_simultaneous_wrong_backup_codes_after_four_failures_check_one(any_app: Flask) -> None:
    user = create_user(any_app, "victim")
    enable_mfa(any_app, user.id)
    manager = any_app.auth_manager  # type: ignore[attr-defined]
    now = utcnow()
    for _ in range(FREE_FAILURES - 1):
        assert manager.verify_mfa_code(user.id, "ZZZZ-ZZZZ", now=now)[0] is False
    before = sum('"invalid"' in d for d in _reasons(any_app, "mfa_verify_failure"))
    results = _burst(BURST, lambda: manager.verify_mfa_code(user.id, "ZZZZ-YYYY", now=now))
    assert not any(ok for ok, _ in results)  # type: ignore[misc]
    after = sum('"invalid"' in d for d in _reasons(any_app, "mfa_verify_failure"))
    assert after - before == 1, "only the attempt that reached the allowance was checked"
    assert manager.get_backup_codes_info(user.id).remaining == 8


def test_two_backup_codes_on_one_pending_sign_in_spend_one(any_app: Flask) -> None:
    """Of two codes racing on one pending session, one wins and the other spends nothing."""
    user = create_user(any_app, "victim")
    _secret, codes = enable_mfa(any_app, user.id)
    manager = any_app.auth_manager  # type: ignore[attr-defined]
    for _round in range(3):
        pending = manager.login("victim", PASSWORD).token
        pair = iter([codes.pop(), codes.pop()])
        lock = threading.Lock()

        def attempt(
            token: str = pending, pair: Iterator[str] = pair, lock: threading.Lock = lock
        ) -> object:
            with lock:
                code = next(pair)
            return manager.complete_mfa_login(token, code)

        results = _burst(2, attempt)
        assert sum(r.success for r in results) == 1, results  # type: ignore[attr-defined]
    assert manager.get_backup_codes_info(user.id).remaining == 8 - 3
    assert len(_reasons(any_app, "backup_code_used")) == 3


def test_wrong_enrolment_codes_are_counted_and_audited(app: Flask) -> None:
    user = create_user(app, "victim")
    manager = app.auth_manager  # type: ignore[attr-defined]
    now = utcnow()
    manager.start_mfa_setup(user.id, now=now)
    for _ in range(FREE_FAILURES):
        with pytest.raises(MFAError):
            manager.confirm_mfa_setup(user.id, "000000", now=now)
    with pytest.raises(AccountThrottled):
        manager.confirm_mfa_setup(user.id, "000000", now=now)
    setup_failures = [d for d in _reasons(app, "mfa_verify_failure") if '"setup"' in d]
    assert len(setup_failures) == FREE_FAILURES + 1
    assert sum('"throttled"' in d for d in setup_failures) == 1
    assert manager.list_users()[0].failures == FREE_FAILURES


def test_an_expired_setup_is_deleted_when_refused(app: Flask) -> None:
    user = create_user(app, "victim")
    manager = app.auth_manager  # type: ignore[attr-defined]
    now = utcnow()
    manager.start_mfa_setup(user.id, now=now)
    with pytest.raises(MFAError, match="Setup session expired"):
        manager.confirm_mfa_setup(user.id, "000000", now=now + timedelta(minutes=16))
    assert manager.get_pending_setup(user.id, now=now) is None  # the row is gone, committed


# -- two processes -------------------------------------------------------------------------------
def _process_guesses(settings: Settings, start: object, out: object, threads: int) -> None:
    app = create_app(settings)
    manager = app.auth_manager  # type: ignore[attr-defined]
    now = utcnow()
    start.wait()  # type: ignore[attr-defined]
    for result in _burst(
        threads, lambda: manager.authenticate("victim", "wrong password!!", now=now)
    ):
        out.put(type(result).__name__)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_wrong_passwords_from_two_processes_keep_the_budget(
    make_settings: Callable[..., Settings], db_url: str
) -> None:
    settings = make_settings(db_url)
    app = create_app(settings)
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    create_user(app, "victim")
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_process_guesses, args=(settings, start, out, 15)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=180) for _ in range(30)]
    for p in procs:
        p.join(30)
    assert set(results) <= {"InvalidCredentials", "AccountThrottled"}, results
    assert _checked_passwords(app) == FREE_FAILURES
    app.db_manager.dispose()  # type: ignore[attr-defined]
