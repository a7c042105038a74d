"""The per-user audit query before and after revision 0003's indexes, on ~300k events.

    .venv/bin/python bench/audit_user_query.py [--events 300000] [--no-postgres]

Builds a database at revision 0002 holding a valid unkeyed chain of ``--events`` events spread
over 2,000 users, times the query behind a user's *Recent security events* and the admin
filter by user (``target_user_id = ? OR actor_id = ?``, newest first, 51 rows), migrates to
head through ``create_app`` (0003 adds the indexes and seals the chain with the audit key;
its duration is printed too), and times the same statement again. Medians of 50 runs, for a
typical user (~150 events) and for one with 3 events (worst case without an index).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sqlalchemy import create_engine, text  # noqa: E402

from harness.services import find_pg_bin, postgres_cluster  # noqa: E402
from qpki.db.manager import DatabaseManager  # noqa: E402

USERS = 2000
RARE_USER = USERS + 1  # gets 3 events, spread through the table
QUERY = text(
    "SELECT * FROM audit_events WHERE target_user_id = :u OR actor_id = :u "
    "ORDER BY id DESC LIMIT 51"
)


def _legacy_rows(n: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(7)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    prev = "0" * 64
    rare_at = {n // 4, n // 2, 3 * n // 4}
    for i in range(n):
        uid = RARE_USER if i in rare_at else rng.randrange(1, USERS + 1)
        failure = i % 9 == 0
        row: dict[str, Any] = {
            "occurred_at": start + timedelta(seconds=i),
            "event": "login_failure" if failure else "login_success",
            "outcome": "failure" if failure else "success",
            "actor_id": None if failure else uid,
            "actor_name": "" if failure else f"user{uid}",
            "target_user_id": uid,
            "target_name": f"user{uid}",
            "ip": "10.0.0.1",
            "user_agent": "bench",
            "details": "{}",
        }
        payload = dict(row, occurred_at=row["occurred_at"].isoformat())
        canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        digest = hashlib.sha256((prev + canon).encode()).hexdigest()
        row.update(prev_hash=prev, hash=digest, occurred_at=row["occurred_at"].replace(tzinfo=None))
        prev = digest
        yield row


def _load(url: str, n: int) -> None:
    db = DatabaseManager(url)
    db.migrate_database("0002_mfa")
    db.dispose()
    engine = create_engine(url)
    insert = text(
        "INSERT INTO audit_events (occurred_at, event, outcome, actor_id, actor_name,"
        " target_user_id, target_name, ip, user_agent, details, prev_hash, hash) VALUES"
        " (:occurred_at, :event, :outcome, :actor_id, :actor_name, :target_user_id,"
        " :target_name, :ip, :user_agent, :details, :prev_hash, :hash)"
    )
    batch: list[dict[str, Any]] = []
    with engine.begin() as conn:
        for row in _legacy_rows(n):
            batch.append(row)
            if len(batch) == 10000:
                conn.execute(insert, batch)
                batch = []
        if batch:
            conn.execute(insert, batch)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    engine.dispose()


def _time(url: str, user: int, runs: int = 50) -> float:
    engine = create_engine(url)
    samples = []
    with engine.connect() as conn:
        conn.execute(QUERY, {"u": user}).all()  # warm the cache
        for _ in range(runs):
            t0 = time.perf_counter()
            conn.execute(QUERY, {"u": user}).all()
            samples.append(time.perf_counter() - t0)
    engine.dispose()
    return statistics.median(samples) * 1000


def _typical_user(url: str) -> tuple[int, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        uid, count = conn.execute(
            text(
                "SELECT target_user_id, count(*) FROM audit_events WHERE target_user_id <= :n "
                "GROUP BY target_user_id ORDER BY count(*) DESC LIMIT 1 OFFSET :mid"
            ),
            {"n": USERS, "mid": USERS // 2},
        ).one()
    engine.dispose()
    return int(uid), int(count)


def run(backend: str, url: str, events: int, data_dir: Path) -> None:
    from qpki.app import create_app
    from qpki.config import Settings

    print(f"{backend}: loading {events} events at revision 0002 ...", flush=True)
    _load(url, events)
    typical, count = _typical_user(url)
    before = (_time(url, typical), _time(url, RARE_USER))
    data_dir.mkdir(mode=0o700)
    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        secret_key=secrets.token_urlsafe(48),
        log_level="WARNING",
    )
    app = create_app(settings)
    t0 = time.perf_counter()
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    migrate_s = time.perf_counter() - t0
    app.db_manager.dispose()  # type: ignore[attr-defined]
    engine = create_engine(url)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    engine.dispose()
    after = (_time(url, typical), _time(url, RARE_USER))
    print(
        f"{backend}: per-user audit query, median of 50 (ms): typical user ({count} events) "
        f"{before[0]:.2f} -> {after[0]:.2f}; user with 3 events {before[1]:.2f} -> "
        f"{after[1]:.2f}; migration 0002 -> head (indexes + sealing {events} events): "
        f"{migrate_s:.1f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        run("sqlite", f"sqlite:///{root / 'bench.db'}", args.events, root / "sqlite-data")
        if args.no_postgres:
            return
        if find_pg_bin() is None:
            print("postgres: skipped (no PostgreSQL server binaries)")
            return
        server = stack.enter_context(postgres_cluster())
        url = server.create_database("audit_bench")
        run("postgres", url, args.events, root / "pg-data")


if __name__ == "__main__":
    main()
