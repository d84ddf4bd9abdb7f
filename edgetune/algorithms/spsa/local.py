"""A site's local SPSA steps: K steps of P probes on its own batches, no backward pass.

Per step k on batch B_k, with z_p the probe's Rademacher direction (masked when sparse)::

    central:  g_p = [L(w + eps z_p) - L(w - eps z_p)] / (2 eps)       2 forwards per probe
    forward:  g_p = [L(w + eps z_p) - L(w)] / eps                     1 forward per probe,
                                                                      + 1 shared base L(w) per step

Forward differences cost (P + 1) / P forwards per probe instead of 2 and carry an O(eps)
curvature bias (eps z^T H z / 2); with P >= 8 the base pass is amortised. Each g_p is quantised
to one byte (stochastic rounding keyed from the schedule). Between steps the site moves along
its own quantised scalars (``w -= lr * g_hat_p * z_p / P``), so its trajectory is the one its
bytes describe; the server applies everyone's from the round-start state.

The work tensors are perturbed in place (inference memory); the caller resets them from the
round-start masters afterwards (``Replica.local``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from edgetune.comm.codecs import SCALAR_CODECS
from edgetune.crypto import keystream
from edgetune.models.loss import answer_loss
from edgetune.models.suffix import SuffixRunner

DIFFERENCES = ("central", "forward")


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Mean next-token loss over the answer tokens of ``batch`` (labels -100 elsewhere)."""
    with torch.inference_mode():
        return float(answer_loss(model, batch))


def _apply_all(
    work: Sequence[torch.Tensor],
    packed: Sequence[torch.Tensor],
    alpha: float,
    masks: Sequence[torch.Tensor] | None,
) -> None:
    for i, (w, bits) in enumerate(zip(work, packed)):
        keystream.add_(w, b"", i, alpha, packed=bits, mask=None if masks is None else masks[i])


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
    runner: SuffixRunner | None = None,
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
        Perturbation size, the site's own step size, the round's clip and the one-byte codec.
    difference
        ``central`` or ``forward`` (see the module docstring).
    masks
        Sparse masks (one per tensor, the work dtype), or None.
    runner
        When every perturbed tensor sits in the upper decoder blocks: probes rerun only those
        (``models/suffix.py``; bitwise the same losses, fewer FLOPs). None: full forwards.

    Returns
    -------
    codes, raw, loss
        The K*P one-byte codes, the raw (unquantised) scalars, and the mean train loss (the
        unperturbed loss with forward differences, the probes' midpoint with central ones).
    """
    if difference not in DIFFERENCES:
        raise ValueError(f"difference must be one of {DIFFERENCES}, got {difference!r}")
    n_probes = len(keys[0])
    device = work[0].device
    numels = [w.numel() for w in work]
    cod = SCALAR_CODECS[codec]
    codes = bytearray()
    raw = []
    losses = []
    for k, batch in enumerate(batches):
        last_step = k == len(batches) - 1
        packs = [[keystream.tensor_bits(key, i, n, device) for i, n in enumerate(numels)] for key in keys[k]]
        g_hat = []
        base = 0.0
        if runner is not None:
            base = runner.capture(batch)
        elif difference == "forward":
            base = batch_loss(model, batch)
        if difference == "forward":
            losses.append(base)
        pending = 0.0  # what brings the last probe's perturbation back to w
        for p, packed in enumerate(packs):
            _apply_all(work, packed, eps, masks)
            loss_plus = runner.loss() if runner is not None else batch_loss(model, batch)
            if difference == "central":
                _apply_all(work, packed, -2.0 * eps, masks)
                loss_minus = runner.loss() if runner is not None else batch_loss(model, batch)
                g = (loss_plus - loss_minus) / (2.0 * eps)
                losses.append(0.5 * (loss_plus + loss_minus))
                pending = eps
            else:
                loss_minus = base
                g = (loss_plus - base) / eps
                pending = -eps
            if not math.isfinite(g):
                raise ValueError(f"step {k} probe {p}: loss is not finite ({loss_plus}, {loss_minus})")
            u = uniforms[k * n_probes + p : k * n_probes + p + 1]
            code = cod.encode(np.array([g]), u, scale)
            codes += code
            g_hat.append(float(cod.decode(code, 1, scale)[0]))
            raw.append(g)
            if p < n_probes - 1:  # the next probe starts from w
                _apply_all(work, packed, pending, masks)
        # The site's own step, with the values the server will apply (so its trajectory is the
        # one its scalars describe); the last probe's way back to w rides in the same pass. After
        # the last step nothing is applied: the caller resets the weights from the masters.
        if not last_step:
            for p, packed in enumerate(packs):
                alpha = -lr * g_hat[p] / n_probes + (pending if p == n_probes - 1 else 0.0)
                _apply_all(work, packed, alpha, masks)
    return bytes(codes), np.array(raw), float(np.mean(losses))
