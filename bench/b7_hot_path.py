"""B7 the verification hot path under wrk, next to the framework's ceiling and a peer.

Measured from outside with ``wrk`` (``b7_wrk.lua``: 8 threads, one connection each, every
request sent exactly once), every server on gunicorn with the settings of ``qpki run`` (2 sync
workers, preloaded app, access log on) on 127.0.0.1:

- qPKI's web second step, ``POST /auth/mfa/verify``: N users with 2FA (bulk-inserted) each get
  two pending sign-ins (rows made by the product's ``SessionStore.create``, cookies signed with
  the server's secret key and carrying a CSRF token) before the timed window. Timed: one
  next-step TOTP code per user on the first pending sign-in. Then every code is replayed on the
  user's second pending sign-in and must be refused (the replay guard, not the claimed session).
- qPKI's JSON API, ``POST /api/v1/verify`` (a service key with the "verify" scope), the same
  way: each code once, then every code again, all refused.
- the ceiling: a Flask app answering "ok" (``b7_hello.py``) on the same gunicorn settings.
- the peer: privacyIDEA from PyPI (``b7_privacyidea.py``), TOTP tokens with known secrets via
  ``/token/init``, each code once on ``POST /validate/check`` (serial and pass).

A refused code mails its owner (checklist §12.8, at most once per window), so each replay
queues mail; before anything else is timed the benchmark waits, untimed, until the server
has delivered it, so no run pays for the mail of the run before it.

Rounds alternate the order (ABBA) and every ratio is the median of per-round ratios, each
between figures measured back to back. Then, information only: SQLite with 4 workers, and
PostgreSQL with 2 workers. Per-address limits are off (QPKI_RATE_LIMITS=0): every client is
127.0.0.1; the per-account throttle stays on (each user sends one code per step).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import b7_privacyidea
import b7_sqlite_writers
import b7_wrk_driver
import pyotp
from b7_wrk_driver import Req, WrkRun
from common import (
    AppServer,
    Context,
    MFAUser,
    Result,
    app_server,
    child_pids,
    free_port,
    median,
    migrate,
    seed_mfa_users,
    server_env,
)

THREADS = 8  # wrk threads = connections (one each)
WORKERS = 2
BOUND_S = 120  # the hard limit of any one wrk run
SESSION_COOKIE = "qpki_session"  # QPKI_HTTPS=0 in server_env
PENDING_LIFETIME = timedelta(minutes=5)  # SessionPolicy.pending, as the cookie states it
OUTBOX_DRAIN_S = 120  # the longest wait for the replays' alert mails to be delivered
LOOPBACK = "127.0.0.1"

# The targets.
WEB_SHARE, WEB_P99_MS = 0.10, 25.0
API_SHARE, API_P99_MS = 0.15, 15.0
PEER_FACTOR, PEER_P99_SHARE = 15.0, 0.10


# -- servers -----------------------------------------------------------------------------------
@dataclass
class HelloServer:
    url: str
    pid: int


@contextmanager
def hello_server(log_dir: Path, workers: int = WORKERS) -> Iterator[HelloServer]:
    """``b7_hello:app`` on gunicorn with qpki run's settings (sync, preload, access log)."""
    from harness.services import _http_ok, _kill_process_group

    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "sync",
        "--preload", "--timeout", "60", "--graceful-timeout", "10", "--access-logfile", "-",
        "--bind", f"{LOOPBACK}:{port}", "--chdir", str(Path(__file__).parent), "b7_hello:app",
    ]  # fmt: skip
    with (log_dir / f"hello-{port}.log").open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _http_ok(f"http://{LOOPBACK}:{port}/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hello-world gunicorn did not start (exit {proc.poll()})")
            time.sleep(0.1)
        yield HelloServer(f"http://{LOOPBACK}:{port}", proc.pid)
    finally:
        _kill_process_group(proc, timeout=10)


def create_api_key(env: dict[str, str]) -> str:
    """A service key with the "verify" scope, made by ``qpki api-keys create``."""
    proc = subprocess.run(
        [sys.executable, "-m", "qpki", "api-keys", "create", "b7-bench", "--scope", "verify"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"qpki api-keys create failed: {proc.stderr[-500:]}")
    return proc.stdout.strip().splitlines()[0]


# -- preparing the sign-ins (outside the timed window) ----------------------------------------
def user_ids(url: str, names: list[str]) -> dict[str, int]:
    from sqlalchemy import create_engine, select

    from qpki.auth.models import User

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(User.username, User.id).where(User.username.in_(names)))
            return {name: uid for name, uid in rows}
    finally:
        engine.dispose()


class CookieMinter:
    """Signs session cookies exactly as the server does (same secret key, Flask's session
    serializer, Flask-WTF's CSRF token bound to the session), with what the password step's
    answer puts in them for a 2FA account (``start_pending_session``: the session token, the
    name and when the pending sign-in times out)."""

    def __init__(self, secret_key: str) -> None:
        from flask import Flask

        self.app = Flask("b7-cookies")
        self.app.config.update(SECRET_KEY=secret_key, SESSION_COOKIE_NAME=SESSION_COOKIE)

    def cookie_and_csrf(self, sid: str, username: str) -> tuple[str, str]:
        from flask import session
        from flask_wtf.csrf import generate_csrf

        from qpki.web.session_auth import PENDING_UNTIL_KEY, PENDING_USER_KEY, SESSION_KEY

        with self.app.test_request_context("/auth/mfa/verify"):
            session[SESSION_KEY] = sid
            session[PENDING_USER_KEY] = username
            session[PENDING_UNTIL_KEY] = (datetime.now(UTC) + PENDING_LIFETIME).timestamp()
            csrf = generate_csrf()
            serializer = self.app.session_interface.get_signing_serializer(self.app)  # type: ignore[attr-defined]
            return f"{SESSION_COOKIE}={serializer.dumps(dict(session))}", csrf


def pending_sign_ins(url: str, ids: list[int], per_user: int) -> list[list[str]]:
    """``per_user`` pending (password-only) sessions per user, by the product's SessionStore,
    in one transaction; returns their raw tokens, per user."""
    from qpki.auth.sessions import SessionPolicy, SessionStore
    from qpki.db.manager import DatabaseManager

    db = DatabaseManager(url)
    store = SessionStore(SessionPolicy())
    now = datetime.now(UTC)
    try:
        with db.transaction() as s:
            return [
                [
                    store.create(
                        s, uid, mfa_passed=False, now=now, ip=LOOPBACK, user_agent="wrk (B7)"
                    )
                    for _ in range(per_user)
                ]
                for uid in ids
            ]
    finally:
        db.dispose()


def web_requests(
    url: str, secret_key: str, users: list[MFAUser], codes: list[str]
) -> tuple[list[Req], list[Req]]:
    """(first use, replay on a second pending sign-in) of each user's code."""
    ids = user_ids(url, [u.username for u in users])
    tokens = pending_sign_ins(url, [ids[u.username] for u in users], per_user=2)
    minter = CookieMinter(secret_key)
    first: list[Req] = []
    replay: list[Req] = []
    for (tok1, tok2), code, user in zip(tokens, codes, users, strict=True):
        for tok, out in ((tok1, first), (tok2, replay)):
            cookie, csrf = minter.cookie_and_csrf(tok, user.username)
            out.append(
                Req(
                    "POST",
                    "/auth/mfa/verify",
                    {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
                    urllib.parse.urlencode({"csrf_token": csrf, "code": code}),
                )
            )
    return first, replay


def api_requests(api_key: str, users: list[MFAUser], codes: list[str]) -> list[Req]:
    import json

    return [
        Req(
            "POST",
            "/api/v1/verify",
            {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            json.dumps({"username": u.username, "code": code}, separators=(",", ":")),
        )
        for u, code in zip(users, codes, strict=True)
    ]


def next_step_codes(secrets_b32: list[str]) -> list[str]:
    """The code of the next time step: accepted (±1 step) for at least 60 s from now."""
    at = time.time() + 30
    return [pyotp.TOTP(s).at(at) for s in secrets_b32]


# -- one measured run --------------------------------------------------------------------------
@dataclass
class Measured:
    first: WrkRun
    replay: WrkRun | None = None
    cpu_ms: float | None = None  # the server's CPU time (all workers) per first-run request

    @property
    def guard_ok(self) -> bool:
        f = self.first
        ok = f.complete and f.accepted == f.n and f.other == 0
        if self.replay is not None:
            r = self.replay
            ok = ok and r.complete and r.refused == r.n and r.accepted == 0
        return ok

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.first.n,
            "wall_s": self.first.wall_s,
            "rps": self.first.rps,
            "p50_ms": self.first.p50_ms,
            "p90_ms": self.first.p90_ms,
            "p99_ms": self.first.p99_ms,
            "max_ms": self.first.max_ms,
            "accepted": self.first.accepted,
            "other": self.first.other,
            "statuses": self.first.statuses,
            "errors": self.first.errors,
            "server_cpu_ms_per_request": self.cpu_ms,
        }
        if self.replay is not None:
            out.update(
                replay_refused=self.replay.refused,
                replay_accepted=self.replay.accepted,
                replay_other=self.replay.other,
                replay_statuses=self.replay.statuses,
            )
        return out


def server_cpu_s(master_pid: int) -> float:
    """User + system CPU time of a gunicorn arbiter and its workers so far (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [master_pid, *child_pids(master_pid)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def drive(
    base: str, first: list[Req], mode: str, pid: int, replay: list[Req] | None = None
) -> Measured:
    """One wrk run (and the replay run); the server's CPU per request, which unlike
    requests/s hardly depends on what else the shared machine is doing."""
    cpu_before = server_cpu_s(pid)
    run = b7_wrk_driver.run(base, first, mode, threads=THREADS, bound_s=BOUND_S)
    cpu = (server_cpu_s(pid) - cpu_before) / max(1, run.n) * 1000
    again = None
    if replay is not None:
        again = b7_wrk_driver.run(base, replay, mode, threads=THREADS, bound_s=BOUND_S)
    return Measured(run, again, cpu)


def _pid(server: AppServer) -> int:
    assert server.process is not None
    return server.process.pid


def wait_for_outbox(url: str, bound_s: float = OUTBOX_DRAIN_S) -> None:
    """Untimed: let the server deliver the mails the replays queued (a refused code mails
    its owner, at most once per window) before anything else is timed, so that no run pays
    for the mail of the one before it. Polls the outbox; bounded."""
    from sqlalchemy import create_engine, func, select

    from qpki.mail.models import MailStatus, OutboxMessage

    waiting = (MailStatus.PENDING.value, MailStatus.SENDING.value)
    engine = create_engine(url)
    deadline = time.monotonic() + bound_s
    try:
        while True:
            with engine.connect() as conn:
                left = conn.scalar(
                    select(func.count(OutboxMessage.id)).where(OutboxMessage.status.in_(waiting))
                )
            if not left:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{left} mails still undelivered after {bound_s:.0f} s")
            time.sleep(0.1)
    finally:
        engine.dispose()


def measure_web(server: AppServer, env: dict[str, str], url: str, users: list[MFAUser]) -> Measured:
    codes = next_step_codes([u.secret for u in users])
    first, replay = web_requests(url, env["QPKI_SECRET_KEY"], users, codes)
    measured = drive(server.url, first, "web", _pid(server), replay)
    wait_for_outbox(url)
    return measured


def measure_api(server: AppServer, url: str, api_key: str, users: list[MFAUser]) -> Measured:
    codes = next_step_codes([u.secret for u in users])
    reqs = api_requests(api_key, users, codes)
    measured = drive(server.url, reqs, "api", _pid(server), reqs)
    wait_for_outbox(url)
    return measured


def measure_hello(hello: HelloServer, n: int) -> Measured:
    return drive(hello.url, [Req("GET", "/")] * n, "hello", hello.pid)


def measure_peer(peer: b7_privacyidea.PeerServer, tokens: list[tuple[str, str]]) -> Measured:
    codes = next_step_codes([_b32(hex_secret) for _, hex_secret in tokens])
    reqs = [
        Req(
            "POST",
            "/validate/check",
            {"Content-Type": "application/x-www-form-urlencoded"},
            urllib.parse.urlencode({"serial": serial, "pass": code}),
        )
        for (serial, _), code in zip(tokens, codes, strict=True)
    ]
    return drive(peer.url, reqs, "pi", peer.pid)  # its replay guard is not measured here


def _b32(hex_secret: str) -> str:
    import base64

    return base64.b32encode(bytes.fromhex(hex_secret)).decode()


# -- the benchmark -----------------------------------------------------------------------------
@dataclass
class Sizes:
    n: int  # verifications per qPKI run (web, API)
    n_peer: int  # per privacyIDEA run
    n_hello: int
    rounds: int
    n_info: int  # per run of the information-only variants


def sizes(ctx: Context) -> Sizes:
    if ctx.quick:
        return Sizes(n=240, n_peer=120, n_hello=2000, rounds=1, n_info=160)
    return Sizes(n=800, n_peer=400, n_hello=6000, rounds=3, n_info=800)


def _setup_backend(ctx: Context, backend: str, name: str, count: int) -> tuple[str, list[MFAUser]]:
    if backend == "sqlite":
        url = f"sqlite:///{ctx.tmp / f'{name}.db'}"
    else:
        assert ctx.pg is not None
        url = ctx.pg.create_database(name)
    migrate(url)
    return url, seed_mfa_users(url, ctx.mfa_key, "b7u", count)


def _peer_or_reason(ctx: Context) -> tuple[Path | None, str]:
    try:
        return b7_privacyidea.ensure_venv(ctx.log), ""
    except b7_privacyidea.PeerUnavailable as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"privacyIDEA could not be installed: {exc}"


def run(ctx: Context, backends: list[str]) -> list[Result]:
    b7_wrk_driver.wrk_path()  # fail early, with the apt-get hint
    sz = sizes(ctx)
    venv, peer_reason = _peer_or_reason(ctx)
    if venv is None:
        ctx.log(f"  B7: privacyIDEA skipped: {peer_reason}")
    per_round = 2 * sz.n
    warm = 2 * THREADS
    url, users = _setup_backend(ctx, "sqlite", "b7", warm * 2 + per_round * sz.rounds)
    env = server_env(url, ctx.tmp / "data-b7", ctx.mfa_key)
    rounds: list[dict[str, Measured]] = []
    with (
        app_server(env, workers=WORKERS, log_dir=ctx.tmp / "logs-b7") as server,
        hello_server(ctx.tmp / "logs-b7") as hello,
        _maybe_peer(ctx, venv) as peer,
    ):
        api_key = create_api_key(env)
        # Warm-up (not measured): every worker has served each route and opened its pool.
        measure_web(server, env, url, users[:warm])
        measure_api(server, url, api_key, users[warm : 2 * warm])
        measure_hello(hello, 200)
        pool = users[2 * warm :]
        peer_tokens: list[list[tuple[str, str]]] = []
        if peer is not None:
            ctx.log(f"  B7: {sz.rounds}×{sz.n_peer} privacyIDEA tokens via /token/init")
            peer_tokens = [
                [(f"B7R{r}T{i:05d}", os.urandom(20).hex()) for i in range(sz.n_peer)]
                for r in range(sz.rounds)
            ]
            peer.init_tokens([t for rnd in peer_tokens for t in rnd])
            peer.init_tokens([("B7WARM", os.urandom(20).hex())])
        for r in range(sz.rounds):
            web_users = pool[r * per_round : r * per_round + sz.n]
            api_users = pool[r * per_round + sz.n : (r + 1) * per_round]
            steps: list[tuple[str, Callable[[], Measured]]] = [
                ("hello", lambda: measure_hello(hello, sz.n_hello)),
                ("web", lambda u=web_users: measure_web(server, env, url, u)),  # type: ignore[misc]
                ("api", lambda u=api_users: measure_api(server, url, api_key, u)),  # type: ignore[misc]
            ]
            if peer is not None:
                steps.append(("peer", lambda t=peer_tokens[r]: measure_peer(peer, t)))  # type: ignore[misc]
            if r % 2 == 1:
                steps.reverse()
            got: dict[str, Measured] = {}
            for name, fn in steps:
                got[name] = fn()
                m = got[name].first
                ctx.log(
                    f"  B7 round {r + 1} {name}: {m.rps:,.0f}/s p50 {m.p50_ms:.1f} ms "
                    f"p99 {m.p99_ms:.1f} ms ({m.accepted}/{m.n} accepted), "
                    f"server CPU {_cpu(got[name]):.2f} ms/request"
                )
            rounds.append(got)
    results = _main_results(rounds, peer_reason)
    results += _variants(ctx, backends, sz)
    results += b7_sqlite_writers.run(ctx)
    return results


@contextmanager
def _maybe_peer(ctx: Context, venv: Path | None) -> Iterator[b7_privacyidea.PeerServer | None]:
    if venv is None:
        yield None
        return
    with b7_privacyidea.peer_server(ctx.tmp / "privacyidea", venv) as peer:
        yield peer


def _ratio(
    rounds: list[dict[str, Measured]], a: str, b: str, f: Callable[[WrkRun], float]
) -> float:
    return median(f(rnd[a].first) / f(rnd[b].first) for rnd in rounds)


def _cpu(m: Measured) -> float:
    """CPU ms per request, floored at one clock tick over the run (never zero)."""
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    return max(m.cpu_ms or 0.0, tick_ms / max(1, m.first.n))


def _main_results(rounds: list[dict[str, Measured]], peer_reason: str) -> list[Result]:
    has_peer = all("peer" in rnd for rnd in rounds)
    hello_rps = median(rnd["hello"].first.rps for rnd in rounds)
    out = [
        Result(
            "B7 hello-world ceiling (gunicorn 2 sync workers, wrk 8 conns)",
            hello_rps,
            "req/s",
            extra={"rounds": [rnd["hello"].summary() for rnd in rounds]},
        )
    ]
    per_round = {k: [rnd[k].summary() for rnd in rounds] for k in rounds[0]}
    for key, label, share, p99_max in (
        ("web", "web 2nd step POST /auth/mfa/verify", WEB_SHARE, WEB_P99_MS),
        ("api", "API POST /api/v1/verify", API_SHARE, API_P99_MS),
    ):
        rps = median(rnd[key].first.rps for rnd in rounds)
        p50 = median(rnd[key].first.p50_ms for rnd in rounds)
        p99 = median(rnd[key].first.p99_ms for rnd in rounds)
        of_ceiling = _ratio(rounds, key, "hello", lambda m: m.rps)
        guard = all(rnd[key].guard_ok for rnd in rounds)
        total = sum(rnd[key].first.n for rnd in rounds)
        out += [
            Result(
                f"B7 {label} (SQLite)",
                rps,
                "req/s",
                baseline=hello_rps,
                ratio=of_ceiling,
                target=f"≥ {share:.0%} of ceiling",
                met=of_ceiling >= share,
                note=f"p50 {p50:.1f} ms; ratio = share of the hello-world ceiling (paired rounds)",
                extra={"rounds": per_round[key]},
            ),
            Result(
                f"B7 {key} p99 (SQLite, 8 conns)",
                p99,
                "ms",
                target=f"≤ {p99_max:.0f} ms",
                met=p99 <= p99_max,
            ),
            Result(
                f"B7 {key} server CPU per verification (all workers)",
                median(_cpu(rnd[key]) for rnd in rounds),
                "ms",
                baseline=median(_cpu(rnd["hello"]) for rnd in rounds),
                ratio=median(_cpu(rnd["hello"]) / _cpu(rnd[key]) for rnd in rounds),
                note="ratio = hello-world's CPU per request ÷ this one's: the share of the "
                "ceiling a CPU-bound server reaches, whatever else the machine is doing",
            ),
            Result(
                f"B7 {key} replay guard (each code once, every replay refused)",
                float(sum(rnd[key].first.accepted for rnd in rounds)),
                f"of {total}",
                target="all once, 0 replays",
                met=guard,
                note="replays refused "
                f"{sum(rnd[key].replay.refused for rnd in rounds if rnd[key].replay)}/{total}",
            ),
        ]
        if has_peer:
            vs_peer = _ratio(rounds, key, "peer", lambda m: m.rps)
            p99_share = _ratio(rounds, key, "peer", lambda m: m.p99_ms)
            out += [
                Result(
                    f"B7 {key} vs privacyIDEA /validate/check, throughput",
                    vs_peer,
                    "×",
                    target=f"≥ {PEER_FACTOR:.0f}×",
                    met=vs_peer >= PEER_FACTOR,
                ),
                Result(
                    f"B7 {key} vs privacyIDEA, server CPU per request",
                    median(_cpu(rnd["peer"]) / _cpu(rnd[key]) for rnd in rounds),
                    "× less",
                    note="privacyIDEA's CPU per /validate/check ÷ qPKI's per verification",
                ),
                Result(
                    f"B7 {key} vs privacyIDEA, p99 share",
                    p99_share,
                    "of peer p99",
                    target=f"≤ {PEER_P99_SHARE}",
                    met=p99_share <= PEER_P99_SHARE,
                ),
            ]
        else:
            out.append(
                Result(
                    f"B7 {key} vs privacyIDEA",
                    None,
                    "",
                    target=f"≥ {PEER_FACTOR:.0f}×, p99 ≤ {PEER_P99_SHARE} of peer",
                    met=None,
                    note=f"not measured: {peer_reason}",
                )
            )
    if has_peer:
        out.append(
            Result(
                f"B7 privacyIDEA {b7_privacyidea.VERSION} POST /validate/check (SQLite)",
                median(rnd["peer"].first.rps for rnd in rounds),
                "req/s",
                note=(
                    f"server CPU {median(_cpu(rnd['peer']) for rnd in rounds):.1f} ms per check; "
                    f"p50 {median(rnd['peer'].first.p50_ms for rnd in rounds):.1f} ms, "
                    f"p99 {median(rnd['peer'].first.p99_ms for rnd in rounds):.1f} ms; "
                    "every code accepted once: "
                    f"{all(rnd['peer'].guard_ok for rnd in rounds)}"
                ),
                extra={"rounds": per_round["peer"]},
            )
        )
    return out


def _variants(ctx: Context, backends: list[str], sz: Sizes) -> list[Result]:
    """Information only: SQLite under 4 workers, PostgreSQL under 2 (fresh server each)."""
    out: list[Result] = []
    plans = [("sqlite", 4)] + [("postgres", WORKERS) for b in backends if b == "postgres"]
    for backend, workers in plans:
        name = f"b7_{backend}_{workers}w"
        url, users = _setup_backend(ctx, backend, name, 2 * THREADS + 2 * sz.n_info)
        env = server_env(url, ctx.tmp / f"data-{name}", ctx.mfa_key)
        with app_server(env, workers=workers, log_dir=ctx.tmp / f"logs-{name}") as server:
            api_key = create_api_key(env)
            measure_web(server, env, url, users[:THREADS])
            measure_api(server, url, api_key, users[THREADS : 2 * THREADS])
            rest = users[2 * THREADS :]
            web = measure_web(server, env, url, rest[: sz.n_info])
            api = measure_api(server, url, api_key, rest[sz.n_info :])
        for key, m in (("web", web), ("api", api)):
            ctx.log(
                f"  B7 {backend} {workers} workers {key}: {m.first.rps:,.0f}/s "
                f"p50 {m.first.p50_ms:.1f} ms p99 {m.first.p99_ms:.1f} ms, "
                f"server CPU {_cpu(m):.2f} ms/request"
            )
            out.append(
                Result(
                    f"B7 {key} ({backend}, {workers} workers)",
                    m.first.rps,
                    "req/s",
                    met=m.guard_ok if not m.guard_ok else None,
                    target="" if m.guard_ok else "all once, 0 replays",
                    note=f"p50 {m.first.p50_ms:.1f} ms, p99 {m.first.p99_ms:.1f} ms, "
                    f"server CPU {_cpu(m):.2f} ms/request; "
                    f"replay guard {'held' if m.guard_ok else 'FAILED'}",
                    extra=m.summary(),
                )
            )
    return out
