"""LoRA factor math (peft convention, B on the left): pairs, scales, products never formed densely.

Legend: O, I = out / in features of an adapted Linear, R = the rank, s = peft's scaling
``lora_alpha / r``. A layer's weight is W' = W + s B_OR A_RI. Used by lowrank (merging products,
screening in dW space) and dppf (the worker spread in dW space).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgetune.models.params import Manifest


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


def dense_shapes(manifest: Manifest, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(O, I) of each LoRA layer's weight: B is O x R, A is R x I."""
    return [(manifest.entries[ib].shape[0], manifest.entries[ia].shape[1]) for ia, ib in pairs]


def scaled_norm(terms: Sequence[tuple[float, float]], c: float) -> float:
    """sqrt(sum_layers (c lin + c^2 quad)^2): the dW-space norm of a site's deltas scaled by c."""
    return math.sqrt(sum((c * lin + c * c * quad) ** 2 for lin, quad in terms))


def shrink_factor(terms: Sequence[tuple[float, float]], bound: float) -> float:
    """The c in (0, 1] with scaled_norm(terms, c) = bound (to 1e-9), never above it."""
    full = scaled_norm(terms, 1.0)
    lo, hi = bound / full, 1.0  # n(c) <= c n(1) for c <= 1, so bound / n(1) is feasible
    for _ in range(60):
        mid = (lo + hi) / 2
        if scaled_norm(terms, mid) <= bound:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9 * hi:
            break
    return lo


def layer_scales(model: nn.Module, manifest: Manifest, pairs: Sequence[tuple[int, int]]) -> list[float]:
    """LoRA scaling s of every pair's layer, in pair order."""
    return [lora_scale(model, manifest.entries[a].name) for a, _ in pairs]


def delta_w_terms(
    params: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    scales: Sequence[float],
) -> list[tuple[float, float]]:
    """Per layer, (||s (dB A + B dA)||, ||s dB dA||) of factor deltas from the factors ``params``.

    s (B + dB)(A + dA) - s B A = s (dB A + B dA) + s dB dA, so ``scaled_norm`` of these terms bounds
    the change of every adapted weight (and equals it when one factor moves).
    """
    out = []
    for (ia, ib), scale in zip(pairs, scales):
        a, b, da, db = params[ia], params[ib], deltas[ia], deltas[ib]
        out.append((scale * norm_of_sum([db, b], [a, da]), scale * norm_of_sum([db], [da])))
    return out


def product_gap(
    before: Sequence[torch.Tensor],
    after: Sequence[torch.Tensor],
    deltas: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    pairs: Sequence[tuple[int, int]],
    scales: Sequence[float],
) -> float:
    """Bias of merging factors instead of products, relative to the mean update (all layers).

    ||s B' A' - mean_i s B_i A_i|| / ||mean_i s B_i A_i - s B A|| with (B, A) = ``before``, (B', A') =
    ``after`` and (B_i, A_i) = ``before`` + site i's ``deltas``; 0 up to rounding for only-b.
    """
    total = sum(weights)
    gap2 = move2 = 0.0
    for (ia, ib), scale in zip(pairs, scales):
        a_i = [before[ia] + d[ia] for d in deltas]
        b_i = [scale * w / total * (before[ib] + d[ib]) for d, w in zip(deltas, weights)]
        gap2 += norm_of_sum([scale * after[ib]] + [-b for b in b_i], [after[ia], *a_i]) ** 2
        move2 += norm_of_sum([*b_i, -scale * before[ib]], [*a_i, before[ia]]) ** 2
    return math.sqrt(gap2 / move2) if move2 > 0 else 0.0
