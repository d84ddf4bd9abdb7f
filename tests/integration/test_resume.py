"""A server killed with kill -9 resumes at the last committed round and ends bitwise equal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _cmd(run_dir: Path, rounds: int = 4) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edgetune.inproc",
        "recipes/spsa/tiny-4c.toml",
        f"num_rounds={rounds}",
        f"run.dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        "--sites",
        "3",
    ]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EDGETUNE_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ref_hash(tmp_path_factory) -> str:
    """The final state hash of the uninterrupted run (one run, for every kill point)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    ref = subprocess.run(_cmd(tmp / "a" / "same"), cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return _rows(tmp / "a" / "same" / "metrics.jsonl")[-1]["state_hash"]


@pytest.mark.parametrize("point", ["after-plan:3:30", "after-commit:2:30"])
def test_kill9_then_restart_commits_each_round_once_and_matches(tmp_path, point, ref_hash):
    """kill -9 mid-round (after round 3 was planned) or between rounds: the restarted server
    resumes, rounds 1..4 are each committed once, and the final state equals an uninterrupted run."""
    run_dir = tmp_path / "b" / "same"
    proc = subprocess.Popen(
        _cmd(run_dir),
        cwd=ROOT,
        env=_env(tmp_path, EDGETUNE_FAULT=point),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while "fault point" not in (line := proc.stdout.readline()):
        assert line or proc.poll() is None, "run ended before the fault point"
        assert time.time() < deadline
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    journal = _rows(run_dir / "journal.jsonl")
    assert not any(r["t"] == "finished" for r in journal)

    again = subprocess.run(_cmd(run_dir), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    journal = _rows(run_dir / "journal.jsonl")
    assert [r["round"] for r in journal if r["t"] == "commit"] == [1, 2, 3, 4]
    rows = _rows(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["state_hash"] == ref_hash

    finished = subprocess.run(_cmd(run_dir), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert finished.returncode != 0 and "finished run" in finished.stderr
    assert _rows(run_dir / "journal.jsonl") == journal  # nothing trained again
