"""Fixtures for the deployment tests: real PostgreSQL, Redis, nginx and `qpki run` processes.

Everything listens on 127.0.0.1 only and lives in temporary directories. Services are
module-scoped (a module starts what it needs once) and are context managers from
``harness.services``, so they stop even when a test fails. A missing binary skips the module
with the reason, or fails it under ``QPKI_REQUIRE_ALL=1`` (as CI runs).

``web`` gives tests a small browser stand-in: a ``requests.Session`` aimed at one server that
scrapes the CSRF token from the page's form and sends a same-origin ``Referer`` (Flask-WTF
checks it strictly over HTTPS), as a browser would.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.services import (
    PostgresServer,
    RedisServer,
    find_pg_bin,
    postgres_cluster,
    redis_server,
    require_component,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
TIMEOUT = 15


def _require_module(component: str, module: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        require_component(component, f"Python package {module!r} is not installed ({exc})")


# -- services ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deploy_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster for this module (restartable without disturbing others)."""
    if find_pg_bin() is None:
        require_component("PostgreSQL", "initdb/pg_ctl not found (apt-get install postgresql)")
    _require_module("PostgreSQL", "psycopg")
    with postgres_cluster() as server:
        yield server


@pytest.fixture(scope="module")
def deploy_redis() -> Iterator[RedisServer]:
    """A private redis-server for this module (stoppable to simulate an outage)."""
    if shutil.which("redis-server") is None:
        require_component("Redis", "redis-server not found (apt-get install redis-server)")
    _require_module("Redis", "redis")
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def nginx_available() -> None:
    if shutil.which("nginx") is None:
        require_component("nginx", "nginx not found on PATH (apt-get install nginx)")


@pytest.fixture(scope="module")
def nginx_template() -> Path:
    """The documented example configuration; the TLS tests run nginx with exactly this file."""
    return DEPLOY_DIR / "nginx.conf"


# -- a browser stand-in --------------------------------------------------------------------------
class Web:
    """One client (cookie jar) talking to one server, with the form handling of a browser."""

    def __init__(self, base_url: str, *, verify: bool | str = True) -> None:
        import requests

        self.base_url = base_url.rstrip("/")
        self.http = requests.Session()
        # Loopback only: no proxies or CA bundles from the environment (REQUESTS_CA_BUNDLE
        # would otherwise override ``verify``, and an HTTPS_PROXY would see our traffic).
        self.http.trust_env = False
        self.http.verify = verify
        self.http.headers["User-Agent"] = "qpki-deploy-test"

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("allow_redirects", False)
        return self.http.get(self.url(path), timeout=TIMEOUT, **kwargs)

    def csrf(self, path: str) -> str:
        """The CSRF token of the (first) form on the page at ``path``."""
        response = self.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text[:500])
        return self.csrf_in(response)

    @staticmethod
    def csrf_in(response: Any) -> str:
        field = page(response).find("input", attrs={"name": "csrf_token"})
        assert field is not None, response.text[:500]
        return str(field["value"])

    def post(
        self,
        path: str,
        data: dict[str, str] | None = None,
        *,
        token: str | None = None,
        csrf_from: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """POST a form: the CSRF token is scraped from ``csrf_from`` (default ``path``)."""
        source = csrf_from or path
        if token is None:
            token = self.csrf(source)
        all_headers = {"Referer": self.url(source), **(headers or {})}
        return self.http.post(
            self.url(path),
            data={**(data or {}), "csrf_token": token},
            headers=all_headers,
            allow_redirects=False,
            timeout=TIMEOUT,
        )

    # the interface contract's flows
    def login(self, username: str, password: str, **headers: str) -> Any:
        return self.post(
            "/auth/login", {"username": username, "password": password}, headers=headers
        )

    def verify(self, code: str) -> Any:
        return self.post("/auth/mfa/verify", {"code": code})

    def logout(self) -> Any:
        return self.post("/auth/logout", csrf_from="/auth/profile")

    def take_cookies_from(self, other: Web) -> None:
        """Carry the browser's cookies over to this server (what a load balancer does)."""
        self.http.cookies.clear()
        for cookie in other.http.cookies:
            self.http.cookies.set_cookie(copy.copy(cookie))


def page(response: Any) -> Any:
    from bs4 import BeautifulSoup

    return BeautifulSoup(response.text, "html.parser")


def main_text(response: Any) -> str:
    """The visible text of the page's <main> (flash messages and content)."""
    soup = page(response)
    main = soup.find("main") or soup
    return str(main.get_text(" ", strip=True))


@pytest.fixture(scope="module")
def web() -> Callable[..., Web]:
    """``web(base_url, verify=...)`` makes a fresh client; ``web.text(resp)`` reads a page."""
    _require_module("the deployment tests", "requests")
    _require_module("the deployment tests", "bs4")

    def factory(base_url: str, *, verify: bool | str = True) -> Web:
        return Web(base_url, verify=verify)

    factory.text = main_text  # type: ignore[attr-defined]
    factory.page = page  # type: ignore[attr-defined]
    return factory
