"""Flower's simulation engine end to end through `edgetune simulate` (offline, tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EDGETUNE = [sys.executable, "-m", "edgetune.cli"]

pytestmark = pytest.mark.slow


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "EDGETUNE_CACHE": str(tmp_path / "cache"), "COLUMNS": "160"}


def _run_dir(runs: Path) -> Path:
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    """One 2-round, 4-site simulation shared by the checks below, with at most 2 messages in flight
    (``run.in_flight``), so Flower's engine runs every exchange through the server's window."""
    tmp = tmp_path_factory.mktemp("sim")
    out = subprocess.run(
        [
            *EDGETUNE,
            "simulate",
            "recipes/spsa/tiny-4c.toml",
            "--sites",
            "4",
            "--rounds",
            "2",
            "--set",
            f"run.dir={tmp / 'runs'}",
            "--set",
            "run.in_flight=2",
        ],
        cwd=ROOT,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return tmp, out


def test_simulation_completes_and_records_every_round(sim_run):
    """The run finishes with exit 0 and writes rounds 0..2, a summary, a plot and a checkpoint."""
    tmp, out = sim_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = _run_dir(tmp / "runs")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["num_accepted"] == 4 for r in rows[1:])
    assert "in_flight = 2" in (run_dir / "config.toml").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["heldout_loss_last"] < summary["heldout_loss_first"]
    assert (run_dir / "loss_vs_bytes.png").stat().st_size > 1000


def test_ledger_agrees_with_flower_serialized_sizes(sim_run):
    """Every payload has a Flower-serialized twin; Flower's framing around it is a few hundred bytes
    and the same for every site (the ledger counts what Flower carries, not an estimate)."""
    tmp, _ = sim_run
    rows = [json.loads(line) for line in (_run_dir(tmp / "runs") / "ledger.jsonl").read_text().splitlines()]
    payload = {(r["round_idx"], r["site_id"], r["direction"]): r["num_bytes"] for r in rows if r["kind"] == "payload"}
    flower = {(r["round_idx"], r["site_id"], r["direction"]): r["num_bytes"] for r in rows if r["kind"] == "flower"}
    assert payload.keys() == flower.keys() and len(payload) == 2 * 2 * 4
    for direction in ("up", "down"):
        overheads = [flower[k] - payload[k] for k in payload if k[2] == direction]
        assert all(150 <= o <= 600 for o in overheads), overheads
        assert max(overheads) - min(overheads) <= 8  # varint widths of ids and sizes only
    ups = {v for k, v in payload.items() if k[2] == "up"}
    assert ups == {4 + 88}  # K*P = 4 codes + 88 bytes of framing


def test_checkpoint_loads_with_transformers_and_eval_agrees(sim_run):
    """The final checkpoint loads with AutoModelForCausalLM, its weights hash to the run's state hash,
    and `edgetune eval` reproduces the run's last held-out loss."""
    from transformers import AutoModelForCausalLM

    from edgetune.models.params import sha256_tensors

    tmp, _ = sim_run
    run_dir = _run_dir(tmp / "runs")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt = run_dir / "checkpoints" / "round-0002"
    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True, dtype=torch.float32)
    assert sha256_tensors(p.data for p in model.parameters()) == rows[-1]["state_hash"]
    out = subprocess.run(
        [*EDGETUNE, "eval", str(ckpt), "--no-accuracy"],
        cwd=ROOT,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if "heldout_loss" in x)
    assert abs(float(line.split(":")[1]) - rows[-1]["heldout_loss"]) < 1e-6


def test_failed_app_makes_simulate_exit_nonzero(tmp_path):
    """`flwr run` exits 0 when the ServerApp fails; `edgetune simulate` checks the run status."""
    out = subprocess.run(
        [
            *EDGETUNE,
            "simulate",
            "recipes/spsa/tiny-4c.toml",
            "--sites",
            "2",
            "--rounds",
            "1",
            "--set",
            f"run.dir={tmp_path / 'runs'}",
            "--set",
            f"crypto.keys_dir={tmp_path / 'missing'}",
            "--set",
            "run.min_sites=2",
        ],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1
    assert "finished:failed" in out.stdout


def test_bad_recipe_is_refused_before_starting(tmp_path):
    """A recipe with a wrong value fails at once with a message naming the key."""
    recipe = tmp_path / "bad.toml"
    recipe.write_text("# bad\n[spsa]\neps = 0.001\n")
    out = subprocess.run(
        [*EDGETUNE, "simulate", str(recipe)], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and "spsa.eps must be a power of two" in out.stdout
