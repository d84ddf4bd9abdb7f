"""benchmarks/model_load.py: each variant loads in its own process and reports comparable byte counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from hf_fixtures import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_model_load_rows_count_the_weights_in_their_dtype(tmp_path):
    """On a saved tiny model every variant reports its dtype and peak; the bf16 weights are exactly half the
    fp32 bytes (counted from the loaded tensors), and the fp32 row is the reference of the ratios."""
    folder = save_tiny_model(tmp_path / "m", dtype=torch.float32)
    out = tmp_path / "model_load.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.model_load", "--model", str(folder), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: the goal missed, still a valid result
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"fp32", "bf16", "bf16-from-fp32-file", "bf16-via-fp32"}
    assert {r["dtype"] for v, r in rows.items() if v != "fp32"} == {"bfloat16"} and rows["fp32"]["dtype"] == "float32"
    assert rows["bf16"]["weights_mib"] * 2 == rows["fp32"]["weights_mib"]
    for r in rows.values():  # every variant is divided by the fp32 row's numbers
        assert r["peak_vs_fp32"] == r["peak_mib"] / rows["fp32"]["peak_mib"]
        assert r["load_vs_fp32"] == r["load_mib"] / rows["fp32"]["load_mib"]
    assert all(r["peak_mib"] >= r["load_peak_mib"] >= r["import_peak_mib"] > 0 for r in rows.values())
    assert "bf16 peak below fp32 peak" in proc.stdout
