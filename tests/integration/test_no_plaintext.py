"""Invariant 3: no secret in plaintext in the database file, the logs or the audit trail.

Runs a whole user journey through the web app, then greps the raw SQLite files (database and
write-ahead log) and every log line for each secret the journey used.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest
from flask import Flask

from helpers import PASSWORD, create_user, enroll, login, login_with_mfa, next_step_code, page
from qpki.auth.keys import key_file_path


def _needles(secret: str, codes: list[str], extra: list[str]) -> list[bytes]:
    raw = base64.b32decode(secret)
    found = [secret, secret.lower(), " ".join(secret[i : i + 4] for i in range(0, 32, 4)), PASSWORD]
    for code in codes:
        found += [code, code.replace("-", ""), code.lower()]
    return [n.encode() for n in found + extra] + [raw, base64.b64encode(raw)]


def test_journey_leaves_no_plaintext_secrets(
    app: Flask, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    create_user(app, "admin", "admin")
    create_user(app, "alice")
    client = app.test_client()
    assert login(client, "alice").status_code == 302
    secret, codes = enroll(client)
    uri_fragment = f"secret={secret}"
    client.post("/auth/logout", data={})
    totp = next_step_code(secret)
    assert login_with_mfa(client, "alice", totp).status_code == 302
    client.post("/auth/logout", data={})
    assert login_with_mfa(client, "alice", codes[0].lower()).status_code == 302
    regenerated = client.post("/auth/mfa/backup-codes/regenerate", data={"password": PASSWORD})
    new_codes = [li.get_text(strip=True) for li in page(regenerated).select(".backup-code")]
    assert len(new_codes) == 8
    session_cookie = client.get_cookie("qpki_session")
    assert session_cookie is not None
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    raw_session_id = serializer.loads(session_cookie.value)["sid"]
    key = key_file_path(app.settings.data_dir).read_text().strip()  # type: ignore[attr-defined]
    app.db_manager.dispose()  # type: ignore[attr-defined]

    needles = _needles(secret, codes + new_codes, [uri_fragment, totp, key, raw_session_id])
    db_path = Path(app.settings.database_url.removeprefix("sqlite:///"))  # type: ignore[attr-defined]
    blobs = {p.name: p.read_bytes() for p in db_path.parent.glob(db_path.name + "*")}
    assert blobs, "database file not found"
    for name, blob in blobs.items():
        for needle in needles:
            assert needle not in blob, f"{needle!r} found in {name}"
    log_text = "\n".join(r.getMessage() for r in caplog.records).encode()
    for needle in needles:
        assert needle not in log_text, f"{needle!r} found in the log"
    assert b"otpauth://" not in log_text
