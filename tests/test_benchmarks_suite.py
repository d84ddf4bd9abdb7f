"""Fast checks of the benchmark suite's measuring functions on the tiny model (bytes, stream, replay, FedAvg)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bytes_per_round, kavg_vs_fedavg, stream_and_replay
from edgetune.algorithms.spsa import reply_overhead_bytes
from edgetune.crypto import keystream


def test_bytes_per_round_spsa_uplink_is_one_byte_per_scalar_plus_framing(tmp_path):
    """A real spsa round (K*P = 4) on the tiny model uploads K*P bytes plus the fixed framing per site;
    Flower's message is larger than the payload it carries; the round-2 downlink carries the replay log."""
    # Arrange
    configs = {c.name: c for c in bytes_per_round.all_configs()}
    spsa_cfg, ft_cfg = configs["spsa-kp4"], configs[bytes_per_round.FT_REFERENCE]
    # Execute
    rows = bytes_per_round.measure(spsa_cfg, "tiny", 2, 1, tmp_path)
    rows += bytes_per_round.measure(ft_cfg, "tiny", 2, 1, tmp_path)
    bytes_per_round.add_ratios(rows)
    spsa, ft = rows
    # Assert
    assert spsa["spsa_kp"] == 4
    assert spsa["up_payload_bytes"] == spsa["up_payload_min"] == spsa["up_payload_max"] == 4 + reply_overhead_bytes(4)
    assert spsa["up_flower_bytes"] > spsa["up_payload_bytes"]
    assert spsa["down_payload_bytes"] > spsa["down_payload_round1"]  # round 2 carries round 1's log
    # the ratio columns divide by the reference row, not by the row itself
    assert ft["up_vs_spsa4_flower"] == ft["up_flower_bytes"] / spsa["up_flower_bytes"] > 10
    assert spsa["up_vs_flowertune_payload"] == spsa["up_payload_bytes"] / ft["up_payload_bytes"]
    assert spsa["down_vs_flowertune_flower"] == spsa["down_flower_bytes"] / ft["down_flower_bytes"]
    assert ft["up_payload_bytes"] > 4 * ft["trainable_numel"]  # fp32 arrays plus np.save headers
    assert ft["up_flower_bytes"] > ft["up_payload_bytes"]
    assert spsa["up_vs_flowertune_payload"] < 0.01
    assert "spsa-kp4" in bytes_per_round.format_table(rows, model="tiny", num_sites=2)


def test_stream_expansion_equals_rademacher_and_throughput_is_measured(monkeypatch):
    """Every benchmarked keystream path reproduces keystream.rademacher; each throughput column is its own
    path's elements per second and the ratios put the keystream over torch (timed by a fake clock, so the
    arithmetic is checked, not this machine's speed)."""
    # Arrange
    n = 5000 + 3  # not a multiple of 8: exercises the packed tail
    seconds = {"keystream_bits": 1e-3, "bits_expand": 2e-3, "bits_expand_add": 3e-3, "randn": 5e-3, "randn_add": 7e-3}
    timed = iter(seconds.values())  # stream_throughput times its paths in this order
    monkeypatch.setattr(stream_and_replay, "_median_time", lambda fn, device, repeats: (fn(), next(timed))[1])
    # Execute
    ok = stream_and_replay.stream_matches_rademacher(n)
    row = stream_and_replay.stream_throughput(4096, torch.device("cpu"), 1)
    # Assert
    assert ok
    z = keystream.rademacher(stream_and_replay.BENCH_KEY, 0, n)
    assert torch.equal(z, keystream.expand(keystream.tensor_bits(stream_and_replay.BENCH_KEY, 0, n), n))
    assert row["matches_rademacher"] is True
    for key, s in seconds.items():
        assert row[f"{key}_s"] == s and row[f"{key}_elem_per_s"] == 4096 / s, key
    assert row["ratio_add_vs_randn_add"] == pytest.approx(7 / 3)
    assert row["ratio_expand_vs_randn"] == pytest.approx(5 / 2)


def test_replay_terms_scale_with_sites_without_a_pool_and_are_capped_with_one(tmp_path, monkeypatch):
    """Without a pool a round replays sites x K x P terms; with a pool of S seeds at most S. Timed by a fake
    clock (1 ms per term to build, 2 ms to apply), the row's seconds and the pool ratio follow the terms."""
    # Arrange
    replica, numel = stream_and_replay.make_replica("tiny", stream_and_replay.ATTENTION, "cpu", "host", tmp_path)
    replay_once = stream_and_replay.replay_once

    def fake_clock(replica, entry, tag):
        out = replay_once(replica, entry, tag)
        return {**out, "terms_s": 1e-3 * out["terms"], "apply_s": 2e-3 * out["terms"]}

    monkeypatch.setattr(stream_and_replay, "replay_once", fake_clock)
    # Execute
    rows = stream_and_replay.replay_rows(replica, [6], pool=3, repeats=2)
    # Assert
    no_pool, pool = rows
    assert numel > 0
    assert no_pool["terms"] == 6 * stream_and_replay.STEPS * stream_and_replay.PROBES
    assert 1 <= pool["terms"] <= 3
    assert no_pool["deterministic"] and pool["deterministic"]
    assert no_pool["state_hash"] != pool["state_hash"]
    for r in rows:
        assert r["round_s"] == pytest.approx(3e-3 * r["terms"]) and r["apply_s_per_term"] == pytest.approx(2e-3)
    assert pool["ratio_pool_vs_no_pool"] == pytest.approx(pool["terms"] / no_pool["terms"])
    assert "ratio_pool_vs_no_pool" not in no_pool


def test_kavg_matches_flower_fedavg_within_tolerance(tmp_path):
    """edgetune's kavg aggregate equals Flower's FedAvg.aggregate_train on the same site models up to
    float32 summation order, far below the size of the update itself."""
    # Execute
    rows = kavg_vs_fedavg.compare("tiny", num_sites=2, rounds=1, local_steps=1, workdir=tmp_path)
    # Assert
    assert [r["check"] for r in rows] == ["round 1", "unequal weights (aggregation functions only)"]
    for r in rows:
        assert r["max_abs_diff"] <= kavg_vs_fedavg.DEFAULT_TOL
        assert r["max_ulps"] <= 8
        assert r["edgetune_vs_exact"] <= 1e-6 and r["flower_vs_exact"] <= 1e-6
        assert r["max_abs_update"] > 100 * kavg_vs_fedavg.DEFAULT_TOL  # the check can tell a wrong weighting
    assert rows[0]["weights"][0] == rows[0]["weights"][1]
