"""Shared fixtures: settings on a temporary data dir, apps on SQLite and PostgreSQL, clients.

PostgreSQL tests use a throwaway cluster started once per test session on 127.0.0.1 (or the
server named by QPKI_TEST_POSTGRES_URL). They skip with a reason when no server binary is
present, and fail instead under QPKI_REQUIRE_ALL=1 (as CI runs them).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from harness.services import PostgresServer, find_pg_bin, postgres_cluster, require_component
from qpki.app import create_app
from qpki.clock import Clock, system_clock
from qpki.config import Settings

TEST_SECRET_KEY = "test-secret-key-" + "x" * 40


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer | None]:
    """One PostgreSQL cluster for the whole run (None when QPKI_TEST_POSTGRES_URL is used)."""
    if os.environ.get("QPKI_TEST_POSTGRES_URL"):
        yield None
        return
    if find_pg_bin() is None:
        require_component("PostgreSQL", "initdb/pg_ctl not found (apt-get install postgresql)")
    with postgres_cluster() as server:
        yield server


def _fresh_postgres_url(request: pytest.FixtureRequest) -> str:
    external = os.environ.get("QPKI_TEST_POSTGRES_URL")
    server: PostgresServer | None = request.getfixturevalue("pg_server")
    if server is None:
        assert external
        from sqlalchemy import create_engine, text

        engine = create_engine(external)
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()
        return external
    return server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'qpki.db'}"
    return _fresh_postgres_url(request)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'qpki.db'}"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a test app; keyword arguments override fields."""

    def factory(database_url: str | None = None, **overrides: object) -> Settings:
        data_dir = tmp_path / "data"
        data_dir.mkdir(mode=0o700, exist_ok=True)
        values: dict[str, object] = {
            "data_dir": data_dir,
            "database_url": database_url or f"sqlite:///{tmp_path / 'qpki.db'}",
            "secret_key": TEST_SECRET_KEY,
            "csrf_enabled": False,
            "rate_limits_enabled": False,
            "testing": True,
            "argon2_profile": "fast",
            # Tests deliver queued mail by hand (tests/mail); no background sender thread
            # outlives a test's database.
            "mail_worker": False,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return factory


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Flask]]:
    """Build migrated apps; every engine is disposed at teardown."""
    apps: list[Flask] = []

    def factory(
        database_url: str | None = None, *, clock: Clock = system_clock, **overrides: object
    ) -> Flask:
        app = create_app(make_settings(database_url, **overrides), clock=clock)
        app.db_manager.migrate_database()  # type: ignore[attr-defined]
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.db_manager.dispose()  # type: ignore[attr-defined]


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """A migrated app on SQLite with CSRF and per-address limits off (tested separately)."""
    return make_app()


@pytest.fixture
def any_app(make_app: Callable[..., Flask], db_url: str) -> Flask:
    """A migrated app on each backend (SQLite and PostgreSQL)."""
    return make_app(db_url)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
