"""Self-check of the service harness: every helper starts the real binary and cleans up.

If these fail, integration-test failures elsewhere are probably harness problems, not app bugs.
"""

from __future__ import annotations

import shutil
import socket
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .services import (
    find_pg_bin,
    free_port,
    make_self_signed_cert,
    nginx_proxy,
    postgres_cluster,
    redis_server,
    require_component,
)


def _require_module(component: str, module: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        require_component(component, f"Python package {module!r} is not installed ({exc})")


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.postgres
def test_postgres_cluster_select_restart_and_cleanup() -> None:
    if find_pg_bin() is None:
        require_component("PostgreSQL", "initdb/pg_ctl not found")
    _require_module("PostgreSQL", "psycopg")
    import psycopg

    with postgres_cluster() as pg:
        tmp_dir = pg.tmp_dir
        assert pg.url == f"postgresql+psycopg://{pg.user}:{pg.password}@127.0.0.1:{pg.port}/qpki"
        # TCP + password, no unix socket.
        dsn = f"postgresql://{pg.user}:{pg.password}@127.0.0.1:{pg.port}/{pg.dbname}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.execute("SHOW max_connections").fetchone() == ("200",)
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('survives restart')")

        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                f"postgresql://{pg.user}:wrong@127.0.0.1:{pg.port}/{pg.dbname}", connect_timeout=3
            ).close()

        pg.restart()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == ("survives restart",)

        other_url = pg.create_database("isolated_test")
        assert other_url.endswith(f":{pg.port}/isolated_test")
        with psycopg.connect(pg.conninfo("isolated_test")) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("isolated_test",)

        pg.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=2).close()
        pg.start()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)
    assert not tmp_dir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2).close()  # server is really gone


def test_redis_set_get_stop_start() -> None:
    if shutil.which("redis-server") is None:
        require_component("Redis", "redis-server not found on PATH")
    _require_module("Redis", "redis")
    import redis

    with redis_server() as srv:
        tmp_dir = srv.tmp_dir
        assert srv.url == f"redis://127.0.0.1:{srv.port}/0"
        client = redis.Redis.from_url(srv.url, socket_timeout=2, socket_connect_timeout=2)
        client.set("k", "v")
        assert client.get("k") == b"v"

        srv.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()

        srv.start()
        assert client.ping() is True  # redis-py reconnects on its own
        assert client.get("k") is None  # nothing persisted
        client.close()
    assert not tmp_dir.exists()
    assert not srv.is_running()


class _Backend(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"backend saw {self.path} proto={self.headers.get('X-Forwarded-Proto')}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet


@pytest.fixture
def http_backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


NGINX_TEMPLATE = """
worker_processes 1;
events { worker_connections 64; }
http {
    $http_defaults
    server {
        listen 127.0.0.1:$port ssl;
        server_name localhost;
        ssl_certificate $cert;
        ssl_certificate_key $key;
        location / {
            proxy_pass http://127.0.0.1:$backend_port;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto $$scheme;
        }
    }
}
"""


def test_nginx_https_proxy_with_self_signed_cert(tmp_path: Path, http_backend: int) -> None:
    if shutil.which("nginx") is None:
        require_component("nginx", "nginx not found on PATH")
    _require_module("nginx", "requests")
    _require_module("nginx", "cryptography")
    import requests

    cert, key = make_self_signed_cert(tmp_path / "tls")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    template = tmp_path / "nginx.conf.tmpl"
    template.write_text(NGINX_TEMPLATE, encoding="utf-8")

    with nginx_proxy(template, cert=cert, key=key, backend_port=http_backend) as proxy:
        tmp_dir = proxy.tmp_dir
        assert proxy.url == f"https://127.0.0.1:{proxy.port}"
        for base in (proxy.url, f"https://localhost:{proxy.port}"):
            resp = requests.get(f"{base}/hello?x=1", verify=str(cert), timeout=5)
            assert resp.status_code == 200, proxy.error_log_text()
            assert resp.text == "backend saw /hello?x=1 proto=https"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(proxy.url, timeout=5)  # system CAs do not trust our cert
        # Access log went to the temp dir, not /var/log/nginx.
        assert "GET /hello?x=1" in (tmp_dir / "access.log").read_text()
    assert not tmp_dir.exists()
