"""A site's local SPSA steps: K steps of P probes on its own batches, no backward pass.

Per step k on batch B_k, with z_p the probe's Rademacher direction (masked when sparse)::

    central:  g_p = [L(w + eps z_p) - L(w - eps z_p)] / (2 eps)       2 forwards per probe
    forward:  g_p = [L(w + eps z_p) - L(w)] / eps                     1 forward per probe,
                                                                      + 1 shared base L(w) per step

Forward differences cost (P + 1) / P forwards per probe instead of 2 and carry an O(eps)
curvature bias (eps z^T H z / 2); with P >= 8 the base pass is amortised. Each g_p is quantised
by the round's codec (one byte with stochastic rounding keyed from the schedule, or one sign bit
with a shared magnitude per block of steps). Between steps the site moves along
its own quantised scalars (``w -= lr * g_hat_p * z_p / P``), so its trajectory is the one its
bytes describe; the server applies everyone's from the round-start state.

The work tensors are perturbed in place (inference memory); the caller resets them from the
round-start masters afterwards (``Replica.local``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetune.comm.codecs import codec_for
from edgetune.crypto import keystream
from edgetune.models.biascache import BiasRunner
from edgetune.models.headcache import HeadRunner
from edgetune.models.loss import objective_loss
from edgetune.models.suffix import SuffixRunner

DIFFERENCES = ("central", "forward")
OBJECTIVES = ("answer", "choices")
"""``spsa.objective``: what a probe's loss scores (``models/loss.py``: ``answer_loss``, ``choice_loss``)."""


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The probe loss of ``batch``: the choice cross-entropy when it carries candidate answers
    (``TokenizedSet.batch(..., choices=True)``), else the mean next-token loss over its answer tokens.
    """
    with torch.inference_mode():
        return float(objective_loss(model, batch))


def _apply_all(
    work: Sequence[torch.Tensor],
    packed: keystream.Directions,
    alpha: float,
    masks: Sequence[torch.Tensor] | None,
) -> None:
    keystream.add_directions_(work, packed, alpha, masks)


@dataclass
class Lane:
    """One device's replica of the site's model for probing: its model, its trainable tensors in
    manifest order (bitwise equal to the primary's at the start of the round), its sparse masks,
    its suffix runner and its copy of the step batches.
    """

    model: nn.Module
    work: Sequence[torch.Tensor]
    batches: Sequence[dict[str, torch.Tensor]]
    masks: Sequence[torch.Tensor] | None = None
    runner: SuffixRunner | HeadRunner | BiasRunner | None = None


def local_steps(
    model: nn.Module,
    work: Sequence[torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    keys: Sequence[Sequence[bytes]],
    uniforms: np.ndarray,
    *,
    eps: float,
    lr: float,
    scale: float,
    codec: str,
    difference: str = "central",
    masks: Sequence[torch.Tensor] | None = None,
    runner: SuffixRunner | HeadRunner | BiasRunner | None = None,
    extra_lanes: Sequence[Lane] = (),
) -> tuple[bytes, np.ndarray, float]:
    """K SPSA steps of P probes on ``work`` (perturbed in place; the caller resets it).

    Parameters
    ----------
    model
        The model whose trainable tensors are ``work``.
    work
        Trainable tensors in manifest order.
    batches
        One batch per step (K).
    keys
        K lists of P probe keys.
    uniforms
        K*P keyed uniforms for stochastic rounding.
    eps, lr, scale, codec
        Perturbation size, the site's own step size, the round's clip and the scalar codec's spec
        (``comm.codecs.codec_for``: one byte per scalar, or ``sign``'s one bit).
    difference
        ``central`` or ``forward`` (see the module docstring).
    masks
        Sparse masks (one per tensor, the work dtype), or None.
    runner
        When every perturbed tensor sits in the upper decoder blocks: probes rerun only those
        (``models/suffix.py``; bitwise the same losses, fewer FLOPs). For a label head: losses from
        cached final hidden states (``models/headcache.py``). For a token bias: all P losses of a step
        from one product with cached exponentials (``models/biascache.py``); the weights are never
        perturbed and ``extra_lanes`` go unused (one device's bytes, whatever ``model.device`` lists).
        None: full forwards.
    extra_lanes
        Replicas on further devices of this site (``model.device = cuda:0,cuda:1``). Each step's
        P probes are shared round-robin (probe p on lane p mod G). Every lane performs the same
        sequence of in-place perturbations as one device would, and runs forward passes only
        for its own probes, so its weights stay bitwise equal to the one-device trajectory (the
        +-eps round trips are not exact, so skipping another lane's perturbations would drift);
        the losses are merged in probe order and every scalar, code and local step is computed
        from them as with one device: the same bytes, given devices that compute the same
        forward (same kind of device and kernels).

    Returns
    -------
    codes, raw, loss
        The codes of the K*P scalars (``codec_for(codec).blob_len(K, P)`` bytes), the raw
        (unquantised) scalars, and the mean train loss (the
        unperturbed loss with forward differences, the probes' midpoint with central ones).
    """
    if difference not in DIFFERENCES:
        raise ValueError(f"difference must be one of {DIFFERENCES}, got {difference!r}")
    batched = isinstance(runner, BiasRunner)  # every probe of a step in one product, w never perturbed
    lanes = [Lane(model, work, batches, masks, runner), *([] if batched else extra_lanes)]
    n_lanes = len(lanes)
    n_probes = len(keys[0])
    encoder = codec_for(codec).encoder(scale, n_probes)
    # what brings the last probe's perturbation back to w: it rides in the step's update pass
    pending = 0.0 if batched else eps if difference == "central" else -eps
    raw = []
    losses = []
    pool = ThreadPoolExecutor(max_workers=n_lanes) if n_lanes > 1 else None

    def on_lanes(fn: Callable[..., Any], *per_lane: Sequence[Any]) -> list[Any]:
        """``fn(lane, *args)`` on every lane (in threads when there are several), in lane order."""
        if pool is None:
            return [fn(lanes[0], *(a[0] for a in per_lane))]
        return list(pool.map(fn, lanes, *per_lane))

    try:
        for k in range(len(batches)):
            last_step = k == len(batches) - 1
            if batched:
                results = [_probe_batched(lanes[0], keys=keys[k], k=k, eps=eps, difference=difference)]
            else:
                step = partial(_probe_lane, n_lanes=n_lanes, keys=keys[k], k=k, eps=eps, difference=difference)
                results = on_lanes(step, range(n_lanes))
            base = results[0][0]
            seen: dict[int, tuple[float, float]] = {}
            for _, lane_losses, _ in results:
                seen.update(lane_losses)
            if difference == "forward":
                losses.append(base)
            step_g = []
            for p in range(n_probes):  # canonical order: probe index, whichever lane ran it
                loss_plus, loss_minus = seen[p]
                if difference == "central":
                    g = (loss_plus - loss_minus) / (2.0 * eps)
                    losses.append(0.5 * (loss_plus + loss_minus))
                else:
                    g = (loss_plus - base) / eps
                if not math.isfinite(g):
                    raise ValueError(f"step {k} probe {p}: loss is not finite ({loss_plus}, {loss_minus})")
                step_g.append(g)
            raw.extend(step_g)
            u = uniforms[k * n_probes : (k + 1) * n_probes]
            g_hat = [float(v) for v in encoder.step(np.array(step_g), u)]
            # The site's own step, with the values the server will apply (so its trajectory is the
            # one its scalars describe); the last probe's way back to w rides in the same pass.
            # After the last step nothing is applied: the caller resets the weights from the masters.
            if not last_step:
                last = n_probes - 1  # (+ 0.0 on the others, as before: the sign of a zero alpha is kept)
                alphas = [-lr * g / n_probes + (pending if p == last else 0.0) for p, g in enumerate(g_hat)]
                on_lanes(_update_lane, [r[2] for r in results], [alphas] * n_lanes)
    finally:
        if pool is not None:
            pool.shutdown()
    return encoder.blob(), np.array(raw), float(np.mean(losses))


def _update_lane(lane: Lane, packs: Sequence[keystream.Directions], alphas: Sequence[float]) -> None:
    """The site's own step on one lane: ``w += alpha_p z_p`` for every probe, in probe order."""
    for packed, alpha in zip(packs, alphas, strict=True):
        _apply_all(lane.work, packed, alpha, lane.masks)


def _probe_batched(
    lane: Lane, *, keys: Sequence[bytes], k: int, eps: float, difference: str
) -> tuple[float, dict[int, tuple[float, float]], list[Any]]:
    """One step's probes from a runner that scores them all at once (``BiasRunner``: a token bias from
    cached exponentials); the weights are not perturbed. Returns what ``_probe_lane`` returns.
    """
    assert isinstance(lane.runner, BiasRunner)
    device = lane.work[0].device
    numels = [w.numel() for w in lane.work]
    packs = [keystream.directions(key, numels, device) for key in keys]
    lane.runner.select(lane.batches[k])  # the base loss comes with the probes' product
    mask = None if lane.masks is None else lane.masks[0]
    base, pairs = lane.runner.probe_losses(packs, eps, difference, mask)
    return base, dict(enumerate(pairs)), packs


def _probe_lane(
    lane: Lane, index: int, *, n_lanes: int, keys: Sequence[bytes], k: int, eps: float, difference: str
) -> tuple[float, dict[int, tuple[float, float]], list[Any]]:
    """One step's probes on one lane: every perturbation, the forwards of its own probes only.

    Returns the base loss (forward differences; 0.0 otherwise), {probe: (loss_plus, loss_minus)}
    of its own probes, and the packed directions (reused by the step's update pass).
    """
    batch = lane.batches[k]
    device = lane.work[0].device
    numels = [w.numel() for w in lane.work]
    packs = [keystream.directions(key, numels, device) for key in keys]
    n_probes = len(keys)
    base = 0.0
    if lane.runner is not None:
        base = lane.runner.capture(batch)  # every lane: its suffix runs start from this capture
    elif difference == "forward" and index == 0:
        base = batch_loss(lane.model, batch)

    def loss() -> float:
        return lane.runner.loss() if lane.runner is not None else batch_loss(lane.model, batch)

    out: dict[int, tuple[float, float]] = {}
    for p, packed in enumerate(packs):
        mine = p % n_lanes == index
        _apply_all(lane.work, packed, eps, lane.masks)
        loss_plus = loss() if mine else 0.0
        if difference == "central":
            _apply_all(lane.work, packed, -2.0 * eps, lane.masks)
            loss_minus = loss() if mine else 0.0
            pending = eps
        else:
            loss_minus = base
            pending = -eps
        if mine:
            out[p] = (loss_plus, loss_minus)
        if p < n_probes - 1:  # the next probe starts from w
            _apply_all(lane.work, packed, pending, lane.masks)
    return base, out, packs
