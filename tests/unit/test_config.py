"""Settings.from_env, the data directory, the Flask secret key file and write_private_file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from qpki.config import (
    ConfigError,
    Settings,
    load_or_create_secret_key,
    write_private_file,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(directory: Path, *expected: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in expected)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_from_env_creates_private_data_dir(data_dir: Path) -> None:
    settings = Settings.from_env({"QPKI_DATA_DIR": str(data_dir)})
    assert data_dir.is_dir()
    assert mode_of(data_dir) == 0o700
    assert settings.data_dir == data_dir.resolve()
    assert settings.database_url == f"sqlite:///{data_dir.resolve() / 'qpki.db'}"


def test_secret_key_file(data_dir: Path) -> None:
    settings = Settings.from_env({"QPKI_DATA_DIR": str(data_dir)})
    key_file = data_dir / ".secret_key"
    assert mode_of(key_file) == 0o600
    assert key_file.read_text().strip() == settings.secret_key
    assert len(settings.secret_key) >= 32
    assert leftovers(data_dir) == [".secret_key"]  # no temp files


def test_secret_key_is_stable_and_per_install(tmp_path: Path) -> None:
    first = Settings.from_env({"QPKI_DATA_DIR": str(tmp_path / "a")})
    again = Settings.from_env({"QPKI_DATA_DIR": str(tmp_path / "a")})
    other = Settings.from_env({"QPKI_DATA_DIR": str(tmp_path / "b")})
    assert again.secret_key == first.secret_key
    assert other.secret_key != first.secret_key  # never a hard-coded key


def test_secret_key_from_env_overrides(data_dir: Path) -> None:
    settings = Settings.from_env({"QPKI_DATA_DIR": str(data_dir), "QPKI_SECRET_KEY": "k" * 40})
    assert settings.secret_key == "k" * 40
    assert not (data_dir / ".secret_key").exists()


def test_secret_key_env_wins_over_existing_file(data_dir: Path) -> None:
    from_file = Settings.from_env({"QPKI_DATA_DIR": str(data_dir)}).secret_key
    settings = Settings.from_env({"QPKI_DATA_DIR": str(data_dir), "QPKI_SECRET_KEY": "e" * 40})
    assert settings.secret_key == "e" * 40 != from_file


def test_short_secret_key_file_is_refused(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    write_private_file(data_dir / ".secret_key", b"short")
    with pytest.raises(ConfigError, match="too short"):
        load_or_create_secret_key(data_dir)


def test_database_url_and_other_settings_from_env(data_dir: Path) -> None:
    settings = Settings.from_env(
        {
            "QPKI_DATA_DIR": str(data_dir),
            "QPKI_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1/qpki",
            "QPKI_ISSUER": "Example",
            "QPKI_MFA_KEY": "abc",
            "QPKI_HTTPS": "1",
            "QPKI_PROXY_FIX": "2",
            "QPKI_SESSION_IDLE_MINUTES": "15",
            "QPKI_LOG_LEVEL": "debug",
        }
    )
    assert settings.database_url == "postgresql+psycopg://u@127.0.0.1/qpki"
    assert settings.issuer == "Example"
    assert settings.mfa_key == "abc"
    assert settings.https is True
    assert settings.proxy_fix_hops == 2
    assert settings.session_idle_minutes == 15
    assert settings.log_level == "DEBUG"


def test_defaults(data_dir: Path) -> None:
    settings = Settings.from_env({"QPKI_DATA_DIR": str(data_dir)})
    assert settings.https is False
    assert settings.mfa_key is None
    assert settings.session_idle_minutes == 30
    assert settings.session_absolute_hours == 12
    assert settings.csrf_enabled is True
    assert settings.rate_limits_enabled is True


def test_explicit_env_ignores_process_environment(data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("QPKI_HTTPS", "maybe")
    monkeypatch.setenv("QPKI_SECRET_KEY", "p" * 40)
    settings = Settings.from_env({"QPKI_DATA_DIR": str(data_dir)})
    assert settings.https is False
    assert settings.secret_key != "p" * 40


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False), ("off", False),
     ("False", False), ("", False)],
)  # fmt: skip
def test_booleans(data_dir: Path, raw: str, expected: bool) -> None:
    settings = Settings.from_env({"QPKI_DATA_DIR": str(data_dir), "QPKI_HTTPS": raw})
    assert settings.https is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "tru", "y e s"])
def test_bad_boolean_raises(data_dir: Path, raw: str) -> None:
    with pytest.raises(ConfigError, match="QPKI_HTTPS"):
        Settings.from_env({"QPKI_DATA_DIR": str(data_dir), "QPKI_HTTPS": raw})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("QPKI_PROXY_FIX", "two"),
        ("QPKI_PROXY_FIX", "1.5"),
        ("QPKI_PROXY_FIX", "-1"),
        ("QPKI_SESSION_IDLE_MINUTES", "0"),
        ("QPKI_SESSION_ABSOLUTE_HOURS", "abc"),
    ],
)
def test_bad_int_raises(data_dir: Path, name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({"QPKI_DATA_DIR": str(data_dir), name: raw})


def test_write_private_file_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"original")
    with pytest.raises(FileExistsError):
        write_private_file(path, b"new", overwrite=False)
    assert path.read_bytes() == b"original"
    assert leftovers(tmp_path) == ["file"]


def test_write_private_file_creates_0600(tmp_path: Path) -> None:
    path = tmp_path / "file"
    write_private_file(path, b"content", overwrite=False)
    assert path.read_bytes() == b"content"
    assert mode_of(path) == 0o600
    assert leftovers(tmp_path) == ["file"]


def test_write_private_file_overwrite_replaces_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"original")
    path.chmod(0o644)
    write_private_file(path, b"replacement")
    assert path.read_bytes() == b"replacement"
    assert mode_of(path) == 0o600
    assert leftovers(tmp_path) == ["file"]
