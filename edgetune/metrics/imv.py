"""Checkpoint flatness: a forward-only valley probe, and its Inverse Mean Valley (IMV).

For one model (any algorithm, including spsa, where every copy coincides and no worker spread
exists) the valley is probed along R random directions d_1..d_R of the trainable parameters::

    z_r = Rademacher(derive(key, "imv", r))       ChaCha20 bits over the manifest (crypto/keystream.py)
    filter (default; Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"):
      every row i of a tensor with 2+ dims (a filter: one output unit; the rest of the dims flattened)
      d_r[i] = z_r[i] * ||theta[i]|| / sqrt(n_i)   so ||d_r[i]|| = ||theta[i]||  (n_i: the row's length)
      tensors with 1 dim (norm weights, biases): d_r = 0 (Li et al.'s default, "ignore biasbn")
    global:
      d_r = z_r / sqrt(D)                          ||d_r|| = 1, D = number of probed parameters
    rise_r(rho) = L(theta + rho d_r) - L(theta)    L: held-out answer-token loss
    radius_r = the smallest rho found with rise_r(rho) >= delta:
               double rho from rho_0 = max_radius / 2^10 until rise >= delta or rho = max_radius,
               then bisect the last bracket ``bisect_steps`` times (radius = the bracket's top;
               the crossing lies within (top - bottom) = bracket / 2^bisect_steps below it);
               max_radius when the loss never rises by delta along d_r
    mean_radius = mean_r radius_r,   IMV = 1 / mean_radius     (large IMV: a sharp valley)

A non-finite loss counts as a rise above delta. The random signs never depend on the model, so with
the same ``key`` every checkpoint of a run is probed along the same sign pattern (differences between
checkpoints come from the model, not from the draw). With ``filter`` the radius is relative: rho = 0.05
moves every row by 5% of its own norm, whatever the layer's scale, and a rescaling of a row (which
RMSNorm after it, or a LoRA pair (c B, A / c), makes invisible to the loss) rescales d with it, so
the radius does not change. With ``global`` the radius is in parameter-space L2 units: it depends on
the parameters' scale and on D, so only runs with the same trainable tensors and similar weight
norms compare.

This is edgetune's definition, not a verified copy of the DPPF paper's (Dimlioglu & Choromanska 2025,
arXiv 2507.20424): the paper's Inv. MV, as far as its abstract and summaries tell, is 1 / (mean
distance of the workers from their average), a distance between trained copies that uses no random
directions and hence no normalisation; how it scores a single trained model in its correlation
study could not be read (notes/seed_algorithms.md section 1). The probe here is a line search to a
loss threshold, one of the candidates named there, with the flatness literature's per-filter
normalisation by default; see docs/flatness.md.

The probe never changes the model: the probed tensors are copied (fp32, or their own dtype when
wider) and written back exactly, in a ``finally``; no gradients, dropout off, module modes restored;
no global RNG is read or advanced, and no training stream is drawn from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgetune.config import RunConfig
from edgetune.crypto import keystream, schedule
from edgetune.models.params import manifest_of

RADIUS_START_FRACTION = 2.0**-10
"""rho_0 = max_radius x this: doubling reaches max_radius in at most 10 steps."""
NORMALIZATIONS = ("filter", "global")


@dataclass(frozen=True)
class ImvResult:
    """Outcome of one valley probe."""

    radii: list[float]
    """Radius per direction (max_radius where the loss never rose by delta)."""
    mean_radius: float
    """Mean of ``radii``."""
    imv: float
    """1 / mean_radius."""
    base_loss: float
    """L(theta) at the probed point."""
    num_loss_evals: int
    """Loss evaluations, the base one included (each is a forward pass over the probe's examples)."""
    num_capped: int
    """Directions that reached max_radius without the loss rising by delta."""
    numel: int
    """D: parameters the probe moves (``global``: the whole trainable manifest, or every parameter when
    nothing requires grad; ``filter``: those in rows of nonzero norm of tensors with 2+ dims)."""
    normalize: str = "filter"
    """The direction normalisation used."""


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def probed_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs the probe moves: the trainable manifest, else every floating parameter."""
    named = dict(model.named_parameters())
    manifest = manifest_of(model)
    if len(manifest):
        return [(e.name, named[e.name]) for e in manifest]
    return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]


def filter_scales(saved: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-row scale of the filter-normalised direction: ||theta[i]|| / sqrt(n_i), shaped to broadcast.

    A tensor with 2+ dims gets one scale per row (its first index; the other dims flattened), a 1-D
    or 0-D tensor a zero scale (not moved). z * scale then has, row by row, the norm of theta's row.
    """
    out = []
    for s in saved:
        if s.dim() < 2 or s.numel() == 0:
            out.append(torch.zeros((), dtype=s.dtype, device=s.device))
            continue
        rows = s.reshape(s.shape[0], -1)
        scale = rows.norm(dim=1) / math.sqrt(rows.shape[1])
        out.append(scale.view(-1, *([1] * (s.dim() - 1))))
    return out


def valley_imv(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], float],
    *,
    key: bytes,
    num_directions: int,
    delta: float,
    max_radius: float,
    bisect_steps: int,
    normalize: str = "filter",
) -> ImvResult:
    """Probe the loss valley around ``model``'s weights along keyed random unit directions.

    Parameters
    ----------
    model
        The model; its probed tensors are moved during the probe and restored exactly.
    loss_fn
        ``loss_fn(model) -> float``: the loss at the model's current weights (held-out loss).
        Called under ``torch.no_grad`` with the model in eval mode; it must be deterministic.
    key
        32-byte master key; direction r uses ``schedule.derive(key, "imv", r)``.
    num_directions
        R >= 1.
    delta
        Loss rise that marks the valley's edge (> 0).
    max_radius
        Largest radius searched (> 0): relative to the rows' norms (``filter``) or in
        parameter-space L2 units (``global``).
    bisect_steps
        Bisection steps after bracketing (>= 0).
    normalize
        ``filter`` (per-row, Li et al. 2018) or ``global`` (one unit vector); module docstring.

    Returns
    -------
    ImvResult
        Radii, their mean, IMV = 1 / mean radius, the base loss and the cost in loss evaluations.
    """
    if num_directions < 1 or bisect_steps < 0:
        raise ValueError(f"valley_imv: num_directions >= 1 and bisect_steps >= 0, got {num_directions}, {bisect_steps}")
    if not (delta > 0 and math.isfinite(delta)) or not (max_radius > 0 and math.isfinite(max_radius)):
        raise ValueError(f"valley_imv: delta and max_radius must be positive and finite, got {delta}, {max_radius}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"valley_imv: normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    params = [p for _, p in probed_parameters(model)]
    numel = sum(p.numel() for p in params)
    if numel == 0:
        raise ValueError("valley_imv: the model has no parameters to probe")
    scale = 1.0 / math.sqrt(numel)
    evals = num_capped = 0
    with _frozen_eval(model):
        # fp32 (or wider) copies: the source of every perturbed point and of the exact restore
        saved = [p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone() for p in params]
        rows: list[torch.Tensor] = []
        if normalize == "filter":
            rows = filter_scales(saved)
            numel = sum(int((r > 0).sum()) * (s.numel() // max(r.numel(), 1)) for r, s in zip(rows, saved))
            if numel == 0:
                raise ValueError(
                    "valley_imv: filter normalisation moves nothing here (every probed tensor is 1-D or its "
                    "rows are all zero, e.g. LoRA's B at initialisation); use imv.normalize = 'global'"
                )
        try:
            base = float(loss_fn(model))
            evals += 1
            if not math.isfinite(base):
                raise ValueError(f"valley_imv: the loss at the probed point is not finite ({base})")
            radii = []
            for r in range(num_directions):
                dkey = schedule.derive(key, "imv", r)
                packed = [keystream.tensor_bits(dkey, i, p.numel(), p.device) for i, p in enumerate(params)]

                def rises(rho: float, packed: list[torch.Tensor] = packed) -> bool:
                    nonlocal evals
                    for i, (p, s, bits) in enumerate(zip(params, saved, packed)):
                        z = keystream.expand(bits, p.numel(), s.dtype).view_as(s)
                        if rows:
                            p.copy_(torch.add(s, z * rows[i], alpha=rho))
                        else:
                            p.copy_(torch.add(s, z, alpha=rho * scale))
                    loss = float(loss_fn(model))
                    evals += 1
                    return not math.isfinite(loss) or loss - base >= delta

                radius, capped = _edge(rises, max_radius, bisect_steps)
                radii.append(radius)
                num_capped += capped
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)
    mean_radius = sum(radii) / len(radii)
    return ImvResult(
        radii=radii,
        mean_radius=mean_radius,
        imv=1.0 / mean_radius,
        base_loss=base,
        num_loss_evals=evals,
        num_capped=num_capped,
        numel=numel,
        normalize=normalize,
    )


def _edge(rises: Callable[[float], bool], max_radius: float, bisect_steps: int) -> tuple[float, bool]:
    """(smallest radius found with ``rises(radius)``, False), or (max_radius, True) if none rises.

    Doubling from rho_0 brackets the edge in (lo, hi] with rises(hi) and not rises(lo) (lo = 0 when
    rho_0 already rises); bisection halves the bracket ``bisect_steps`` times and returns its top.
    """
    lo, rho = 0.0, max_radius * RADIUS_START_FRACTION
    while not rises(rho):
        lo = rho
        if rho >= max_radius:
            return max_radius, True
        rho = min(2.0 * rho, max_radius)
    hi = rho
    for _ in range(bisect_steps):
        mid = 0.5 * (lo + hi)
        if rises(mid):
            hi = mid
        else:
            lo = mid
    return hi, False


def heldout_loss_fn(
    tokenizer: Any, examples: Sequence[Mapping[str, str]], *, batch_size: int, max_length: int
) -> Callable[[nn.Module], float]:
    """``loss_fn`` for ``valley_imv``: mean answer-token loss over ``examples`` (``answer_loss``)."""
    from edgetune.metrics.eval import heldout_loss

    def loss_fn(model: nn.Module) -> float:
        return heldout_loss(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)

    return loss_fn


def imv_examples(cfg: RunConfig, num_sites: int) -> list[dict]:
    """The probe's examples: the first ``imv.num_examples`` of the run's held-out set."""
    from edgetune.data.sources import heldout_examples

    wide = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_examples=cfg.imv.num_examples))
    return heldout_examples(wide, num_sites)


def model_imv(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    cfg: RunConfig,
    on_loss_eval: Callable[[], None] | None = None,
) -> ImvResult:
    """The probe of ``cfg.imv`` on ``model``, loss over the first ``imv.num_examples`` of ``examples``.

    Directions come from ``derive(run_key(run.seed), "imv", r)``: the same for every round of a run.
    ``on_loss_eval`` is called after every loss evaluation (progress bars; at most
    ``1 + num_directions * (11 + bisect_steps)``).
    """
    icfg = cfg.imv
    loss_fn = heldout_loss_fn(
        tokenizer, list(examples[: icfg.num_examples]), batch_size=cfg.eval.batch_size, max_length=cfg.data.max_length
    )
    if on_loss_eval is not None:
        scored = loss_fn

        def loss_fn(m: nn.Module) -> float:
            value = scored(m)
            on_loss_eval()
            return value

    return valley_imv(
        model,
        loss_fn,
        key=schedule.run_key(cfg.run.seed),
        num_directions=icfg.num_directions,
        delta=icfg.delta,
        max_radius=icfg.radius_limit,
        bisect_steps=icfg.bisect_steps,
        normalize=icfg.normalize,
    )


def imv_metrics(result: ImvResult) -> dict[str, float]:
    """The metrics-row fields of a probe (``imv``, ``imv_radius``, ``imv_base_loss``, ``imv_capped``)."""
    return {
        "imv": result.imv,
        "imv_radius": result.mean_radius,
        "imv_base_loss": result.base_loss,
        "imv_capped": float(result.num_capped),
    }
