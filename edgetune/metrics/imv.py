"""Checkpoint flatness: a forward-only valley probe, and its Inverse Mean Valley (IMV).

For one model (any algorithm, including spsa, where every copy coincides and no worker spread
exists) the valley is probed along R random unit directions d_1..d_R of the trainable parameters::

    z_r = Rademacher(derive(key, "imv", r))       ChaCha20 bits over the manifest (crypto/keystream.py)
    d_r = z_r / sqrt(D)                            ||d_r|| = 1, D = number of probed parameters
    rise_r(rho) = L(theta + rho d_r) - L(theta)    L: held-out answer-token loss
    radius_r = the smallest rho found with rise_r(rho) >= delta:
               double rho from rho_0 = max_radius / 2^10 until rise >= delta or rho = max_radius,
               then bisect the last bracket ``bisect_steps`` times (radius = the bracket's top;
               the crossing lies within (top - bottom) = bracket / 2^bisect_steps below it);
               max_radius when the loss never rises by delta along d_r
    mean_radius = mean_r radius_r,   IMV = 1 / mean_radius     (large IMV: a sharp valley)

A non-finite loss counts as a rise above delta. Directions never depend on the model, so with
the same ``key`` every checkpoint of a run is probed along the same directions (differences between
checkpoints come from the model, not from the draw).

This is edgetune's definition, not a verified copy of the DPPF paper's (Dimlioglu & Choromanska 2025,
arXiv 2507.20424): the paper's Inv. MV is 1 / (mean distance of the workers from their average);
how it scores a single trained model in its correlation study could not be read
(notes/seed_algorithms.md section 1). The probe here is a line search to a loss threshold, one of
the candidates named there; see docs/flatness.md.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.config import RunConfig
from edgetune.crypto import keystream, schedule
from edgetune.models.params import manifest_of, select_trainable

RADIUS_START_FRACTION = 2.0**-10
"""rho_0 = max_radius x this: doubling reaches max_radius in at most 10 steps."""


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
    """D: parameters probed (the trainable manifest, or every parameter when nothing requires grad)."""


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


def valley_imv(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], float],
    *,
    key: bytes,
    num_directions: int,
    delta: float,
    max_radius: float,
    bisect_steps: int,
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
        Largest radius searched (> 0), in parameter-space L2 units.
    bisect_steps
        Bisection steps after bracketing (>= 0).

    Returns
    -------
    ImvResult
        Radii, their mean, IMV = 1 / mean radius, the base loss and the cost in loss evaluations.
    """
    if num_directions < 1 or bisect_steps < 0:
        raise ValueError(f"valley_imv: num_directions >= 1 and bisect_steps >= 0, got {num_directions}, {bisect_steps}")
    if not (delta > 0 and math.isfinite(delta)) or not (max_radius > 0 and math.isfinite(max_radius)):
        raise ValueError(f"valley_imv: delta and max_radius must be positive and finite, got {delta}, {max_radius}")
    params = [p for _, p in probed_parameters(model)]
    numel = sum(p.numel() for p in params)
    if numel == 0:
        raise ValueError("valley_imv: the model has no parameters to probe")
    scale = 1.0 / math.sqrt(numel)
    evals = num_capped = 0
    with _frozen_eval(model):
        # fp32 (or wider) copies: the source of every perturbed point and of the exact restore
        saved = [p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone() for p in params]
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
                    for p, s, bits in zip(params, saved, packed):
                        z = keystream.expand(bits, p.numel(), s.dtype).view_as(s)
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
        max_radius=icfg.max_radius,
        bisect_steps=icfg.bisect_steps,
    )


def imv_metrics(result: ImvResult) -> dict[str, float]:
    """The metrics-row fields of a probe (``imv``, ``imv_radius``, ``imv_base_loss``, ``imv_capped``)."""
    return {
        "imv": result.imv,
        "imv_radius": result.mean_radius,
        "imv_base_loss": result.base_loss,
        "imv_capped": float(result.num_capped),
    }


def checkpoint_imv(
    checkpoint: Path | str,
    *,
    recipe: Path | None = None,
    num_sites: int = 0,
    overrides: Mapping[str, Any] | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Valley probe of a saved checkpoint (``edgetune imv CHECKPOINT``), as a JSON-ready dict.

    Parameters
    ----------
    checkpoint
        A checkpoint folder (``runs/<run>/checkpoints/round-NNNN``).
    recipe
        Recipe to read the configuration from, when the checkpoint is not inside a run folder.
    num_sites
        Sites of the run, for the demo held-out set (0: ``run.num_sites`` or 4), as ``edgetune eval``.
    overrides
        Dotted config keys replacing the run's (``{"imv.num_directions": 8, "imv.delta": 0.05}``).
    show_progress
        Show a progress bar over the probe's loss evaluations (``edgetune/progress.py``).

    Returns
    -------
    dict
        ``imv``, ``mean_radius``, ``radii``, ``base_loss``, the probe settings, ``num_loss_evals``,
        ``num_capped``, ``numel``, ``round`` and ``weights_sha256`` (unchanged by the probe).
    """
    import json

    from edgetune import config as cfgmod
    from edgetune.evaluation import _run_config, load_checkpoint
    from edgetune.models.params import model_sha256

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"no checkpoint folder at {checkpoint}")
    cfg = _run_config(checkpoint, recipe)
    if overrides:
        cfg = cfgmod.from_run_config({**cfgmod.flatten(cfg), **dict(overrides)})
    model, tokenizer = load_checkpoint(checkpoint, cfg)
    # Probe the run's trainable tensors (a loaded checkpoint comes back all-trainable or, as a peft
    # adapter, all-frozen), so the probe moves what training moved.
    select_trainable(model, cfg.model.trainable_patterns)
    examples = imv_examples(cfg, num_sites or cfg.run.num_sites or 4)
    if show_progress:
        from edgetune import progress

        bound = 1 + cfg.imv.num_directions * (11 + cfg.imv.bisect_steps)
        with progress.task("valley probe (loss evaluations, at most)", total=bound) as bar:
            result = model_imv(model, tokenizer, examples, cfg, on_loss_eval=bar.advance)
    else:
        result = model_imv(model, tokenizer, examples, cfg)
    out: dict[str, Any] = {"checkpoint": str(checkpoint)}
    info = checkpoint / "edgetune.json"
    if info.is_file():
        out["round"] = json.loads(info.read_text()).get("round")
    out.update(
        {
            "imv": result.imv,
            "mean_radius": result.mean_radius,
            "radii": result.radii,
            "base_loss": result.base_loss,
            "num_directions": cfg.imv.num_directions,
            "delta": cfg.imv.delta,
            "max_radius": cfg.imv.max_radius,
            "bisect_steps": cfg.imv.bisect_steps,
            "num_examples": len(examples),
            "num_loss_evals": result.num_loss_evals,
            "num_capped": result.num_capped,
            "numel": result.numel,
            "weights_sha256": model_sha256(model),
        }
    )
    return out
