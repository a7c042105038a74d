"""What a gunicorn worker carries from start-up (benchmark B6: worker memory ≤ 80 MB).

``qpki run`` builds the app once in the master and forks the workers from it, so every module
imported while the app is built is resident in every worker. Libraries that only some requests
need are imported by those requests: py_webauthn (passkey ceremonies), ua-parser (describing a
browser in an alert or on the activity page), the JSON API's views with spectree, pydantic and
the schema models (the first API request; see qpki.api.lazy) and the CLI's command groups
(never used by the server). These tests build the app the way ``qpki run`` does, in a fresh
interpreter, and fail when one of them is imported at start-up again.
"""

from __future__ import annotations

from pathlib import Path

import click

from helpers import run_fresh_app_process
from qpki.cli import COMMAND_GROUPS, main

# Deferred to the first request that needs them (module prefixes), and the CLI's groups.
DEFERRED = (
    "webauthn",
    "cbor2",
    "pyasn1",
    "OpenSSL",
    "ua_parser",
    "yaml",
    "pydantic",
    "spectree",
    "qpki.api.views",
    "qpki.api.openapi",
    "qpki.api.schemas",
    *sorted({module for module, _ in COMMAND_GROUPS.values()}),
)

_BUILD_LIKE_RUN = """
import json, sys
from qpki.api.metrics_dir import prepare_multiprocess_dir
from qpki.config import Settings
from qpki.cli import _app

prepare_multiprocess_dir(Settings.from_env().data_dir)
app = _app(migrate=True, quiet=True)
from qpki.mail.useragent import describe_user_agent
before = sorted(sys.modules)
words = describe_user_agent(
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
)
print(json.dumps({"modules": before, "words": words}))
"""


def test_the_served_app_defers_passkey_user_agent_and_cli_libraries(tmp_path: Path) -> None:
    report = run_fresh_app_process(_BUILD_LIKE_RUN, data_dir=tmp_path / "data")
    loaded = [m for m in report["modules"] if m.startswith(DEFERRED)]
    assert loaded == [], f"imported at start-up: {loaded}"
    # The deferred import still works on first use.
    assert report["words"] == "Firefox 121 on Linux"


def test_every_command_group_is_listed_and_loads_under_its_name() -> None:
    ctx = click.Context(main)
    names = main.list_commands(ctx)
    assert set(COMMAND_GROUPS) <= set(names)
    assert names == sorted(names)
    for name in COMMAND_GROUPS:
        command = main.get_command(ctx, name)
        assert isinstance(command, click.Group) and command.name == name, name
