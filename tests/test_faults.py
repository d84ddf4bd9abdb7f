"""edgetune/faults.py: a fault point pauses for its seconds, or until its release file appears."""

from __future__ import annotations

import threading
import time

from edgetune import faults


def test_a_fault_point_pauses_only_at_its_point_and_round(monkeypatch, capsys):
    monkeypatch.setenv("EDGETUNE_FAULT", "after-commit:3:0.3")
    t0 = time.monotonic()
    faults.point("after-commit", 2)
    faults.point("after-plan", 3)
    assert time.monotonic() - t0 < 0.2 and capsys.readouterr().out == ""
    faults.point("after-commit", 3)
    assert time.monotonic() - t0 >= 0.3
    assert "fault point after-commit round 3: pausing 0.3 s" in capsys.readouterr().out


def test_a_release_file_ends_the_pause_early(monkeypatch, tmp_path, capsys):
    release = tmp_path / "release"
    monkeypatch.setenv("EDGETUNE_FAULT", "after-commit:*:30")
    monkeypatch.setenv("EDGETUNE_FAULT_RELEASE", str(release))
    timer = threading.Timer(0.5, release.touch)
    timer.start()
    t0 = time.monotonic()
    faults.point("after-commit", 4)
    waited = time.monotonic() - t0
    timer.join()
    assert 0.4 <= waited < 5, waited  # released after the file appeared, long before 30 s
    assert f"released by {release}" in capsys.readouterr().out


def test_without_the_release_file_the_pause_lasts_its_seconds(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGETUNE_FAULT", "site-before-reply:1:0.5")
    monkeypatch.setenv("EDGETUNE_FAULT_RELEASE", str(tmp_path / "never"))
    t0 = time.monotonic()
    faults.point("site-before-reply", 1)
    assert time.monotonic() - t0 >= 0.5
