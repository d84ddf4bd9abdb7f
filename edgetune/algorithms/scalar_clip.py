"""The spsa scalar clip, robust to Byzantine sites: next round's clip from this round's decoded scalars.

The clip C bounds every one-byte code (|g| <= C by construction) and so bounds what one site can move
the model per probe. Setting it from a quantile over *all* accepted scalars lets a site that always
sends the largest code pull the quantile up to C, and with ``scale_mult`` > 1 the clip then grows
every round (8 -> 131,072 in 14 rounds): its influence is unbounded, and with ``median`` the honest
codes quantise to zero and training stalls. Here each site speaks once::

    q_i     = quantile_{scale_quantile}(|g_i|)          per site, over its K*P scalars
    centre  = lower median_i q_i                        one of the q_i; <= some honest q_i while
                                                        fewer than half of the sites lie
    C_next  = clamp(scale_mult * centre, C / MAX_SHRINK, C * MAX_GROWTH)

With f < n/2 lying sites the centre lies within the honest sites' q_i, so the clip follows the honest
scalars whatever the liars send; the bounded move keeps even a majority from moving it faster than
x2 per round. A site whose codes sit at the clip (``saturation``) is visible in the metrics every
round. Warnings need a pattern, not one round (with K*P = 2 scalars an honest site has both at the
clip now and then): a site with all its scalars at the clip for ``STREAK`` rounds in a row is a
faulty or Byzantine site (whose influence the clip bounds); most sites saturated for ``STREAK`` rounds
means the clip is too small for the honest signal (it grows x2 per round).

Pure: the caller keeps C and the streak counters (``ClipUpdate.streaks``, passed back next round);
no I/O besides the ``edgetune`` logger's warnings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_GROWTH = 2.0
"""The clip at most doubles from one round to the next."""
MAX_SHRINK = 4.0
"""The clip at most quarters from one round to the next."""
SATURATED_SITE = 0.5
"""A site with at least this fraction of its scalars at the clip counts as saturated."""
SATURATED_TOLERANCE = 1e-12
STREAK = 3
"""Rounds in a row a pattern must hold before it is warned about (then every ``STREAK * 4`` rounds)."""

log = logging.getLogger("edgetune")


@dataclass(frozen=True)
class ClipUpdate:
    """Next round's clip and what this round's scalars looked like against the current one."""

    scale: float
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    streaks: dict[str, int] = field(default_factory=dict)
    """Rounds in a row each site had all its scalars at the clip (and ``*``: most sites saturated)."""


def lower_median(values: list[float]) -> float:
    """The ``(n - 1) // 2``-th smallest value: an element of ``values``, never an average."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def _due(streak: int) -> bool:
    return streak == STREAK or (streak > STREAK and streak % (STREAK * 4) == 0)


def next_clip(
    per_site: Mapping[str, np.ndarray], clip: float, cfg: Any, streaks: Mapping[str, int] | None = None
) -> ClipUpdate:
    """Next round's scalar clip from each accepted site's decoded scalars.

    Parameters
    ----------
    per_site
        Site id -> its K*P decoded scalars (float, |g| <= ``clip``), accepted sites only.
    clip
        The clip this round's codes were decoded with.
    cfg
        Has ``scale_quantile`` (per-site quantile of |g|) and ``scale_mult`` (clip = mult x centre).
    streaks
        ``ClipUpdate.streaks`` of the previous round (None: none yet).

    Returns
    -------
    ClipUpdate
        ``scale``: next round's clip; ``metrics``: ``saturated_frac`` (all scalars), ``saturated_sites``,
        ``site_saturation_max`` and ``site_saturation_median``, ``clip_centre`` (the robust centre),
        ``mean_abs_g``; ``warnings``: the messages also logged on the ``edgetune`` logger; ``streaks``:
        to pass back next round.
    """
    streaks = dict(streaks or {})
    if not per_site:
        return ClipUpdate(clip, streaks=streaks)
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be a finite positive number, got {clip}")
    sites = sorted(per_site)
    at_clip = clip * (1 - SATURATED_TOLERANCE)
    quantiles, saturation = [], {}
    for s in sites:
        mags = np.sort(np.abs(np.asarray(per_site[s], dtype=np.float64)))
        if mags.size == 0 or not np.all(np.isfinite(mags)):
            raise ValueError(f"{s}: scalars must be finite and non-empty")
        quantiles.append(float(mags[min(mags.size - 1, int(cfg.scale_quantile * mags.size))]))
        saturation[s] = float(np.mean(mags >= at_clip))
    centre = lower_median(quantiles)
    target = cfg.scale_mult * centre if centre > 0 else clip
    scale = float(min(max(target, clip / MAX_SHRINK), clip * MAX_GROWTH))

    everything = np.concatenate([np.abs(np.asarray(per_site[s], dtype=np.float64)) for s in sites])
    saturated = [s for s in sites if saturation[s] >= SATURATED_SITE]
    median_sat = lower_median(list(saturation.values()))
    metrics = {
        "saturated_frac": float(np.mean(everything >= at_clip)),
        "saturated_sites": float(len(saturated)),
        "site_saturation_max": max(saturation.values()),
        "site_saturation_median": median_sat,
        "clip_centre": centre,
        "mean_abs_g": float(np.mean(everything)),
    }
    new = {s: streaks.get(s, 0) + 1 for s in sites if saturation[s] >= 1.0}
    new["*"] = streaks.get("*", 0) + 1 if median_sat >= SATURATED_SITE else 0
    warnings = []
    if _due(new["*"]):
        warnings.append(
            f"scalar clip {clip:.4g} saturates most sites for {new['*']} rounds (median site {median_sat:.0%} of "
            f"its scalars at the clip): the signal is cut; the clip grows to {scale:.4g} (at most x{MAX_GROWTH:g} "
            "per round)"
        )
    streaking = [s for s in sites if new.get(s, 0) >= STREAK]
    stuck = [s for s in streaking if _due(new[s])] if 2 * len(streaking) < len(sites) else []
    if stuck:  # a minority stuck at the clip (a majority stuck is the clip's fault: the warning above)
        detail = ", ".join(f"{s} ({new[s]} rounds)" for s in stuck)
        warnings.append(
            f"sites with every scalar at the clip round after round while most sites are not: {detail}; "
            f"faulty or Byzantine? Their influence is bounded by the clip ({clip:.4g}), which follows the median site"
        )
    for w in warnings:
        log.warning(w)
    return ClipUpdate(scale, metrics, tuple(warnings), {k: v for k, v in new.items() if v})
