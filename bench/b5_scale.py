"""B5 scale: the same four operations on a small and a large database, side by side.

Databases are built by SQLAlchemy Core bulk inserts (not through the web): users with one shared
argon2id hash, a third of them with 2FA, a few with failed-login rows; audit events with a
valid keyed chain sealed with the app's ``AuditLog.seal`` (and its head stored) so that
``audit verify`` passes.
Measured: the admin users page and a filtered audit page (Flask test client, logged in as an
admin), ``AuthManager.login`` of one user, and ``AuditLog.verify`` (what ``qpki audit verify``
runs). Targets: the large database within 1.2× of the small one; verify of 1M events < 60 s.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from common import (
    PASSWORD,
    Context,
    Result,
    bulk_insert,
    csrf_token,
    interleaved,
    make_app,
    median,
    paired_ratio,
    password_hash,
    user_row,
)

from qpki.audit.chain import GENESIS
from qpki.audit.log import AuditLog
from qpki.audit.models import AuditEventRecord
from qpki.auth.models import LoginThrottle, User
from qpki.auth.throttle import account_key

SCALE_TARGET = 1.2
VERIFY_TARGET_S = 60.0
ADMIN = "bench-admin"
LOGIN_USER = "bench-login"

# One event in ten is a login failure; the rest is what sign-ins and sessions leave behind.
_PATTERN = (
    ["login_password_accepted", "mfa_verify_success", "login_success"] * 4
    + ["login_success", "logout", "logout", "session_ended"]
    + ["login_failure", "login_failure", "mfa_verify_failure", "user_changed"]
)
_DETAILS = {
    "login_success": '{"second_factor":"totp"}',
    "login_failure": '{"failures":1,"reason":"bad_password"}',
    "mfa_verify_success": '{"method":"totp"}',
    "mfa_verify_failure": '{"failures":1,"method":"totp","reason":"invalid"}',
    "session_ended": '{"session_id":1}',
    "user_changed": '{"role":{"from":"viewer","to":"operator"}}',
}
_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0"


@dataclass
class Scale:
    users: int
    events: int

    @property
    def label(self) -> str:
        def short(n: int) -> str:
            return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"

        return f"{short(self.users)}/{short(self.events)}"


def _user_rows(n: int, now: datetime, mfa_key: str) -> Iterator[dict[str, Any]]:
    from cryptography.fernet import Fernet, MultiFernet

    from qpki.auth.mfa import MFAManager

    mfa = MFAManager(MultiFernet([Fernet(mfa_key.encode())]))
    token = mfa.encrypt(mfa.generate_secret())  # one secret shared by every 2FA user here
    blob = mfa.encrypt_backup_entries(mfa.hash_backup_codes(mfa.generate_backup_codes()))
    pw_hash = password_hash()
    yield user_row(ADMIN, pw_hash=pw_hash, now=now, role="admin")
    yield user_row(LOGIN_USER, pw_hash=pw_hash, now=now)
    for i in range(n - 2):
        mfa_on = i % 3 == 0
        row = user_row(
            f"user{i:07d}",
            pw_hash=pw_hash,
            now=now,
            role="operator" if i % 10 == 0 else "viewer",
            totp_token=token if mfa_on else None,
            backup_blob=blob,
        )
        row["last_login_at"] = now - timedelta(minutes=i % 5000)
        yield row


def _event_rows(n: int, users: int, now: datetime, audit: AuditLog) -> Iterator[dict[str, Any]]:
    rng = random.Random(42)
    start = now - timedelta(seconds=n + 60)
    prev = GENESIS
    for i in range(n):
        event = _PATTERN[i % len(_PATTERN)]
        uid = rng.randrange(3, users + 1)
        name = f"user{uid - 3:07d}"
        failure = event in ("login_failure", "mfa_verify_failure")
        row = SimpleNamespace(
            seq=i + 1,
            occurred_at=start + timedelta(seconds=i, microseconds=rng.randrange(1_000_000)),
            event=event,
            outcome="failure" if failure else "success",
            actor_id=None if event == "login_failure" else uid,
            actor_name="" if event == "login_failure" else name,
            target_user_id=uid,
            target_name=name,
            ip=f"10.{(uid >> 16) & 255}.{(uid >> 8) & 255}.{uid & 255}",
            user_agent=_AGENT,
            details=_DETAILS.get(event, "{}"),
        )
        digest = audit.seal(prev, row)
        yield {**vars(row), "prev_hash": prev, "hash": digest}
        prev = digest


def build(url: str, scale: Scale, mfa_key: str, audit: AuditLog) -> dict[str, float]:
    """Bulk-load ``scale`` into the (migrated, empty) database at ``url``; returns timings."""
    from sqlalchemy import create_engine, event, select

    engine = create_engine(url)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA cache_size=-262144")  # 256 MiB for the bulk load only
            cursor.close()

    now = datetime.now(UTC)
    try:
        t0 = time.perf_counter()
        bulk_insert(engine, User.__table__, _user_rows(scale.users, now, mfa_key))
        throttled = [
            {
                "key": account_key(f"user{i:07d}"),
                "failures": 1 + i % 7,
                "last_failure_at": now,
                "next_allowed_at": now + timedelta(seconds=30) if i % 7 >= 4 else None,
                "locked_at": None,
            }
            for i in range(0, scale.users - 2, 97)
        ]
        bulk_insert(engine, LoginThrottle.__table__, throttled)
        t1 = time.perf_counter()
        events = _event_rows(scale.events, scale.users, now, audit)
        bulk_insert(engine, AuditEventRecord.__table__, events)
        with engine.connect() as conn:
            last = conn.execute(
                select(AuditEventRecord.seq, AuditEventRecord.hash)
                .order_by(AuditEventRecord.id.desc())
                .limit(1)
            ).one()
        audit.head.replace(audit.sealed_head(last.seq, last.hash))
        t2 = time.perf_counter()
        if url.startswith("postgresql"):
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE")
        t3 = time.perf_counter()
    finally:
        engine.dispose()
    return {"users_s": t1 - t0, "events_s": t2 - t1, "analyze_s": t3 - t2}


class Site:
    """One built database with its app and an admin logged in through the test client."""

    def __init__(self, ctx: Context, backend: str, scale: Scale) -> None:
        self.scale = scale
        self.backend = backend
        self.name = f"b5_{backend}_{scale.users}"
        self.ctx = ctx
        if backend == "sqlite":
            self.url = f"sqlite:///{ctx.tmp / f'{self.name}.db'}"
        else:
            assert ctx.pg is not None
            self.url = ctx.pg.create_database(self.name)
        self.app = make_app(ctx.tmp / self.name, self.url, ctx.mfa_key, rate_limits_enabled=False)
        self.manager = self.app.auth_manager
        self.build_times: dict[str, float] = {}
        self.body = b""

    def build(self) -> None:
        self.ctx.log(f"  B5 {self.backend} {self.scale.label}: building")
        self.build_times = build(self.url, self.scale, self.ctx.mfa_key, self.manager.audit)
        self.ctx.log(
            f"  B5 {self.backend} {self.scale.label}: built in "
            f"{sum(self.build_times.values()):.1f} s"
        )
        # The bench admin signs in with the password alone: lift the fresh-install policy
        # that would send it to enrol first (as `qpki policy set admin --no-require-2fa`).
        from qpki.web.services import services_of

        services_of(self.app).policy.set_policy(
            "admin", actor=None, actor_name="bench", require_2fa=False
        )
        self.client = self.app.test_client()
        page = self.client.get("/auth/login")
        done = self.client.post(
            "/auth/login",
            data={
                "csrf_token": csrf_token(page.get_data(as_text=True)),
                "username": ADMIN,
                "password": PASSWORD,
                "next": "",
            },
        )
        if done.status_code != 302:
            raise RuntimeError(f"admin login failed: {done.status_code}")

    def get(self, path: str, expect: str) -> None:
        resp = self.client.get(path)
        body = resp.get_data()
        if resp.status_code != 200 or expect.encode() not in body:
            raise RuntimeError(f"GET {path}: {resp.status_code}")
        if path == "/admin/users":
            self.body = body

    def users_page(self) -> None:
        self.get("/admin/users", "users-table")

    def audit_page(self) -> None:
        self.get("/admin/audit?event=login_failure", 'data-event="login_failure"')

    def login(self) -> None:
        result = self.manager.login(LOGIN_USER, PASSWORD, ip="127.0.0.1", user_agent="bench")
        if result.mfa_required or not result.token:
            raise RuntimeError("login did not open a full session")

    def verify(self, runs: int) -> tuple[list[float], list[float], int]:
        wall, cpu, checked = [], [], 0
        for _ in range(runs):
            with self.manager.db.transaction(write=False) as s:
                start, cpu_start = time.perf_counter(), time.process_time()
                outcome = self.manager.audit.verify(s)
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - cpu_start)
            if not outcome.ok:
                raise RuntimeError(f"audit chain broken at {outcome.broken_id}: {outcome.reason}")
            checked = outcome.checked
        return wall, cpu, checked

    def close(self) -> None:
        self.app.db_manager.dispose()
        if self.backend == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.ctx.tmp / self.name}.db{suffix}").unlink(missing_ok=True)
        elif self.ctx.pg is not None:
            self.ctx.pg.drop_database(self.name)


def run_backend(ctx: Context, backend: str, scales: list[Scale]) -> list[Result]:
    """Build both databases, then measure them turn by turn (ABBA), so that load on a shared
    machine falls on both alike; each ratio is the median of back-to-back pairs."""
    small, big = Site(ctx, backend, scales[0]), Site(ctx, backend, scales[-1])
    try:
        small.build()
        big.build()
        ctx.log(f"  B5 {backend}: measuring {small.scale.label} and {big.scale.label} in turn")
        timings: dict[str, dict[str, list[float]]] = {}
        for key, reps in (
            ("users_page", ctx.reps(7, 3)),
            ("audit_page", ctx.reps(21, 7)),
            ("login", ctx.reps(9, 3)),
        ):
            timings[key] = interleaved(
                {"small": getattr(small, key), "big": getattr(big, key)}, 1, reps
            )
        small_verify = small.verify(ctx.reps(5, 3))
        ctx.log(f"  B5 {backend}: audit verify of {big.scale.events:,} events")
        big_verify = big.verify(ctx.reps(2, 1))
        return _results(backend, small, big, timings, small_verify, big_verify)
    finally:
        small.close()
        big.close()


def _results(
    backend: str,
    small: Site,
    big: Site,
    timings: dict[str, dict[str, list[float]]],
    small_verify: tuple[list[float], list[float], int],
    big_verify: tuple[list[float], list[float], int],
) -> list[Result]:
    tag = f"{backend} {big.scale.label} vs {small.scale.label}"
    results = []
    rows = {
        "small": small.body.count(b"data-user-id="),
        "big": big.body.count(b"data-user-id="),
    }
    for key, label in (
        ("users_page", "admin users page"),
        ("audit_page", "audit page ?event=login_failure"),
        ("login", "AuthManager.login"),
    ):
        small_ms = median(timings[key]["small"]) * 1000
        big_ms = median(timings[key]["big"]) * 1000
        ratio = paired_ratio(timings[key]["big"], timings[key]["small"])
        note = f"{small.scale.label}: {small_ms:.1f} ms"
        extra: dict[str, Any] = {
            "small_ms": [x * 1000 for x in timings[key]["small"]],
            "big_ms": [x * 1000 for x in timings[key]["big"]],
        }
        if key == "users_page":
            note += f"; the page lists {rows['big']} users ({len(big.body) / 1e6:.2f} MB)"
            extra.update(rows=rows, bytes={"small": len(small.body), "big": len(big.body)})
        results.append(
            Result(
                f"B5 {label} ({tag})",
                big_ms,
                "ms",
                baseline=small_ms,
                ratio=ratio,
                target=f"≤ {SCALE_TARGET}× small db",
                met=ratio <= SCALE_TARGET,
                note=note,
                extra=extra,
            )
        )
    wall, cpu, checked = big_verify
    big_s = median(wall)
    per_event = big_s / checked
    projected = per_event * 1_000_000
    full_size = big.scale.events >= 1_000_000
    results.append(
        Result(
            f"B5 audit verify ({backend}, {big.scale.label.split('/')[1]} events)",
            big_s,
            "s",
            baseline=median(small_verify[0]),
            target=f"1M events < {VERIFY_TARGET_S:.0f} s" + ("" if full_size else " (projected)"),
            met=projected < VERIFY_TARGET_S,
            note=f"{checked} events, {per_event * 1e6:.1f} µs/event, CPU {median(cpu):.1f} s"
            + ("" if full_size else f"; 1M projected {projected:.1f} s"),
            extra={
                "small_s": small_verify[0],
                "big_s": wall,
                "big_cpu_s": cpu,
                "checked": checked,
                "projected_1m_s": projected,
            },
        )
    )
    results.append(
        Result(
            f"B5 bulk build ({backend} {big.scale.label})",
            sum(big.build_times.values()),
            "s",
            note="users+throttle rows, audit chain, ANALYZE (no target)",
            extra={"small": small.build_times, "big": big.build_times},
        )
    )
    return results


def scales(quick: bool) -> list[Scale]:
    if quick:
        return [Scale(1_000, 10_000), Scale(10_000, 100_000)]
    return [Scale(1_000, 10_000), Scale(100_000, 1_000_000)]


def run(ctx: Context, backends: list[str]) -> list[Result]:
    results: list[Result] = []
    for backend in backends:
        results += run_backend(ctx, backend, scales(ctx.quick))
    return results
