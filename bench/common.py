"""Shared pieces of the qPKI benchmark suite: results, timing, machine facts, seeding, HTTP.

Everything talks to 127.0.0.1 only. Services (PostgreSQL, the gunicorn app server) come from
the test harness in ``tests/harness/services.py``, imported from the tests directory rather than
copied, so the benchmarks start and stop them exactly like the integration tests do.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = ROOT / "tests"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from harness.services import (  # noqa: E402  (needs the tests dir on sys.path)
    AppServer,
    PostgresServer,
    app_server,
    find_pg_bin,
    free_port,
    postgres_cluster,
)

__all__ = [
    "PASSWORD",
    "AppServer",
    "Context",
    "PostgresServer",
    "Result",
    "app_server",
    "find_pg_bin",
    "free_port",
    "postgres_cluster",
]

# The one password of every seeded account (bulk-inserted, so the policy is not consulted).
PASSWORD = "bench-Passphrase-for-qpki-77"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Result:
    """One line of the table (and one object of the JSON file)."""

    name: str
    figure: float | None
    unit: str
    baseline: float | None = None  # the figure it is compared with, same unit
    ratio: float | None = None  # figure / baseline
    target: str = ""  # e.g. "ratio <= 1.5"; empty when the issue sets none
    met: bool | None = None  # None when there is no target (or it was not measured)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def error_result(name: str, exc: BaseException) -> Result:
    """A row for a benchmark that crashed: shown as not met, with the error."""
    return Result(name, None, "", target="runs", met=False, note=f"ERROR {exc!r}"[:300])


@dataclass
class Context:
    """What every benchmark receives: the mode, the repetition counts, shared services."""

    quick: bool
    tmp: Path
    pg: PostgresServer | None = None
    pg_reason: str = ""
    log: Callable[[str], None] = print
    mfa_key: str = ""

    def reps(self, full: int, quick: int) -> int:
        return quick if self.quick else full


# -- timing ----------------------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def percentile(values: Iterable[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0..100), as numpy's default."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * pct / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def per_op(
    fn: Callable[[], object], number: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds per call of ``fn`` over ``number`` calls, with the collector paused (timeit-style).

    ``clock=time.thread_time`` counts only the CPU time of this thread: for pure-CPU code on a
    shared machine that leaves out the time the thread spent descheduled by other tenants.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        for _ in range(number):
            fn()
        return (clock() - start) / number
    finally:
        if enabled:
            gc.enable()


def interleaved(
    fns: dict[str, Callable[[], object]],
    number: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time each function in alternating blocks (order flipped every repeat), so that drift of
    a shared, noisy machine hits all of them alike. Returns seconds per call, per block."""
    names = list(fns)
    out: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # one untimed warm-up block each
        per_op(fns[name], max(1, number // 10))
    for rep in range(repeats):
        order = names if rep % 2 == 0 else list(reversed(names))
        for name in order:
            out[name].append(per_op(fns[name], number, clock))
    return out


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the block-by-block ratios: each pair ran back to back, under the same load."""
    return median(n / d for n, d in zip(numerator, denominator, strict=True))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def ratio_met(ratio: float | None, limit: float) -> bool | None:
    return None if ratio is None else ratio <= limit


# -- machine ---------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """nproc, CPU model, RAM, Python, SQLite, PostgreSQL, and the commit measured."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_kb = int(line.split()[1])
    except OSError:
        pass
    import sqlite3

    pg_bin = find_pg_bin()
    pg_version = ""
    if pg_bin is not None:
        try:
            pg_version = subprocess.run(
                [str(pg_bin / "postgres"), "--version"],
                capture_output=True,
                text=True,
                check=False,
                timeout=10,
            ).stdout.strip()
        except OSError:
            pg_version = ""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(ram_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg_version,
        "commit": commit + ("+local changes" if dirty else ""),
    }


# -- output ----------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}"


def render_table(results: list[Result]) -> str:
    """A plain-text table: name, figure, unit, ratio vs baseline, target, met."""
    header = ("benchmark", "figure", "unit", "ratio", "target", "met")
    rows = [
        (
            r.name,
            _fmt(r.figure),
            r.unit,
            _fmt(r.ratio) + ("×" if r.ratio is not None else ""),
            r.target or "—",
            {True: "yes", False: "NO", None: "—"}[r.met],
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    align = ["<", ">", "<", ">", "<", "<"]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths, strict=True))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    return "\n".join(out)


def write_json(payload: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


# -- the application in-process --------------------------------------------------------------------
def new_mfa_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def make_app(data_dir: Path, url: str, mfa_key: str, **overrides: object) -> Any:
    """A migrated qPKI app with production settings (CSRF on, default argon2), quiet logs."""
    from qpki.app import create_app
    from qpki.config import Settings

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    values: dict[str, object] = {
        "data_dir": data_dir,
        "database_url": url,
        "secret_key": secrets.token_urlsafe(48),
        "mfa_key": mfa_key,
        "log_level": "WARNING",
        "argon2_profile": "default",  # the production parameters, never the tests' "fast"
    }
    values.update(overrides)
    app = create_app(Settings(**values))  # type: ignore[arg-type]
    _app_logs_to_file(data_dir.parent / "app-inprocess.log")
    app.db_manager.migrate_database()
    return app


def _app_logs_to_file(path: Path) -> None:
    """Send the in-process apps' log lines (Flask-Limiter logs every 429 at INFO) to a file
    instead of the console: still written, as in production, but not mixed into the table."""
    import logging

    for name in ("qpki", "flask-limiter"):
        for handler in logging.getLogger(name).handlers:
            ours = getattr(handler, "_qpki", False) and isinstance(handler, logging.StreamHandler)
            if ours and getattr(handler.stream, "name", None) != str(path):
                handler.setStream(path.open("a", encoding="utf-8"))


def migrate(url: str) -> None:
    from qpki.db.manager import DatabaseManager

    db = DatabaseManager(url)
    try:
        db.migrate_database()
    finally:
        db.dispose()


_HASH_CACHE: dict[str, str] = {}


def password_hash(password: str = PASSWORD) -> str:
    """One argon2id hash with the product's default parameters (computed once per run)."""
    if password not in _HASH_CACHE:
        from qpki.auth.passwords import Passwords

        _HASH_CACHE[password] = Passwords().hash(password)
    return _HASH_CACHE[password]


def user_row(
    username: str,
    *,
    pw_hash: str,
    now: datetime,
    role: str = "viewer",
    totp_token: str | None = None,
    backup_blob: str | None = None,
) -> dict[str, Any]:
    """A complete ``users`` row for a Core bulk insert (every column, so executemany works)."""
    from qpki.auth.throttle import account_key

    mfa = totp_token is not None
    return {
        "username": username,
        "username_key": account_key(username),
        "email": f"{username}@example.org",
        "password_hash": pw_hash,
        "role": role,
        "is_active": True,
        "must_change_password": False,
        "created_at": now,
        "last_login_at": None,
        "password_changed_at": None,
        "two_factor_enabled": mfa,
        "totp_secret": totp_token,
        "backup_codes": backup_blob if mfa else None,
        "backup_codes_version": 0,
        "totp_last_step": None,
        "mfa_enabled_at": now if mfa else None,
    }


def chunks(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def bulk_insert(engine: Any, table: Any, rows: Iterable[dict[str, Any]], chunk: int = 20000) -> int:
    """SQLAlchemy Core executemany in chunks, one transaction per chunk."""
    from sqlalchemy import insert

    count = 0
    batch: list[dict[str, Any]] = []
    stmt = insert(table)
    for row in rows:
        batch.append(row)
        if len(batch) >= chunk:
            with engine.begin() as conn:
                conn.execute(stmt, batch)
            count += len(batch)
            batch = []
    if batch:
        with engine.begin() as conn:
            conn.execute(stmt, batch)
        count += len(batch)
    return count


@dataclass
class MFAUser:
    username: str
    secret: str


def seed_mfa_users(url: str, mfa_key: str, prefix: str, count: int) -> list[MFAUser]:
    """``count`` active users with 2FA on (own TOTP secret each), bulk-inserted."""
    from cryptography.fernet import Fernet, MultiFernet
    from sqlalchemy import create_engine

    from qpki.auth.mfa import MFAManager
    from qpki.auth.models import User

    mfa = MFAManager(MultiFernet([Fernet(mfa_key.encode())]))
    now = datetime.now(UTC)
    blob = mfa.encrypt_backup_entries(mfa.hash_backup_codes(mfa.generate_backup_codes()))
    pw_hash = password_hash()
    users = [MFAUser(f"{prefix}{i:05d}", mfa.generate_secret()) for i in range(count)]
    rows = [
        user_row(
            u.username, pw_hash=pw_hash, now=now, totp_token=mfa.encrypt(u.secret), backup_blob=blob
        )
        for u in users
    ]
    engine = create_engine(url)
    try:
        bulk_insert(engine, User.__table__, rows)
    finally:
        engine.dispose()
    return users


# -- HTTP ------------------------------------------------------------------------------------------
def csrf_token(html: str) -> str:
    match = CSRF_RE.search(html)
    if match is None:
        raise RuntimeError("no CSRF token in the page")
    return match.group(1)


def server_env(url: str, data_dir: Path, mfa_key: str) -> dict[str, str]:
    """Environment of a load-test server: per-address limits OFF (one client address)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return {
        "QPKI_DATA_DIR": str(data_dir),
        "QPKI_DATABASE_URL": url,
        "QPKI_SECRET_KEY": secrets.token_urlsafe(48),
        "QPKI_MFA_KEY": mfa_key,
        # A shared database needs every key given explicitly; servers that share the database
        # share the audit chain, so they must share its key (derived here from the MFA key).
        "QPKI_AUDIT_KEY": hashlib.sha256(b"bench-audit-key:" + mfa_key.encode()).hexdigest(),
        "QPKI_RATE_LIMITS": "0",
        "QPKI_LOG_LEVEL": "WARNING",
        "QPKI_HTTPS": "0",
        "QPKI_PROXY_FIX": "0",
        "QPKI_REDIS_URL": "",
    }


# -- processes -------------------------------------------------------------------------------------
def child_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` (gunicorn's workers of its arbiter), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return sorted(found)


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Browser:
    """One user's browser: a requests session (cookie jar) against the app on 127.0.0.1."""

    def __init__(self, base: str) -> None:
        import requests

        self.base = base
        self.http = requests.Session()
        self.http.trust_env = False  # never a proxy: the server is on loopback

    def password_step(self, username: str, password: str = PASSWORD) -> str:
        """Sign-in page, password POST, verify page; returns the verify form's CSRF token."""
        page = self.http.get(f"{self.base}/auth/login", timeout=120)
        resp = self.http.post(
            f"{self.base}/auth/login",
            data={
                "csrf_token": csrf_token(page.text),
                "username": username,
                "password": password,
                "next": "",
            },
            allow_redirects=False,
            timeout=120,
        )
        if resp.status_code != 302 or not resp.headers.get("Location", "").endswith(
            "/auth/mfa/verify"
        ):
            raise RuntimeError(f"password step for {username}: HTTP {resp.status_code}")
        return csrf_token(self.http.get(f"{self.base}/auth/mfa/verify", timeout=120).text)

    def post_code(self, csrf: str, code: str) -> str:
        """POST the second factor: 'accepted', 'refused' (invalid code) or 'other:<status>'."""
        resp = self.http.post(
            f"{self.base}/auth/mfa/verify",
            data={"csrf_token": csrf, "code": code},
            allow_redirects=False,
            timeout=120,
        )
        location = resp.headers.get("Location", "")
        if resp.status_code == 302 and "/auth/" not in location:
            return "accepted"
        if resp.status_code == 200 and (
            "Invalid verification code" in resp.text  # qpki.auth.errors.INVALID_CODE
            or "That code was just used" in resp.text  # CODE_JUST_USED: the replay guard
        ):
            return "refused"
        return f"other:{resp.status_code}"

    def close(self) -> None:
        self.http.close()


def smaps_rollup_kb(pid: int) -> dict[str, int]:
    """Pss and private (unshared) memory of ``pid`` from /proc/<pid>/smaps_rollup, in kB."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return out
    if "Private_Clean" in out and "Private_Dirty" in out:
        out["Private"] = out["Private_Clean"] + out["Private_Dirty"]
    return out
