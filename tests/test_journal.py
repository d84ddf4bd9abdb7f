"""The run journal is the single commit point, checksummed, and bound to its run.

A killed run is simulated in-process by raising at a fault point (``test_crash_matrix.py`` kills forked
processes instead); what matters here is which folder a restart accepts.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import faults, inproc
from edgetune.journal import Journal, JournalMismatch


class Killed(BaseException):
    """Stands in for kill -9 (a BaseException, so no handler of the code under test catches it)."""


def _killed_at(monkeypatch, point: str, round_idx: int) -> None:
    def fp(name, r):
        if (name, r) == (point, round_idx):
            raise Killed(name)

    monkeypatch.setattr(faults, "point", fp)


def _flat(**extra):
    return tiny_flat(**{"num_rounds": 3, "data.demo_facts": 2, "eval.num_examples": 2, **extra})


def _crashed_run(tmp_path, monkeypatch, name="run-a", point="after-commit", round_idx=2, **extra):
    run_dir = tmp_path / name
    _killed_at(monkeypatch, point, round_idx)
    with pytest.raises(Killed):
        inproc.run(cfgmod.from_run_config(_flat(**extra)), 2, run_dir=run_dir)
    monkeypatch.undo()
    return run_dir


def test_a_copied_or_renamed_run_folder_is_not_adopted(tmp_path, monkeypatch):
    """Another run's journal and state under a new run name are refused (naming both runs); the original
    folder still resumes to completion."""
    # Prepare
    run_dir = _crashed_run(tmp_path, monkeypatch)
    copy = tmp_path / "run-b"
    shutil.copytree(run_dir, copy, symlinks=True)

    # Execute / Assert
    with pytest.raises(JournalMismatch, match="belongs to run 'run-a', not 'run-b'"):
        inproc.run(cfgmod.from_run_config(_flat()), 2, run_dir=copy)
    summary = inproc.run(cfgmod.from_run_config(_flat()), 2, run_dir=run_dir)
    assert summary["rounds_completed"] == 3


def test_a_run_name_reused_with_another_training_config_is_refused(tmp_path, monkeypatch):
    """Restarting a killed run with a different lr is another run: refused with the differing key. Where it
    runs (device, timeouts) may change."""
    run_dir = _crashed_run(tmp_path, monkeypatch)
    with pytest.raises(JournalMismatch, match="spsa.lr: 0.001 -> 0.002"):
        inproc.run(cfgmod.from_run_config(_flat(**{"spsa.lr": 2e-3})), 2, run_dir=run_dir)
    summary = inproc.run(cfgmod.from_run_config(_flat(**{"run.round_timeout_s": 30.0})), 2, run_dir=run_dir)
    assert summary["rounds_completed"] == 3


def test_a_journal_line_with_a_changed_field_is_refused(tmp_path, monkeypatch):
    """Every journal line carries a checksum: a commit line whose round or hash was edited is refused."""
    run_dir = _crashed_run(tmp_path, monkeypatch)
    path = run_dir / "journal.jsonl"
    lines = path.read_text().splitlines()
    commit = json.loads(lines[2])
    assert commit["t"] == "commit"
    commit["hash"] = "0" * 64
    path.write_text("\n".join([*lines[:2], json.dumps(commit), *lines[3:]]) + "\n")
    with pytest.raises(ValueError, match="record 3 .*fails its checksum"):
        Journal(run_dir)


@pytest.mark.parametrize("algorithm", ["spsa", "kavg"])
def test_server_state_is_private_and_a_corrupted_field_is_refused(tmp_path, monkeypatch, algorithm):
    """Server state (round secrets, replay log, weights) is 0600 in 0700 folders; a changed field of a state
    file makes the restart refuse it, naming the file, instead of silently changing the run."""
    # Prepare
    extra = {"algorithm": algorithm} if algorithm == "kavg" else {}
    run_dir = _crashed_run(tmp_path, monkeypatch, **extra)
    root = run_dir / "server-state"

    # Assert: modes
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for dirpath, _dirs, files in os.walk(root):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o600, f

    # Execute: flip one field of the state file the journal names
    named = Journal(run_dir).last_state()["state"]
    state_file = root / named / ("spsa.json" if algorithm == "spsa" else "weights.json")
    doc = json.loads(state_file.read_text())
    key = "scale" if algorithm == "spsa" else "round"
    doc["state"][key] = doc["state"][key] + 1
    state_file.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"{state_file}: checksum mismatch"):
        inproc.run(cfgmod.from_run_config(_flat(**extra)), 2, run_dir=run_dir)


def test_a_kill_between_the_state_save_and_the_commit_line_resumes(tmp_path, monkeypatch):
    """The crash window of the issue: round 2's state saved, its commit line not written. The restart loads
    the state the journal names (round 1 + round 2's plan), redoes round 2 and ends on the uninterrupted
    run's hash."""
    ref = inproc.run(cfgmod.from_run_config(_flat()), 2, run_dir=tmp_path / "ref" / "same")
    run_dir = _crashed_run(tmp_path / "b", monkeypatch, name="same", point="commit-saved", round_idx=2)
    summary = inproc.run(cfgmod.from_run_config(_flat()), 2, run_dir=run_dir)
    assert summary["final_state_hash"] == ref["final_state_hash"]
    assert Journal(run_dir).commits() == [1, 2, 3]
