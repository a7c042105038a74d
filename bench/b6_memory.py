"""B6 memory: resident memory (VmRSS from /proc/<pid>/status) of the gunicorn workers, after a
warm-up of full logins and again after B2. The figure is the largest worker. Target ≤ 80 MB
(10^6 bytes). VmHWM (the peak, which includes argon2id's 64 MiB working memory while it hashes)
is kept in the JSON.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from b3_login import full_login
from common import (
    AppServer,
    Context,
    MFAUser,
    Result,
    child_pids,
    proc_status_kb,
    smaps_rollup_kb,
)

TARGET_MB = 80.0


def warm_up(server: AppServer, users: list[MFAUser]) -> None:
    """Full logins from two clients at once, so both workers serve every route at least once."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda u: full_login(server.url, u), users))


def snapshot(server: AppServer) -> dict[str, Any]:
    assert server.process is not None
    workers = child_pids(server.process.pid)
    return {
        "master_pid": server.process.pid,
        "master_rss_kb": proc_status_kb(server.process.pid, "VmRSS"),
        "workers": {
            pid: {
                "VmRSS_kb": proc_status_kb(pid, "VmRSS"),
                "VmHWM_kb": proc_status_kb(pid, "VmHWM"),
                **{f"{k}_kb": v for k, v in smaps_rollup_kb(pid).items()},
            }
            for pid in workers
        },
    }


def _mb(kb: int | None) -> float:
    return (kb or 0) * 1024 / 1e6


def results(ctx: Context, backend: str, snaps: dict[str, dict[str, Any]]) -> list[Result]:
    out = []
    for label, snap in snaps.items():
        rss = [_mb(w["VmRSS_kb"]) for w in snap["workers"].values()]
        if not rss:
            out.append(
                Result(
                    f"B6 worker RSS {label} ({backend})",
                    None,
                    "MB",
                    target=f"≤ {TARGET_MB:.0f} MB",
                    met=False,
                    note="no worker process found",
                )
            )
            continue
        worst = max(rss)
        hwm = max(_mb(w["VmHWM_kb"]) for w in snap["workers"].values())
        private = max(_mb(w.get("Private_kb")) for w in snap["workers"].values())
        pss = max(_mb(w.get("Pss_kb")) for w in snap["workers"].values())
        out.append(
            Result(
                f"B6 worker RSS {label} ({backend})",
                worst,
                "MB",
                target=f"≤ {TARGET_MB:.0f} MB",
                met=worst <= TARGET_MB,
                note=f"largest of {len(rss)} workers ({', '.join(f'{x:.1f}' for x in rss)});"
                f" own (private) {private:.1f} MB, PSS {pss:.1f} MB, the rest shared with the"
                f" preloading master; peak VmHWM {hwm:.1f} MB (argon2id's 64 MiB while hashing)",
                extra=snap,
            )
        )
    return out
