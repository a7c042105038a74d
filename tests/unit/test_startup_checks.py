"""Start-up checks that need no server: URL parsing, redaction, keys, pool settings, logging."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from qpki.config import ConfigError, Settings
from qpki.db.manager import DatabaseManager, code_head_revision
from qpki.logging_setup import configure_logging
from qpki.ops.startup import StartupError, check_shared_keys, parse_database_url, redact_url

PG = "postgresql+psycopg://qpki:{pw}@db.internal:5432/qpki"


@pytest.mark.parametrize(
    "url",
    [
        PG.format(pw="pa@ss-TOPSECRET"),
        PG.format(pw="pa@ss:w@rd-TOPSECRET"),
        "postgresql+psycopg://qpki:TOPSECRET@db.internal:5x/qpki",
        "postgresql+psycopg://qpki:TOPSECRET@db.internal:99999/qpki",
        "qpki:TOPSECRET@db.internal/qpki",
        "postgresql+psycopg://qpki:TOPSECRET@/qpki",
    ],
)
def test_malformed_urls_are_refused_without_showing_the_password(url: str) -> None:
    with pytest.raises(StartupError) as refused:
        parse_database_url(url)
    message = str(refused.value)
    assert "URL-encoded" in message and "\n" not in message
    assert "TOPSECRET" not in message and "ss-" not in message and "pa@" not in message


def test_a_url_without_a_database_name_is_refused_with_the_password_hidden() -> None:
    with pytest.raises(StartupError, match=r"names no database") as refused:
        parse_database_url("postgresql+psycopg://qpki:TOPSECRET@db.internal:5432")
    assert "TOPSECRET" not in str(refused.value) and "***" in str(refused.value)


def test_encoded_passwords_and_sqlite_urls_pass() -> None:
    parsed = parse_database_url(PG.format(pw="p%40ss%3Aw%2Frd"))
    assert parsed.password == "p@ss:w/rd" and parsed.host == "db.internal"
    assert parse_database_url("sqlite:////tmp/x.db").get_backend_name() == "sqlite"
    assert (
        redact_url(PG.format(pw="p%40ss")) == "postgresql+psycopg://qpki:***@db.internal:5432/qpki"
    )


def _settings(tmp_path: Path, env: dict[str, str]) -> Settings:
    return Settings.from_env({"QPKI_DATA_DIR": str(tmp_path), **env})


def test_a_shared_database_needs_every_key_explicitly(tmp_path: Path) -> None:
    env = {"QPKI_DATABASE_URL": PG.format(pw="x")}
    with pytest.raises(StartupError) as refused:
        check_shared_keys(_settings(tmp_path, env), env)
    assert "QPKI_MFA_KEY, QPKI_SECRET_KEY, QPKI_AUDIT_KEY" in str(refused.value)
    keys = {
        "QPKI_MFA_KEY": "k",
        "QPKI_SECRET_KEY_FILE": str(tmp_path / "secret"),
        "QPKI_AUDIT_KEY": "a" * 40,
    }
    (tmp_path / "secret").write_text("s" * 40)
    check_shared_keys(_settings(tmp_path, {**env, **keys}), {**env, **keys})  # accepted
    check_shared_keys(_settings(tmp_path, {}), {})  # SQLite: the data directory keeps them


def test_pool_settings_reach_the_engine(tmp_path: Path) -> None:
    env = {"QPKI_DATABASE_URL": PG.format(pw="x"), "QPKI_DB_POOL_SIZE": "4",
           "QPKI_DB_MAX_OVERFLOW": "0"}  # fmt: skip
    settings = _settings(tmp_path, env)
    db = DatabaseManager(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )
    assert (db.engine.pool.size(), db.engine.pool._max_overflow) == (4, 0)  # type: ignore[attr-defined]
    defaults = _settings(tmp_path, {})
    assert (defaults.db_pool_size, defaults.db_max_overflow) == (2, 3)
    with pytest.raises(ConfigError, match="QPKI_DB_POOL_SIZE must be at least 1"):
        _settings(tmp_path, {"QPKI_DB_POOL_SIZE": "0"})


def test_the_head_revision_read_without_alembic_matches_alembic(tmp_path: Path) -> None:
    db = DatabaseManager(f"sqlite:///{tmp_path / 'x.db'}")
    assert code_head_revision() == db.head_revision()
    assert db.revisions()[-1] == code_head_revision()


def test_limiter_recovery_is_logged_and_its_breach_lines_are_not() -> None:
    configure_logging("INFO")
    limiter_log = logging.getLogger("flask-limiter")
    (handler,) = [h for h in limiter_log.handlers if getattr(h, "_qpki", False)]
    stream = io.StringIO()
    old = handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        limiter_log.warning("Rate limit storage unreachable - falling back to in-memory storage")
        limiter_log.info("ratelimit %s (%s) exceeded at endpoint: %s", "60/minute", "k", "login")
        limiter_log.info("Rate limit storage recovered")
    finally:
        handler.setStream(old)  # type: ignore[attr-defined]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "unreachable" in lines[0] and "Rate limit storage recovered" in lines[1]
