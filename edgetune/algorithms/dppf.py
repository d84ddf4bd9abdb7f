"""dppf: kavg with a pull-push step on every site's own copy, and the worker spread MV / IMV.

Source: Dimlioglu & Choromanska 2025, "Communication-Efficient Distributed Training for Collaborative
Flat Optima Recovery in Deep Learning" (arXiv 2507.20424; no public code). Only the abstract could be
read (notes/seed_algorithms.md section 1), so the update below is a reconstruction:

* verified (abstract): a push force from a relaxed Inverse Mean Valley regulariser acts against the
  consensus pull; the workers come to span a valley whose width is set by the balance of push and
  pull (a third-party summary: width ~ lam / alpha); Inv. MV is the paper's sharpness measure.
* reconstructed, NOT verified against the paper: the constant-size push lam * u_i (the paper might
  scale it, e.g. as the true gradient of lam / MV); the push is not centred (sum_i u_i != 0 moves
  the mean); pull-push happens once per round, at the site, against the freshly averaged x_bar;
  the schedules of alpha and lam; MV measured on the uploaded copies; x_bar served and evaluated.

Round r (K, lr, codecs and screening as kavg; x_i lives on site i, x_bar on the server)::

    site i:  x_bar_r from the message;  x_i <- its copy from the last round it took part in,
             or x_bar_r in its first round
             d = x_i - x_bar_r;  u = d / ||d|| (global L2 norm over all tensors; u = 0 if d = 0)
             x_i <- x_bar_r + (1 - alpha_r) d + lam_r u                       (pull_push)
             K local steps from x_i -> x_i';  store x_i';  send Delta_i = x_i' - x_bar_r
    server:  x_bar_{r+1} = x_bar_r + sum_i w_i Delta_i / sum_i w_i   (= weighted mean of x_i')
             worker_mv  = mean_i ||x_i' - x_bar_{r+1}||,  x_i' - x_bar_{r+1} = Delta_i - (x_bar_{r+1} - x_bar_r)
             worker_imv = 1 / worker_mv                              (omitted when worker_mv = 0)

With x_bar fixed, r <- (1 - alpha) r + lam has the fixed point r* = lam / alpha: the spread
settles near lam / alpha, plus what local training adds. alpha = 1, lam = 0 returns x_bar_r
bitwise (``pull_push`` copies it), so dppf then reproduces kavg bitwise.

Schedules (``dppf.schedule``), with f the fraction of full strength in round r (1-based)::

    constant                 f(r) = 1
    linear, W = warmup_rounds  f(r) = min(1, (r - 1) / W)   (W = 0: f = 1)
    dppf.ramp = "push"       alpha_r = alpha,       lam_r = f(r) lam      (the default)
    dppf.ramp = "pull-push"  alpha_r = f(r) alpha,  lam_r = f(r) lam      (lam_r / alpha_r = lam / alpha)

so round 1 (where every x_i = x_bar anyway) has f = 0, and full strength starts at round W + 1.
``push`` keeps the consensus pull at full strength from the start and lets the valley width target
lam_r / alpha grow from 0: the sites stay coupled while the push comes in (a warm-up of the
regulariser, the usual way a regularisation term is ramped in). ``pull-push`` (edgetune's earlier
default) fixes the target width and ramps the stiffness instead, so early rounds couple the sites
weakly (alpha_2 = alpha / 2 with W = 2), which lets non-IID sites drift apart. The paper's schedules
could not be read (module docstring, "reconstructed").

``dppf.distance`` picks the space of worker_mv: ``params`` (the trainable tensors) or ``delta-w``
for LoRA, where each site's adapters count as dW_i = s B_i A_i per layer (s = peft's scaling
lora_alpha / r) and worker_mv = mean_i sqrt(sum_layers ||dW_i - sum_j w_j dW_j / W||_F^2), which
does not change when a site rescales (c B_i, A_i / c). The pull-push itself always acts on the
trainable tensors (factors, for LoRA; merged like kavg, i.e. lowrank's ``fedavg``).

Wire: the downlink is kavg's (plan, params) plus two floats, ``alpha`` and ``lam`` (alpha_r,
lam_r); the uplink is kavg's (``delta`` with ``kavg.up_codec``, ``loss``). Screening (outlier
rejection, ``kavg.clip_norm``) sees Delta_i, offset included.

The site keeps x_i' in its per-site store (``ClientContext.store``: ``<state_dir>/<run id>/dppf/
x-<round>.safetensors``, written atomically): rounds of one site may run in different processes.
A retried round reads the copy from before it, never its own earlier attempt; files of later
rounds (an earlier run with the same name) are ignored and removed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from edgetune.algorithms.base import ServerContext
from edgetune.algorithms.sitestore import RoundFiles
from edgetune.algorithms.weights import WeightsClient, WeightsServer, aggregate_tensors, example_weights
from edgetune.comm import wire
from edgetune.comm.tensors import encode_tensors
from edgetune.comm.wire import Payload
from edgetune.config import DppfSection, RunConfig
from edgetune.models.lora import layer_scales, lora_pairs, norm_of_sum
from edgetune.models.params import Manifest, trainable_tensors

_MSG_SCHEMA: dict[str, type] = {"plan": bytes, "params": bytes, "alpha": float, "lam": float}

# ---- the math, as pure functions ------------------------------------------------------------------


def pull_push(
    x_i: Sequence[torch.Tensor], x_bar: Sequence[torch.Tensor], alpha: float, lam: float
) -> list[torch.Tensor]:
    """One pull-push step of a site's copy around the average.

    ``x_i <- x_bar + (1 - alpha) d + lam u``, d = x_i - x_bar, u = d / ||d|| (global L2 norm over
    all tensors; u = 0 when ||d|| = 0). Evaluated as x_bar + c d with c = (1 - alpha) + lam / ||d||
    in float64, rounded once to each tensor's dtype.

    Parameters
    ----------
    x_i
        The site's copy, one tensor per trainable tensor.
    x_bar
        The average, same shapes.
    alpha
        Pull strength in [0, 1] (1: jump to the average).
    lam
        Push strength >= 0 (a step of length lam away from the average).

    Returns
    -------
    list[torch.Tensor]
        New tensors (the inputs are not modified). With alpha = 1 and lam = 0 they are copies of
        ``x_bar``, bitwise.
    """
    if len(x_i) != len(x_bar):
        raise ValueError(f"pull_push: {len(x_i)} tensors against {len(x_bar)}")
    if not 0.0 <= alpha <= 1.0 or not (lam >= 0.0 and math.isfinite(lam)):
        raise ValueError(f"pull_push: alpha must be in [0, 1] and lam finite >= 0, got {alpha}, {lam}")
    diffs = [a.double() - b.double() for a, b in zip(x_i, x_bar, strict=True)]
    radius = math.sqrt(sum(float(d.pow(2).sum()) for d in diffs))
    coeff = 1.0 - alpha
    if radius > 0.0:
        coeff += lam / radius
    if coeff == 0.0:  # alpha = 1 and (lam = 0 or d = 0): exactly the average, signed zeros included
        return [b.clone() for b in x_bar]
    return [(b.double() + coeff * d).to(b.dtype) for b, d in zip(x_bar, diffs)]


def ramp(round_idx: int, schedule: str, warmup_rounds: int) -> float:
    """Fraction f of full pull and push strength in round ``round_idx`` (1-based).

    ``constant``: 1. ``linear``: min(1, (round_idx - 1) / warmup_rounds), or 1 without warm-up.
    """
    if schedule == "constant" or warmup_rounds == 0:
        return 1.0
    if schedule != "linear":
        raise ValueError(f"dppf.schedule must be constant or linear, got {schedule!r}")
    return min(1.0, (round_idx - 1) / warmup_rounds)


def strengths(dcfg: DppfSection, round_idx: int) -> tuple[float, float]:
    """(alpha_r, lam_r) of round ``round_idx``: lam (and alpha with ``dppf.ramp = "pull-push"``) times ``ramp``."""
    f = ramp(round_idx, dcfg.schedule, dcfg.warmup_rounds)
    if f == 1.0:
        return float(dcfg.alpha), float(dcfg.lam)
    if dcfg.ramp == "pull-push":
        return f * dcfg.alpha, f * dcfg.lam
    return float(dcfg.alpha), f * dcfg.lam


def spread(offsets: Sequence[Sequence[torch.Tensor]]) -> float:
    """MV = mean_i ||o_i|| of per-site offsets o_i = x_i - x_bar (global L2 norm per site)."""
    if not offsets:
        return 0.0
    return sum(math.sqrt(sum(float(t.double().pow(2).sum()) for t in o)) for o in offsets) / len(offsets)


# ---- the site's own copy --------------------------------------------------------------------------


class SiteCopy:
    """A site's x_i, one file per round it took part in (``x-<round>``, in the per-site store)."""

    def __init__(self, folder: Path | RoundFiles, manifest: Manifest) -> None:
        self.files = folder if isinstance(folder, RoundFiles) else RoundFiles(Path(folder))
        self.manifest = manifest

    def rounds(self) -> list[int]:
        """Rounds with a stored copy, ascending."""
        return self.files.rounds("x")

    def load_before(self, round_idx: int) -> list[torch.Tensor] | None:
        """The copy of the newest round before ``round_idx`` (None: the site has none)."""
        older = self.files.newest_before("x", round_idx)
        if older is None:
            return None
        if self.files.metadata("x", older).get("manifest") != self.manifest.digest():
            # another run under this run id (a reused run name) trained other tensors: not this site's copy,
            # so it starts from the global weights as a new site does (the next save replaces the file)
            return None
        shapes = {e.name: e.shape for e in self.manifest}
        named = self.files.read("x", older, shapes, {"manifest": self.manifest.digest()})
        assert named is not None
        return [named[e.name] for e in self.manifest]

    def save(self, round_idx: int, tensors: Sequence[torch.Tensor]) -> None:
        """Store x_i' of ``round_idx`` atomically; keep only it and the newest older copy."""
        named = {e.name: t for e, t in zip(self.manifest, tensors)}
        self.files.write("x", round_idx, named, {"manifest": self.manifest.digest(), "round": str(round_idx)})
        older = self.files.newest_before("x", round_idx)
        self.files.drop("x", keep=lambda r: r in (round_idx, older))  # the older copy stays for a retry


# ---- server and site ------------------------------------------------------------------------------


class DppfServer(WeightsServer):
    """kavg's server, plus (alpha_r, lam_r) in every site's message and the worker spread MV / IMV."""

    def __init__(self, cfg: RunConfig, ctx: ServerContext) -> None:
        super().__init__(cfg, ctx)
        self.dcfg = cfg.dppf
        self.pairs: list[tuple[int, int]] = []
        self.scales: list[float] = []
        if self.dcfg.distance == "delta-w":
            # raises unless every trainable tensor is a LoRA factor of a pair
            self.pairs = lora_pairs(self.manifest)
            self.scales = layer_scales(self.model, self.manifest, self.pairs)

    def configure(self, round_idx: int, phase: str, site_ids: list[str]) -> dict[str, Payload]:
        alpha, lam = strengths(self.dcfg, round_idx)
        payloads = super().configure(round_idx, phase, site_ids)
        return {s: {**p, "alpha": float(alpha), "lam": float(lam)} for s, p in payloads.items()}

    def combine(
        self, round_idx: int, updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]
    ) -> dict[str, float]:
        before = [p.clone() for p in self.params]
        sites = sorted(updates)
        k = self.kcfg  # x_bar_{r+1}: kavg's weighted (or robust) mean of the sites' updates
        mean = aggregate_tensors([updates[s] for s in sites], example_weights(plans, sites), k.aggregator, k.trim_frac)
        for p, d in zip(self.params, mean):
            p.add_(d)
        if self.dcfg.distance == "delta-w":
            mv = self._delta_w_spread(before, [updates[s] for s in sites], plans, sites)
        else:
            # x_i' - x_bar_{r+1} = (x_bar_r + Delta_i) - x_bar_{r+1}; the applied step in float64 is exact
            applied = [p.double() - b.double() for p, b in zip(self.params, before)]
            mv = spread([[d.double() - a for d, a in zip(updates[s], applied)] for s in sites])
        alpha, lam = strengths(self.dcfg, round_idx)
        metrics = {"worker_mv": mv, "dppf_alpha": alpha, "dppf_lam": lam}
        if mv > 0:
            metrics["worker_imv"] = 1.0 / mv
        return metrics

    def _delta_w_spread(
        self,
        before: list[torch.Tensor],
        deltas: list[list[torch.Tensor]],
        plans: dict[str, dict],
        sites: list[str],
    ) -> float:
        """mean_i sqrt(sum_layers ||s B_i A_i - sum_j w_j s B_j A_j / W||_F^2), products never formed."""
        weights = example_weights(plans, sites)
        total = sum(weights)
        sq = [0.0] * len(sites)
        for (ia, ib), scale in zip(self.pairs, self.scales):
            a_i = [(before[ia] + d[ia]).double() for d in deltas]
            b_i = [scale * (before[ib] + d[ib]).double() for d in deltas]
            mean_left = [-w / total * b for w, b in zip(weights, b_i)]
            for k in range(len(sites)):
                sq[k] += norm_of_sum([b_i[k], *mean_left], [a_i[k], *a_i]) ** 2
        return sum(math.sqrt(s) for s in sq) / len(sq) if sq else 0.0


class DppfClient(WeightsClient):
    """A site: pull-push its own copy toward the global average, K local steps, store the copy, send the delta."""

    def copy_store(self, run: str) -> SiteCopy:
        """The site's x_i store for run ``run`` (hex id), in the per-site store."""
        return SiteCopy(self.ctx.store.round_files(run, "dppf"), self.manifest)

    def step(self, phase: str, msg: Payload, state: Payload) -> tuple[Payload, Payload]:
        if phase != "train":
            raise ValueError(f"dppf has no phase {phase!r}")
        wire.require(msg, _MSG_SCHEMA, where="dppf round message")
        alpha, lam = float(msg["alpha"]), float(msg["lam"])
        if not 0.0 <= alpha <= 1.0 or lam < 0.0:
            raise ValueError(f"dppf round message: alpha {alpha} must be in [0, 1] and lam {lam} >= 0")
        plan, x_bar = self.load_global({"plan": msg["plan"], "params": msg["params"]})
        if plan["train"] != "all":
            raise ValueError(f"dppf trains every trainable tensor, the plan selects {plan['train']!r}")
        store = self.copy_store(plan["run"])
        own = store.load_before(plan["round"])
        work = trainable_tensors(self.ctx.model, self.manifest)
        if own is not None:
            start = pull_push(own, x_bar, alpha, lam)
            with torch.no_grad():
                for w, p in zip(work, start):
                    w.copy_(p.to(w.device, w.dtype))
        losses = self.train_plan(plan, self.chosen(plan))
        trained = [w.detach().to("cpu", torch.float32) for w in work]
        store.save(plan["round"], trained)
        deltas = [t - b for t, b in zip(trained, x_bar)]
        reply = {"delta": encode_tensors(deltas, plan["up"]), "loss": sum(losses) / len(losses)}
        return reply, state
