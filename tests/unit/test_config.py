"""Settings.from_env, the data directory, the Flask secret key file and write_private_file."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpki.config import (
    MIN_SECRET_KEY_BYTES,
    ConfigError,
    Settings,
    load_or_create_secret_key,
    secure_data_dir,
    secure_sqlite_files,
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
    assert leftovers(data_dir) == [".secret_key", "qpki.db"]  # no temp files
    assert mode_of(data_dir / "qpki.db") == 0o600  # created private before SQLite opens it


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
            "QPKI_WEBAUTHN_RP_ID": "qpki.example.org",
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
    settings = Settings.from_env(
        {"QPKI_DATA_DIR": str(data_dir), "QPKI_HTTPS": raw, "QPKI_WEBAUTHN_RP_ID": "localhost"}
    )
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


# -- secrets from files (systemd credentials, container secrets) -------------------------------
SECRET = "s" * 40


@pytest.mark.parametrize(
    ("name", "attribute", "expected"),
    [
        ("QPKI_SECRET_KEY", "secret_key", SECRET),
        ("QPKI_MFA_KEY", "mfa_key", SECRET),
        ("QPKI_MFA_DECRYPT_KEYS", "mfa_decrypt_keys", SECRET),
        ("QPKI_SECRET_KEY_FALLBACKS", "secret_key_fallbacks", (SECRET,)),
    ],
)
def test_every_key_setting_has_a_file_form(
    data_dir: Path, tmp_path: Path, name: str, attribute: str, expected: object
) -> None:
    secret_file = tmp_path / "credential"
    secret_file.write_text(SECRET + "\n")  # the usual trailing newline is not part of it
    direct = Settings.from_env({"QPKI_DATA_DIR": str(data_dir), name: SECRET})
    from_file = Settings.from_env(
        {"QPKI_DATA_DIR": str(data_dir), f"{name}_FILE": str(secret_file)}
    )
    assert getattr(direct, attribute) == getattr(from_file, attribute) == expected


def test_file_form_and_direct_form_together_are_refused(data_dir: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "credential"
    secret_file.write_text(SECRET)
    env = {
        "QPKI_DATA_DIR": str(data_dir),
        "QPKI_SECRET_KEY": SECRET,
        "QPKI_SECRET_KEY_FILE": str(secret_file),
    }
    with pytest.raises(ConfigError, match="Both QPKI_SECRET_KEY and QPKI_SECRET_KEY_FILE"):
        Settings.from_env(env)


@pytest.mark.parametrize(("content", "problem"), [(None, "does not exist"), (b"\n  \n", "empty"),
                                                 (b"\xff\xfe", "not UTF-8")])  # fmt: skip
def test_unusable_secret_file_is_refused(
    data_dir: Path, tmp_path: Path, content: bytes | None, problem: str
) -> None:
    secret_file = tmp_path / "credential"
    if content is not None:
        secret_file.write_bytes(content)
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_env({"QPKI_DATA_DIR": str(data_dir), "QPKI_MFA_KEY_FILE": str(secret_file)})
    message = str(excinfo.value)
    assert "QPKI_MFA_KEY_FILE" in message and str(secret_file) in message and problem in message


def test_unreadable_secret_file_is_refused(data_dir: Path, tmp_path: Path) -> None:
    """A path that cannot be read as a file (here a directory: unreadable even for root, who
    reads any mode-0 file, and this suite runs as root in CI) stops start-up with one line."""
    secret_file = tmp_path / "credential"
    secret_file.mkdir()
    with pytest.raises(ConfigError, match="cannot be read"):
        Settings.from_env({"QPKI_DATA_DIR": str(data_dir), "QPKI_MFA_KEY_FILE": str(secret_file)})


# -- QPKI_SECRET_KEY length ----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["abc", "k" * 31, "é" * 15])  # é is 2 bytes: 30 bytes
def test_short_secret_key_stops_with_one_line(data_dir: Path, key: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_env({"QPKI_DATA_DIR": str(data_dir), "QPKI_SECRET_KEY": key})
    message = str(excinfo.value)
    assert "QPKI_SECRET_KEY is too short" in message and "qpki keys generate" in message
    assert "\n" not in message and key not in message  # one line, never the key itself


def test_secret_key_of_32_bytes_is_accepted(data_dir: Path) -> None:
    assert MIN_SECRET_KEY_BYTES == 32
    settings = Settings.from_env({"QPKI_DATA_DIR": str(data_dir), "QPKI_SECRET_KEY": "k" * 32})
    assert settings.secret_key == "k" * 32


def test_secret_key_fallbacks(data_dir: Path) -> None:
    old1, old2 = "a" * 40, "b" * 40
    settings = Settings.from_env(
        {
            "QPKI_DATA_DIR": str(data_dir),
            "QPKI_SECRET_KEY": SECRET,
            "QPKI_SECRET_KEY_FALLBACKS": f"{old1}, {old2}\n",
        }
    )
    assert settings.secret_key_fallbacks == (old1, old2)
    with pytest.raises(ConfigError, match="QPKI_SECRET_KEY_FALLBACKS is too short"):
        Settings.from_env(
            {"QPKI_DATA_DIR": str(data_dir), "QPKI_SECRET_KEY_FALLBACKS": f"{old1},short"}
        )


# -- file permissions (§12.11) -------------------------------------------------------------------
@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, under which files come out world-readable."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_secure_data_dir_narrows_everything_once(tmp_path: Path, umask_022: None) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    names = ["qpki.db", "qpki.db-wal", "qpki.db-shm", ".secret_key", ".mfa_key", "notes.txt"]
    for name in names:
        (data / name).write_text("x")
        (data / name).chmod(0o644)
    (data / "backups").mkdir(mode=0o755)
    (data / "backups" / "old.db").write_text("x")
    (data / "readonly").write_text("x")
    (data / "readonly").chmod(0o400)
    outside = tmp_path / "outside"
    outside.write_text("x")
    outside.chmod(0o644)
    (data / "link").symlink_to(outside)

    fixed = secure_data_dir(data)

    assert mode_of(data) == 0o700 and mode_of(data / "backups") == 0o700
    for name in [*names, "backups/old.db"]:
        assert mode_of(data / name) == 0o600, name
    assert mode_of(data / "readonly") == 0o400  # already private: left as it is
    assert mode_of(outside) == 0o644  # links are not followed out of the directory
    assert set(fixed) == {data, data / "backups", data / "backups" / "old.db"} | {
        data / n for n in names
    }
    assert secure_data_dir(data) == []  # nothing left to fix: nothing to report again


def test_sqlite_database_and_wal_files_are_created_0600(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "db" / "qpki.db"
    assert secure_sqlite_files(f"sqlite:///{path}") == []
    assert mode_of(path) == 0o600 and path.stat().st_size == 0
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        for suffix in ("", "-wal", "-shm"):
            assert mode_of(path.with_name(path.name + suffix)) == 0o600, suffix
    finally:
        conn.close()


def test_existing_sqlite_files_outside_the_data_dir_are_narrowed(
    tmp_path: Path, umask_022: None
) -> None:
    path = tmp_path / "elsewhere.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    wal = tmp_path / "elsewhere.db-wal"
    wal.write_bytes(b"")
    wal.chmod(0o644)
    assert secure_sqlite_files(f"sqlite:///{path}") == [path, wal]
    assert mode_of(path) == mode_of(wal) == 0o600


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://u:p@127.0.0.1/qpki", "sqlite://", "sqlite:///:memory:"]
)
def test_no_file_for_other_databases(url: str, tmp_path: Path) -> None:
    assert secure_sqlite_files(url) == []
