"""The README's JSON API examples work as written: its Python example and its curl command
run against a live server (werkzeug's, in a thread) with a real key."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

from harness.services import require_component
from helpers import create_user, enable_mfa
from qpki.api import api_keys_of
from qpki.clock import SteppedClock

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## JSON API (for other services)")
    return text[start : text.index("\n## ", start + 1)]


def _block(language: str, containing: str) -> str:
    for body in re.findall(rf"```{language}\n(.*?)```", _section(), flags=re.S):
        if containing in body:
            return str(body)
    raise AssertionError(f"no {language} block with {containing!r} in the README's API section")


@pytest.fixture
def live(api_app: Flask, clock: SteppedClock) -> Iterator[tuple[str, str]]:
    """A served app with alice (2FA on) and bob, and a key for verify and users:read."""
    alice = create_user(api_app, "alice")
    enable_mfa(api_app, alice.id, at=clock())
    create_user(api_app, "bob")
    key = api_keys_of(api_app).create("docs", "verify,users:read", actor_name="test").secret
    server = make_server("127.0.0.1", 0, api_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", key
    server.shutdown()
    thread.join(10)


def test_the_python_example_runs_as_written(live: tuple[str, str], tmp_path: Path) -> None:
    base, key = live
    script = tmp_path / "example.py"
    script.write_text(_block("python", "/api/v1/verify"))
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "QPKI_URL": base, "QPKI_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "200 reject Invalid verification code"
    assert lines[1] == "['bob'] next: None"


def test_the_curl_example_runs_as_written(live: tuple[str, str]) -> None:
    if shutil.which("curl") is None:
        require_component("curl", "the curl program is not installed (apt-get install curl)")
    base, key = live
    command = _block("sh", "curl").split("\n# ")[0].replace("http://localhost:5000", base)
    done = subprocess.run(
        ["bash", "-c", command],
        env={**os.environ, "KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "message": "Invalid verification code",
        "result": "reject",
        "method": "totp",
    }
