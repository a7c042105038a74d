"""Per-address limits follow each app's own QPKI_RATE_LIMITS, whatever was built after it."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask


def _hammer(app: Flask, times: int) -> list[int]:
    client = app.test_client()
    return [
        client.post("/auth/login", data={"username": f"u{i}", "password": "x" * 12}).status_code
        for i in range(times)
    ]


def test_limits_are_per_app(make_app: Callable[..., Flask]) -> None:
    limited = make_app(rate_limits_enabled=True)
    unlimited = make_app(rate_limits_enabled=False)  # built last: must not switch `limited` off
    assert 429 not in _hammer(unlimited, 35)
    statuses = _hammer(limited, 31)
    assert 429 not in statuses[:30] and statuses[30] == 429
