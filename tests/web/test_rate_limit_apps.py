"""Per-address limits follow each app's own QPKI_RATE_LIMITS, whatever was built after it."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

from qpki.web.limits import LOGIN_LIMIT


def _hammer(app: Flask, times: int) -> list[int]:
    client = app.test_client()
    return [
        client.post("/auth/login", data={"username": f"u{i}", "password": "x" * 12}).status_code
        for i in range(times)
    ]


def test_limits_are_per_app(make_app: Callable[..., Flask]) -> None:
    limited = make_app(rate_limits_enabled=True)
    unlimited = make_app(rate_limits_enabled=False)  # built last: must not switch `limited` off
    allowed = int(LOGIN_LIMIT.split()[0])
    assert 429 not in _hammer(unlimited, allowed + 5)
    statuses = _hammer(limited, allowed + 1)
    assert 429 not in statuses[:allowed] and statuses[allowed] == 429
