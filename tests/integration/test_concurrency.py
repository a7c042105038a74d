"""Once-only invariants under real concurrency: threads and separate processes, both backends."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from datetime import timedelta

import pyotp
import pytest
from flask import Flask

from helpers import create_user, enable_mfa
from qpki.app import create_app
from qpki.config import Settings
from qpki.db.base import utcnow

THREADS = 20


def _enable(app: Flask) -> tuple[int, str, list[str]]:
    user = create_user(app, "concurrent")
    return (user.id, *enable_mfa(app, user.id))


def _race(count: int, attempt: Callable[[], tuple[bool, str]]) -> list[tuple[bool, str]]:
    barrier = threading.Barrier(count)
    results: list[tuple[bool, str]] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        outcome = attempt()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _refusals(results: list[tuple[bool, str]]) -> set[str]:
    """Why the losers lost. Once five have failed, the account back-off may answer first
    ("Too many failed attempts"): that refusal is just as good and is left out here."""
    return {m for ok, m in results if not ok and not m.startswith("Too many failed attempts")}


def test_one_backup_code_20_threads_one_success(any_app: Flask) -> None:
    user_id, _, codes = _enable(any_app)
    results = _race(THREADS, lambda: any_app.auth_manager.verify_mfa_code(user_id, codes[0]))  # type: ignore[attr-defined]
    assert len(results) == THREADS
    assert sum(ok for ok, _ in results) == 1
    assert _refusals(results) == {"Backup code already used"}
    assert any_app.auth_manager.get_backup_codes_info(user_id).remaining == 7  # type: ignore[attr-defined]


def test_one_totp_code_20_threads_one_success(any_app: Flask) -> None:
    user_id, secret, _ = _enable(any_app)
    at = utcnow() + timedelta(seconds=30)
    code = pyotp.TOTP(secret).at(at)
    results = _race(
        THREADS,
        lambda: any_app.auth_manager.verify_mfa_code(user_id, code, now=at),  # type: ignore[attr-defined]
    )
    assert sum(ok for ok, _ in results) == 1
    assert _refusals(results) == {"Invalid verification code"}  # the seed API keeps its message


def test_different_backup_codes_concurrently_all_succeed(any_app: Flask) -> None:
    user_id, _, codes = _enable(any_app)
    it = iter(codes[:6])
    lock = threading.Lock()

    def attempt() -> tuple[bool, str]:
        with lock:
            code = next(it)
        return any_app.auth_manager.verify_mfa_code(user_id, code)  # type: ignore[attr-defined]

    results = _race(6, attempt)
    assert all(ok for ok, _ in results), results
    assert any_app.auth_manager.get_backup_codes_info(user_id).remaining == 2  # type: ignore[attr-defined]


# -- separate processes (each its own engine and connection pool) --------------------------------
def _process_attempt(
    settings: Settings, user_id: int, code: str, start: object, out: object, threads: int = 1
) -> None:
    """One worker process: ``threads`` simultaneous attempts with the same code."""
    app = create_app(settings)
    manager = app.auth_manager  # type: ignore[attr-defined]
    start.wait()  # type: ignore[attr-defined]
    for outcome in _race(threads, lambda: manager.verify_mfa_code(user_id, code)):
        out.put(outcome)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_backup_code_across_processes(make_settings: Callable[..., Settings], db_url: str) -> None:
    settings = make_settings(db_url)
    app = create_app(settings)
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    user_id, _, codes = _enable(app)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_process_attempt, args=(settings, user_id, codes[0], start, out))
        for _ in range(6)
    ]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(ok for ok, _ in results) == 1, results
    app.db_manager.dispose()  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["backup_code", "totp"])
def test_200_attempts_from_two_processes(
    make_settings: Callable[..., Settings], db_url: str, kind: str
) -> None:
    """Two separate worker processes, 100 simultaneous attempts each: one success in all."""
    settings = make_settings(db_url)
    app = create_app(settings)
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    user_id, secret, codes = _enable(app)
    code = (
        codes[0]
        if kind == "backup_code"
        else pyotp.TOTP(secret).at(utcnow() + timedelta(seconds=30))
    )
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_process_attempt, args=(settings, user_id, code, start, out, 100))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in range(200)]
    for p in procs:
        p.join(30)
    assert sum(ok for ok, _ in results) == 1
    expected = (
        "Backup code already used"
        if kind == "backup_code"
        else "Invalid verification code"  # the seed API keeps its message
    )
    failures = [m for ok, m in results if not ok]
    # after five failures the account back-off answers first; both refuse the code
    assert all(m == expected or m.startswith("Too many failed attempts") for m in failures)
    assert expected in failures
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        chain = app.auth_manager.audit.verify(s)  # type: ignore[attr-defined]
    assert chain.ok and chain.checked >= 200  # 200 concurrent writers kept one unbroken chain
    app.db_manager.dispose()  # type: ignore[attr-defined]
