"""Run ``wrk`` with ``b7_wrk.lua`` over a fixed list of requests, each sent exactly once.

Every wrk thread has one connection and its own slice of the requests. The run is bounded:
wrk gets ``-d`` as a hard limit, and the driver ends it (SIGINT) as soon as every thread has
written its done file, or at the bound. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import free_port

LUA = Path(__file__).resolve().parent / "b7_wrk.lua"
LOOPBACK = "127.0.0.1"


class WrkMissing(RuntimeError):
    """wrk is not installed (``apt-get install wrk``)."""


@dataclass(frozen=True)
class Req:
    """One HTTP request: the Lua script formats it with wrk.format()."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""

    def line(self) -> str:
        for part in (self.method, self.path, self.body, *self.headers, *self.headers.values()):
            if any(c in part for c in "\t\n\1"):
                raise ValueError(f"request field holds a tab, newline or \\1: {part[:40]!r}")
        head = "\1".join(f"{k}: {v}" for k, v in self.headers.items())
        return f"{self.method}\t{self.path}\t{head}\t{self.body}"


@dataclass
class WrkRun:
    """What one wrk run measured (latencies by wrk's histogram, wall time by the script)."""

    n: int
    wall_s: float
    accepted: int
    refused: int
    other: int
    extra: int
    complete: bool
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]
    statuses: str
    raw: dict[str, Any]

    @property
    def rps(self) -> float:
        return self.n / self.wall_s if self.wall_s > 0 else 0.0


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise WrkMissing("wrk not found: apt-get install wrk")
    return found


def split(requests: list[Req], threads: int) -> list[list[Req]]:
    """Deal the requests round-robin to ``threads`` slices (each non-empty)."""
    if len(requests) < threads:
        raise ValueError(f"{len(requests)} requests cannot feed {threads} wrk threads")
    return [requests[i::threads] for i in range(threads)]


def run(base_url: str, requests: list[Req], mode: str, *, threads: int, bound_s: float) -> WrkRun:
    """Send every request once over ``threads`` connections; stop when all are answered."""
    if not base_url.startswith(f"http://{LOOPBACK}:"):
        raise ValueError(f"benchmarks only contact {LOOPBACK}, not {base_url}")
    slices = split(requests, threads)
    work = Path(tempfile.mkdtemp(prefix="qpki-b7-wrk-"))
    try:
        for i, chunk in enumerate(slices, start=1):
            (work / f"thread-{i}.req").write_text("\n".join(r.line() for r in chunk) + "\n")
        dead = free_port()  # closed: finished threads reconnect here and are refused
        cmd = [
            wrk_path(), "-t", str(threads), "-c", str(threads), "-d", f"{int(bound_s)}s",
            "--timeout", "30s", "-s", str(LUA), base_url, "--", str(work), mode, str(dead),
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + bound_s + 5
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if len(list(work.glob("done-*"))) == threads:
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # wrk sleeps for all of -d otherwise
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        line = next((ln for ln in out.splitlines() if ln.startswith("B7JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result (exit {proc.returncode}): {err[-500:]}")
        raw = json.loads(line.removeprefix("B7JSON "))
        lat = raw["latency_us"]
        complete = raw["answered"] == len(requests) and raw["extra"] == 0
        return WrkRun(
            n=raw["answered"],
            wall_s=raw["finished"] - raw["started"] if raw["finished"] else bound_s,
            accepted=raw["accepted"],
            refused=raw["refused"],
            other=raw["other"],
            extra=raw["extra"],
            complete=complete,
            p50_ms=lat["p50"] / 1000,
            p90_ms=lat["p90"] / 1000,
            p99_ms=lat["p99"] / 1000,
            max_ms=lat["max"] / 1000,
            mean_ms=lat["mean"] / 1000,
            errors=raw["errors"],
            statuses=raw["statuses"].strip(),
            raw=raw,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
