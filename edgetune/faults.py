"""Fault injection for crash tests (unset in normal use).

``EDGETUNE_FAULT=<point>:<round>:<seconds>`` makes the process print a marker and pause at that
point of that round (``*``: every round), so a test can kill it there with certainty; benchmarks use
``site-before-reply:*:55`` for rounds of about a minute. Points: every step of a server round
(``federation.FAULT_POINTS``: ``plan-saved``, ``after-plan``, ..., ``after-commit``, ...) and
``site-before-reply`` (a site, after computing, before replying). The crash matrix
(``tests/integration/test_crash_matrix.py``) replaces ``point`` to kill a forked server at each one.

``EDGETUNE_FAULT_RELEASE=<path>`` ends such a pause early once that file exists: a test that waits for
something outside the process (a restarted site admitted again) pauses for as long as that takes, up to
``seconds``, instead of a fixed time sized for the slowest machine.
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
        release = os.environ.get("EDGETUNE_FAULT_RELEASE", "")
        deadline = time.monotonic() + float(seconds)
        while (left := deadline - time.monotonic()) > 0:
            if release and os.path.exists(release):
                print(f"[edgetune] fault point {where} round {round_idx}: released by {release}", flush=True)
                return
            time.sleep(min(left, 0.2) if release else left)
