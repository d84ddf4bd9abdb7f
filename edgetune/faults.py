"""Fault injection for crash tests (unset in normal use).

``EDGETUNE_FAULT=<point>:<round>:<seconds>`` makes the process print a marker and pause at that
point of that round (``*``: every round), so a test can kill it there with certainty; benchmarks use
``site-before-reply:*:55`` for rounds of about a minute. Points: ``after-plan`` and
``after-commit`` (server), ``site-before-reply`` (a site, after computing, before replying).
"""

from __future__ import annotations

import os
import time


def point(where: str, round_idx: int) -> None:
    """Pause here if ``EDGETUNE_FAULT`` names this point and round."""
    spec = os.environ.get("EDGETUNE_FAULT", "")
    if not spec:
        return
    name, rnd, seconds = spec.split(":")
    if name == where and (rnd == "*" or int(rnd) == round_idx):
        print(f"[edgetune] fault point {where} round {round_idx}: pausing {seconds} s", flush=True)
        time.sleep(float(seconds))
