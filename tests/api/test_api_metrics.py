"""GET /metrics: Prometheus text behind the ``metrics`` scope; request, verification and
throttle counters, the outbox depth; counters summed over worker processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from api_helpers import bearer, problem
from flask import Flask
from flask.testing import FlaskClient

from helpers import create_user, enable_mfa
from qpki.api import api_keys_of
from qpki.api.metrics_dir import MULTIPROC_ENV, prepare_multiprocess_dir
from qpki.clock import SteppedClock


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_need_the_metrics_scope(api: FlaskClient, make_key: Callable[..., str]) -> None:
    assert api.get("/metrics").status_code == 401
    refused = api.get("/metrics", headers=bearer(make_key("verify", "users:read", "audit:read")))
    assert refused.status_code == 403 and problem(refused)["scope"] == "metrics"
    ok = api.get("/metrics", headers=bearer(make_key("metrics")))
    assert ok.status_code == 200 and ok.mimetype == "text/plain"


def test_requests_verifications_throttles_and_the_outbox_are_counted(
    api_app: Flask, api: FlaskClient, make_key: Callable[..., str], clock: SteppedClock
) -> None:
    scrape = bearer(make_key("metrics"))
    verify = bearer(make_key("verify"))
    before = api.get("/metrics", headers=scrape).get_data(as_text=True)
    user = create_user(api_app, "mia")
    enable_mfa(api_app, user.id, at=clock())  # queues an "MFA enabled" mail
    for _ in range(6):
        api.post("/api/v1/verify", json={"username": "mia", "code": "000000"}, headers=verify)
    after = api.get("/metrics", headers=scrape).get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    route = {"route": "/api/v1/verify", "method": "POST"}
    assert delta("qpki_http_requests_total", status="200", **route) == 5
    assert delta("qpki_http_requests_total", status="429", **route) == 1
    assert delta("qpki_api_verifications_total", method="totp", result="reject") == 5
    assert delta("qpki_throttled_attempts_total", kind="account") == 1
    outbox = sum(_value(after, "qpki_mail_outbox_messages", status=s) for s in ("pending", "sent"))
    assert outbox >= 1


def test_prepare_multiprocess_dir_empties_its_directory_and_respects_a_given_one(
    tmp_path: Path,
) -> None:
    env: dict[str, str] = {}
    target = prepare_multiprocess_dir(tmp_path, env)
    (target / "counter_1.db").write_text("stale")
    env.clear()
    assert prepare_multiprocess_dir(tmp_path, env) == target
    assert list(target.iterdir()) == [] and env[MULTIPROC_ENV] == str(target)
    assert prepare_multiprocess_dir(tmp_path, {MULTIPROC_ENV: "/elsewhere"}) == Path("/elsewhere")


_WORKER = """
import sys
from qpki.app import create_app
from qpki.config import Settings
app = create_app(Settings.from_env())
client = app.test_client()
headers = {"Authorization": "Bearer " + sys.argv[1]}
if sys.argv[2] == "scrape":
    print(client.get("/metrics", headers=headers).get_data(as_text=True))
else:
    for _ in range(3):
        assert client.get("/api/v1/audit/chain", headers=headers).status_code == 200
"""


def test_counters_of_separate_worker_processes_are_summed(
    tmp_path: Path, make_app: Callable[..., Flask], make_settings: Callable[..., object]
) -> None:
    """Multiprocess mode as ``qpki run`` sets it up: two workers count, a third scrapes."""
    app = make_app()
    key = api_keys_of(app).create("prom", ["audit:read", "metrics"], actor_name="test").secret
    settings = app.settings  # type: ignore[attr-defined]
    env = {
        **os.environ,
        "QPKI_DATA_DIR": str(settings.data_dir),
        "QPKI_DATABASE_URL": settings.database_url,
        "QPKI_SECRET_KEY": settings.secret_key,
        "QPKI_LOG_LEVEL": "WARNING",
    }
    prepare_multiprocess_dir(tmp_path, env)

    def worker(mode: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _WORKER, key, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    worker("count")
    worker("count")
    text = worker("scrape")
    assert (
        _value(
            text,
            "qpki_http_requests_total",
            route="/api/v1/audit/chain",
            method="GET",
            status="200",
        )
        == 6
    )
