"""Byzantine sites over 20 rounds: the spsa clip stays with the honest sites and held-out loss stays within 5%.

The attackers are ``benchmarks/byzantine.py``'s: each computes its honest reply (so it stays in sync with
the run) and sends the largest codes instead. Before the robust clip (``algorithms/scalar_clip.py``) the
clip was a quantile over all scalars, so with ``scale_mult`` 2 one such site doubled it every round
(8 -> 131,072 in 14 rounds) and held-out loss exploded with ``mean``; with ``median`` the honest codes
quantised to zero and training stalled. With the clip alone, one max-code site of four with per-site
directions still ended at 1.089x the clean run: its codes sit at the clip on every probe of its own
directions, noise the mean passes on. The per-site norm bound (``spsa/log.py``, ``site_norm_factors``)
scales such a site down to twice the lower median of the round's site norms.
"""

from __future__ import annotations

import json
import logging
import math

import pytest

from benchmarks.byzantine import flat_config, run_case

ROUNDS = 20


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["spsa-per-site-mean", "spsa-shared-median"])
@pytest.mark.parametrize(("sites", "attackers"), [(4, 1), (8, 2)])
def test_max_code_sites_keep_heldout_loss_within_5pct_of_the_clean_run(tmp_path, caplog, variant, sites, attackers):
    """1 of 4 and 2 of 8 sites sending +-127 on every probe for 20 rounds, with the default aggregator (mean,
    per-site directions) and with median (shared directions): the final held-out loss is within 5% of the
    clean run's, the clip never exceeds twice the clean run's largest, and the saturated sites are counted in
    the metrics and named in a warning."""
    # Prepare
    assert flat_config(variant, sites, ROUNDS)["num_rounds"] == ROUNDS

    # Execute
    clean = run_case(variant, sites, attackers, None, ROUNDS, tmp_path / "clean")
    with caplog.at_level(logging.WARNING, logger="edgetune"):
        attacked = run_case(variant, sites, attackers, "max", ROUNDS, tmp_path / "attacked")

    # Assert
    assert clean["completed"] and attacked["completed"], attacked["error"]
    assert clean["heldout_loss_last"] < clean["heldout_loss_first"]  # the clean run trains
    rel = attacked["heldout_loss_last"] / clean["heldout_loss_last"]
    assert abs(rel - 1) <= 0.05, (clean, attacked)
    assert attacked["max_scale"] <= 2 * clean["max_scale"], (clean["max_scale"], attacked["max_scale"])
    evil = [f"site-{i}" for i in range(sites - attackers, sites)]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"{s} (3 rounds)" in warned for s in evil), warned[-500:]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["spsa-pool-momentum", "spsa-pool-adam"])
def test_max_code_site_with_a_run_scope_pool_and_optimizer_state(tmp_path, variant):
    """A run-scope seed pool with the momentum or adam server-side optimizer, 1 of 4 sites sending +-127 for
    20 rounds: the clip still follows the honest sites (at most twice the clean run's largest), the
    optimizer's state is built from the committed codes only, and the final held-out loss stays within 5%
    of the clean run's."""
    # Execute
    clean = run_case(variant, 4, 1, None, ROUNDS, tmp_path / "clean")
    attacked = run_case(variant, 4, 1, "max", ROUNDS, tmp_path / "attacked")

    # Assert
    assert clean["completed"] and attacked["completed"], attacked["error"]
    assert clean["heldout_loss_last"] < clean["heldout_loss_first"]  # the clean run trains
    assert attacked["max_scale"] <= 2 * clean["max_scale"], (clean["max_scale"], attacked["max_scale"])
    rel = attacked["heldout_loss_last"] / clean["heldout_loss_last"]
    assert abs(rel - 1) <= 0.05, (clean, attacked)


@pytest.mark.slow
def test_the_norm_bound_leaves_a_clean_run_nearly_unchanged(tmp_path, monkeypatch):
    """The clean 4-site per-site-mean run of 20 rounds with the per-site norm bound and without it: the bound
    scales few honest site-rounds (at most 15%: with K*P = 2 scalars an honest site's norm varies a lot) and the
    final held-out loss differs by at most 2%."""
    from edgetune.algorithms.spsa import log as spsalog

    bounded = run_case("spsa-per-site-mean", 4, 1, None, ROUNDS, tmp_path / "bounded")
    rows = [json.loads(x) for x in next((tmp_path / "bounded").rglob("metrics.jsonl")).read_text().splitlines()]
    scaled = sum(r.get("norm_bounded_sites", 0) for r in rows) / sum(r.get("num_accepted", 0) for r in rows[1:])
    monkeypatch.setattr(spsalog, "SITE_NORM_MULT", math.inf)
    unbounded = run_case("spsa-per-site-mean", 4, 1, None, ROUNDS, tmp_path / "unbounded")
    assert bounded["completed"] and unbounded["completed"]
    assert scaled <= 0.15, scaled
    assert abs(bounded["heldout_loss_last"] / unbounded["heldout_loss_last"] - 1) <= 0.02, (bounded, unbounded)
