"""Fixtures of the JSON API tests: an app on a stepped clock, keys with chosen scopes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from flask import Flask
from flask.testing import FlaskClient

from qpki.api import api_keys_of
from qpki.auth.services.api_keys import SCOPES
from qpki.clock import SteppedClock

START = datetime(2026, 11, 30, 12, 0, 5, tzinfo=UTC)


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock(START)


@pytest.fixture
def api_app(make_app: Callable[..., Flask], clock: SteppedClock) -> Flask:
    return make_app(clock=clock)


@pytest.fixture
def make_key(api_app: Flask) -> Callable[..., str]:
    """Create a key (all scopes unless named) and return the secret."""
    counter = iter(range(1000))

    def factory(*scopes: str, name: str | None = None, expires_days: int | None = None) -> str:
        created = api_keys_of(api_app).create(
            name or f"svc{next(counter)}",
            scopes or SCOPES,
            expires_days=expires_days,
            actor_name="test",
        )
        return created.secret

    return factory


@pytest.fixture
def api(api_app: Flask) -> FlaskClient:
    return api_app.test_client()
