"""Byzantine sites over 20 rounds: the spsa clip stays with the honest sites and held-out loss stays within 5%.

The attackers are ``benchmarks/byzantine.py``'s: each computes its honest reply (so it stays in sync with
the run) and sends the largest codes instead. Before the robust clip (``algorithms/scalar_clip.py``) the
clip was a quantile over all scalars, so with ``scale_mult`` 2 one such site doubled it every round
(8 -> 131,072 in 14 rounds) and held-out loss exploded with ``mean``; with ``median`` the honest codes
quantised to zero and training stalled.
"""

from __future__ import annotations

import logging

import pytest

from benchmarks.byzantine import flat_config, run_case

ROUNDS = 20


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["spsa-per-site-mean", "spsa-shared-median"])
@pytest.mark.parametrize(("sites", "attackers"), [(4, 1), (8, 2)])
def test_max_code_sites_keep_heldout_loss_within_5pct_of_the_clean_run(
    tmp_path, caplog, request, variant, sites, attackers
):
    """1 of 4 and 2 of 8 sites sending +-127 on every probe for 20 rounds, with the default aggregator (mean,
    per-site directions) and with median (shared directions): the final held-out loss is within 5% of the
    clean run's, the clip never exceeds twice the clean run's largest, and the saturated sites are counted in
    the metrics and named in a warning."""
    # Prepare
    if (variant, sites, attackers) == ("spsa-per-site-mean", 4, 1):
        # issue 13's goal, not met yet: the attacked run ends at 1.089x the clean run's held-out loss (the clip
        # holds, but one site's max-magnitude codes on its own directions still add noise the mean passes on;
        # a per-site bound on the scalars' norm is the next step). strict: passing would flag the fix.
        request.applymarker(pytest.mark.xfail(reason="1 of 4 with per-site mean: 1.089x, goal 1.05x", strict=True))
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
