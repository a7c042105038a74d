"""The machine-wide counter file behind the per-address limits when no Redis is configured."""

from __future__ import annotations

import multiprocessing
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from limits import parse
from limits.errors import ConfigurationError
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from qpki.clock import SteppedClock
from qpki.config import Settings
from qpki.web.limits import COUNTER_FILE, SQLiteStorage, storage_uri


def _settings(tmp_path: Path, redis_url: str | None = None) -> Settings:
    return Settings(
        data_dir=tmp_path, database_url="sqlite://", secret_key="k" * 40, redis_url=redis_url
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "a dir%"  # a space and a percent sign survive the URI
    path.mkdir()
    return path


def test_the_counter_file_is_chosen_without_redis_and_redis_with_it(data_dir: Path) -> None:
    assert storage_uri(_settings(data_dir, "redis://cache:6379/0")) == "redis://cache:6379/0"
    storage = storage_from_string(storage_uri(_settings(data_dir)))
    assert isinstance(storage, SQLiteStorage)
    assert storage.path == (data_dir / COUNTER_FILE).resolve()


def test_the_file_is_owner_only(data_dir: Path) -> None:
    storage = SQLiteStorage(SQLiteStorage.uri_for(data_dir / COUNTER_FILE))
    assert stat.S_IMODE(storage.path.stat().st_mode) == 0o600


def test_a_relative_or_missing_path_is_refused() -> None:
    for uri in ("qpki+sqlite://", "qpki+sqlite:relative.db"):
        with pytest.raises(ConfigurationError, match="absolute file path"):
            SQLiteStorage(uri)


def test_fixed_window_counts_expires_and_clears(data_dir: Path) -> None:
    clock = SteppedClock()
    storage = SQLiteStorage(SQLiteStorage.uri_for(data_dir / COUNTER_FILE), clock=clock)
    window = FixedWindowRateLimiter(storage)
    limit = parse("3 per minute")
    assert [window.hit(limit, "10.0.0.1") for _ in range(4)] == [True, True, True, False]
    assert window.hit(limit, "10.0.0.2")  # another address has its own count
    stats = window.get_window_stats(limit, "10.0.0.1")
    assert stats.remaining == 0
    assert stats.reset_time == pytest.approx(clock().timestamp() + 60)

    clock.advance(seconds=59)
    assert not window.hit(limit, "10.0.0.1")  # the window runs from the first hit
    clock.advance(seconds=1)
    assert window.get_window_stats(limit, "10.0.0.1").remaining == 3
    assert window.hit(limit, "10.0.0.1")

    window.clear(limit, "10.0.0.1")
    assert window.get_window_stats(limit, "10.0.0.1").remaining == 3
    assert window.hit(limit, "10.0.0.3")
    assert storage.check()
    # 10.0.0.2's window expired (deleted by a later hit), 10.0.0.1's was cleared: one is left.
    assert storage.reset() == 1


def test_expired_windows_are_deleted_as_hits_arrive(data_dir: Path) -> None:
    clock = SteppedClock()
    storage = SQLiteStorage(SQLiteStorage.uri_for(data_dir / COUNTER_FILE), clock=clock)
    for address in range(50):
        storage.incr(f"LIMITER/10.0.0.{address}", 60)
    clock.advance(seconds=61)
    storage.incr("LIMITER/10.0.1.1", 60)
    assert storage.reset() == 1


KEY = "LIMITER/127.0.0.1/auth.login/60/1/minute"
# The storage the parent process built and used before forking, as gunicorn's master builds
# the app: the children inherit it (and its open connection) through fork().
_inherited: SQLiteStorage | None = None


def _hit_many(times: int) -> None:
    assert _inherited is not None
    for _ in range(times):
        _inherited.incr(KEY, 60)


def test_forked_processes_sharing_the_file_lose_no_hit(data_dir: Path) -> None:
    """What gunicorn's workers do: separate processes incrementing one key at once."""
    global _inherited
    _inherited = SQLiteStorage(SQLiteStorage.uri_for(data_dir / COUNTER_FILE))
    _inherited.incr(KEY, 60)  # the parent's connection is open when the children fork
    workers, times = 4, 40
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for done in [pool.submit(_hit_many, times) for _ in range(workers)]:
                done.result()
        assert _inherited.get(KEY) == 1 + workers * times
        assert _inherited.incr(KEY, 60) == 2 + workers * times  # the parent's still works
    finally:
        _inherited = None


def test_a_broken_file_is_reported_unhealthy(data_dir: Path) -> None:
    """check() is how Flask-Limiter decides to count in memory until the storage is back."""
    storage = SQLiteStorage(SQLiteStorage.uri_for(data_dir / COUNTER_FILE))
    storage.path.write_bytes(b"this is not an SQLite database" * 10)
    assert storage.check() is False
