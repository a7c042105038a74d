"""Start REAL throwaway services on 127.0.0.1 for integration tests, and always stop them.

Why real services: mocks cannot show what a PostgreSQL restart, a Redis outage, or a TLS
terminating proxy does to the app. Every helper here therefore runs the genuine binary in a
private temporary directory, listens only on loopback, and is a context manager whose
``finally`` block tears the service down (killing whole process groups) even when the test body
raises. Nothing is written outside the temporary directory (no /var, no system config).

This module deliberately has no import-time dependency on pytest, psycopg, redis or
cryptography, so it can be imported by benchmark scripts or by tests that will be skipped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AppServer",
    "NginxServer",
    "PostgresServer",
    "RedisServer",
    "ServiceStartError",
    "SmtpSink",
    "app_server",
    "find_pg_bin",
    "free_port",
    "make_self_signed_cert",
    "nginx_proxy",
    "postgres_cluster",
    "redis_server",
    "require_component",
    "smtp_sink",
]

LOOPBACK = "127.0.0.1"


class ServiceStartError(RuntimeError):
    """A service did not come up in time; the message carries the tail of its log."""


# ---------------------------------------------------------------------------------------------
# small generic helpers
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (bind to port 0), which avoids collisions between parallel test runs far
    better than hard-coded ports. There is an unavoidable small race until the service binds it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def require_component(name: str, reason: str) -> None:
    """Skip the calling test because ``name`` is unavailable, or fail in strict mode.

    Locally a missing PostgreSQL/Redis/nginx should only skip; in CI (``QPKI_REQUIRE_ALL=1``)
    a silently skipped integration test would hide a broken environment, so it fails instead.
    pytest is imported lazily so this module stays importable without pytest.
    """
    import pytest

    if os.environ.get("QPKI_REQUIRE_ALL") == "1":
        pytest.fail(f"{name} required (QPKI_REQUIRE_ALL=1) but {reason}")
    pytest.skip(f"{name} not available: {reason}")


def _tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a log file, for error messages (never raises)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _port_open(port: int, host: str = LOOPBACK) -> bool:
    """True if something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _kill_process_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it if it does not exit in time.

    Services are started with ``start_new_session=True`` so their pid is also their process
    group id; killing the group also takes out workers/children (gunicorn, nginx workers) that
    would otherwise survive as orphans holding the port.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # Children may outlive the leader; always sweep the group with SIGKILL.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _is_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------


def find_pg_bin() -> Path | None:
    """Directory containing ``initdb`` and ``pg_ctl``, or None.

    Debian does not put the server binaries on PATH (only wrappers for client tools), so after
    PATH we look in /usr/lib/postgresql/<major>/bin and prefer the highest major version.
    """
    initdb = shutil.which("initdb")
    if initdb:
        bindir = Path(initdb).resolve().parent
        if (bindir / "pg_ctl").exists():
            return bindir

    def major(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return -1.0

    for bindir_str in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        bindir = Path(bindir_str)
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL cluster reachable over TCP with password auth."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    dbname: str
    url: str
    bin_dir: Path = field(repr=False)
    tmp_dir: Path = field(repr=False)
    data_dir: Path = field(repr=False)
    log_path: Path = field(repr=False)

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) for another database on this server."""
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str | None = None) -> str:
        """libpq conninfo string, for using psycopg directly (without SQLAlchemy)."""
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname={dbname or self.dbname} connect_timeout=3"
        )

    def _pg_ctl(self, *args: str, timeout: float = 60.0) -> None:
        cmd = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        _run_as_postgres(cmd, cwd=self.tmp_dir, timeout=timeout, log_path=self.log_path)

    def is_running(self) -> bool:
        """True if the postmaster is up (per pg_ctl status)."""
        cmd = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "status"]
        result = subprocess.run(
            cmd, capture_output=True, cwd=self.tmp_dir, check=False, **_postgres_user_kwargs()
        )
        return result.returncode == 0

    def start(self) -> None:
        """Start the (stopped) cluster again and wait until it accepts connections."""
        self._pg_ctl("start", "-w", "-t", "30", "-l", str(self.log_path))
        _wait_for_postgres(self, timeout=30.0)

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster (e.g. to simulate a database outage); ``start()`` brings it back."""
        self._pg_ctl("stop", "-w", "-t", "30", "-m", mode)

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: drops all connections, keeps the data, same port."""
        self._pg_ctl("restart", "-w", "-t", "30", "-m", "fast", "-l", str(self.log_path))
        _wait_for_postgres(self, timeout=30.0)

    def create_database(self, name: str) -> str:
        """Create database ``name`` (owned by the superuser) and return its SQLAlchemy URL.

        Tests that must not see each other's rows get their own database on one cluster; that
        is much cheaper than a cluster per test.
        """
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting remaining sessions (PostgreSQL 13+)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _postgres_ids() -> tuple[int, int] | None:
    """(uid, gid) of the ``postgres`` OS user when we run as root, else None.

    PostgreSQL refuses to run as root, so initdb/pg_ctl/postgres must run as an unprivileged
    user, and the files they touch must belong to it.
    """
    if not _is_root():
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceStartError("running as root but there is no 'postgres' OS user") from None
    return entry.pw_uid, entry.pw_gid


def _postgres_user_kwargs() -> dict[str, Any]:
    """subprocess kwargs that drop to the ``postgres`` OS user when we run as root.

    ``user=``/``group=``/``extra_groups=`` make Popen call setgroups/setgid/setuid in the
    child, which avoids depending on runuser/su and a thread-unsafe preexec_fn.
    """
    ids = _postgres_ids()
    if ids is None:
        return {}
    return {"user": ids[0], "group": ids[1], "extra_groups": []}


def _run_as_postgres(
    cmd: list[str], *, cwd: Path, timeout: float, log_path: Path | None = None
) -> None:
    """Run a PostgreSQL tool, raising ServiceStartError with its output on failure."""
    result = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **_postgres_user_kwargs(),
    )
    if result.returncode != 0:
        log = f"\n--- server log ---\n{_tail(log_path)}" if log_path else ""
        raise ServiceStartError(
            f"{' '.join(cmd)} failed with exit code {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}{log}"
        )


def _wait_for_postgres(server: PostgresServer, timeout: float) -> None:
    """Poll with a real psycopg login (TCP + password) until it works or ``timeout`` passes."""
    import psycopg

    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            last_error = exc
            time.sleep(0.1)
    raise ServiceStartError(
        f"PostgreSQL on port {server.port} not ready after {timeout:.0f}s: {last_error}\n"
        f"--- server log ---\n{_tail(server.log_path)}"
    )


@contextmanager
def postgres_cluster(
    dbname: str = "qpki", user: str = "qpki", port: int | None = None
) -> Iterator[PostgresServer]:
    """Initialise and run a private PostgreSQL cluster in a temp dir; destroy it at exit.

    Durability settings (fsync, synchronous_commit, full_page_writes) are off because the data
    is thrown away and they make initdb/DDL many times slower. Authentication is
    scram-sha-256 even over TCP on loopback so the app's real password-based URL is exercised.
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise ServiceStartError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    port = port or free_port()
    password = secrets.token_hex(16)
    # Short path under /tmp: unix socket paths are limited to ~107 bytes.
    tmp_dir = Path(tempfile.mkdtemp(prefix="qpki-pg-", dir="/tmp"))
    data_dir = tmp_dir / "data"
    log_path = tmp_dir / "postgres.log"
    server = PostgresServer(
        host=LOOPBACK,
        port=port,
        user=user,
        password=password,
        dbname=dbname,
        url="",
        bin_dir=bin_dir,
        tmp_dir=tmp_dir,
        data_dir=data_dir,
        log_path=log_path,
    )
    server.url = server.url_for(dbname)
    try:
        pwfile = tmp_dir / "pwfile"
        pwfile.write_text(password + "\n", encoding="utf-8")
        pwfile.chmod(0o600)
        log_path.touch()
        ids = _postgres_ids()
        if ids is not None:
            for path in (tmp_dir, pwfile, log_path):
                os.chown(path, *ids)
        _run_as_postgres(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=tmp_dir,
            timeout=120,
        )
        pwfile.unlink()
        settings = {
            "listen_addresses": f"'{LOOPBACK}'",
            "port": str(port),
            "unix_socket_directories": f"'{tmp_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
        }
        # Appended to postgresql.conf (not passed with -o) so restart() keeps them.
        with (data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# qpki test harness\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        server.start()
        server.create_database(dbname)
        yield server
    finally:
        _destroy_postgres(server)


def _destroy_postgres(server: PostgresServer) -> None:
    """Stop the cluster the hard way and remove its directory; never raises."""
    pid_file = server.data_dir / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(Exception):
            server._pg_ctl("stop", "-w", "-t", "15", "-m", "immediate", timeout=30)
    if pid_file.exists():
        # pg_ctl failed or hung: the postmaster runs in its own session (pg_ctl calls setsid),
        # so its pid is a process group id; kill the whole group.
        with contextlib.suppress(Exception):
            pid = int(pid_file.read_text().splitlines()[0])
            os.killpg(pid, signal.SIGKILL)
            time.sleep(0.2)
    shutil.rmtree(server.tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------


def _redis_ping(port: int) -> bool:
    """Raw RESP PING, so readiness checks do not depend on redis-py."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """A throwaway redis-server without persistence; can be stopped and restarted in place."""

    host: str
    port: int
    url: str
    tmp_dir: Path = field(repr=False)
    log_path: Path = field(repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 10.0) -> None:
        """(Re)start on the same port, e.g. to end a simulated Redis outage."""
        if self.process is not None and self.process.poll() is None:
            return
        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            raise ServiceStartError("redis-server not found on PATH")
        cmd = [
            redis_bin,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.tmp_dir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _redis_ping(self.port):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise ServiceStartError(
            f"redis-server on port {self.port} did not answer PING\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); data is lost because nothing is persisted."""
        if self.process is not None:
            _kill_process_group(self.process, timeout=5.0)
            self.process = None

    def is_running(self) -> bool:
        """True if the server currently answers PING."""
        return _redis_ping(self.port)


@contextmanager
def redis_server(port: int | None = None) -> Iterator[RedisServer]:
    """Run a private redis-server on 127.0.0.1 for the duration of the block."""
    port = port or free_port()
    tmp_dir = Path(tempfile.mkdtemp(prefix="qpki-redis-"))
    server = RedisServer(
        host=LOOPBACK,
        port=port,
        url=f"redis://{LOOPBACK}:{port}/0",
        tmp_dir=tmp_dir,
        log_path=tmp_dir / "redis.log",
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# nginx + TLS
# ---------------------------------------------------------------------------------------------


def make_self_signed_cert(dir: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """Write a 1-day self-signed EC P-256 certificate and key into ``dir``.

    The SAN covers ``hostname`` and 127.0.0.1 so clients can verify either name with
    ``verify=cert_path``. The key file is created with mode 0600 (never world-readable, even
    briefly). Returns ``(cert_path, key_path)``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = dir / f"{hostname}.crt"
    key_path = dir / f"{hostname}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with contextlib.suppress(FileNotFoundError):
        key_path.unlink()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    return cert_path, key_path


@dataclass
class NginxServer:
    """A running nginx master (plus workers) using a rendered config in a temp dir."""

    host: str
    port: int
    url: str
    conf_path: Path
    tmp_dir: Path = field(repr=False)
    error_log: Path = field(repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop nginx (SIGTERM = fast shutdown to the whole process group)."""
        if self.process is not None:
            _kill_process_group(self.process, timeout=10.0)
            self.process = None

    def error_log_text(self) -> str:
        """The error log, useful in assertion messages."""
        return self.error_log.read_text(encoding="utf-8", errors="replace")


def _http_defaults(tmp_dir: Path) -> str:
    """http{}-level directives that keep access logs and temp files inside ``tmp_dir``.

    Debian's nginx is compiled with /var/log/nginx and /var/lib/nginx defaults; without these
    lines a test run would write there (or fail when not root).
    """
    lines = [f"access_log {tmp_dir}/access.log;"]
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        lines.append(f"{kind}_temp_path {tmp_dir}/{kind}_temp;")
    return "\n    ".join(lines)


@contextmanager
def nginx_proxy(
    conf_template: Path, scheme: str = "https", **substitutions: object
) -> Iterator[NginxServer]:
    """Render ``conf_template`` with :class:`string.Template` and run nginx in the foreground.

    Placeholders available in the template (besides the caller's ``substitutions``):

    * ``$port``      listening port (a free port unless the caller passes ``port=``)
    * ``$tmp_dir``   the private temp dir (also nginx's ``-p`` prefix)
    * ``$http_defaults``  put this inside ``http {}``: access_log and *_temp_path in tmp_dir

    Rendering uses ``safe_substitute``, so nginx's own variables (``$host``,
    ``$remote_addr`` ...) pass through untouched as long as no substitution has the same name;
    ``$$`` also yields a literal ``$``. ``daemon off``, ``pid``, ``error_log`` and, when running
    as root, ``user nobody <group>`` are added with ``-g`` unless the template sets them in the
    main context, so nothing is written under /var or /run.
    """
    if shutil.which("nginx") is None:
        raise ServiceStartError("nginx not found on PATH")
    port = int(str(substitutions.pop("port", 0))) or free_port()
    tmp_dir = Path(tempfile.mkdtemp(prefix="qpki-nginx-"))
    # nginx workers run as an unprivileged user when the master is root; they must be able to
    # traverse the dir to reach the temp paths that the master creates and chowns for them.
    tmp_dir.chmod(0o755)
    error_log = tmp_dir / "error.log"
    conf_path = tmp_dir / "nginx.conf"
    server = NginxServer(
        host=LOOPBACK,
        port=port,
        url=f"{scheme}://{LOOPBACK}:{port}",
        conf_path=conf_path,
        tmp_dir=tmp_dir,
        error_log=error_log,
    )
    try:
        values = {
            "port": str(port),
            "tmp_dir": str(tmp_dir),
            "http_defaults": _http_defaults(tmp_dir),
            **{key: str(value) for key, value in substitutions.items()},
        }
        rendered = string.Template(conf_template.read_text(encoding="utf-8")).safe_substitute(
            values
        )
        conf_path.write_text(rendered, encoding="utf-8")

        def has_directive(directive: str) -> bool:
            return re.search(rf"(?m)^\s*{directive}\s", rendered) is not None

        globals_ = [f"error_log {error_log} info;"]
        if not has_directive("daemon"):
            globals_.append("daemon off;")
        if not has_directive("pid"):
            globals_.append(f"pid {tmp_dir}/nginx.pid;")
        if _is_root() and not has_directive("user"):
            import grp

            nobody = pwd.getpwnam("nobody")
            globals_.append(f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};")
        cmd = [
            "nginx",
            "-p", f"{tmp_dir}/",
            "-c", str(conf_path),
            "-e", str(error_log),
            "-g", " ".join(globals_),
        ]  # fmt: skip
        with (tmp_dir / "nginx.stderr.log").open("wb") as out:
            server.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15.0
        while not _port_open(port):
            if server.process.poll() is not None or time.monotonic() > deadline:
                stderr = _tail(tmp_dir / "nginx.stderr.log")
                raise ServiceStartError(
                    f"nginx did not listen on port {port} (exit={server.process.poll()})\n"
                    f"--- stderr ---\n{stderr}\n--- error.log ---\n{_tail(error_log)}\n"
                    f"--- config ---\n{rendered}"
                )
            time.sleep(0.05)
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the application itself
# ---------------------------------------------------------------------------------------------


@dataclass
class AppServer:
    """The qpki app started as a real subprocess (``python -m qpki run``)."""

    url: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group (graceful shutdown), SIGKILL after ``timeout`` seconds."""
        if self.process is not None:
            _kill_process_group(self.process, timeout=timeout)
            self.process = None

    def log_text(self) -> str:
        """Everything the app wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextmanager
def app_server(
    env: dict[str, str],
    port: int | None = None,
    workers: int = 1,
    *,
    log_dir: Path | None = None,
    timeout: float = 60.0,
) -> Iterator[AppServer]:
    """Run ``python -m qpki run`` on 127.0.0.1 until the block exits.

    ``env`` is merged over ``os.environ``. The process gets its own process group so that
    stop() also ends gunicorn workers. Readiness means ``GET /auth/login`` answers 200; on
    timeout or early exit the error includes the tail of the log. Pass ``log_dir`` (e.g.
    pytest's ``tmp_path``) to keep the log after the block; otherwise it lives in a temp dir
    that is removed.
    """
    port = port or free_port()
    own_dir = log_dir is None
    directory = Path(tempfile.mkdtemp(prefix="qpki-app-")) if log_dir is None else log_dir
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"app-{port}.log"
    cmd = [
        sys.executable, "-m", "qpki", "run",
        "--host", LOOPBACK,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    server = AppServer(url=f"http://{LOOPBACK}:{port}", port=port, log_path=log_path, process=None)
    try:
        with log_path.open("wb") as out:
            server.process = subprocess.Popen(
                cmd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        probe = f"{server.url}/auth/login"
        deadline = time.monotonic() + timeout
        while not _http_ok(probe):
            exit_code = server.process.poll()
            if exit_code is not None or time.monotonic() > deadline:
                state = f"exited with {exit_code}" if exit_code is not None else "timed out"
                raise ServiceStartError(
                    f"app server on port {port} not ready ({state}); GET {probe} never gave 200\n"
                    f"--- log tail ({log_path}) ---\n{_tail(log_path, 60)}"
                )
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# SMTP sink (aiosmtpd)
# ---------------------------------------------------------------------------------------------


@dataclass
class SmtpSink:
    """A real SMTP server on 127.0.0.1 that keeps every message it accepts.

    ``refuse`` set to an SMTP reply (``"451 4.3.0 Try again later"``) makes it refuse DATA, as
    a relay does when it is overloaded; ``stop()``/``start()`` take it away and bring it back on
    the same port, as a relay outage does.
    """

    port: int
    host: str = LOOPBACK
    messages: list[Any] = field(default_factory=list)  # email.message.EmailMessage
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    refuse: str | None = None
    delay: float = 0.0  # seconds spent on each DATA, to make concurrent senders overlap
    _controller: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> None:
        from aiosmtpd.controller import Controller

        sink = self

        class _Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                if sink.refuse:
                    return sink.refuse
                if sink.delay:
                    import asyncio

                    await asyncio.sleep(sink.delay)
                import email
                import email.policy

                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                sink.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
                sink.messages.append(message)
                return "250 Message accepted"

        self._controller = Controller(_Handler(), hostname=self.host, port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def is_running(self) -> bool:
        return self._controller is not None

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Any]:
        """Wait until at least ``count`` messages arrived; returns them all."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} mails, got {len(self.messages)}")
            time.sleep(0.05)
        return list(self.messages)


def wait_until(
    condition: Callable[[], bool], *, timeout: float = 10.0, what: str = "the condition"
) -> None:
    """Poll ``condition`` until it holds: for work in another thread or process, which no
    injected clock can step. Never used to dodge a TOTP step edge."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@contextmanager
def smtp_sink(port: int | None = None) -> Iterator[SmtpSink]:
    """Run an :class:`SmtpSink` for the duration of the block (skips without aiosmtpd)."""
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        require_component("aiosmtpd", "the aiosmtpd package is not installed (test extras)")
    sink = SmtpSink(port=port or free_port())
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()
