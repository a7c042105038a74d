"""Behind a TLS reverse proxy: Debian's nginx with deploy/nginx.conf in front of two instances.

nginx runs the documented example configuration (deploy/nginx.conf, rendered with a
self-signed certificate made here) in front of two `qpki run` instances started with
QPKI_HTTPS=1 and QPKI_PROXY_FIX=1 that share one data directory. Over HTTPS the session cookie
is `__Host-` prefixed and Secure, HSTS is sent, redirects stay on https, and the audit log
records the address nginx saw — never an X-Forwarded-For value the client made up. An
instance started without QPKI_PROXY_FIX, reached directly, ignores X-Forwarded-For entirely.
"""

from __future__ import annotations

import secrets
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from harness.services import (
    LOOPBACK,
    AppServer,
    NginxServer,
    app_server,
    free_port,
    make_self_signed_cert,
    nginx_proxy,
)
from qpki.app import create_app
from qpki.audit.events import AuditEvent
from qpki.config import Settings

pytestmark = [pytest.mark.slow]

PASSWORD = "proxy test passphrase 5829"
SPOOFED = "203.0.113.9"
COOKIE = "__Host-qpki_session"
DEVICE_COOKIE = "__Host-qpki_device"


@dataclass
class Stack:
    proxy: NginxServer
    http_port: int
    cert: Path
    apps: list[AppServer]
    service: Any  # create_app() on the shared data directory: the service API and audit log
    data_dir: Path
    base_env: dict[str, str]
    tmp: Path

    def user(self, prefix: str) -> tuple[str, int]:
        name = f"{prefix}-{secrets.token_hex(3)}"
        user = self.service.auth_manager.create_user(name, PASSWORD, f"{name}@example.org")
        return name, user.id

    def audit_ips(self, event: AuditEvent, target_name: str) -> list[str]:
        with self.service.db_manager.transaction(write=False) as s:
            page = self.service.auth_manager.audit.query(s, events=[event.value], limit=1000)
            return [e.ip for e in page.events if e.target_name == target_name]


@pytest.fixture(scope="module")
def stack(
    nginx_available: None, nginx_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("tls-proxy")
    data_dir = tmp / "data"
    cert, key = make_self_signed_cert(tmp / "tls")
    base_env = {
        "QPKI_DATA_DIR": str(data_dir),
        "QPKI_DATABASE_URL": "",  # SQLite in the shared data directory
        "QPKI_REDIS_URL": "",
        "QPKI_SECRET_KEY": "",  # generated once into the shared data directory
        "QPKI_MFA_KEY": "",
        "QPKI_RATE_LIMITS": "1",
    }
    proxied_env = {
        **base_env,
        "QPKI_HTTPS": "1",
        "QPKI_PROXY_FIX": "1",
        "QPKI_WEBAUTHN_RP_ID": "localhost",
    }
    service = create_app(Settings.from_env(proxied_env))
    service.db_manager.migrate_database()  # type: ignore[attr-defined]
    with ExitStack() as stack:
        stack.callback(service.db_manager.dispose)  # type: ignore[attr-defined]
        apps = [
            stack.enter_context(app_server(proxied_env, workers=1, log_dir=tmp / f"logs-{n}"))
            for n in ("a", "b")
        ]
        http_port = free_port()
        proxy = stack.enter_context(
            nginx_proxy(
                nginx_template,
                bind=LOOPBACK,
                http_port=http_port,
                server_names="localhost 127.0.0.1",
                cert=cert,
                key=key,
                upstream_a=f"{LOOPBACK}:{apps[0].port}",
                upstream_b=f"{LOOPBACK}:{apps[1].port}",
            )
        )
        yield Stack(proxy, http_port, cert, apps, service, data_dir, base_env, tmp)


@pytest.fixture
def browser(stack: Stack, web: Callable[..., Any]) -> Any:
    return web(stack.proxy.url, verify=str(stack.cert))


def _set_cookie_headers(response: Any) -> list[str]:
    return list(response.raw.headers.getlist("Set-Cookie"))


def _cookie_attributes(header: str) -> tuple[str, dict[str, str]]:
    first, *rest = (part.strip() for part in header.split(";"))
    name = first.split("=", 1)[0]
    attributes = {}
    for part in rest:
        key, _, value = part.partition("=")
        attributes[key.lower()] = value
    return name, attributes


def _assert_host_cookie(response: Any) -> None:
    headers = _set_cookie_headers(response)
    assert headers, dict(response.headers)
    for header in headers:
        name, attributes = _cookie_attributes(header)
        assert name in (COOKIE, DEVICE_COOKIE), header
        assert "secure" in attributes, header
        assert "httponly" in attributes, header
        assert attributes.get("samesite", "").lower() == "lax", header
        assert attributes.get("path") == "/", header
        assert "domain" not in attributes, header  # required by the __Host- prefix


def _assert_stays_on_https(stack: Stack, response: Any) -> str:
    assert response.status_code in (301, 302, 303, 307, 308), response.status_code
    location = response.headers["Location"]
    target = urlsplit(urljoin(stack.proxy.url + "/", location))
    assert target.scheme == "https", location
    assert target.netloc == f"{LOOPBACK}:{stack.proxy.port}", location
    return target.path


# -- cookies, headers, redirects --------------------------------------------------------------
def test_session_cookie_is_secure_with_host_prefix(stack: Stack, browser: Any) -> None:
    page = browser.get("/auth/login")
    assert page.status_code == 200, stack.proxy.error_log_text()[-2000:]
    _assert_host_cookie(page)

    name, _ = stack.user("cookie")
    signed_in = browser.login(name, PASSWORD)
    assert _assert_stays_on_https(stack, signed_in) == "/"
    _assert_host_cookie(signed_in)
    # the session, and the device cookie that keeps this browser out of strangers' lock-outs
    assert sorted(c.name for c in browser.http.cookies) == sorted([COOKIE, DEVICE_COOKIE])


def test_hsts_is_sent_once_on_every_response(stack: Stack, browser: Any) -> None:
    for path in ("/auth/login", "/", "/no-such-page", "/static/style.css"):
        response = browser.get(path)
        values = response.raw.headers.getlist("Strict-Transport-Security")
        assert values == ["max-age=31536000; includeSubDomains"], (path, values)
        assert response.headers.get("Server") in (None, "nginx"), response.headers  # no version


def _handshake(stack: Stack, version: ssl.TLSVersion) -> str | None:
    context = ssl.create_default_context(cafile=str(stack.cert))
    context.minimum_version = context.maximum_version = version
    with (
        socket.create_connection((LOOPBACK, stack.proxy.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version()


def test_tls_1_3_and_1_2_handshakes_verify_the_certificate(stack: Stack) -> None:
    assert _handshake(stack, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert _handshake(stack, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


def test_redirects_stay_on_https(stack: Stack, browser: Any) -> None:
    assert _assert_stays_on_https(stack, browser.get("/")) == "/auth/login"
    assert _assert_stays_on_https(stack, browser.get("/auth/profile")) == "/auth/login"

    plain = browser.http.get(
        f"http://{LOOPBACK}:{stack.http_port}/auth/login?next=/auth/profile",
        allow_redirects=False,
        timeout=10,
    )
    assert plain.status_code == 301
    assert plain.headers["Location"] == (
        f"https://{LOOPBACK}:{stack.proxy.port}/auth/login?next=/auth/profile"
    )


def test_forms_over_https_need_a_same_origin_referer(stack: Stack, browser: Any) -> None:
    """The app sees the public https://host:port, so Flask-WTF's strict Referer check works."""
    name, _ = stack.user("referer")
    foreign = browser.login(name, PASSWORD, Referer="https://evil.example/auth/login")
    assert foreign.status_code == 400
    assert browser.get("/").status_code == 302  # not signed in
    assert _assert_stays_on_https(stack, browser.login(name, PASSWORD)) == "/"


# -- client addresses -------------------------------------------------------------------------
def test_audit_records_the_real_client_not_a_spoofed_forwarded_for(
    stack: Stack, browser: Any, web: Callable[..., Any]
) -> None:
    name, _ = stack.user("xff")
    spoof = {"X-Forwarded-For": SPOOFED, "X-Real-IP": SPOOFED}

    wrong = browser.login(name, "not the right password", **spoof)
    assert wrong.status_code == 200 and "Invalid username or password" in web.text(wrong)
    signed_in = browser.login(name, PASSWORD, **spoof)
    assert _assert_stays_on_https(stack, signed_in) == "/"

    assert stack.audit_ips(AuditEvent.LOGIN_FAILURE, name) == [LOOPBACK]
    assert stack.audit_ips(AuditEvent.LOGIN_SUCCESS, name) == [LOOPBACK]
    profile = web.text(browser.get("/auth/profile", headers=spoof))
    assert LOOPBACK in profile and SPOOFED not in profile


def test_both_instances_serve_one_session(stack: Stack, browser: Any) -> None:
    """Round robin over the two upstreams; the session is valid on either of them."""
    name, _ = stack.user("spread")
    browser.login(name, PASSWORD)
    before = [len(app.log_text()) for app in stack.apps]
    for _ in range(6):
        assert browser.get("/auth/profile").status_code == 200
    for app, offset in zip(stack.apps, before, strict=True):
        assert "GET /auth/profile" in app.log_text()[offset:], app.log_path


def test_proxy_refuses_oversized_bodies(stack: Stack, browser: Any) -> None:
    response = browser.http.post(
        browser.url("/auth/login"), data={"username": "x" * 100_000}, timeout=10
    )
    assert response.status_code == 413


def test_app_without_proxy_fix_ignores_forwarded_for(stack: Stack, web: Callable[..., Any]) -> None:
    """Reached directly, an app that trusts no proxy records the socket's address."""
    name, _ = stack.user("direct")
    direct_env = {**stack.base_env, "QPKI_HTTPS": "0", "QPKI_PROXY_FIX": "0"}
    with app_server(direct_env, workers=1, log_dir=stack.tmp / "logs-direct") as direct:
        client = web(direct.url)
        spoof = {"X-Forwarded-For": SPOOFED}
        signed_in = client.login(name, PASSWORD, **spoof)
        assert signed_in.status_code == 302 and urlsplit(signed_in.headers["Location"]).path == "/"
        assert sorted(c.name for c in client.http.cookies) == ["qpki_device", "qpki_session"]
    assert stack.audit_ips(AuditEvent.LOGIN_SUCCESS, name) == [LOOPBACK]
