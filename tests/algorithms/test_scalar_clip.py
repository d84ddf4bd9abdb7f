"""The spsa scalar clip follows the honest sites whatever a minority sends, and says when it saturates."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from edgetune.algorithms.scalar_clip import MAX_GROWTH, MAX_SHRINK, STREAK, lower_median, next_clip

CFG = SimpleNamespace(scale_quantile=0.9, scale_mult=2.0)


def honest_scalars(rng: np.random.Generator, clip: float, n: int = 8, sigma: float = 1.0) -> np.ndarray:
    """What an honest site's codes decode to: N(0, sigma) projections, saturated at the clip."""
    return np.clip(rng.normal(0.0, sigma, n), -clip, clip)


@pytest.mark.parametrize(("num_sites", "num_liars"), [(4, 1), (8, 2), (7, 3)])
@pytest.mark.parametrize("lie", ["max", "zero"])
def test_a_minority_at_the_clip_or_at_zero_cannot_move_the_clip_out_of_the_honest_range(num_sites, num_liars, lie):
    """Over 20 rounds, with f < n/2 sites always sending the largest code (or always zero), every clip lies
    within the clips that the honest sites alone would produce (mult x the smallest and the largest honest
    per-site quantile): no run-away growth (the old global quantile doubled it every round)."""
    rng = np.random.default_rng(0)
    clip = 8.0
    for _ in range(20):
        honest = {f"h{i}": honest_scalars(rng, clip) for i in range(num_sites - num_liars)}
        value = clip if lie == "max" else 0.0
        liars = {f"z{i}": np.array([value, -value] * 4) for i in range(num_liars)}
        q = [np.sort(np.abs(v))[int(0.9 * v.size)] for v in honest.values()]
        prev = clip
        clip = next_clip({**honest, **liars}, clip, CFG).scale
        lo = max(CFG.scale_mult * min(q), prev / MAX_SHRINK)
        hi = min(CFG.scale_mult * max(q), prev * MAX_GROWTH)
        assert lo - 1e-12 <= clip <= hi + 1e-12, (clip, lo, hi)
    assert clip < 8.0  # honest |g| ~ 1: the clip settled near 2 x q90, far below where it started


def test_majority_of_liars_moves_the_clip_at_most_x2_per_round():
    """Even with every site at the clip, the clip at most doubles per round (and at most quarters)."""
    assert next_clip({"a": np.array([8.0, -8.0]), "b": np.array([8.0, 8.0])}, 8.0, CFG).scale == 8.0 * MAX_GROWTH
    assert next_clip({"a": np.array([1e-9]), "b": np.array([1e-9])}, 8.0, CFG).scale == 8.0 / MAX_SHRINK


def test_saturated_site_is_counted_every_round_and_warned_about_by_name_once_it_is_a_pattern(caplog):
    """One site with all its scalars at the clip among unsaturated ones: every round's metrics count it; after
    STREAK rounds in a row a warning names it (one round is not a pattern: an honest site with two scalars
    sometimes has both at the clip)."""
    rng = np.random.default_rng(1)
    streaks = None
    warned = []
    with caplog.at_level(logging.WARNING, logger="edgetune"):
        for _ in range(STREAK):
            per_site = {f"site-{i}": honest_scalars(rng, 8.0) for i in range(3)}
            per_site["site-3"] = np.array([8.0, -8.0] * 4)
            update = next_clip(per_site, 8.0, CFG, streaks)
            streaks = update.streaks
            warned.append(update.warnings)
            assert update.metrics["saturated_sites"] == 1.0
            assert update.metrics["site_saturation_max"] == 1.0 and update.metrics["site_saturation_median"] == 0.0
            assert update.metrics["saturated_frac"] == pytest.approx(8 / 32)
    assert warned[:-1] == [()] * (STREAK - 1)
    assert any("site-3 (3 rounds)" in w and "Byzantine" in w for w in warned[-1])
    assert any("site-3 (3 rounds)" in r.getMessage() for r in caplog.records)


def test_clip_too_small_for_every_site_warns_and_grows(caplog):
    """All sites saturated: the clip doubles each round; after STREAK rounds a warning says the signal is cut
    (and does not call every site Byzantine)."""
    per_site = {f"s{i}": np.array([1.0, -1.0, 1.0, 0.1]) * 1e6 for i in range(4)}
    clip, streaks, warnings = 0.5, None, ()
    with caplog.at_level(logging.WARNING, logger="edgetune"):
        for _ in range(STREAK):
            update = next_clip({s: np.clip(v, -clip, clip) for s, v in per_site.items()}, clip, CFG, streaks)
            assert update.scale == 2 * clip
            clip, streaks, warnings = update.scale, update.streaks, update.warnings
    assert len(warnings) == 1 and "saturates most sites for 3 rounds" in warnings[0]


def test_lower_median_is_an_element():
    assert lower_median([3.0, 1.0, 2.0, 100.0]) == 2.0
    assert lower_median([5.0]) == 5.0
    assert lower_median([1.0, 9.0]) == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="clip"):
        next_clip({"a": np.array([1.0])}, float("inf"), CFG)
    with pytest.raises(ValueError, match="finite"):
        next_clip({"a": np.array([np.nan])}, 1.0, CFG)
    assert next_clip({}, 3.0, CFG).scale == 3.0
