"""B4 throttling: how long the app takes to turn away a throttled sign-in, against the time of
one password check (argon2id verify with the product's parameters). Target ≤ 1/20.

Two rejections, each a full POST /auth/login through the Flask app (test client, so the
figure is the server's own work without network noise), CSRF and rate limits ON:
- per-account back-off: the account has 6 consecutive failures (its ``login_throttle`` row is
  written directly), so ``authenticate`` refuses before any hashing. Each request comes from a
  different client address so that the per-address limit never answers instead;
- Flask-Limiter's per-address limit: one address has used up its 30 sign-ins per minute.
Blocks of rejections alternate with one argon2id verification; the ratio is the median of the
back-to-back pairs.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from common import (
    PASSWORD,
    Context,
    Result,
    bulk_insert,
    csrf_token,
    make_app,
    median,
    paired_ratio,
    password_hash,
    per_op,
    user_row,
)

from qpki.auth.models import LoginThrottle, User
from qpki.auth.passwords import Passwords
from qpki.auth.throttle import account_key
from qpki.web.limits import LOGIN_LIMIT

TARGET = 1 / 20
VICTIM = "bench-victim"
LIMITED_ADDR = "10.255.255.1"


def run(ctx: Context) -> list[Result]:
    url = f"sqlite:///{ctx.tmp / 'b4.db'}"
    app = make_app(ctx.tmp / "b4", url, ctx.mfa_key, rate_limits_enabled=True)
    try:
        return _run(ctx, app)
    finally:
        app.db_manager.dispose()


def _run(ctx: Context, app: object) -> list[Result]:
    now = datetime.now(UTC)
    engine = app.db_manager.engine  # type: ignore[attr-defined]
    bulk_insert(engine, User.__table__, [user_row(VICTIM, pw_hash=password_hash(), now=now)])
    bulk_insert(
        engine,
        LoginThrottle.__table__,
        [
            {
                "key": account_key(VICTIM),
                "failures": 6,
                "last_failure_at": now,
                "next_allowed_at": now + timedelta(hours=2),
                "locked_at": None,
            }
        ],
    )
    client = app.test_client()  # type: ignore[attr-defined]
    form = {
        "csrf_token": csrf_token(client.get("/auth/login").get_data(as_text=True)),
        "username": VICTIM,
        "password": PASSWORD,
        "next": "",
    }
    addresses = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in itertools.count(1))

    def account_reject() -> None:
        resp = client.post(
            "/auth/login", data=form, environ_overrides={"REMOTE_ADDR": next(addresses)}
        )
        if resp.status_code != 429 or b"Too many failed attempts" not in resp.get_data():
            raise RuntimeError(f"expected the per-account back-off, got {resp.status_code}")

    def limiter_reject() -> None:
        resp = client.post(
            "/auth/login", data=form, environ_overrides={"REMOTE_ADDR": LIMITED_ADDR}
        )
        if resp.status_code != 429 or b"Too many attempts from your address" not in resp.get_data():
            raise RuntimeError(f"expected Flask-Limiter's 429, got {resp.status_code}")

    per_minute = int(LOGIN_LIMIT.split()[0])
    for _ in range(per_minute):  # use up the address's allowance (each turned away by back-off)
        client.post("/auth/login", data=form, environ_overrides={"REMOTE_ADDR": LIMITED_ADDR})
    limiter_reject()
    account_reject()

    passwords, stored = Passwords(), password_hash()

    def password_check() -> None:
        if not passwords.verify(stored, PASSWORD):
            raise RuntimeError("argon2 reference did not verify")

    password_check()
    block = ctx.reps(40, 20)
    account, limited, argon2 = [], [], []
    for _ in range(ctx.reps(15, 5)):
        account.append(per_op(account_reject, block))
        argon2.append(per_op(password_check, 1))
        limited.append(per_op(limiter_reject, block))
    ref = median(argon2) * 1000
    results = []
    for label, times in (
        ("per-account back-off", account),
        ("per-address limit (Flask-Limiter)", limited),
    ):
        ratio = paired_ratio(times, argon2)
        results.append(
            Result(
                f"B4 reject throttled sign-in: {label}",
                median(times) * 1000,
                "ms",
                baseline=ref,
                ratio=ratio,
                target="≤ 1/20 (0.05×) of a password check",
                met=ratio <= TARGET,
                note=f"password check (argon2id verify) {ref:.0f} ms; in-process WSGI request",
                extra={
                    "reject_ms": [x * 1000 for x in times],
                    "argon2_ms": [x * 1000 for x in argon2],
                },
            )
        )
    return results
