"""The keyed, anchored audit chain (checklist 12.10): edits, truncation, wrong keys, the head.

An attacker here can write to the database (edit, delete, recompute hashes with the public
format) but holds neither the audit key nor the head kept outside the database.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select, text

from harness.services import redis_server, require_component
from qpki.app import create_app
from qpki.audit.events import AuditEvent, Outcome
from qpki.audit.head import HEAD_FILE_NAME, FileHeadStore, RedisHeadStore
from qpki.audit.keys import AUDIT_KEY_FILE_NAME, AuditKeyError
from qpki.audit.log import AuditLog, VerifyResult
from qpki.audit.models import AuditEventRecord
from qpki.cli import main
from qpki.config import Settings

EVENTS = 10


def _log(app: Flask) -> AuditLog:
    return app.auth_manager.audit  # type: ignore[attr-defined, no-any-return]


def _record(app: Flask, count: int = EVENTS) -> list[int]:
    """``count`` events, one transaction each (as use cases write them); their ids."""
    ids = []
    for i in range(count):
        with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
            row = _log(app).record(s, AuditEvent.USER_CHANGED, target_name=f"u{i}")
            ids.append(row.id)
    return ids


def _verify(app: Flask, audit: AuditLog | None = None) -> VerifyResult:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return (audit or _log(app)).verify(s)


def _sha256_recompute_from(app: Flask, first_id: int) -> None:
    """What defeated the old chain: recompute every hash from ``first_id`` with plain SHA-256
    over the public canonical format (here even including ``seq``)."""
    with app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        rows = conn.execute(select(AuditEventRecord.__table__).order_by(AuditEventRecord.id)).all()
        prev = "0" * 64
        for row in rows:
            if row.id >= first_id:
                payload = {
                    "seq": row.seq,
                    "occurred_at": row.occurred_at.isoformat(),
                    "event": row.event,
                    "outcome": row.outcome,
                    "actor_id": row.actor_id,
                    "actor_name": row.actor_name,
                    "target_user_id": row.target_user_id,
                    "target_name": row.target_name,
                    "ip": row.ip,
                    "user_agent": row.user_agent,
                    "details": row.details,
                }
                canon = json.dumps(payload, sort_keys=True, separators=(",", ":"))
                digest = hashlib.sha256((prev + canon).encode()).hexdigest()
                conn.execute(
                    text("UPDATE audit_events SET prev_hash=:p, hash=:h WHERE id=:i"),
                    {"p": prev, "h": digest, "i": row.id},
                )
                prev = digest
            else:
                prev = row.hash


def test_intact_chain_verifies_and_head_matches(any_app: Flask) -> None:
    ids = _record(any_app)
    result = _verify(any_app)
    assert result.ok and result.checked == len(ids)
    head = _log(any_app).head.read()
    assert head is not None and head.seq == len(ids)


def test_rewritten_row_with_recomputed_sha256_chain_is_named(any_app: Flask) -> None:
    ids = _record(any_app)
    victim = ids[4]
    with any_app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(
            text('UPDATE audit_events SET details=\'{"reason":"rewritten"}\' WHERE id=:i'),
            {"i": victim},
        )
    _sha256_recompute_from(any_app, victim)
    result = _verify(any_app)
    assert not result.ok and result.broken_id == victim
    assert "seal" in result.reason


@pytest.mark.parametrize("deleted", [1, 3])
def test_deleting_the_last_events_reports_how_many_are_missing(
    any_app: Flask, deleted: int
) -> None:
    ids = _record(any_app)
    with any_app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("DELETE FROM audit_events WHERE id >= :i"), {"i": ids[-deleted]})
    result = _verify(any_app)
    assert not result.ok and result.missing == deleted
    assert f"{deleted} events missing from the end" in result.reason
    assert result.checked == len(ids) - deleted


def test_deleting_every_event_is_detected(any_app: Flask) -> None:
    _record(any_app)
    with any_app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("DELETE FROM audit_events"))
    result = _verify(any_app)
    assert not result.ok and result.missing == EVENTS and result.checked == 0


def test_deleting_the_first_events_is_named(any_app: Flask) -> None:
    ids = _record(any_app)
    with any_app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("DELETE FROM audit_events WHERE id <= :i"), {"i": ids[1]})
    result = _verify(any_app)
    assert not result.ok and result.broken_id == ids[2]
    assert "2 events before it are missing" in result.reason


def test_wrong_audit_key_is_detected(any_app: Flask, tmp_path: Path) -> None:
    ids = _record(any_app)
    other_head = FileHeadStore(tmp_path / "other-head")
    result = _verify(any_app, AuditLog(b"k" * 43, other_head))
    assert not result.ok and result.broken_id == ids[0]

    # The same head, read with another key, does not authenticate either.
    result = _verify(any_app, AuditLog(b"k" * 43, _log(any_app).head))
    assert not result.ok and "altered" in result.reason


def test_an_app_started_with_another_key_cannot_verify(make_app: object, db_url: str) -> None:
    first = make_app(db_url)  # type: ignore[operator]
    _record(first, 3)
    second = make_app(db_url, audit_key="another-audit-key-" + "z" * 30)  # type: ignore[operator]
    assert not _verify(second).ok


def test_head_moves_only_after_commit(app: Flask) -> None:
    _record(app, 2)
    with pytest.raises(RuntimeError), app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        _log(app).record(s, AuditEvent.USER_CHANGED, target_name="rolled back")
        raise RuntimeError("use case failed")
    head = _log(app).head.read()
    assert head is not None and head.seq == 2
    assert _verify(app).ok
    # One transaction with two events moves the head once, to the second.
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        _log(app).record(s, AuditEvent.USER_CHANGED)
        _log(app).record(s, AuditEvent.USER_CHANGED, Outcome.FAILURE)
    head = _log(app).head.read()
    assert head is not None and head.seq == 4 and _verify(app).ok


def test_a_lagging_head_still_verifies_but_a_forged_one_does_not(app: Flask) -> None:
    _record(app, 3)
    store = _log(app).head
    stale = store.read()
    _record(app, 2)
    store.replace(stale)  # a crash between commit and head update: the head lags
    assert _verify(app).ok
    assert stale is not None
    head_path = Path(store.description)
    forged = json.loads(head_path.read_text())
    forged["seq"] = 1
    head_path.write_text(json.dumps(forged))
    result = _verify(app)
    assert not result.ok and "altered" in result.reason


def test_record_uses_the_use_case_time(app: Flask) -> None:
    from datetime import UTC, datetime

    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        row = _log(app).record(s, AuditEvent.USER_CHANGED, at=moment)
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        stored = s.get(AuditEventRecord, row.id)
        assert stored is not None and stored.occurred_at == moment
    assert _verify(app).ok


def test_key_and_head_files_are_private(app: Flask) -> None:
    _record(app, 1)
    data_dir = app.settings.data_dir  # type: ignore[attr-defined]
    for name in (AUDIT_KEY_FILE_NAME, HEAD_FILE_NAME):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name


def test_missing_key_file_with_sealed_events_stops_startup(
    make_app: object, make_settings: object
) -> None:
    app = make_app()  # type: ignore[operator]
    _record(app, 1)
    (app.settings.data_dir / AUDIT_KEY_FILE_NAME).unlink()  # type: ignore[attr-defined]
    with pytest.raises(AuditKeyError, match="Restore the audit key"):
        create_app(make_settings())  # type: ignore[operator]


def test_key_from_environment_or_file(tmp_path: Path) -> None:
    key_file = tmp_path / "audit-key"
    key_file.write_text("from-a-file-" + "f" * 40 + "\n")
    os.chmod(key_file, 0o600)
    env = {"QPKI_DATA_DIR": str(tmp_path / "d"), "QPKI_AUDIT_KEY_FILE": str(key_file)}
    assert Settings.from_env(env).audit_key == "from-a-file-" + "f" * 40
    too_short = {"QPKI_DATA_DIR": str(tmp_path / "d"), "QPKI_AUDIT_KEY": "short"}
    with pytest.raises(AuditKeyError, match="shorter than 32"):
        create_app(Settings.from_env(too_short))


def test_cli_verify_says_how_many_events_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QPKI_DATA_DIR", str(tmp_path / "data"))
    for name in ("QPKI_DATABASE_URL", "QPKI_MFA_KEY", "QPKI_AUDIT_KEY", "QPKI_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    assert runner.invoke(main, ["migrate"]).exit_code == 0
    app = create_app(Settings.from_env())
    ids = _record(app, 5)
    ok = runner.invoke(main, ["audit", "verify"])
    assert ok.exit_code == 0 and "5 events verified" in ok.output
    with app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("DELETE FROM audit_events WHERE id >= :i"), {"i": ids[3]})
    bad = runner.invoke(main, ["audit", "verify"])
    assert bad.exit_code == 1 and "2 events missing from the end" in bad.output
    app.db_manager.dispose()  # type: ignore[attr-defined]


def test_head_shared_through_redis(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    """With QPKI_REDIS_URL the head lives in Redis: two instances (separate data dirs, one
    database) move one head, and truncation is found from either."""
    if shutil.which("redis-server") is None:
        require_component("Redis", "redis-server not found (apt-get install redis-server)")
    with redis_server() as server:
        store = RedisHeadStore(server.url)
        assert store.read() is None
        url = f"sqlite:///{tmp_path / 'shared.db'}"
        key = "shared-audit-key-" + "s" * 30
        first = make_app(url, redis_url=server.url, audit_key=key)
        second = make_app(
            url, redis_url=server.url, audit_key=key, data_dir=_private_dir(tmp_path / "two")
        )
        _record(first, 2)
        ids = _record(second, 2)
        head = store.read()
        assert head is not None and head.seq == 4
        store.advance(_log(first).sealed_head(1, "0" * 64))  # never moves backwards
        assert store.read() == head
        assert _verify(first).ok and _verify(second).ok
        with first.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
            conn.execute(text("DELETE FROM audit_events WHERE id = :i"), {"i": ids[-1]})
        assert _verify(first).missing == 1 and _verify(second).missing == 1


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path
