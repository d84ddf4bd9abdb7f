"""Bounds for weight updates in any federation size: the update-norm clip and the check of the result.

kavg, lowrank, dppf and deft screen site updates before averaging. The outlier screen (an update
``outlier_mult`` times the median site's) needs three sites, so with two a site could move the model
arbitrarily (a 1e6x update was accepted), and an update near FLT_MAX summed to inf and killed the
run. Two bounds hold for every number of sites:

* an adaptive clip, on by default (``kavg.clip_mult``): every update is scaled down to
  ``clip_mult x`` the lower median of this round's update norms. The lower median is one of the
  norms and, while fewer than half of the sites lie, at most an honest one (with two sites: the
  smaller), so a liar's update counts at most ``clip_mult`` times an honest site's. A fixed
  ``kavg.clip_norm`` replaces it;
* a check of what aggregation produced (``check_applied``): every new parameter finite, and the
  step no longer than the aggregator can make it from the clipped updates, nor (whatever the clip
  setting) than ``MAX_STEP_MULT`` times the lower-median update (``magnitude_bound``). A failing
  aggregate is undone and the largest update dropped, with the reason in ``rejected``; the round
  goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from edgetune.algorithms.base import ReplyRejected


def lower_median(values: Sequence[float]) -> float:
    """The ``(n - 1) // 2``-th smallest value (an element, never an average)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def clip_bound(norms: Mapping[str, float], *, clip_norm: float, clip_mult: float) -> float:
    """The norm every update of this round is clipped to (``inf``: no clip).

    Parameters
    ----------
    norms
        Site -> the L2 norm of its update (finite: decoding refused anything else).
    clip_norm
        A fixed clip (> 0) overrides the adaptive one.
    clip_mult
        Adaptive clip: ``clip_mult`` x the lower median of ``norms`` (0: off).
    """
    if clip_norm > 0:
        return float(clip_norm)
    if clip_mult <= 0 or not norms:
        return math.inf
    return float(clip_mult * lower_median(list(norms.values())))


def screen_norms(
    norms: Mapping[str, float],
    *,
    outlier_mult: float,
    clip_norm: float,
    clip_mult: float,
    what: str = "update norm",
) -> tuple[dict[str, str], float]:
    """The two screens of a round's update norms: outliers, then the clip bound of the rest.

    Parameters
    ----------
    norms
        Site -> the norm of its update (in whatever space the algorithm screens: L2 of the
        deltas, dW space for LoRA factors, the sent values for deft).
    outlier_mult
        With 3+ sites, a norm above ``outlier_mult`` x the median is rejected (0: off).
    clip_norm, clip_mult
        As ``clip_bound``, over the sites that were not rejected.
    what
        Names the norm in the rejection reason.

    Returns
    -------
    tuple[dict[str, str], float]
        Site -> why it was rejected, and the bound every other update is clipped to.
    """
    rejected = {}
    if outlier_mult and len(norms) >= 3:
        med = sorted(norms.values())[len(norms) // 2]
        for s, n in norms.items():
            if med > 0 and n > outlier_mult * med:
                rejected[s] = f"{what} {n:.4g} is {n / med:.0f}x the median site's {med:.4g}"
    kept = {s: n for s, n in norms.items() if s not in rejected}
    return rejected, clip_bound(kept, clip_norm=clip_norm, clip_mult=clip_mult)


def clip_factors(norms: Mapping[str, float], bound: float) -> dict[str, float]:
    """Site -> the factor in (0, 1] that brings its update norm down to ``bound`` (1.0 if within it)."""
    return {s: (bound / n if n > bound else 1.0) for s, n in norms.items()}


def applied_bound(clipped_norms: Sequence[float], aggregator: str) -> float:
    """The largest step (L2 norm) an aggregator can take from updates with these norms.

    A weighted mean is a convex combination: at most the largest norm. A coordinate-wise median or
    trimmed mean takes every coordinate from within the sites' values, so at most
    sqrt(sum of squared norms) <= sqrt(n) x the largest.
    """
    if not clipped_norms:
        return 0.0
    if aggregator == "mean":
        return max(clipped_norms)
    return math.sqrt(sum(n * n for n in clipped_norms))


MAX_STEP_MULT = 100.0
"""Whatever the clip setting, an aggregate step longer than sqrt(n) x this x the lower-median update norm is
refused: it can only come from an update far outside what the other sites sent (a clip switched off)."""


def magnitude_bound(norms: Sequence[float]) -> float:
    """The longest aggregate step any setting may take: ``sqrt(n) x MAX_STEP_MULT x`` the lower median norm."""
    if not norms:
        return 0.0
    return math.sqrt(len(norms)) * MAX_STEP_MULT * lower_median(list(norms))


def check_applied(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], bound: float) -> str | None:
    """Why the step from ``before`` to ``after`` must not be kept (None: keep it).

    Parameters
    ----------
    before, after
        The parameters before and after aggregation, in manifest order.
    bound
        Largest acceptable step norm (``inf``: only finiteness is checked).
    """
    step2 = size2 = 0.0
    for b, a in zip(before, after, strict=True):
        if not bool(torch.isfinite(a).all()):
            return "the aggregate is not finite (inf or NaN after summing the updates)"
        step2 += float((a.double() - b.double()).pow(2).sum())
        size2 += float(a.double().pow(2).sum())
    step = math.sqrt(step2)
    # slack: the parameters are float32, so the step carries up to half an ulp of rounding per value
    slack = 2.0**-23 * math.sqrt(size2) + 1e-4 * bound
    if math.isfinite(bound) and step > bound + slack:
        return f"the aggregated step has norm {step:.4g}, more than the {bound:.4g} the clipped updates allow"
    return None


MAX_REPORTED_LOSS = 1e6
"""A site's reported training loss beyond this (or not finite) is not a loss: the reply is refused."""


def reported_loss(site: str, value: float) -> float:
    """A site's self-reported loss, checked: finite and within ``MAX_REPORTED_LOSS`` (else ``ReplyRejected``).

    The loss is only a metric, but averaging a reported 1e308 gives ``train_loss = inf``; an honest site
    never reports anything like it (its client refuses a non-finite loss itself).
    """
    value = float(value)
    if not (math.isfinite(value) and abs(value) <= MAX_REPORTED_LOSS):
        raise ReplyRejected(
            f"{site} reported a training loss of {value!r} (not finite, or beyond {MAX_REPORTED_LOSS:g})"
        )
    return value
