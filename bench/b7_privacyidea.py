"""privacyIDEA, the peer of B7: installed from PyPI into its own virtual environment, set up
with its ``pi-manage`` CLI, fed tokens with known secrets through its REST API
(``/token/init``) and measured on ``/validate/check``.

The virtual environment is cached (``$XDG_CACHE_HOME/qpki-bench/privacyidea-<version>``, or
``~/.cache``) so later runs do not install again; the server's files (config, encryption
key, audit keys, SQLite database) live in the run's temp dir. The server runs on gunicorn with
the same settings as ``qpki run``: 2 sync workers, preloaded app, access log on, 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import free_port

VERSION = "3.14"
LOOPBACK = "127.0.0.1"
ADMIN_PASSWORD = "bench-admin-Passphrase-91"


class PeerUnavailable(RuntimeError):
    """privacyIDEA cannot be installed or started here; the message says exactly why."""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qpki-bench" / f"privacyidea-{VERSION}"


def _gunicorn_version() -> str:
    import gunicorn

    return str(gunicorn.__version__)


def ensure_venv(log: Any = print) -> Path:
    """The virtual environment with privacyIDEA and the same gunicorn as qPKI's; built once."""
    venv = cache_dir()
    marker = venv / ".qpki-bench-ready"
    if marker.exists():
        return venv
    log(f"  installing privacyIDEA {VERSION} from PyPI into {venv} (once; a few minutes)")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                f"privacyidea=={VERSION}", f"gunicorn=={_gunicorn_version()}",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "")[-600:] if isinstance(exc.stderr, str) else ""
        raise PeerUnavailable(
            f"pip install privacyidea=={VERSION} failed (exit {exc.returncode}): {tail}"
        ) from None
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"pip install privacyidea=={VERSION} took over 15 min") from None
    marker.write_text("ok\n")
    return venv


@dataclass
class PeerServer:
    url: str
    venv: Path
    admin_jwt: str
    pid: int = 0  # gunicorn's arbiter

    def post(self, path: str, data: dict[str, str], *, auth: bool = False) -> dict[str, Any]:
        import json

        req = urllib.request.Request(
            self.url + path,
            data=urllib.parse.urlencode(data).encode(),
            headers={"Authorization": self.admin_jwt} if auth else {},
            method="POST",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=60) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer

    def init_tokens(self, serials_and_secrets: list[tuple[str, str]]) -> None:
        """Create TOTP tokens with the given hex secrets through ``POST /token/init``."""

        def one(item: tuple[str, str]) -> None:
            serial, hex_secret = item
            answer = self.post(
                "/token/init",
                {
                    "type": "totp",
                    "serial": serial,
                    "otpkey": hex_secret,
                    "genkey": "0",
                    "otplen": "6",
                    "timeStep": "30",
                    "hashlib": "sha1",
                },
                auth=True,
            )
            if not answer.get("result", {}).get("status"):
                raise RuntimeError(f"privacyIDEA /token/init {serial}: {answer}")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, serials_and_secrets))


def _pi_manage(venv: Path, env: dict[str, str], *args: str) -> None:
    proc = subprocess.run(
        [str(venv / "bin" / "pi-manage"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise PeerUnavailable(
            f"pi-manage {' '.join(args[:2])} failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout)[-500:]}"
        )


@contextmanager
def peer_server(work: Path, venv: Path, *, workers: int = 2) -> Iterator[PeerServer]:
    """A privacyIDEA server on 127.0.0.1 (SQLite, its default signed audit), until exit."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "pi.cfg"
    cfg.write_text(
        "SUPERUSER_REALM = ['super']\n"
        f"SQLALCHEMY_DATABASE_URI = 'sqlite:///{work / 'pi.sqlite'}'\n"
        f"SECRET_KEY = {secrets.token_hex(32)!r}\n"
        f"PI_PEPPER = {secrets.token_hex(32)!r}\n"
        f"PI_ENCFILE = {str(work / 'enckey')!r}\n"
        f"PI_AUDIT_KEY_PRIVATE = {str(work / 'private.pem')!r}\n"
        f"PI_AUDIT_KEY_PUBLIC = {str(work / 'public.pem')!r}\n"
        f"PI_LOGFILE = {str(work / 'privacyidea.log')!r}\n"
        "PI_LOGLEVEL = 30\n"
    )
    env = {**os.environ, "PRIVACYIDEA_CONFIGFILE": str(cfg)}
    _pi_manage(venv, env, "setup", "create_enckey")
    _pi_manage(venv, env, "setup", "create_audit_keys")
    _pi_manage(venv, env, "setup", "create_tables")
    _pi_manage(venv, env, "admin", "add", "admin", "-p", ADMIN_PASSWORD)
    (work / "piapp.py").write_text(
        "from privacyidea.app import create_app\n"
        f"application = create_app(config_name='production', config_file={str(cfg)!r}, "
        "silent=True)\n"
    )
    port = free_port()
    log_path = work / "gunicorn.log"
    cmd = [
        str(venv / "bin" / "gunicorn"), "--workers", str(workers), "--worker-class", "sync",
        "--preload", "--timeout", "60", "--graceful-timeout", "10", "--access-logfile", "-",
        "--bind", f"{LOOPBACK}:{port}", "--chdir", str(work), "piapp:application",
    ]  # fmt: skip
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = PeerServer(f"http://{LOOPBACK}:{port}", venv, "", proc.pid)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                answer = server.post("/auth", {"username": "admin", "password": ADMIN_PASSWORD})
                server.admin_jwt = answer["result"]["value"]["token"]
                break
            except (urllib.error.URLError, OSError, KeyError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise PeerUnavailable(
                        "privacyIDEA's gunicorn did not answer /auth: "
                        + log_path.read_text(errors="replace")[-800:]
                    ) from None
                time.sleep(0.2)
        yield server
    finally:
        from harness.services import _kill_process_group

        _kill_process_group(proc, timeout=10)
