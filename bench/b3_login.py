"""B3 full login over HTTP (sign-in page, password POST, verify page, code POST) against the
same gunicorn server, next to the argon2id hash time alone — the floor by design.

Sequential logins alternate with one in-process argon2id verification (the product's default
parameters), so each login has its own back-to-back reference; the ratio is the median of those
pairs. Then a pool of clients logs in concurrently for logins/s. Each login uses its own user
(a TOTP code is accepted once per user and time step).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pyotp
from common import (
    PASSWORD,
    AppServer,
    Browser,
    Context,
    MFAUser,
    Result,
    median,
    paired_ratio,
    password_hash,
    percentile,
)

from qpki.auth.passwords import Passwords

CLIENTS = 4


def full_login(base: str, user: MFAUser) -> float:
    browser = Browser(base)
    try:
        start = time.perf_counter()
        csrf = browser.password_step(user.username)
        outcome = browser.post_code(csrf, pyotp.TOTP(user.secret).now())
        elapsed = time.perf_counter() - start
    finally:
        browser.close()
    if outcome != "accepted":
        raise RuntimeError(f"full login of {user.username}: {outcome}")
    return elapsed


def argon2_check(passwords: Passwords, stored: str) -> float:
    start = time.perf_counter()
    if not passwords.verify(stored, PASSWORD):
        raise RuntimeError("argon2 reference did not verify")
    return time.perf_counter() - start


def run(
    ctx: Context, server: AppServer, backend: str, sequential: list[MFAUser], loaded: list[MFAUser]
) -> list[Result]:
    passwords = Passwords()
    stored = password_hash()
    argon2_check(passwords, stored)  # warm
    logins, argon2 = [], []
    for user in sequential:
        argon2.append(argon2_check(passwords, stored))
        logins.append(full_login(server.url, user))
    ratio = paired_ratio(logins, argon2)
    results = [
        Result(
            f"B3 full login latency p50 ({backend}, 1 client)",
            median(logins) * 1000,
            "ms",
            baseline=median(argon2) * 1000,
            ratio=ratio,
            note=f"argon2id verify alone {median(argon2) * 1000:.0f} ms (4 requests per login)",
            extra={"login_ms": [x * 1000 for x in logins], "argon2_ms": [x * 1000 for x in argon2]},
        )
    ]
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda _: None, range(CLIENTS)))
        start = time.perf_counter()
        times = list(pool.map(lambda u: full_login(server.url, u), loaded))
        wall = time.perf_counter() - start
    floor = 2 / median(argon2)  # two single-threaded workers, each bound by one argon2 per login
    results.append(
        Result(
            f"B3 full login throughput ({backend}, {CLIENTS} clients)",
            len(loaded) / wall,
            "logins/s",
            baseline=floor,
            ratio=(len(loaded) / wall) / floor,
            note=f"p50 {percentile(times, 50) * 1000:.0f} ms, "
            f"p99 {percentile(times, 99) * 1000:.0f} ms under load; "
            "baseline = 2 workers / argon2 time; QPKI_RATE_LIMITS=0",
            extra={"latency_ms": [x * 1000 for x in times], "wall_s": wall},
        )
    )
    return results
