"""Profile the verification hot path in-process: ``python bench/profile_hot_path.py [-n 300]``.

Drives N web second steps (``POST /auth/mfa/verify``) and N API verifications
(``POST /api/v1/verify``) through Flask's test client on a migrated SQLite app with production
settings (CSRF on), each a fresh pending sign-in and a fresh code, exactly as B7 prepares them.
Prints per request: wall time, SQL statements, transactions (BEGINs) and audit records; then,
when pyinstrument is importable (``pip install pyinstrument``, or ``--pyinstrument-path DIR``
for a ``pip install --target DIR`` copy), its call tree of the web run. Only the in-process
app is used; nothing is contacted.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from b7_hot_path import CookieMinter, next_step_codes, pending_sign_ins, user_ids
from common import make_app, new_mfa_key, seed_mfa_users


class SqlCounter:
    """Counts statements by kind and BEGINs on an engine (SQLAlchemy events)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.statements: Counter[str] = Counter()
        self.begins = 0
        self.enabled = False
        self.log: list[str] | None = None

        @event.listens_for(engine, "before_cursor_execute")
        def _stmt(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if self.enabled:
                self.statements[statement.split(None, 1)[0].upper()] += 1
            if self.log is not None:
                self.log.append(" ".join(statement.split())[:160])

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            if self.enabled:
                self.begins += 1

    def reset(self) -> None:
        self.statements.clear()
        self.begins = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300, help="verifications per path")
    parser.add_argument("--pyinstrument-path", default="", help="extra sys.path for pyinstrument")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--show-sql", action="store_true", help="print the statements of one request per path"
    )
    parser.add_argument(
        "--cprofile", action="store_true", help="also print cProfile's top functions by own time"
    )
    args = parser.parse_args(argv)
    if args.pyinstrument_path:
        sys.path.append(args.pyinstrument_path)
    try:
        from pyinstrument import Profiler
    except ImportError:
        Profiler = None  # type: ignore[assignment,misc]

    tmp = Path(tempfile.mkdtemp(prefix="qpki-profile-"))
    try:
        key = new_mfa_key()
        url = f"sqlite:///{tmp / 'p.db'}"
        secret_key = secrets.token_urlsafe(48)
        app = make_app(tmp / "data", url, key, secret_key=secret_key, rate_limits_enabled=False)
        n = args.n
        users = seed_mfa_users(url, key, "prof", 2 * n + 20)
        counter = SqlCounter(app.db_manager.engine)
        from qpki.api import api_keys_of

        api_key = api_keys_of(app).create("profile", "verify", actor_name="bench").secret
        client = app.test_client(use_cookies=False)
        minter = CookieMinter(secret_key)

        def web_batch(batch: list[Any]) -> list[tuple[str, str, str]]:
            ids = user_ids(url, [u.username for u in batch])
            tokens = pending_sign_ins(url, [ids[u.username] for u in batch], per_user=1)
            codes = next_step_codes([u.secret for u in batch])
            return [
                (*minter.cookie_and_csrf(t[0], u.username), c)
                for t, c, u in zip(tokens, codes, batch, strict=True)
            ]

        def post_web(item: tuple[str, str, str]) -> None:
            cookie, csrf, code = item
            resp = client.post(
                "/auth/mfa/verify",
                data={"csrf_token": csrf, "code": code},
                headers={"Cookie": cookie},
            )
            if resp.status_code != 302 or "/auth/" in resp.headers.get("Location", ""):
                raise RuntimeError(f"web verify not accepted: {resp.status_code}")

        def post_api(item: tuple[str, str]) -> None:
            username, code = item
            resp = client.post(
                "/api/v1/verify",
                json={"username": username, "code": code},
                headers={"Authorization": f"Bearer {api_key}"},
            )
            if resp.status_code != 200 or resp.get_json().get("result") != "accept":
                raise RuntimeError(f"API verify not accepted: {resp.status_code} {resp.data!r}")

        figures: dict[str, Any] = {}
        warm_web = web_batch(users[:10])
        for item in warm_web:
            post_web(item)
        warm_codes = next_step_codes([u.secret for u in users[10:20]])
        for u, c in zip(users[10:20], warm_codes, strict=True):
            post_api((u.username, c))

        from sqlalchemy import func, select

        from qpki.audit.models import AuditEventRecord

        def audit_count() -> int:
            with app.db_manager.engine.connect() as conn:
                return int(conn.scalar(select(func.count(AuditEventRecord.id))) or 0)

        for label, items, fn in (
            ("web", web_batch(users[20 : 20 + n]), post_web),
            (
                "api",
                list(
                    zip(
                        [u.username for u in users[20 + n : 20 + 2 * n]],
                        next_step_codes([u.secret for u in users[20 + n : 20 + 2 * n]]),
                        strict=True,
                    )
                ),
                post_api,
            ),
        ):
            if args.show_sql:
                counter.log = []
                fn(items[0])  # type: ignore[operator]
                print(f"\n== {label}: the statements of one request")
                print("\n".join(f"  {i + 1:2d}. {q}" for i, q in enumerate(counter.log)))
                counter.log = None
                items = items[1:]
            before = audit_count()
            counter.reset()
            counter.enabled = True
            profiler = Profiler(interval=0.0005) if Profiler is not None else None
            if profiler is not None:
                profiler.start()
            cprof = cProfile.Profile() if args.cprofile else None
            start = time.perf_counter()
            cpu_start = time.process_time()
            if cprof is not None:
                cprof.enable()
            for item in items:
                fn(item)  # type: ignore[operator]
            if cprof is not None:
                cprof.disable()
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            if profiler is not None:
                profiler.stop()
            counter.enabled = False
            stmts = sum(counter.statements.values())
            figures[label] = {
                "ms_per_request": elapsed / len(items) * 1000,
                "cpu_ms_per_request": cpu / len(items) * 1000,
                "statements_per_request": stmts / len(items),
                "by_kind": {k: v / len(items) for k, v in counter.statements.most_common()},
                "transactions_per_request": counter.begins / len(items),
                "audit_records_per_request": (audit_count() - before) / len(items),
            }
            print(f"\n== {label}: {json.dumps(figures[label], indent=1)}")
            if profiler is not None:
                print(profiler.output_text(unicode=True, color=False, show_all=False)[:12000])
            if cprof is not None:
                out = io.StringIO()
                pstats.Stats(cprof, stream=out).sort_stats("tottime").print_stats(30)
                print(out.getvalue())
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
