"""lowrank: LoRA factors trained with K local steps (kavg), merged in one of four ways.

Sources: LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"
(arXiv 2106.09685), through peft; AB-training, Coquelin et al. 2024, "AB-Training: A Communication-Efficient
Approach for Distributed Low-Rank Learning" (arXiv 2405.01067; code Helmholtz-AI-Energy/AB-Training).

Legend: O, I = out / in features of an adapted Linear, R = LoRA rank r, N = accepted sites,
s = peft's scaling lora_alpha / r, w_i = K x batch size (assigned by the server, as in kavg).
LoRA (peft convention, B on the left)::

    W' = W + s * B_OR @ A_RI          A from the keyed ``init`` stream, B = 0 (models/load.py)

Each site trains the factors its plan's ``train`` selector names for K steps from the global
(A, B) and sends their deltas (``WeightsClient``). The server merges them (``lowrank.mode``)::

    fedavg     A <- sum_i w_i A_i / W,  B <- sum_i w_i B_i / W            (W = sum_i w_i)
               s B A != sum_i w_i s B_i A_i / W: the cross terms make it biased (the baseline).
    exact      M = sum_i w_i s B_i A_i / W per layer, never formed densely: M = P Q with
                 P = [w_1 s B_1 .. w_N s B_N] / W  (O x NR),  Q = [A_1; ..; A_N]  (NR x I),
                 P = Qp Rp, Q^T = Qq Rq (thin QR),  Rp Rq^T = Uc S Vc^T  (an NR x NR SVD),
                 M = (Qp Uc) S (Qq Vc)^T = U S V^T.
               Keep the top R singular values (``svd_cutoff`` c > 0 also zeroes s_j <= c s_1;
               shapes stay rank R) and re-split in balance:
                 B = U sqrt(S) / sqrt(s),  A = sqrt(S) V^T / sqrt(s)   =>   s B A = U_R S_R V_R^T,
               the best rank-R approximation of M (Eckart-Young). AB-training writes W = A B with
               A = U sqrt(S), B = sqrt(S) V^T; only the names swap. Dividing by sqrt(s) balances the
               factors as they are stored and trained, so ||B[:, j]|| = ||A[j]|| = sqrt(s_j / s).
    only-b     every site trains B only; A stays the shared keyed init, so
                 s (sum_i w_i B_i / W) A = sum_i w_i s B_i A / W          exactly. Uplink: B.
    ab-groups  AB-training, "only-learned": in round r the site at position p of the sorted
               site ids trains A if p + r is odd, else B (the groups swap every round, so every
               site's data reaches both factors); A <- mean over the A-group, B <- mean over the
               B-group. Uplink per site: about half of fedavg's. Rounds 1, 1 + F, 1 + 2F, ...
               (F = ``refactor_every``) are re-factorisations: all sites train both factors and the
               server merges as ``exact``. Round 1 is one because B = 0 there makes A's gradient
               s B^T G vanish (an A-group would learn nothing); it plays AB-training's warm-up.
               After each re-factorisation the learning rate rebounds:
                 lr(R + j) = rebound_lr + (lr - rebound_lr) (j - 1) / rebound_rounds,  j = 1..rebound_rounds,
               capped by the round's scheduled lr (``kavg.lr_schedule``).
    full-rank  (ab-groups with ``full_rank_steps`` D > 0) AB-training's full-rank phase, in the
               re-factorisation rounds: each site freezes its factors and trains a dense dW_i on every
               adapted layer's weight for D local steps (W0 + s B A + dW_i; ``full_rank_lr``), and
               sends dW_i (O x I per layer). The server truncates the merged weight back to rank R:
                 M = s B A + sum_i w_i dW_i / W,   (B, A) <- resplit(top-R SVD of M)   (svd_cutoff applies)
               A slot the truncation zeroed is dead under factor training (B[:, j] = 0 and A[j] = 0
               make both gradients vanish); dW is not confined to the factors' span, so it regrows.
               Round 1 is a full-rank round too: AB-training's full-rank warm-up, then factorise.

Screening (design notes, security.md section 2.2) happens in dW space, not on factor norms. For a site's deltas
(dB, dA) on a layer, with (B, A) the global factors::

    s (B + dB)(A + dA) - s B A = s (dB A + B dA) + s dB dA
    n_layer = ||s (dB A + B dA)||_F + ||s dB dA||_F,   n = sqrt(sum_layers n_layer^2)

n bounds the dW change the update makes (triangle inequality) and equals it when only one factor
moves (only-b, ab-groups). It cannot be lowered by a rescaling (c B_i, A_i / c), which keeps the
product and would slip past a pure product norm, yet multiplies fedavg's factor average: its
first-order term grows with c. Sites with n above ``kavg.outlier_mult`` x the median are rejected
(3+ sites); the deltas are scaled by the c in (0, 1] with n(c dB, c dA) = clip, where clip is
``kavg.clip_norm`` or, by default, ``kavg.clip_mult`` x the lower median of the sites' n
(``screening.py``), so every site moves dW by at most the clip in any federation size (the product
mean in ``exact`` then moves by at most twice the clip after truncation, since ||M_R - M|| <=
||s B A - M||).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from edgetune.algorithms import screening
from edgetune.algorithms.base import ClientContext, ServerContext
from edgetune.algorithms.weights import (
    Screened,
    WeightsClient,
    WeightsServer,
    aggregate_tensors,
    example_weights,
    norm,
    round_lr,
    select,
)
from edgetune.comm import wire
from edgetune.comm.tensors import TENSOR_CODECS, decode_tensors, encode_tensors
from edgetune.comm.wire import Payload
from edgetune.config import RunConfig
from edgetune.models import lora

FULL_RANK = "full-rank"
"""The plan's ``train`` selector of a full-rank round: dense deltas of the adapted layers' weights."""

# ---- the math, as pure functions (LoRA's own in models/lora.py) ------------------------------------


def is_refactor_round(round_idx: int, refactor_every: int) -> bool:
    """ab-groups: rounds 1, 1 + F, 1 + 2F, ... train both factors and merge exactly (F = 0: never)."""
    if refactor_every == 0:
        return False
    return (round_idx - 1) % refactor_every == 0


def rebound_lr(round_idx: int, *, lr: float, refactor_every: int, rebound_rounds: int, start: float) -> float:
    """ab-groups learning rate: ``start`` right after a re-factorisation, linear back to ``lr``.

    Parameters
    ----------
    round_idx
        1-based round.
    lr
        The learning rate outside rebounds (``kavg.lr``).
    refactor_every, rebound_rounds, start
        ``lowrank.refactor_every``, ``lowrank.rebound_rounds``, ``lowrank.rebound_lr``.

    Returns
    -------
    float
        lr(R + j) = start + (lr - start) (j - 1) / rebound_rounds for j = 1..rebound_rounds after a
        re-factorisation in round R; ``lr`` otherwise.
    """
    if refactor_every == 0 or rebound_rounds == 0 or round_idx < 2:
        return lr
    last = round_idx - 1 - (round_idx - 2) % refactor_every  # latest re-factorisation before this round
    j = round_idx - last
    if j > rebound_rounds:
        return lr
    return start + (lr - start) * (j - 1) / rebound_rounds


def full_rank_merge(
    b: torch.Tensor,
    a: torch.Tensor,
    dense: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    scale: float,
    cutoff: float,
    aggregator: str = "mean",
    trim_frac: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """One layer of the full-rank phase: rank-R factors of M = s B A + the mean of the sites' dW_i.

    Parameters
    ----------
    b, a
        The global factors B (O x R) and A (R x I) the sites started from (and kept frozen).
    dense
        Each site's dense delta dW_i (O x I) of the layer's weight.
    weights
        w_i (examples the server assigned).
    scale
        LoRA scaling s.
    cutoff, aggregator, trim_frac
        ``lowrank.svd_cutoff``; ``kavg.aggregator`` and ``kavg.trim_frac`` across sites.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]
        B', A' (float64, shapes of B and A) with s B' A' the best rank-R approximation of M
        (Eckart-Young), the number of nonzero components kept, and M's singular values.
    """
    (mean,) = aggregate_tensors([[d] for d in dense], weights, aggregator, trim_frac)
    target = scale * b.double() @ a.double() + mean.double()
    u, sv, vh = torch.linalg.svd(target, full_matrices=False)
    nb, na, kept = lora.resplit(u, sv, vh, rank=a.shape[0], cutoff=cutoff, scale=scale)
    return nb, na, kept, sv


def ab_group(round_idx: int, position: int) -> str:
    """ab-groups selector of the site at ``position`` in the sorted ids: alternates, swapping every round."""
    return "lora_A" if (position + round_idx) % 2 == 1 else "lora_B"


# ---- server and site ------------------------------------------------------------------------------


class LowrankServer(WeightsServer):
    """Global LoRA factors; per-site train selectors; dW-space screening; factor or product merging."""

    def __init__(self, cfg: RunConfig, ctx: ServerContext) -> None:
        super().__init__(cfg, ctx)
        self.lcfg = cfg.lowrank
        self.pairs = lora.lora_pairs(self.manifest)
        self.scales = lora.layer_scales(self.model, self.manifest, self.pairs)
        self.dense_shapes = lora.dense_shapes(self.manifest, self.pairs)
        """(O, I) of every adapted layer's weight: the shapes of a full-rank round's deltas."""

    # ---- plans -------------------------------------------------------------------------------------

    def refactor_round(self, round_idx: int) -> bool:
        """True when this round merges products: always in ``exact``, periodically in ``ab-groups``."""
        mode = self.lcfg.mode
        return mode == "exact" or (mode == "ab-groups" and is_refactor_round(round_idx, self.lcfg.refactor_every))

    def full_rank_round(self, round_idx: int) -> bool:
        """True when this re-factorisation round runs AB-training's full-rank phase (``full_rank_steps`` > 0)."""
        return self.lcfg.full_rank_steps > 0 and self.refactor_round(round_idx)

    def round_lr(self, round_idx: int) -> float:
        """The round's scheduled ``kavg.lr``, with the LR rebound after re-factorisations in ``ab-groups``.

        The scheduled rate caps the rebound, as AB-training's scheduler does.
        """
        scheduled = round_lr(self.cfg, round_idx)
        if self.lcfg.mode != "ab-groups":
            return scheduled
        rebound = rebound_lr(
            round_idx,
            lr=scheduled,
            refactor_every=self.lcfg.refactor_every,
            rebound_rounds=self.lcfg.rebound_rounds,
            start=self.lcfg.rebound_lr,
        )
        return min(rebound, scheduled)

    def site_plan(self, round_idx: int, site: str, sites: list[str]) -> dict[str, Any]:
        plan = super().site_plan(round_idx, site, sites)
        if self.lcfg.mode == "only-b":
            plan["train"] = "lora_B"
        elif self.lcfg.mode == "ab-groups" and not self.refactor_round(round_idx):
            plan["train"] = ab_group(round_idx, sorted(sites).index(site))
        plan["lr"] = self.round_lr(round_idx)
        if self.full_rank_round(round_idx):
            plan["train"] = FULL_RANK
            plan["K"] = self.lcfg.full_rank_steps
            plan["lr"] = float(self.lcfg.full_rank_lr or plan["lr"])
        return plan

    def max_reply_bytes(self, phase: str) -> int:
        limit = super().max_reply_bytes(phase)
        if self.lcfg.full_rank_steps:
            dense = sum(TENSOR_CODECS[self.kcfg.up_codec].nbytes(shape) for shape in self.dense_shapes)
            limit = max(limit, dense + 4096)
        return limit

    # ---- screening ---------------------------------------------------------------------------------

    def delta_w_terms(self, full: Sequence[torch.Tensor], plan: dict[str, Any]) -> list[tuple[float, float]]:
        """Per LoRA layer, (||s (dB A + B dA)||, ||s dB dA||) of one site's full delta list.

        A full-rank round's dense deltas give (||dW||, 0).
        """
        if plan["train"] == FULL_RANK:
            return [(float(d.double().norm()), 0.0) for d in full]
        return lora.delta_w_terms(self.params, full, self.pairs, self.scales)

    def decode(self, site: str, payload: Payload, plan: dict[str, Any]) -> list[torch.Tensor]:
        """A reply's deltas: the trained factors, or one dense dW per adapted layer in a full-rank round."""
        if plan["train"] == FULL_RANK:
            wire.require(payload, {"delta": bytes, "loss": float}, where=f"{site} reply")
            return decode_tensors(payload["delta"], self.dense_shapes, plan["up"], where=f"{site} full-rank update")
        return super().decode(site, payload, plan)

    def expand(self, deltas: list[torch.Tensor], plan: dict[str, Any]) -> list[torch.Tensor]:
        if plan["train"] == FULL_RANK:
            return deltas  # one dense delta per adapted layer, not per trainable tensor
        return super().expand(deltas, plan)

    def screen(self, round_idx: int, updates: dict[str, list[torch.Tensor]]) -> Screened:
        """Outliers and the clip in dW = s B A space (module docstring), not on the factors' norms."""
        terms = {s: self.delta_w_terms(self.expand(d, self._plans[s]), self._plans[s]) for s, d in updates.items()}
        norms = {s: lora.scaled_norm(t, 1.0) for s, t in terms.items()}
        k = self.kcfg
        rejected, bound = screening.screen_norms(
            norms,
            outlier_mult=k.outlier_mult,
            clip_norm=k.clip_norm,
            clip_mult=k.clip_mult,
            what="update norm in dW = s*B*A space",
        )
        kept = {s: d for s, d in updates.items() if s not in rejected}
        clipped = {}
        for s, d in kept.items():
            clipped[s] = norms[s]
            if norms[s] > bound:
                c = lora.shrink_factor(terms[s], bound)
                for t in d:
                    t.mul_(c)
                clipped[s] = lora.scaled_norm(terms[s], c)
        return Screened(kept, {s: norms[s] for s in kept}, clipped, rejected, bound)

    def step_bound(self, round_idx: int, screened: Screened) -> float:
        """No bound where the merged products are re-split (any rotation of the factors is as good):
        only finiteness is checked there. Rounds that average factors bound the step by the factor
        deltas' norms after the dW-space clip, as kavg does.
        """
        if self.refactor_round(round_idx):
            return math.inf
        factor_norms = [norm(d) for d in screened.updates.values()]
        applied = screening.applied_bound(factor_norms, self.kcfg.aggregator)
        if self.kcfg.aggregator == "mean":
            # Each tensor is averaged over the sites that trained it (ab-groups), so the step can exceed
            # every site's norm (sqrt(a^2 + b^2) from an A-only and a B-only site): bound it per tensor.
            largest = [0.0] * len(self.shapes)
            for s, d in screened.updates.items():
                for i, t in zip(select(self.manifest, self._plans[s]["train"]), d):
                    largest[i] = max(largest[i], float(t.double().pow(2).sum()))
            applied = math.sqrt(sum(largest))
        return min(applied, screening.magnitude_bound(factor_norms))

    def round_metrics(self, round_idx: int, screened: Screened) -> dict[str, float]:
        dw = [screened.clipped[s] for s in screened.updates]
        return {"mean_delta_w_norm": sum(dw) / len(dw), "lr": self.round_lr(round_idx)}

    # ---- merging -----------------------------------------------------------------------------------

    def combine(
        self, round_idx: int, updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]
    ) -> dict[str, float]:
        if self.full_rank_round(round_idx):
            return self._merge_full_rank(updates, plans)
        if self.refactor_round(round_idx):
            return self._merge_products(updates, plans)
        return self._average_learned(updates, plans)

    def _merge_full_rank(self, updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]) -> dict[str, float]:
        """Per layer: s B A + the mean dense delta, truncated back to rank R (``full_rank_merge``)."""
        sites = sorted(updates)
        weights = example_weights(plans, sites)
        kept, energy, tail = [], 0.0, 0.0
        for layer, ((ia, ib), scale) in enumerate(zip(self.pairs, self.scales)):
            b, a, k, sv = full_rank_merge(
                self.params[ib],
                self.params[ia],
                [updates[s][layer] for s in sites],
                weights,
                scale=scale,
                cutoff=self.lcfg.svd_cutoff,
                aggregator=self.kcfg.aggregator,
                trim_frac=self.kcfg.trim_frac,
            )
            self.params[ia].copy_(a)
            self.params[ib].copy_(b)
            kept.append(k)
            energy += float(sv.pow(2).sum())
            tail += float(sv[k:].pow(2).sum())
        return {
            "refactor": 1.0,
            "full_rank": 1.0,
            "svd_rank": sum(kept) / len(kept),
            "svd_tail": math.sqrt(tail / energy) if energy > 0 else 0.0,
        }

    def _average_learned(self, updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]) -> dict[str, float]:
        """Each tensor averaged over the sites that trained it (all of them in fedavg and only-b)."""
        before = [p.clone() for p in self.params]
        trained = {s: set(select(self.manifest, plans[s]["train"])) for s in updates}
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in range(len(self.params)):
            who = tuple(s for s in sorted(updates) if i in trained[s])
            if who:
                groups.setdefault(who, []).append(i)
        for who, idx in groups.items():
            mean = aggregate_tensors(
                [[updates[s][i] for i in idx] for s in who],
                example_weights(plans, who),
                self.kcfg.aggregator,
                self.kcfg.trim_frac,
            )
            for i, d in zip(idx, mean):
                self.params[i].add_(d)
        if self.lcfg.mode == "ab-groups":
            return {"refactor": 0.0}
        sites = sorted(updates)
        deltas = [updates[s] for s in sites]
        gap = lora.product_gap(before, self.params, deltas, example_weights(plans, sites), self.pairs, self.scales)
        return {"product_gap": gap, "refactor": 0.0}

    def _merge_products(self, updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]) -> dict[str, float]:
        """Per layer: the (weighted or robust) mean of s B_i A_i, truncated and re-split (``exact``)."""
        sites = sorted(updates)
        weights = example_weights(plans, sites)
        total = sum(weights)
        kept, energy, tail = [], 0.0, 0.0
        for (ia, ib), scale in zip(self.pairs, self.scales):
            a_i = [(self.params[ia] + updates[s][ia]).double() for s in sites]
            b_i = [(self.params[ib] + updates[s][ib]).double() for s in sites]
            if self.kcfg.aggregator == "mean":
                u, sv, vh = lora.svd_of_sum([scale * w / total * b for w, b in zip(weights, b_i)], a_i)
            else:  # robust statistics need the dense products, coordinate by coordinate
                (mean,) = aggregate_tensors(
                    [[scale * b @ a] for b, a in zip(b_i, a_i)], weights, self.kcfg.aggregator, self.kcfg.trim_frac
                )
                u, sv, vh = torch.linalg.svd(mean.double(), full_matrices=False)
            b, a, k = lora.resplit(u, sv, vh, rank=self.params[ia].shape[0], cutoff=self.lcfg.svd_cutoff, scale=scale)
            self.params[ia].copy_(a)
            self.params[ib].copy_(b)
            kept.append(k)
            energy += float(sv.pow(2).sum())
            tail += float(sv[k:].pow(2).sum())  # the kept components are the k largest
        return {
            "refactor": 1.0,
            "svd_rank": sum(kept) / len(kept),
            "svd_tail": math.sqrt(tail / energy) if energy > 0 else 0.0,
        }


class LowrankClient(WeightsClient):
    """A site: K local steps on the factors its plan selects (both, ``lora_A`` or ``lora_B``).

    In a full-rank round: D steps on the adapted layers' dense weights instead.
    """

    def __init__(self, cfg: RunConfig, ctx: ClientContext) -> None:
        super().__init__(cfg, ctx)
        self.pairs = lora.lora_pairs(self.manifest)  # fail at start, not in round 1, when the model has no LoRA factors
        self.dense_shapes = lora.dense_shapes(self.manifest, self.pairs)

    def base_weights(self) -> list[torch.Tensor]:
        """The frozen weight W0 of every adapted layer (the module under each LoRA pair), in pair order."""
        out = []
        for (ia, _), shape in zip(self.pairs, self.dense_shapes):
            name = self.manifest.entries[ia].name
            layer: Any = self.ctx.model.get_submodule(name.split(".lora_A.", 1)[0])
            weight = layer.get_base_layer().weight
            if tuple(weight.shape) != shape:
                raise ValueError(
                    f"full-rank phase: {name.split('.lora_A.', 1)[0]} has a weight of shape {tuple(weight.shape)}, "
                    f"expected (out, in) = {shape} (a Linear layer)"
                )
            out.append(weight)
        return out

    def step(self, phase: str, msg: Payload, state: Payload) -> tuple[Payload, Payload]:
        if phase != "train":
            raise ValueError(f"lowrank has no phase {phase!r}")
        plan, start = self.load_global(msg)
        return self.train_and_reply(plan, start), state

    def train_and_reply(self, plan: dict[str, Any], start: list[torch.Tensor]) -> Payload:
        if plan["train"] != FULL_RANK:
            return super().train_and_reply(plan, start)
        # AB-training's full-rank phase: train W0 + s B A + dW with the factors frozen, send dW, restore W0.
        weights = self.base_weights()
        saved = [w.detach().clone() for w in weights]
        flags = [w.requires_grad for w in weights]
        try:
            for w in weights:
                w.requires_grad_(True)
            losses = self.train_plan(plan, weights)  # the shared local steps (kavg.grad_accum_steps included)
            deltas = [w.detach().to("cpu", torch.float32) - s.to("cpu", torch.float32) for w, s in zip(weights, saved)]
        finally:
            with torch.no_grad():
                for w, s, flag in zip(weights, saved, flags):
                    w.copy_(s)
                    w.requires_grad_(flag)
        return {"delta": encode_tensors(deltas, plan["up"]), "loss": sum(losses) / len(losses)}
