"""B2 second-factor step over HTTP against ``qpki run --workers 2`` (gunicorn).

Per round: N users with 2FA (bulk-inserted beforehand) each get two pending-MFA sessions by
the real password step (sign-in page, password POST, verify page) — outside the timed window.
Then, timed, a thread pool of clients posts one valid code per session (the code of the next
time step, valid for at least 60 s); afterwards the same code is replayed on each user's second
pending session. The replay guard holds when every code was accepted exactly once and every
replay refused. Per-address limits are off for this run (QPKI_RATE_LIMITS=0): all clients share
127.0.0.1, and the per-account throttle, which stays on, is not touched by successful codes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyotp
from common import AppServer, Browser, Context, MFAUser, Result, median, percentile

CLIENTS = 4  # concurrent clients: twice the two workers, so neither worker ever waits
PREP_CLIENTS = 4
CODE_VALIDITY_S = 55.0  # a next-step code is accepted for >= 60 s; replays must come before


@dataclass
class Round:
    n: int
    wall_s: float
    latencies_s: list[float]
    accepted: int
    replay_refused: int
    other: list[str] = field(default_factory=list)
    code_age_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.n / self.wall_s


def _prepare(base: str, users: list[MFAUser]) -> list[tuple[MFAUser, Browser, str, Browser, str]]:
    def one(user: MFAUser) -> tuple[MFAUser, Browser, str, Browser, str]:
        first, second = Browser(base), Browser(base)
        return (
            user,
            first,
            first.password_step(user.username),
            second,
            second.password_step(user.username),
        )

    with ThreadPoolExecutor(PREP_CLIENTS) as pool:
        return list(pool.map(one, users))


def _post_all(jobs: list[tuple[Browser, str, str]]) -> tuple[float, list[tuple[str, float]]]:
    def post(job: tuple[Browser, str, str]) -> tuple[str, float]:
        browser, csrf, code = job
        start = time.perf_counter()
        outcome = browser.post_code(csrf, code)
        return outcome, time.perf_counter() - start

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda _: None, range(CLIENTS)))  # start the threads before the clock
        start = time.perf_counter()
        outcomes = list(pool.map(post, jobs))
        return time.perf_counter() - start, outcomes


def run_round(server: AppServer, users: list[MFAUser]) -> Round:
    prepared = _prepare(server.url, users)
    issued = time.time()
    codes = [pyotp.TOTP(user.secret).at(issued + 30) for user, *_ in prepared]
    wall, first = _post_all(
        [(b1, c1, code) for (_, b1, c1, _, _), code in zip(prepared, codes, strict=True)]
    )
    _, replays = _post_all(
        [(b2, c2, code) for (_, _, _, b2, c2), code in zip(prepared, codes, strict=True)]
    )
    age = time.time() - issued
    for _, b1, _, b2, _ in prepared:
        b1.close()
        b2.close()
    other = [o for o, _ in first if o not in ("accepted", "refused")]
    other += [f"replay {o}" for o, _ in replays if o not in ("accepted", "refused")]
    return Round(
        n=len(users),
        wall_s=wall,
        latencies_s=[t for _, t in first],
        accepted=sum(o == "accepted" for o, _ in first),
        replay_refused=sum(o == "refused" for o, _ in replays),
        other=other,
        code_age_s=age,
    )


def run(
    ctx: Context, server: AppServer, backend: str, users: list[MFAUser], per_round: int
) -> list[Result]:
    rounds = []
    for index in range(0, len(users), per_round):
        batch = users[index : index + per_round]
        ctx.log(f"  B2 {backend}: round {len(rounds) + 1}, {len(batch)} sessions")
        rounds.append(run_round(server, batch))
    total = sum(r.n for r in rounds)
    accepted = sum(r.accepted for r in rounds)
    refused = sum(r.replay_refused for r in rounds)
    conclusive = all(r.code_age_s < CODE_VALIDITY_S for r in rounds)
    other = [o for r in rounds for o in r.other]
    p50s = [percentile(r.latencies_s, 50) * 1000 for r in rounds]
    p99s = [percentile(r.latencies_s, 99) * 1000 for r in rounds]
    where = f"{backend}, {CLIENTS} clients, {len(rounds)}×{per_round}"
    extra = {
        "rounds": [
            {
                "n": r.n,
                "wall_s": r.wall_s,
                "rps": r.rps,
                "p50_ms": percentile(r.latencies_s, 50) * 1000,
                "p99_ms": percentile(r.latencies_s, 99) * 1000,
                "accepted": r.accepted,
                "replay_refused": r.replay_refused,
                "code_age_s": r.code_age_s,
            }
            for r in rounds
        ],
        "rate_limits": "QPKI_RATE_LIMITS=0",
    }
    note = (
        "QPKI_RATE_LIMITS=0 (per-address limits off for the load run); the client threads "
        "share the machine's cores with the server; p50/p99 = median over rounds"
    )
    ok = accepted == total and refused == total and not other and conclusive
    return [
        Result(
            f"B2 2nd-factor POST throughput ({where})",
            median(r.rps for r in rounds),
            "req/s",
            note=note,
            extra=extra,
        ),
        Result(
            f"B2 2nd-factor latency p50 ({backend})", median(p50s), "ms", extra={"p50_ms": p50s}
        ),
        Result(
            f"B2 2nd-factor latency p99 ({backend})", median(p99s), "ms", extra={"p99_ms": p99s}
        ),
        Result(
            f"B2 replay guard ({backend}: accepted once / replays refused)",
            float(accepted),
            f"of {total}",
            target="all once, 0 replays",
            met=ok,
            note=f"replays refused {refused}/{total}"
            + ("" if conclusive else "; a replay came after the code's window: inconclusive")
            + (f"; unexpected answers: {other[:5]}" if other else ""),
            extra={"accepted": accepted, "replay_refused": refused, "total": total},
        ),
    ]
