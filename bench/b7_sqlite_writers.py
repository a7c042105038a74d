"""B7 part: SQLite write serialisation under several worker processes.

W processes (forked, like gunicorn's workers) each run K write transactions through
``DatabaseManager.transaction()`` on one SQLite file in WAL mode: a conditional UPDATE, 2 ms
of CPU work, an INSERT (the shape of a verification), then 2 ms outside the transaction.
Measured per transaction: wall time from asking for the transaction to its commit. Two
modes, alternated: with the writer lock (``SQLiteWriterLock``: writers take turns on an
``flock``, a waiter retries every millisecond at most) and without it (SQLite's busy handler
alone, which sleeps 1, 2, 5, 10, ... 100 ms between tries). Nothing leaves the machine;
every run is bounded by K.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

from common import Context, Result, median, percentile

TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS bench_rows (id INTEGER PRIMARY KEY, k INTEGER, v TEXT)",
    "CREATE TABLE IF NOT EXISTS bench_counter (id INTEGER PRIMARY KEY, n INTEGER)",
    "INSERT OR IGNORE INTO bench_counter (id, n) VALUES (1, 0)",
)


HOLD_S = 0.002  # CPU time spent inside each transaction (a verification holds it ~2-5 ms)


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _worker(url: str, use_lock: bool, count: int, start_at: float, out: Any) -> None:
    from sqlalchemy import text

    from qpki.db.manager import DatabaseManager

    db = DatabaseManager(url)
    if not use_lock:
        db._writer_lock = None  # SQLite's busy handler alone
    latencies = []
    while time.time() < start_at:
        time.sleep(0.001)
    for i in range(count):
        begin = time.perf_counter()
        with db.transaction() as s:
            s.execute(text("UPDATE bench_counter SET n = n + 1 WHERE id = 1 AND n >= 0"))
            _spin(HOLD_S)  # the use case's own work inside its transaction
            s.execute(
                text("INSERT INTO bench_rows (k, v) VALUES (:k, :v)"), {"k": i, "v": "x" * 200}
            )
        latencies.append(time.perf_counter() - begin)
        time.sleep(0.002)  # the request's other work, outside the transaction
    db.dispose()
    out.put(latencies)


def measure(tmp: Path, workers: int, use_lock: bool, count: int) -> dict[str, float]:
    from sqlalchemy import text

    from qpki.db.manager import DatabaseManager

    path = tmp / f"writers-{workers}-{int(use_lock)}-{time.monotonic_ns()}.db"
    url = f"sqlite:///{path}"
    db = DatabaseManager(url)
    with db.transaction() as s:
        for sql in TABLE_SQL:
            s.execute(text(sql))
    db.dispose()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    start_at = time.time() + 0.3
    procs = [
        ctx.Process(target=_worker, args=(url, use_lock, count, start_at, queue))
        for _ in range(workers)
    ]
    wall_start = time.perf_counter()
    for p in procs:
        p.start()
    samples: list[float] = []
    for _ in procs:
        samples += queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    wall = time.perf_counter() - wall_start - 0.3
    return {
        "tx_per_s": len(samples) / wall,
        "p50_ms": percentile(samples, 50) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
        "max_ms": max(samples) * 1000,
    }


def run(ctx: Context) -> list[Result]:
    count = 150 if ctx.quick else 400
    repeats = 2 if ctx.quick else 4
    out: list[Result] = []
    for workers in (2, 4):
        runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for rep in range(repeats):
            for use_lock in (True, False) if rep % 2 == 0 else (False, True):
                runs[use_lock].append(measure(ctx.tmp, workers, use_lock, count))
        locked, bare = runs[True], runs[False]
        p99_l = median(r["p99_ms"] for r in locked)
        p99_b = median(r["p99_ms"] for r in bare)
        ratio = median(a["p99_ms"] / b["p99_ms"] for a, b in zip(locked, bare, strict=True))
        ctx.log(
            f"  B7 SQLite writers ×{workers}: p99 {p99_l:.1f} ms with the writer lock, "
            f"{p99_b:.1f} ms with SQLite's busy handler alone"
        )
        out.append(
            Result(
                f"B7 SQLite write tx p99, {workers} processes (writer lock vs busy handler)",
                p99_l,
                "ms",
                baseline=p99_b,
                ratio=ratio,
                note=(
                    f"p50 {median(r['p50_ms'] for r in locked):.2f} vs "
                    f"{median(r['p50_ms'] for r in bare):.2f} ms; "
                    f"{median(r['tx_per_s'] for r in locked):,.0f} vs "
                    f"{median(r['tx_per_s'] for r in bare):,.0f} tx/s; "
                    f"{workers}×{count} transactions, {repeats} alternated runs per mode"
                ),
                extra={"writer_lock": locked, "busy_handler": bare},
            )
        )
    return out
