"""Operating a shared deployment: upgrades, start-up checks, a frozen Redis, PostgreSQL backups.

Everything here runs the real `qpki` command as a separate process against a real PostgreSQL
cluster and redis-server (tests/harness), as an operator would. Failures must be ONE line on
the terminal that says what to do — no traceback, no "Migration failed", never a password.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.services import PostgresServer, RedisServer, app_server, free_port
from qpki.auth.keys import generate_keys
from qpki.db.manager import _MIGRATION_LOCK_ID, code_head_revision

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

PASSWORD = "operations test passphrase 2291"
HEAD = code_head_revision()


def qpki(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qpki", *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line of output and no traceback; returns it."""
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert "\n" not in output, f"more than one line:\n{output}"
    assert "Traceback" not in output and "Migration failed" not in output, output
    return output


@pytest.fixture
def fresh_db(deploy_postgres: PostgresServer) -> Iterator[str]:
    name = f"ops_{uuid.uuid4().hex[:10]}"
    url = deploy_postgres.create_database(name)
    yield url
    deploy_postgres.drop_database(name)


@pytest.fixture
def env_for(tmp_path: Path) -> Callable[..., dict[str, str]]:
    keys = generate_keys()

    def factory(url: str, **extra: str) -> dict[str, str]:
        return {
            "QPKI_DATA_DIR": str(tmp_path / "data"),
            "QPKI_DATABASE_URL": url,
            "QPKI_REDIS_URL": "",
            "QPKI_LOG_JSON": "0",
            **keys,
            **extra,
        }

    return factory


def _http_get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- upgrades and rollback ---------------------------------------------------------------------
def test_old_schema_is_refused_until_migrated_then_served_and_rolled_back(
    fresh_db: str, env_for: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = env_for(fresh_db)
    older = qpki("migrate", "--revision", "0002_mfa", env=env)
    assert older.returncode == 0 and "upgraded from None to 0002_mfa" in older.stdout, older

    # New code, old schema: ordinary commands and the server refuse and name the command.
    for command in (["users", "list"], ["run", "--port", str(free_port())]):
        line = one_line_failure(qpki(*command, env=env))
        assert "at 0002_mfa" in line and f"needs {HEAD}" in line
        assert line.endswith("upgrade it first with: qpki migrate"), line
    assert qpki("migrate", "--check", env=env).returncode == 1

    upgraded = qpki("migrate", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from 0002_mfa to {HEAD}" in upgraded.stdout
    assert "nothing to do" in qpki("migrate", env=env).stdout  # idempotent

    with app_server(env, workers=1, log_dir=tmp_path / "logs") as server:
        status, body = _http_get(server.url + "/readyz")
        assert status == 200, body
        # The documented rollback, step 1, while an instance still runs: it stops being ready.
        back = qpki("migrate", "--revision", "0002_mfa", env=env)
        assert back.returncode == 0 and f"rolled back from {HEAD} to 0002_mfa" in back.stdout
        status, body = _http_get(server.url + "/readyz")
        assert status == 503 and "schema behind" in body
        assert _http_get(server.url + "/healthz")[0] == 200
        assert qpki("migrate", env=env).returncode == 0
        assert _http_get(server.url + "/readyz")[0] == 200
        assert "Traceback" not in server.log_text()


def test_a_schema_newer_than_the_code_is_refused(
    fresh_db: str, env_for: Callable[..., dict[str, str]]
) -> None:
    env = env_for(fresh_db)
    assert qpki("migrate", env=env).returncode == 0
    import psycopg

    conninfo = fresh_db.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    line = one_line_failure(qpki("users", "list", env=env))
    assert "newer than this qPKI knows" in line and "qpki migrate --revision" in line
    assert "newer than this qPKI knows" in one_line_failure(qpki("migrate", env=env))


def test_two_migrations_never_run_at_once(
    deploy_postgres: PostgresServer, fresh_db: str, env_for: Callable[..., dict[str, str]]
) -> None:
    import psycopg

    env = env_for(fresh_db)
    conninfo = fresh_db.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_ID,))
        waiting = subprocess.Popen(
            [sys.executable, "-m", "qpki", "migrate"],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            with psycopg.connect(conninfo, autocommit=True) as probe:
                while time.monotonic() < deadline:  # wait until it queues behind our lock
                    row = probe.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    ).fetchone()
                    if row and row[0]:
                        break
                    time.sleep(0.1)
                else:
                    pytest.fail("qpki migrate never waited for the migration lock")
                    return
                assert waiting.poll() is None, "it ran although another migration held the lock"
                tables = probe.execute(
                    "SELECT count(*) FROM information_schema.tables WHERE table_name = 'users'"
                ).fetchone()
                assert tables == (0,), "it changed the schema without the lock"
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_ID,))
        out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "waiting for it to finish" in err and f"to {HEAD}" in out

    # Two operators at the same moment on a new database: one migrates, the other finds it done.
    second = deploy_postgres.create_database(f"ops_{uuid.uuid4().hex[:10]}")
    env2 = env_for(second)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "qpki", "migrate"],
            env={**os.environ, **env2},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    outputs = sorted(out.strip() for out, _ in results)
    assert outputs == [
        f"Database is at revision {HEAD}; nothing to do.",
        f"Database upgraded from None to {HEAD}.",
    ], results
    with psycopg.connect(second.replace("postgresql+psycopg://", "postgresql://")) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]


# -- start-up checks -----------------------------------------------------------------------------
def _commands() -> list[list[str]]:
    return [["run", "--port", str(free_port())], ["users", "list"]]


def test_a_shared_database_without_explicit_keys_is_refused(
    fresh_db: str, env_for: Callable[..., dict[str, str]]
) -> None:
    env = env_for(fresh_db, QPKI_MFA_KEY="", QPKI_SECRET_KEY="", QPKI_AUDIT_KEY="")
    assert qpki("migrate", env=env).returncode == 0  # migrating needs no keys
    for command in _commands():
        line = one_line_failure(qpki(*command, env=env))
        assert "shared database" in line and "QPKI_MFA_KEY" in line and "QPKI_SECRET_KEY" in line
        assert "qpki keys generate" in line


def test_a_password_with_an_unencoded_at_sign_is_refused_without_leaking_it(
    deploy_postgres: PostgresServer, env_for: Callable[..., dict[str, str]]
) -> None:
    url = f"postgresql+psycopg://qpki:pa@ss-TOPSECRET@127.0.0.1:{deploy_postgres.port}/qpki"
    env = env_for(url)
    for command in [*_commands(), ["migrate"]]:
        line = one_line_failure(qpki(*command, env=env))
        assert "URL-encoded" in line and "%40" in line
        assert "TOPSECRET" not in line and "ss-" not in line and "pa@" not in line


def test_an_url_encoded_password_with_special_characters_works(
    deploy_postgres: PostgresServer, env_for: Callable[..., dict[str, str]]
) -> None:
    import psycopg
    from psycopg import sql

    role, password = f"op_{uuid.uuid4().hex[:8]}", "p@ss:w/rd%#?x"
    dbname = f"ops_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(deploy_postgres.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(*map(sql.Identifier, (dbname, role)))
        )
    encoded = urllib.parse.quote(password, safe="")
    url = f"postgresql+psycopg://{role}:{encoded}@127.0.0.1:{deploy_postgres.port}/{dbname}"
    env = env_for(url)
    result = qpki("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert qpki("users", "list", env=env).returncode == 0
    deploy_postgres.drop_database(dbname)


def test_a_wrong_database_password_says_authentication_failed_in_one_line(
    deploy_postgres: PostgresServer, fresh_db: str, env_for: Callable[..., dict[str, str]]
) -> None:
    wrong = fresh_db.replace(deploy_postgres.password, "WrongPassword123")
    env = env_for(wrong)
    for command in [*_commands(), ["migrate"]]:
        line = one_line_failure(qpki(*command, env=env))
        assert "authentication failed" in line, line
        assert "WrongPassword123" not in line and deploy_postgres.password not in line


def test_an_unreachable_database_is_named_in_one_line(
    env_for: Callable[..., dict[str, str]],
) -> None:
    env = env_for(f"postgresql+psycopg://qpki:secret@127.0.0.1:{free_port()}/qpki")
    for command in [*_commands(), ["migrate"]]:
        line = one_line_failure(qpki(*command, env=env))
        assert "refused the connection" in line and "secret" not in line


def test_a_malformed_mfa_key_stops_in_one_line(
    fresh_db: str, env_for: Callable[..., dict[str, str]]
) -> None:
    env = env_for(fresh_db, QPKI_MFA_KEY="not-a-fernet-key")
    assert qpki("migrate", env=env).returncode == 0
    for command in _commands():
        line = one_line_failure(qpki(*command, env=env))
        assert "QPKI_MFA_KEY" in line and "not-a-fernet-key" not in line


@pytest.fixture
def redis_with_password(deploy_redis: RedisServer) -> Iterator[tuple[RedisServer, str]]:
    import redis

    password = uuid.uuid4().hex
    client = redis.Redis(host=deploy_redis.host, port=deploy_redis.port)
    client.config_set("requirepass", password)
    try:
        yield deploy_redis, password
    finally:
        redis.Redis(host=deploy_redis.host, port=deploy_redis.port, password=password).config_set(
            "requirepass", ""
        )


def test_redis_wrong_password_says_authentication_failed_and_down_says_unreachable(
    fresh_db: str,
    env_for: Callable[..., dict[str, str]],
    redis_with_password: tuple[RedisServer, str],
    tmp_path: Path,
) -> None:
    server, password = redis_with_password
    base = env_for(fresh_db)
    assert qpki("migrate", env=base).returncode == 0
    port = ["run", "--port", str(free_port())]
    for url in (
        f"redis://:wrong-{password[:6]}@{server.host}:{server.port}/0",
        f"redis://{server.host}:{server.port}/0",
    ):
        line = one_line_failure(qpki(*port, env={**base, "QPKI_REDIS_URL": url}))
        assert "Redis" in line and "authentication failed" in line, line
        assert password[:6] not in line
    down = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    line = one_line_failure(qpki(*port, env={**base, "QPKI_REDIS_URL": down}))
    assert "unreachable" in line and password not in line
    good = {**base, "QPKI_REDIS_URL": f"redis://:{password}@{server.host}:{server.port}/0"}
    with app_server(good, workers=1, log_dir=tmp_path / "logs") as app:
        assert _http_get(app.url + "/readyz")[0] == 200


# -- a frozen Redis ------------------------------------------------------------------------------
def test_a_frozen_redis_costs_a_sign_in_little(
    fresh_db: str,
    env_for: Callable[..., dict[str, str]],
    deploy_redis: RedisServer,
    web: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """redis-server stopped with SIGSTOP accepts TCP but never answers: the worst case. The
    sub-second storage timeouts bound what each sign-in pays before the in-memory fallback."""
    env = env_for(fresh_db, QPKI_REDIS_URL=deploy_redis.url, QPKI_RATE_LIMITS="1")
    assert qpki("migrate", env=env).returncode == 0
    created = qpki("users", "create", "frozen", "--password-stdin", env=env, stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    with app_server(env, workers=1, log_dir=tmp_path / "logs") as server:
        client = web(server.url)

        def timed_sign_in() -> float:
            token = client.csrf("/auth/login")
            start = time.monotonic()
            response = client.post(
                "/auth/login", {"username": "frozen", "password": PASSWORD}, token=token
            )
            elapsed = time.monotonic() - start
            assert response.status_code == 302, response.text[:500]
            client.http.cookies.clear()
            return elapsed

        baseline = [timed_sign_in() for _ in range(3)]
        assert deploy_redis.process is not None
        os.kill(deploy_redis.process.pid, signal.SIGSTOP)
        try:
            frozen = [timed_sign_in() for _ in range(5)]
        finally:
            os.kill(deploy_redis.process.pid, signal.SIGCONT)
        print(
            f"\nsign-in seconds: Redis up {[round(t, 3) for t in baseline]}, "
            f"Redis frozen {[round(t, 3) for t in frozen]} "
            f"(median {statistics.median(frozen):.3f})"
        )
        # Generous bound (shared CI machine): redis-py 8's default 5 s timeout, or none at
        # all with older versions, made these 5-10 s each.
        assert max(frozen) < 3.0, frozen
        assert "Rate limit storage unreachable" in server.log_text()


def test_redis_coming_back_is_logged(
    fresh_db: str,
    env_for: Callable[..., dict[str, str]],
    deploy_redis: RedisServer,
    web: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """Both halves of an outage reach the log: the fallback warning and, once Redis answers
    again, Flask-Limiter's INFO line `Rate limit storage recovered`."""
    env = env_for(fresh_db, QPKI_REDIS_URL=deploy_redis.url, QPKI_RATE_LIMITS="1")
    assert qpki("migrate", env=env).returncode == 0
    with app_server(env, workers=1, log_dir=tmp_path / "logs") as server:
        client = web(server.url)

        def attempt() -> None:
            response = client.login("nobody-at-all", "not the password at all")
            assert response.status_code == 200, response.status_code

        attempt()
        deploy_redis.stop()
        try:
            attempt()
            assert "Rate limit storage unreachable" in server.log_text()
        finally:
            deploy_redis.start()
        deadline = time.monotonic() + 60  # Flask-Limiter re-checks after 1, 2, 4, … s
        while "Rate limit storage recovered" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(1.0)
            attempt()


# -- PostgreSQL backup and restore ---------------------------------------------------------------
def test_postgres_backup_drop_restore_and_verify(
    deploy_postgres: PostgresServer, env_for: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    name = f"ops_{uuid.uuid4().hex[:10]}"
    url = deploy_postgres.create_database(name)
    env = env_for(url)
    assert qpki("migrate", env=env).returncode == 0
    for user in ("ann", "ben"):
        made = qpki("users", "create", user, "--password-stdin", env=env, stdin=PASSWORD + "\n")
        assert made.returncode == 0, made.stderr

    backup = qpki("backup", str(tmp_path / "backup"), env=env)
    assert backup.returncode == 0, backup.stderr
    assert "Ran: pg_dump --format=custom" in backup.stdout and "Keys NOT included" in backup.stdout
    assert deploy_postgres.password not in backup.stdout + backup.stderr
    assert (tmp_path / "backup" / "qpki.pgdump").stat().st_size > 0

    deploy_postgres.drop_database(name)  # disaster
    deploy_postgres.create_database(name)
    restored = qpki("restore", str(tmp_path / "backup"), env=env)
    assert restored.returncode == 0, restored.stderr
    assert "Ran: pg_restore" in restored.stdout and deploy_postgres.password not in restored.stdout
    verified = qpki("audit", "verify", env=env)
    assert verified.returncode == 0 and "Audit chain intact" in verified.stdout, verified
    listed = qpki("users", "list", env=env)
    assert "ann" in listed.stdout and "ben" in listed.stdout

    again = qpki("restore", str(tmp_path / "backup"), env=env)
    assert "--force" in one_line_failure(again)
    forced = qpki("restore", str(tmp_path / "backup"), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    deploy_postgres.drop_database(name)
