"""qPKI benchmark suite: ``python bench/run.py [--quick] [--only B1,B5] [--no-postgres]``.

Prints one table (benchmark, figure, unit, ratio against its baseline, target, met) and writes
the same results as JSON to ``bench/results/<UTC timestamp>.json``. Figures are medians over
repeated runs; every ratio compares two things measured side by side in this same run. Only
127.0.0.1 is contacted: PostgreSQL and the gunicorn server are throwaway instances started by
the test harness (``tests/harness/services.py``).

    B1  MFAManager TOTP verify incl. decrypt vs pyotp + Fernet          target ≤ 1.5×
    B2  second-factor POSTs over HTTP (gunicorn, 2 workers), SQLite + PostgreSQL;
        requests/s, p50, p99, replay guard                                 all codes once
    B3  full login over HTTP vs argon2id alone
    B4  rejecting a throttled sign-in vs one password check               target ≤ 1/20
    B5  admin pages, login, audit verify: small vs large database         ≤ 1.2×, verify 1M < 60 s
    B6  gunicorn worker RSS after warm-up and after B2                    target ≤ 80 MB
    B7  verification hot path under wrk (web second step, API verify) vs a hello-world
        Flask ceiling and privacyIDEA's /validate/check   ≥ 10 % / 15 % of ceiling, ≥ 15× peer

``--quick`` uses fewer repetitions and smaller databases (1k/10k vs 10k/100k) and finishes in
a few minutes (B7: one round); the full run builds 100k users / 1M audit events.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import b1_core
import b2_second_factor
import b3_login
import b4_throttle
import b5_scale
import b6_memory
import b7_hot_path
from common import (
    Context,
    Result,
    app_server,
    error_result,
    find_pg_bin,
    machine_info,
    migrate,
    new_mfa_key,
    postgres_cluster,
    render_table,
    seed_mfa_users,
    server_env,
    write_json,
)

ALL = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")


def _guard(name: str, results: list[Result], fn: Callable[[], list[Result]]) -> None:
    """Run one benchmark; a crash becomes a failed row instead of ending the suite."""
    start = time.perf_counter()
    try:
        results.extend(fn())
    except Exception as exc:
        traceback.print_exc()
        results.append(error_result(name, exc))
    print(f"  ({name}: {time.perf_counter() - start:.1f} s)", flush=True)


def http_suite(ctx: Context, backend: str, wanted: set[str]) -> list[Result]:
    """B6 warm-up snapshot, B2, B6 after-B2 snapshot, B3: one gunicorn server per backend."""
    per_round, rounds = (12, 1) if ctx.quick else (100, 3)
    n_warm = 4
    n_b2 = per_round * rounds if "B2" in wanted else 0
    n_seq, n_load = (3, 4) if ctx.quick else (9, 16)
    if "B3" not in wanted:
        n_seq = n_load = 0
    if backend == "sqlite":
        url = f"sqlite:///{ctx.tmp / 'http.db'}"
    else:
        assert ctx.pg is not None
        url = ctx.pg.create_database("bench_http")
    migrate(url)
    users = seed_mfa_users(url, ctx.mfa_key, "load", n_warm + n_b2 + n_seq + n_load)
    warm, b2_users = users[:n_warm], users[n_warm : n_warm + n_b2]
    seq = users[n_warm + n_b2 : n_warm + n_b2 + n_seq]
    loaded = users[n_warm + n_b2 + n_seq :]
    results: list[Result] = []
    env = server_env(url, ctx.tmp / f"data-{backend}", ctx.mfa_key)
    ctx.log(f"  starting qpki run --workers 2 on {backend}")
    with app_server(env, workers=2, log_dir=ctx.tmp / f"logs-{backend}") as server:
        try:
            b6_memory.warm_up(server, warm)
            snaps = {"after warm-up": b6_memory.snapshot(server)}
            if "B2" in wanted:
                _guard(
                    f"B2 ({backend})",
                    results,
                    lambda: b2_second_factor.run(ctx, server, backend, b2_users, per_round),
                )
                snaps["after B2"] = b6_memory.snapshot(server)
            if "B6" in wanted:
                results += b6_memory.results(ctx, backend, snaps)
            if "B3" in wanted:
                ctx.log(f"  B3 {backend}: {n_seq} sequential + {n_load} concurrent logins")
                _guard(
                    f"B3 ({backend})",
                    results,
                    lambda: b3_login.run(ctx, server, backend, seq, loaded),
                )
        except Exception:
            print(f"--- server log tail ({backend}) ---", file=sys.stderr)
            print(server.log_text()[-3000:], file=sys.stderr)
            raise
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: fewer repetitions")
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. B1,B4")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    args = parser.parse_args(argv)
    wanted = {w.strip().upper() for w in args.only.split(",") if w.strip()} or set(ALL)
    unknown = wanted - set(ALL)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    started = time.perf_counter()
    machine = machine_info()
    mode = "quick" if args.quick else "full"
    print(
        f"qPKI benchmarks ({mode}) on {machine['nproc']} CPU × {machine['cpu_model']}, "
        f"{machine['ram_gib']} GiB RAM, Python {machine['python']}, SQLite {machine['sqlite']}, "
        f"{machine['postgresql'] or 'no PostgreSQL'}; commit {machine['commit']}",
        flush=True,
    )
    print(
        "Load runs (B2, B3) use QPKI_RATE_LIMITS=0: every client is 127.0.0.1, so per-address "
        "limits would answer 429; the per-account throttle stays on.",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="qpki-bench-"))
    ctx = Context(
        quick=args.quick, tmp=tmp, mfa_key=new_mfa_key(), log=lambda m: print(m, flush=True)
    )
    results: list[Result] = []
    backends = ["sqlite"]
    try:
        with contextlib.ExitStack() as stack:
            needs_pg = bool(wanted & {"B2", "B3", "B5", "B6", "B7"}) and not args.no_postgres
            if needs_pg and find_pg_bin() is None:
                ctx.pg_reason = "PostgreSQL server binaries not found (apt-get install postgresql)"
                print(f"PostgreSQL skipped: {ctx.pg_reason}", flush=True)
            elif needs_pg:
                pg_start = time.perf_counter()
                ctx.pg = stack.enter_context(postgres_cluster())
                ctx.log(f"PostgreSQL cluster up in {time.perf_counter() - pg_start:.1f} s")
                backends.append("postgres")
            if "B1" in wanted:
                ctx.log("B1 core TOTP verify")
                _guard("B1", results, lambda: b1_core.run(ctx))
            if "B4" in wanted:
                ctx.log("B4 throttling")
                _guard("B4", results, lambda: b4_throttle.run(ctx))
            if wanted & {"B2", "B3", "B6"}:
                for backend in backends:
                    ctx.log(f"B2/B3/B6 over HTTP on {backend}")
                    _guard(
                        f"B2/B3/B6 ({backend})",
                        results,
                        lambda b=backend: http_suite(ctx, b, wanted),
                    )
            if "B7" in wanted:
                ctx.log("B7 hot path under wrk (qPKI web + API, hello-world, privacyIDEA)")
                _guard("B7", results, lambda: b7_hot_path.run(ctx, backends))
            if "B5" in wanted:
                ctx.log("B5 scale")
                b5_backends = backends if not ctx.quick else ["sqlite"]
                if ctx.quick and len(backends) > 1:
                    ctx.log("  (quick: B5 on SQLite only; the full run adds PostgreSQL)")
                for backend in b5_backends:
                    _guard(f"B5 ({backend})", results, lambda b=backend: b5_scale.run(ctx, [b]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.perf_counter() - started
    order = {name: i for i, name in enumerate(ALL)}
    results.sort(key=lambda r: order.get(r.name[:2], 99))
    print()
    print(render_table(results))
    notes = [f"  {r.name}: {r.note}" for r in results if r.note]
    if notes:
        print("\nnotes:")
        print("\n".join(notes))
    missed = [r.name for r in results if r.met is False]
    print(
        f"\n{len(results)} figures, {sum(r.met is True for r in results)} targets met, "
        f"{len(missed)} missed; {elapsed:.0f} s"
    )
    payload = {
        "mode": mode,
        "machine": machine,
        "elapsed_s": elapsed,
        "settings": {"QPKI_RATE_LIMITS": "0 for B2/B3 servers", "workers": 2},
        "postgres": "used" if "postgres" in backends else ctx.pg_reason or "not requested",
        "load_average": os.getloadavg(),
        "results": [r.to_json() for r in results],
    }
    path = write_json(payload, args.out) if args.out else write_json(payload)
    print(f"results written to {path}")
    crashed = any(r.note.startswith("ERROR") for r in results)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
