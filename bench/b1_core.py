"""B1 core: one MFAManager TOTP verification including decrypting the stored secret, against
the raw baseline in the same process (pyotp ``TOTP.verify`` with the same ±1 window plus one
Fernet decrypt). Blocks of calls alternate between the two (ABBA order); the figure is the
median block and the ratio the median of the back-to-back block ratios, which shared-machine
noise disturbs least.
Both are pure CPU work, so blocks are timed with the thread's CPU clock (``time.thread_time``):
time spent descheduled by other tenants of a shared machine is not counted (wall time is kept in
the JSON for comparison).
"""

from __future__ import annotations

import time

import pyotp
from common import Context, Result, interleaved, median, paired_ratio, ratio_met
from cryptography.fernet import Fernet

from qpki.auth.keys import KeyRing
from qpki.auth.mfa import TOTP_WINDOW, MFAManager

TARGET = 1.5


def run(ctx: Context) -> list[Result]:
    key = Fernet.generate_key()
    mfa = MFAManager(KeyRing([key]))  # the product's ring, as create_app builds it
    fernet = Fernet(key)
    secret = mfa.generate_secret()
    token = mfa.encrypt(secret)
    # Short blocks (~15 ms) and many of them: pairs run back to back see the same load.
    number = ctx.reps(300, 200)
    repeats = ctx.reps(61, 21)
    results = []
    for label, wrong in (("valid code", False), ("wrong code", True)):
        # A fresh code per case; a step boundary passing mid-run keeps it inside the window.
        code = mfa.current_code(secret)
        if wrong:
            code = f"{(int(code) + 1) % 1_000_000:06d}"

        def product(code: str = code) -> object:
            return mfa.verify_totp(mfa.decrypt(token), code)

        def baseline(code: str = code) -> object:
            plain = fernet.decrypt(token.encode()).decode()
            return pyotp.TOTP(plain).verify(code, valid_window=TOTP_WINDOW)

        assert (product() is not None) is (not wrong) and baseline() is (not wrong)
        fns = {"product": product, "baseline": baseline}
        times = interleaved(fns, number, repeats, clock=time.thread_time)
        wall = interleaved(fns, number, max(5, repeats // 4))
        ours, raw = median(times["product"]) * 1e6, median(times["baseline"]) * 1e6
        ratio = paired_ratio(times["product"], times["baseline"])
        results.append(
            Result(
                f"B1 TOTP verify incl. decrypt ({label})",
                ours,
                "µs/op",
                baseline=raw,
                ratio=ratio,
                target=f"≤ {TARGET}× raw",
                met=ratio_met(ratio, TARGET),
                note=f"baseline pyotp.verify(window=1)+Fernet.decrypt = {raw:.1f} µs CPU; "
                f"{label}: {'3 vs 3' if wrong else '3 vs 2'} HMACs (ours never stops early)",
                extra={
                    "blocks": repeats,
                    "calls_per_block": number,
                    "product_us": [t * 1e6 for t in times["product"]],
                    "baseline_us": [t * 1e6 for t in times["baseline"]],
                    "clock": "thread_time (CPU)",
                    "wall_product_us": median(wall["product"]) * 1e6,
                    "wall_baseline_us": median(wall["baseline"]) * 1e6,
                    "wall_ratio": paired_ratio(wall["product"], wall["baseline"]),
                },
            )
        )
    return results
