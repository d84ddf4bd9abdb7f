"""deft: sparse uplink with server-assigned partitions, two phases, error feedback.

Source: Yoon & Oh, "DEFT: Exploiting Gradient Norm Difference between Model Layers for Scalable
Gradient Sparsification", ICPP 2023 (doi 10.1145/3605573.3605609, arXiv 2307.03500; code
``kljp/deft``, ``DeftReducer``). DEFT's rotating leader is the server here, and the sparsified
vector is each site's K-step update (K-AVG local steps) plus its residual::

    setup   partitions p: every trainable tensor (manifest order, flattened); a tensor with
            s > D/N is cut into N contiguous chunks (sizes differ by <= 1). k = density * D.
    phase "norms"  (deft.allocation = "site-norms", the default)
      site    y <- theta_r; K local steps;  a = (y - theta_r) + e      (e: residual, 0 at first)
              send nu_{j,p} = ||a_p|| for every partition (bf16, 2 bytes each)
      server  nu_p = sum_j w_j nu_{j,p} / sum_j w_j     (kavg.aggregator: mean, trimmed or median)
    allocation (server)
            visit p by descending nu_p;  K_rem = k, N_rem = sum_p nu_p:
                k_p = min(s_p, max(1, floor(K_rem * nu_p / N_rem)));  K_rem -= k_p;  N_rem -= nu_p
            common C = {p : k_p = s_p}                   (sent whole; no selection, cost 0)
            LPT: c_p = s_p * log2(k_p) if k_p > 1 else s_p; largest c_p first into the least
            loaded of N bins;  site j (sorted ids) gets bin (r + j) mod N   (rotation)
    phase "indices"
      site    (deft.allocation = "applied": the K local steps and a happen here)
              send I_j = top-k_p(|a_p|) for every p in its bin
      server  I = U_j I_j  U  coords(C)        (bins are disjoint: |I| <= sum_p k_p ~ k)
    phase "values"
      site    send a[I];  e <- a with e[I] = a[I] - q(a[I])   (q: value codec; e = 0 without
              error feedback)
      server  theta[I] += sum_j w_j a_j[I] / sum_j w_j         (w_j: examples assigned, K x batch)

Two phases, because a coordinate must be averaged over every site, not only over the site that
picked it (a one-phase variant averages each coordinate over a single site). ``selector =
"topk"`` is the baseline through the same two phases: every site sends its top-k of |a| over all
D coordinates, and the union grows toward N * k ("gradient build-up").

Allocation. In the paper every worker computes k_p from the norms of its own current
error-feedback gradient a, and the rotating leader's k_p decide the bins. Here the server is the
leader and has no a of its own, so with ``deft.allocation = "site-norms"`` every site reports its
per-partition norms of this round's a first (one more exchange per round: the site trains in phase
"norms", then selects in phase "indices" once the bins are known), and the server allocates from
their mean. The only difference from the paper is that all sites select with the leader's k_p
(the paper's workers use their own). ``deft.allocation = "applied"`` (edgetune's earlier scheme,
two exchanges) uses nu_p = ||u_p||, u = last round's applied sparse mean (round 1: nu_p = s_p).
That norm is about sqrt(k_p) times the partition's top magnitudes, so the allocation feeds on its
own past choices and drifts away from partition size; the residual a starved partition keeps on
the site grows until its top values win again. Partitions are fixed by the number of sites in the
first round; the number of bins follows the sites of each round (with "site-norms": the sites whose
norms were accepted).

Wire (every integer list is LEB128 varints; ``comm/varint.py``)::

    down "norms":   plan, params (as kavg), nsplit
    up   "norms":   norms = nu_{j,p} for every partition (bf16), loss
    down "indices": round, run, sel, nsplit, k, bins = (partition id gap, k_p)*   ("site-norms")
                    plan, params (as kavg), sel, nsplit, k, bins                   ("applied", topk)
    up   "indices": idx = gaps of the sorted flat indices (first index, then differences >= 1),
                    about 1 byte per index at 1% density; loss (not with "site-norms": sent with the norms)
    down "values":  round, run, val, ef, n = |I|, union (as idx)
    up   "values":  values = a[I] with ``deft.value_codec`` (4 or 2 bytes per value)

Only sites whose norms were accepted are asked for indices, and only sites whose indices were
accepted are asked for values. Between the phases and rounds a site keeps a (``acc-<r>``) and
e (``res-<r>``) in its per-site store (``ClientContext.store``: ``<state_dir>/<run id>/deft``),
since the phases may run in different processes; ``state`` stays empty. A retried round starts
again from the residual of the round before, so a failed attempt never counts a residual twice.
A site zeroes its residual at the union once it has sent its values; if the server then rejects
or clips those values, that part of the site's update is lost (not carried to the next round).

Files: ``partitions.py`` (partitions, k_p, bins: the math), ``server.py``, ``client.py``.
"""

from edgetune.algorithms.deft.client import DeftClient
from edgetune.algorithms.deft.partitions import (
    Partitions,
    allocate_k,
    make_partitions,
    pack_bins,
    rotated_bin,
    selection_cost,
    size_gap,
)
from edgetune.algorithms.deft.server import NORMS_CODEC, DeftServer

__all__ = [
    "NORMS_CODEC",
    "DeftClient",
    "DeftServer",
    "Partitions",
    "allocate_k",
    "make_partitions",
    "pack_bins",
    "rotated_bin",
    "selection_cost",
    "size_gap",
]
