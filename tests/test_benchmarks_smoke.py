"""Smoke test of the SPSA step benchmark (benchmarks/spsa_step.py) on the tiny model."""

from __future__ import annotations

import json
import math

from benchmarks import spsa_step


def test_spsa_step_benchmark_row_has_documented_keys_and_positive_values(tmp_path):
    """One configuration on the tiny model gives a JSON row with every documented key, positive
    finite numbers, and a table that states both goals."""
    # Arrange
    bench = spsa_step.load("tiny", "cpu", batch_size=4)
    # Execute: memory phases in-process (fresh subprocesses would each re-import transformers)
    row = spsa_step.run_config(bench, spsa_step.ATTENTION, repeats=1, isolate=False, workdir=tmp_path)
    out = tmp_path / "results" / "spsa_step.json"
    spsa_step.write_rows([row], out)
    table = spsa_step.format_table([row])
    # Assert
    assert set(row) == set(spsa_step.ROW_KEYS)
    for key in spsa_step.NUMERIC_KEYS:
        value = row[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value) and value > 0, (key, value)
    assert 0 < row["trainable_numel"] < row["model_numel"]
    # the goals are judged on ratios of the row's own measurements (timings themselves depend on the machine)
    assert row["time_ratio"] == row["spsa_step_s"] / row["forward_s"]
    assert row["time_pass"] == (row["time_ratio"] <= row["time_goal"])
    assert row["memory_ratio"] == row["spsa_round_peak_mib"] / row["forward_peak_mib"]
    assert row["memory_pass"] == (row["memory_ratio"] <= row["memory_goal"])
    assert row["batch_tokens"] <= row["max_length"]
    assert row["replay_terms"] == len(spsa_step.ROUND_SITES) * spsa_step.ROUND_STEPS
    assert row["memory_isolated"] is False
    assert json.loads(out.read_text()) == [json.loads(json.dumps(row))]
    assert "TIME ratio" in table and "MEMORY ratio" in table
