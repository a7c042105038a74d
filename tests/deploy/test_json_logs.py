"""QPKI_LOG_JSON=1: every line a real `qpki run` writes is one JSON object — the app's records,
gunicorn's error log and its access log alike — and access lines carry the client's address
(after ProxyFix, when QPKI_PROXY_FIX trusts the proxy) and the instance's name."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.services import app_server

pytestmark = [pytest.mark.slow]

CLIENT = "198.51.100.23"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "QPKI_DATA_DIR": str(tmp_path / "data"),
        "QPKI_DATABASE_URL": "",
        "QPKI_REDIS_URL": "",
        "QPKI_SECRET_KEY": "",
        "QPKI_MFA_KEY": "",
        "QPKI_AUDIT_KEY": "",
        "QPKI_LOG_JSON": "1",
        "QPKI_LOG_LEVEL": "INFO",
        **extra,
    }


def _records(text: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}")
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "instance", "message"} <= record.keys(), line
        records.append(record)
    return records


def _traffic(client: Any) -> None:
    headers = {"X-Forwarded-For": CLIENT}
    assert client.get("/auth/login", headers=headers).status_code == 200
    token = client.csrf("/auth/login")
    refused = client.post(
        "/auth/login",
        {"username": "nobody-here", "password": "not the password at all"},
        token=token,
        headers=headers,
    )
    assert refused.status_code == 200
    assert client.get("/healthz", headers=headers).status_code == 200


def test_every_line_is_json_with_the_real_client_address_and_instance(
    tmp_path: Path, web: Callable[..., Any]
) -> None:
    env = _env(tmp_path, QPKI_PROXY_FIX="1", QPKI_INSTANCE_NAME="qpki-a")
    with app_server(env, workers=2, log_dir=tmp_path / "logs") as server:
        _traffic(web(server.url))
        server.stop()  # the shutdown lines too
        text = server.log_text()
    records = _records(text)
    assert {r["instance"] for r in records} == {"qpki-a"}
    loggers = {r["logger"] for r in records}
    assert {"gunicorn.error", "gunicorn.access", "qpki.cli"} <= loggers, loggers
    assert any("Booting worker" in r["message"] for r in records)
    assert any(
        "Shutting down" in r["message"] or "Handling signal" in r["message"] for r in records
    )
    access = [r for r in records if r["logger"] == "gunicorn.access"]
    posts = [r for r in access if r["method"] == "POST" and r["path"] == "/auth/login"]
    assert posts and all(r["remote_addr"] == CLIENT for r in posts), access
    assert all(isinstance(r["status"], int) and r["duration_ms"] >= 0 for r in access)
    assert "not the password" not in text and "nobody-here" not in text  # no form data


def test_without_proxy_fix_the_access_log_keeps_the_socket_address(
    tmp_path: Path, web: Callable[..., Any]
) -> None:
    env = _env(tmp_path, QPKI_PROXY_FIX="0", QPKI_INSTANCE_NAME="")
    with app_server(env, workers=1, log_dir=tmp_path / "logs") as server:
        _traffic(web(server.url))
        text = server.log_text()
    records = _records(text)
    assert {r["instance"] for r in records} == {socket.gethostname()}
    access = [r for r in records if r["logger"] == "gunicorn.access"]
    assert access and {r["remote_addr"] for r in access} == {"127.0.0.1"}
