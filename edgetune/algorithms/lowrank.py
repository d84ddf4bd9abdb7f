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

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgetune.algorithms import screening
from edgetune.algorithms.base import ClientContext, ReplyRejected, RoundResult, ServerContext
from edgetune.algorithms.kavg import (
    WeightsClient,
    WeightsServer,
    aggregate_tensors,
    local_train,
    round_lr,
    select,
    site_batches,
)
from edgetune.comm import wire
from edgetune.comm.codecs import CodecError
from edgetune.comm.tensors import TENSOR_CODECS, decode_tensors, encode_tensors
from edgetune.comm.wire import Payload, WireError
from edgetune.config import RunConfig
from edgetune.models.params import Manifest

# ---- the math, as pure functions ------------------------------------------------------------------


def lora_pairs(manifest: Manifest) -> list[tuple[int, int]]:
    """Manifest indices (A, B) of each LoRA layer, paired by name (``...lora_A...`` / ``...lora_B...``).

    Raises ``ValueError`` unless every trainable tensor belongs to exactly one pair of shapes
    (R, I) and (O, R): lowrank needs ``model.trainable = "lora"``.
    """
    index = {e.name: e.index for e in manifest}
    pairs = []
    for e in manifest:
        if ".lora_A." not in e.name:
            continue
        b = index.get(e.name.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ValueError(f"LoRA factor {e.name} has no lora_B partner among the trainable tensors")
        a_shape, b_shape = e.shape, manifest.entries[b].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ValueError(f"LoRA pair {e.name}: shapes {a_shape} and {b_shape} are not (R, I) and (O, R)")
        pairs.append((e.index, b))
    paired = {i for pair in pairs for i in pair}
    others = [e.name for e in manifest if e.index not in paired]
    if not pairs or others:
        raise ValueError(
            "lowrank trains LoRA factor pairs only (set model.trainable = 'lora'); "
            f"found {len(pairs)} pairs and other trainable tensors {others[:3]}"
        )
    return pairs


def lora_scale(model: nn.Module, a_name: str) -> float:
    """LoRA scaling s (peft's ``scaling[adapter]``, lora_alpha / r) of the layer whose A factor is ``a_name``."""
    module_path, rest = a_name.split(".lora_A.", 1)
    adapter = rest.split(".")[0]
    layer: Any = model.get_submodule(module_path)
    return float(layer.scaling[adapter])


def norm_of_sum(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor]) -> float:
    """Frobenius norm of sum_j L_j R_j without forming it: ||P Q|| = ||Rp Q|| for P = Qp Rp.

    Parameters
    ----------
    lefts
        Matrices L_j (O x k_j).
    rights
        Matrices R_j (k_j x I).

    Returns
    -------
    float
        ||sum_j L_j R_j||_F, computed in float64.
    """
    p = torch.cat([t.double() for t in lefts], dim=1)
    q = torch.cat([t.double() for t in rights], dim=0)
    r = torch.linalg.qr(p, mode="r").R
    return float(torch.linalg.matrix_norm(r @ q))


def svd_of_sum(
    lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of M = sum_j L_j R_j through QR of the stacked factors (cost O((O + I) k^2), k = sum k_j).

    Parameters
    ----------
    lefts
        Matrices L_j (O x k_j), e.g. w_i s B_i / W.
    rights
        Matrices R_j (k_j x I), e.g. A_i.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        float64 U (O x m), S (m, descending), Vh (m x I) with M = U diag(S) Vh, m = min(O, I, k).
    """
    p = torch.cat([t.double() for t in lefts], dim=1)
    q = torch.cat([t.double() for t in rights], dim=0)
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    uc, s, vch = torch.linalg.svd(rp @ rq.T, full_matrices=False)
    return qp @ uc, s, vch @ qq.T


def resplit(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, *, rank: int, cutoff: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Balanced rank-``rank`` factors of U diag(S) Vh in LoRA's convention (s B A = the truncation).

    Parameters
    ----------
    u, s, vh
        Thin SVD of the target product (already including LoRA's scale).
    rank
        R: the factors keep this shape whatever is kept.
    cutoff
        Zero the components with s_j <= cutoff * s_1 (0: keep the top R).
    scale
        LoRA scaling s = lora_alpha / r.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor, int]
        B (O x R), A (R x I) in float64, and the number of nonzero components kept.
    """
    k = min(rank, s.numel())
    top = s[:k].clone()
    if cutoff > 0 and k:
        top = torch.where(top > cutoff * s[0], top, torch.zeros_like(top))
    root = (top / scale).sqrt()
    b = u.new_zeros(u.shape[0], rank)
    a = vh.new_zeros(rank, vh.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a, int((top > 0).sum())


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
    nb, na, kept = resplit(u, sv, vh, rank=a.shape[0], cutoff=cutoff, scale=scale)
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
        self.pairs = lora_pairs(self.manifest)
        self.scales = [lora_scale(self.model, self.manifest.entries[a].name) for a, _ in self.pairs]
        self.screen = cfg.kavg
        # kavg screens factor-delta norms, which a rescaling (cB, A/c) moves at will; lowrank
        # screens in dW space (``aggregate``) and switches the factor screens of the base off.
        self.kcfg = dataclasses.replace(cfg.kavg, outlier_mult=0.0, clip_norm=0.0, clip_mult=0.0)
        self._screened: dict[str, list[torch.Tensor]] = {}
        self.dense_shapes = dense_shapes(self.manifest, self.pairs)
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

    def delta_w_terms(
        self, full: Sequence[torch.Tensor], plan: dict[str, Any] | None = None
    ) -> list[tuple[float, float]]:
        """Per LoRA layer, (||s (dB A + B dA)||, ||s dB dA||) of one site's full delta list.

        A full-rank round's dense deltas give (||dW||, 0).
        """
        if plan is not None and plan["train"] == FULL_RANK:
            return [(float(d.double().norm()), 0.0) for d in full]
        out = []
        for (ia, ib), scale in zip(self.pairs, self.scales):
            a, b, da, db = self.params[ia], self.params[ib], full[ia], full[ib]
            out.append((scale * norm_of_sum([db, b], [a, da]), scale * norm_of_sum([db], [da])))
        return out

    def _decode(self, site: str, payload: Payload, plan: dict[str, Any]) -> list[torch.Tensor]:
        """A reply's deltas: the trained factors, or one dense dW per adapted layer in a full-rank round."""
        if plan["train"] == FULL_RANK:
            wire.require(payload, {"delta": bytes, "loss": float}, where=f"{site} reply")
            return decode_tensors(payload["delta"], self.dense_shapes, plan["up"], where=f"{site} full-rank update")
        return super()._validate(site, payload, plan)

    def _validate(self, site: str, payload: Payload, plan: dict[str, Any]) -> list[torch.Tensor]:
        if site in self._screened:  # decoded (and clipped) once, in ``aggregate``
            return self._screened.pop(site)
        return self._decode(site, payload, plan)

    def _expand(self, deltas: list[torch.Tensor], plan: dict[str, Any]) -> list[torch.Tensor]:
        if plan["train"] == FULL_RANK:
            return deltas  # one dense delta per adapted layer, not per trainable tensor
        return super()._expand(deltas, plan)

    def aggregate(self, round_idx: int, phase: str, replies: dict[str, Payload], *, min_sites: int) -> RoundResult:
        self._screened = {}
        for site in sorted(replies):
            if site in self._plans:
                try:
                    self._screened[site] = self._decode(site, replies[site], self._plans[site])
                except (WireError, CodecError, ReplyRejected):
                    pass  # the base class rejects it again, with the same reason
        terms = {
            s: self.delta_w_terms(self._expand(d, self._plans[s]), self._plans[s]) for s, d in self._screened.items()
        }
        norms = {s: _scaled_norm(t, 1.0) for s, t in terms.items()}
        rejected: dict[str, str] = {}
        if self.screen.outlier_mult and len(norms) >= 3:
            med = sorted(norms.values())[len(norms) // 2]
            for s, n in norms.items():
                if med > 0 and n > self.screen.outlier_mult * med:
                    rejected[s] = (
                        f"update norm in dW = s*B*A space {n:.4g} is {n / med:.0f}x the median site's {med:.4g}"
                    )
        # fixed or adaptive clip in dW space (screening.py), in every federation size
        bound = screening.clip_bound(
            {s: n for s, n in norms.items() if s not in rejected},
            clip_norm=self.screen.clip_norm,
            clip_mult=self.screen.clip_mult,
        )
        for s, n in list(norms.items()):
            if s not in rejected and n > bound:
                c = _shrink_factor(terms[s], bound)
                for t in self._screened[s]:
                    t.mul_(c)
                norms[s] = _scaled_norm(terms[s], c)
        for s in rejected:
            del self._screened[s]
        result = super().aggregate(
            round_idx, phase, {s: p for s, p in replies.items() if s not in rejected}, min_sites=min_sites
        )
        self._screened = {}
        result.rejected.update(rejected)
        if result.committed:
            result.metrics["num_rejected"] = float(len(result.rejected))
            result.metrics["mean_delta_w_norm"] = sum(norms[s] for s in result.accepted) / len(result.accepted)
            result.metrics["lr"] = self.round_lr(round_idx)
        return result

    def step_bound(self, round_idx: int, norms: Sequence[float], clipped_norms: Sequence[float]) -> float:
        """No factor-space bound where the merged products are re-split (any rotation of the factors).

        Only finiteness is checked there; rounds that average factors keep the base class's bound.
        """
        if self.refactor_round(round_idx):
            return math.inf
        return super().step_bound(round_idx, norms, clipped_norms)

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
        weights = self._weights(sites, plans)
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

    def _weights(self, sites: Sequence[str], plans: dict[str, dict]) -> list[float]:
        return [float(plans[s]["K"] * plans[s]["bs"]) for s in sites]

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
                self._weights(who, plans),
                self.kcfg.aggregator,
                self.kcfg.trim_frac,
            )
            for i, d in zip(idx, mean):
                self.params[i].add_(d)
        if self.lcfg.mode == "ab-groups":
            return {"refactor": 0.0}
        return {"product_gap": self._product_gap(before, updates, plans), "refactor": 0.0}

    def _product_gap(
        self, before: list[torch.Tensor], updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]
    ) -> float:
        """Bias of merging factors instead of products, relative to the mean update (all layers).

        ||s B' A' - mean_i s B_i A_i|| / ||mean_i s B_i A_i - s B A||; 0 up to rounding for only-b.
        """
        sites = sorted(updates)
        weights = self._weights(sites, plans)
        total = sum(weights)
        gap2 = move2 = 0.0
        for (ia, ib), scale in zip(self.pairs, self.scales):
            a_i = [before[ia] + updates[s][ia] for s in sites]
            b_i = [scale * w / total * (before[ib] + updates[s][ib]) for s, w in zip(sites, weights)]
            gap2 += norm_of_sum([scale * self.params[ib]] + [-b for b in b_i], [self.params[ia], *a_i]) ** 2
            move2 += norm_of_sum([*b_i, -scale * before[ib]], [*a_i, before[ia]]) ** 2
        return math.sqrt(gap2 / move2) if move2 > 0 else 0.0

    def _merge_products(self, updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]) -> dict[str, float]:
        """Per layer: the (weighted or robust) mean of s B_i A_i, truncated and re-split (``exact``)."""
        sites = sorted(updates)
        weights = self._weights(sites, plans)
        total = sum(weights)
        kept, energy, tail = [], 0.0, 0.0
        for (ia, ib), scale in zip(self.pairs, self.scales):
            a_i = [(self.params[ia] + updates[s][ia]).double() for s in sites]
            b_i = [(self.params[ib] + updates[s][ib]).double() for s in sites]
            if self.kcfg.aggregator == "mean":
                u, sv, vh = svd_of_sum([scale * w / total * b for w, b in zip(weights, b_i)], a_i)
            else:  # robust statistics need the dense products, coordinate by coordinate
                (mean,) = aggregate_tensors(
                    [[scale * b @ a] for b, a in zip(b_i, a_i)], weights, self.kcfg.aggregator, self.kcfg.trim_frac
                )
                u, sv, vh = torch.linalg.svd(mean.double(), full_matrices=False)
            b, a, k = resplit(u, sv, vh, rank=self.params[ia].shape[0], cutoff=self.lcfg.svd_cutoff, scale=scale)
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


FULL_RANK = "full-rank"
"""The plan's ``train`` selector of a full-rank round: dense deltas of the adapted layers' weights."""


def dense_shapes(manifest: Manifest, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(O, I) of each LoRA layer's weight: B is O x R, A is R x I."""
    return [(manifest.entries[ib].shape[0], manifest.entries[ia].shape[1]) for ia, ib in pairs]


def _scaled_norm(terms: Sequence[tuple[float, float]], c: float) -> float:
    """sqrt(sum_layers (c lin + c^2 quad)^2): the dW-space norm of a site's deltas scaled by c."""
    return math.sqrt(sum((c * lin + c * c * quad) ** 2 for lin, quad in terms))


def _shrink_factor(terms: Sequence[tuple[float, float]], bound: float) -> float:
    """The c in (0, 1] with _scaled_norm(terms, c) = bound (to 1e-9), never above it."""
    full = _scaled_norm(terms, 1.0)
    lo, hi = bound / full, 1.0  # n(c) <= c n(1) for c <= 1, so bound / n(1) is feasible
    for _ in range(60):
        mid = (lo + hi) / 2
        if _scaled_norm(terms, mid) <= bound:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9 * hi:
            break
    return lo


class LowrankClient(WeightsClient):
    """A site: K local steps on the factors its plan selects (both, ``lora_A`` or ``lora_B``).

    In a full-rank round: D steps on the adapted layers' dense weights instead.
    """

    def __init__(self, cfg: RunConfig, ctx: ClientContext) -> None:
        super().__init__(cfg, ctx)
        self.pairs = lora_pairs(self.manifest)  # fail at start, not in round 1, when the model has no LoRA factors
        self.dense_shapes = dense_shapes(self.manifest, self.pairs)

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
            batches = site_batches(self.ctx, plan["seed"], plan["round"], plan["K"], plan["bs"])
            losses = local_train(
                self.ctx.model,
                weights,
                batches,
                lr=plan["lr"],
                optimizer=plan["opt"],
                momentum=plan["mom"],
                weight_decay=plan["wd"],
            )
            deltas = [w.detach().to("cpu", torch.float32) - s.to("cpu", torch.float32) for w, s in zip(weights, saved)]
        finally:
            with torch.no_grad():
                for w, s, flag in zip(weights, saved, flags):
                    w.copy_(s)
                    w.requires_grad_(flag)
        return {"delta": encode_tensors(deltas, plan["up"]), "loss": sum(losses) / len(losses)}
