"""benchmarks/gpu_check.py on the CPU: every check it makes runs here (the dry mode), and without
CUDA the GPU mode refuses with a clear message instead of failing half way."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from benchmarks import gpu_check, many_sites
from edgetune.crypto import keystream


def test_stream_hash_is_the_rademacher_stream():
    """The hash covers exactly the bits and +-1 values sites apply (checked against rademacher)."""
    h = hashlib.sha256()
    for index, numel in enumerate(gpu_check.STREAM_SHAPES):
        z = keystream.rademacher(gpu_check.STREAM_KEY, index, numel)
        h.update(keystream.tensor_bits(gpu_check.STREAM_KEY, index, numel, "cpu").numpy().tobytes())
        h.update(z.numpy().tobytes())
    assert gpu_check.stream_hash("cpu") == h.hexdigest()
    row = gpu_check.check_stream("cpu")
    assert row["pass"] and row["device_hash"] == row["cpu_hash"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_exits_2_with_a_message(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err
    assert not (tmp_path / "g.json").exists()


def test_dry_run_makes_every_check_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(
        ["--device", "cpu", "--model", "tiny", "--sim-engine", "inproc", "--sites", "2", "--repeats", "1"]
        + ["--out", str(out)]
    )
    result = json.loads(out.read_text())
    by = {r["check"]: r for r in result["rows"]}
    assert set(by) == {
        "stream_hash",
        "spsa_round",
        "lowrank_round",
        "devices_match",
        "spsa_step_vs_forward",
        "spsa_memory_vs_inference",
        "simulate_sites",
    }
    assert by["stream_hash"]["pass"]
    assert by["spsa_round"]["pass"] and by["lowrank_round"]["pass"], by
    assert (by["spsa_round"]["dtype"], by["lowrank_round"]["dtype"]) == ("float32", "bfloat16")  # spsa refuses bf16
    assert by["simulate_sites"]["pass"], by["simulate_sites"]["tail"]
    devices = by["devices_match"]
    assert devices["pass"] and devices["devices"] == "cpu,cpu" and all(devices["repeatable"].values()), devices
    assert by["spsa_step_vs_forward"]["value"] > 1.0  # a step runs two forwards
    memory = by["spsa_memory_vs_inference"]
    assert memory["value"] == memory["spsa_round_peak_mib"] / memory["forward_peak_mib"]
    assert memory["pass"] == (memory["value"] <= gpu_check.MEMORY_GOAL)
    assert result["complete"] and code == (0 if result["all_pass"] else 1)


def test_a_run_cut_short_keeps_the_checks_it_made(tmp_path, monkeypatch):
    """The JSON is written after every check: a check that dies (or a time limit that kills the run)
    leaves the earlier rows on disk, marked incomplete and not passed."""

    def dies(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(gpu_check, "one_round", dies)
    out = tmp_path / "gpu_check.json"
    with pytest.raises(RuntimeError, match="killed"):
        gpu_check.main(["--device", "cpu", "--model", "tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["check"] for r in result["rows"]] == ["stream_hash"]
    assert result["rows"][0]["pass"] and not result["complete"] and not result["all_pass"]


def test_linearity_flags_superlinear_time():
    rows = [
        {"sites": 16, "ok": True, "mean_round_wall_s": 1.6},
        {"sites": 64, "ok": True, "mean_round_wall_s": 6.4},
        {"sites": 200, "ok": True, "mean_round_wall_s": 50.0},
        {"sites": 1000, "ok": False, "mean_round_wall_s": None},
    ]
    many_sites.add_linearity(rows)
    assert rows[1]["per_site_vs_smallest"] == pytest.approx(1.0)
    assert rows[2]["per_site_vs_smallest"] == pytest.approx(2.5)  # 50 s at 200 sites: 0.25 s per site vs 0.1 at 16
    assert "s_per_site_round" not in rows[3]
