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

Wire (every integer list is LEB128 varints; ``encode_varints``)::

    down "norms":   plan, params (as kavg), nsplit
    up   "norms":   norms = nu_{j,p} for every partition (bf16), loss
    down "indices": round, run, sel, nsplit, k, bins = (partition id gap, k_p)*   ("site-norms")
                    plan, params (as kavg), sel, nsplit, k, bins                   ("applied", topk)
    up   "indices": idx = gaps of the sorted flat indices (first index, then differences >= 1),
                    about 1 byte per index at 1% density; loss (not with "site-norms": sent with the norms)
    down "values":  round, run, val, ef, n = |I|, union (as idx)
    up   "values":  values = a[I] with ``deft.value_codec`` (4 or 2 bytes per value)

Only sites whose norms were accepted are asked for indices, and only sites whose indices were
accepted are asked for values. Between the phases and rounds a
site keeps a (``acc-<r>.npy``) and e (``res-<r>.npy``) under ``ClientContext.state_dir / <run id> /
deft``, since the two phases may run in different processes (without a ``state_dir``: the process
workdir, which is enough in one process only); ``state`` stays empty. A retried round starts
again from the residual of the round before, so a failed attempt never counts a residual twice.
A site zeroes its residual at the union once it has sent its values; if the server then rejects
or clips those values, that part of the site's update is lost (not carried to the next round).
"""

from __future__ import annotations

import heapq
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.algorithms import screening
from edgetune.algorithms.base import ClientContext, ReplyRejected, RoundResult, ServerContext
from edgetune.algorithms.kavg import (
    WeightsClient,
    WeightsServer,
    aggregate_tensors,
    select,
)
from edgetune.comm import wire
from edgetune.comm.codecs import CodecError
from edgetune.comm.tensors import TENSOR_CODECS, decode_tensors, encode_tensors
from edgetune.comm.wire import Payload, WireError
from edgetune.config import RunConfig
from edgetune.io import prune_sibling_runs
from edgetune.models.params import trainable_tensors

NORMS_CODEC = "bf16"
"""Codec of the per-partition norms sites report: 2 bytes each, fp32's range (k_p needs ~3 digits)."""
MAX_VARINT_BYTES = 5
"""35 bits: any flat index of a model with fewer than 34 G trainable parameters."""
REPLY_FRAMING_BYTES = 256
"""Room for the wire framing around a reply's one or two fields."""
_RUN_HEX = re.compile(r"[0-9a-f]{8,64}")

# ---- integer lists on the wire ------------------------------------------------------------------


def encode_varints(values: np.ndarray) -> bytes:
    """Non-negative integers -> unsigned LEB128 varints, back to back.

    Parameters
    ----------
    values
        Integers in [0, 2**35).

    Returns
    -------
    bytes
        1 byte per value below 128, 2 below 16384, ..., at most ``MAX_VARINT_BYTES``.
    """
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size == 0:
        return b""
    if int(v.min()) < 0 or int(v.max()) >= 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError(f"varint values must be in [0, 2**{7 * MAX_VARINT_BYTES})")
    num_bytes = np.ones(v.size, dtype=np.int64)
    for b in range(1, MAX_VARINT_BYTES):
        num_bytes += v >= 1 << (7 * b)
    ends = np.cumsum(num_bytes)
    starts = ends - num_bytes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for b in range(MAX_VARINT_BYTES):
        m = num_bytes > b
        if not m.any():
            break
        low7 = (v[m] >> (7 * b)) & 0x7F
        more = (num_bytes[m] > b + 1).astype(np.int64) << 7
        out[starts[m] + b] = (low7 | more).astype(np.uint8)
    return out.tobytes()


def decode_varints(blob: bytes, *, max_count: int, where: str) -> np.ndarray:
    """Inverse of ``encode_varints``; refuses more than ``max_count`` values before decoding them.

    Parameters
    ----------
    blob
        The encoded integers.
    max_count
        Most values accepted.
    where
        Names the field in error messages.

    Returns
    -------
    np.ndarray
        int64 values.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise CodecError(f"{where}: expected bytes, got {type(blob).__name__}")
    raw = np.frombuffer(bytes(blob), dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = np.flatnonzero(raw < 0x80)
    if last.size > max_count:
        raise CodecError(f"{where}: {last.size} values, at most {max_count} allowed")
    if raw[-1] >= 0x80:
        raise CodecError(f"{where}: ends inside a number")
    first = np.concatenate(([0], last[:-1] + 1))
    lengths = last - first + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise CodecError(f"{where}: a number longer than {MAX_VARINT_BYTES} bytes")
    if np.any((lengths > 1) & (raw[last] == 0)):
        raise CodecError(f"{where}: a number is not minimally encoded")
    shift = 7 * (np.arange(raw.size) - np.repeat(first, lengths))
    return np.add.reduceat((raw & 0x7F).astype(np.int64) << shift, first)


def encode_indices(idx: np.ndarray) -> bytes:
    """Strictly increasing flat indices -> varints of the first index and the differences."""
    v = np.asarray(idx, dtype=np.int64)
    gaps = np.diff(v, prepend=0)
    if v.size and (v[0] < 0 or (gaps[1:] < 1).any()):
        raise ValueError("indices must be non-negative and strictly increasing")
    return encode_varints(gaps)


def decode_indices(blob: bytes, *, dim: int, max_count: int, where: str) -> np.ndarray:
    """Decode ``encode_indices`` and check: at most ``max_count``, strictly increasing, < ``dim``.

    Parameters
    ----------
    blob
        The encoded indices.
    dim
        Length of the flat vector the indices point into.
    max_count
        Most indices accepted.
    where
        Names the payload in error messages.

    Returns
    -------
    np.ndarray
        Sorted, unique int64 indices in [0, dim). An unsorted list cannot be encoded (the
        differences are unsigned); a repeated index is a difference of 0 and is refused.
    """
    gaps = decode_varints(blob, max_count=max_count, where=where)
    if gaps.size > 1 and int(gaps[1:].min()) < 1:
        raise CodecError(f"{where}: indices are not strictly increasing (a repeated index)")
    if gaps.size and int(gaps.max()) >= dim:
        raise CodecError(f"{where}: index out of range (a step of {int(gaps.max())}, dimension {dim})")
    idx = np.cumsum(gaps)
    if idx.size and int(idx[-1]) >= dim:
        raise CodecError(f"{where}: index {int(idx[-1])} out of range (dimension {dim})")
    return idx


# ---- partitions, per-partition k, bins ----------------------------------------------------------


@dataclass(frozen=True)
class Partitions:
    """Contiguous ranges of the flat trainable vector, in manifest order."""

    starts: np.ndarray
    sizes: np.ndarray
    tensor: np.ndarray
    """Manifest index of the tensor each partition lies in."""
    num_chunks: int
    """N of the split rule (the number of sites when the partitions were made)."""

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def dim(self) -> int:
        return int(self.sizes.sum())

    def of(self, idx: np.ndarray) -> np.ndarray:
        """Partition id of each flat index."""
        return np.searchsorted(self.starts, idx, side="right") - 1

    def coords(self, pids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Every flat index of the partitions ``pids``, sorted."""
        parts = [np.arange(self.starts[p], self.starts[p] + self.sizes[p]) for p in sorted(pids)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def make_partitions(numels: Sequence[int], num_chunks: int) -> Partitions:
    """DEFT's two-stage partitioning: one partition per tensor, tensors above D/N cut in N chunks.

    Parameters
    ----------
    numels
        Element counts of the trainable tensors, in manifest order.
    num_chunks
        N (the number of sites); a tensor with fewer than N elements is cut into one per element.

    Returns
    -------
    Partitions
        Every flat coordinate in exactly one partition; chunk sizes of a tensor differ by <= 1.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    dim = sum(numels)
    starts, sizes, tensor = [], [], []
    offset = 0
    for t, n in enumerate(numels):
        pieces = min(num_chunks, n) if n * num_chunks > dim else 1
        for c in range(pieces):
            size = n // pieces + (1 if c < n % pieces else 0)
            starts.append(offset)
            sizes.append(size)
            tensor.append(t)
            offset += size
    return Partitions(np.array(starts, np.int64), np.array(sizes, np.int64), np.array(tensor, np.int64), num_chunks)


def allocate_k(nu: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """DEFT's norm-proportional k_p (module docstring), visiting partitions by descending ``nu``.

    Parameters
    ----------
    nu
        Non-negative weight per partition (norms; all zero falls back to the sizes).
    sizes
        s_p.
    k
        Total budget.

    Returns
    -------
    np.ndarray
        int64 k_p with 1 <= k_p <= s_p; the sum is k unless a bound binds.
    """
    nu = np.asarray(nu, dtype=np.float64)
    if not np.all(np.isfinite(nu)) or float(nu.sum()) <= 0:
        nu = sizes.astype(np.float64)
    order = np.argsort(-nu, kind="stable")
    # N_rem as suffix sums of the visiting order, so the last partition sees nu_p / N_rem = 1 exactly.
    remaining = np.cumsum(nu[order][::-1])[::-1]
    kp = np.zeros(len(sizes), dtype=np.int64)
    k_rem = int(k)
    for p, n_rem in zip(order, remaining):
        share = math.floor(k_rem * nu[p] / n_rem) if n_rem > 0 else 0
        kp[p] = min(int(sizes[p]), max(1, min(share, k_rem)))
        k_rem -= int(kp[p])
    return kp


def selection_cost(sizes: np.ndarray, kp: np.ndarray) -> np.ndarray:
    """DEFT's cost model of top-k_p on s_p values: s_p log2 k_p (k_p > 1), else s_p."""
    return np.where(kp > 1, sizes * np.log2(np.maximum(kp, 2)), sizes).astype(np.float64)


def pack_bins(costs: np.ndarray, pids: Sequence[int] | np.ndarray, num_bins: int) -> list[np.ndarray]:
    """Greedy LPT: largest cost first (ties: lower id), into the least-loaded bin (ties: lower bin).

    Returns
    -------
    list[np.ndarray]
        ``num_bins`` sorted arrays of partition ids; disjoint, covering ``pids``.
    """
    heap = [(0.0, b) for b in range(num_bins)]
    members: list[list[int]] = [[] for _ in range(num_bins)]
    for p in sorted(pids, key=lambda q: (-costs[q], q)):
        load, b = heapq.heappop(heap)
        members[b].append(int(p))
        heapq.heappush(heap, (load + float(costs[p]), b))
    return [np.array(sorted(m), dtype=np.int64) for m in members]


def rotated_bin(round_idx: int, site_pos: int, num_bins: int) -> int:
    """Bin of the site at position ``site_pos`` of the sorted site ids: (r + j) mod N."""
    return (round_idx + site_pos) % num_bins


# ---- server -------------------------------------------------------------------------------------


@dataclass
class _RoundState:
    """What the server keeps between the two phases of one round."""

    round_idx: int
    plans: dict[str, dict[str, Any]]
    budget: dict[str, int]
    """Most indices each site may send."""
    bins: dict[str, np.ndarray] = field(default_factory=dict)
    """deft: partition ids each site selects in."""
    kp: np.ndarray | None = None
    common: np.ndarray | None = None
    union: np.ndarray | None = None
    union_blob: bytes = b""
    senders: tuple[str, ...] = ()
    """Sites whose indices were accepted: the only ones asked for values."""
    site_norms: bool = False
    """The round has a "norms" phase; the indices message then carries no parameters."""


def size_gap(kp: np.ndarray, sizes: np.ndarray) -> float:
    """Total variation between the budget shares k_p / sum k_p and the size shares s_p / D (0: k_p ~ s_p)."""
    return 0.5 * float(np.abs(kp / kp.sum() - sizes / sizes.sum()).sum())


class DeftServer(WeightsServer):
    """Plans partitions, k_p and rotating bins; takes the index union; applies the sparse mean."""

    phases: tuple[str, ...] = ("indices", "values")

    def __init__(self, cfg: RunConfig, ctx: ServerContext) -> None:
        super().__init__(cfg, ctx)
        self.dcfg = cfg.deft
        self.site_norms = self.dcfg.selector == "deft" and self.dcfg.allocation == "site-norms"
        if self.site_norms:
            self.phases = ("norms", "indices", "values")
        self.numels = [e.numel for e in self.manifest]
        self.dim = sum(self.numels)
        self.k = min(self.dim, max(1, math.floor(self.dcfg.density * self.dim)))
        self.parts: Partitions | None = None
        """Fixed at the first round, from its number of sites."""
        self.parts_sites = 0
        self.nu: np.ndarray | None = None
        """Per-partition norm of the last applied update (None: sizes)."""
        self.round: _RoundState | None = None

    def extra_state(self) -> dict[str, Any]:
        return {
            "nu": None if self.nu is None else [float(x) for x in self.nu],
            "parts_sites": None if self.parts is None else self.parts_sites,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.nu = None if state.get("nu") is None else np.asarray(state["nu"], dtype=np.float64)
        if state.get("parts_sites"):
            self.parts_sites = int(state["parts_sites"])
            self.parts = make_partitions(self.numels, self.parts_sites)

    def plan_round(self, round_idx: int, site_ids: list[str]) -> _RoundState:
        """Partitions (first call) and plans for one round; with ``applied`` also k_p and the bins."""
        sites = sorted(site_ids)
        plans = {s: self.site_plan(round_idx, s, sites) for s in sites}
        if self.dcfg.selector == "topk":
            return _RoundState(round_idx, plans, {s: self.k for s in sites})
        if self.parts is None:
            self.parts_sites = max(1, len(sites))
            self.parts = make_partitions(self.numels, self.parts_sites)
        st = _RoundState(round_idx, plans, {}, site_norms=self.site_norms)
        if not self.site_norms:
            self.allocate(st, self.nu if self.nu is not None else self.parts.sizes, sites)
        return st

    def allocate(self, st: _RoundState, nu: np.ndarray, sites: list[str]) -> None:
        """k_p from the partition weights ``nu``, the common set, LPT bins and their rotation over ``sites``."""
        assert self.parts is not None
        parts = self.parts
        kp = allocate_k(nu, parts.sizes, self.k)
        common = np.flatnonzero(kp == parts.sizes)
        rest = np.flatnonzero(kp < parts.sizes)
        bins = pack_bins(selection_cost(parts.sizes, kp), rest, max(1, len(sites)))
        st.bins = {s: bins[rotated_bin(st.round_idx, j, len(bins))] for j, s in enumerate(sorted(sites))}
        st.budget = {s: int(kp[b].sum()) for s, b in st.bins.items()}
        st.kp, st.common = kp, common

    # ---- protocol --------------------------------------------------------------------------------

    def max_reply_bytes(self, phase: str) -> int:
        st = self.round
        if st is None:
            return REPLY_FRAMING_BYTES
        if phase == "norms":
            return TENSOR_CODECS[NORMS_CODEC].nbytes((len(self.parts) if self.parts else 0,)) + REPLY_FRAMING_BYTES
        if phase == "indices":
            return MAX_VARINT_BYTES * max(st.budget.values(), default=0) + REPLY_FRAMING_BYTES
        n = 0 if st.union is None else len(st.union)
        return TENSOR_CODECS[self.dcfg.value_codec].nbytes((n,)) + REPLY_FRAMING_BYTES

    def configure(self, round_idx: int, phase: str, site_ids: list[str]) -> dict[str, Payload]:
        if phase == "norms":
            self.round = st = self.plan_round(round_idx, site_ids)
            assert self.parts is not None
            blob = self._params_blob(round_idx)
            return {
                s: {"plan": wire.encode(st.plans[s]), "params": blob, "nsplit": self.parts.num_chunks} for s in st.plans
            }
        if phase == "indices":
            if not self.site_norms:
                self.round = self.plan_round(round_idx, site_ids)
            cur = self.round
            assert cur is not None and cur.round_idx == round_idx, "indices before norms"
            assert cur.kp is not None or not self.site_norms, "indices before norms"
            blob = b"" if self.site_norms else self._params_blob(round_idx)
            out = {}
            for s in cur.budget:
                if s not in site_ids:
                    continue
                pairs = b""
                if cur.kp is not None:
                    ids = cur.bins[s]
                    pairs = encode_varints(np.stack([np.diff(ids, prepend=0), cur.kp[ids]], axis=1))
                head: Payload = (
                    {"round": round_idx, "run": self.ctx.run_id.hex()}
                    if self.site_norms
                    else {"plan": wire.encode(cur.plans[s]), "params": blob}
                )
                out[s] = {
                    **head,
                    "sel": self.dcfg.selector,
                    "nsplit": self.parts.num_chunks if self.parts is not None else 0,
                    "k": cur.budget[s],
                    "bins": pairs,
                }
            return out
        if phase != "values":
            raise ValueError(f"deft has no phase {phase!r}")
        now = self.round
        assert now is not None and now.round_idx == round_idx and now.union is not None, "values before indices"
        head = {
            "round": round_idx,
            "run": self.ctx.run_id.hex(),
            "val": self.dcfg.value_codec,
            "ef": bool(self.dcfg.error_feedback),
            "n": len(now.union),
            "union": now.union_blob,
        }
        return {s: dict(head) for s in now.senders if s in site_ids}

    def aggregate(self, round_idx: int, phase: str, replies: dict[str, Payload], *, min_sites: int) -> RoundResult:
        st = self.round
        assert st is not None and st.round_idx == round_idx, "aggregate without configure"
        if phase == "norms":
            return self._aggregate_norms(st, replies, min_sites)
        if phase == "indices":
            return self._aggregate_indices(st, replies, min_sites)
        result = self._aggregate_values(st, replies, min_sites)
        with torch.no_grad():  # the model also served as a site's scratch copy: always restore it
            for w, p in zip(trainable_tensors(self.model, self.manifest), self.params):
                w.copy_(p.to(w.device, w.dtype))
        return result

    def _site_norms(self, site: str, payload: Payload) -> torch.Tensor:
        assert self.parts is not None
        wire.require(payload, {"norms": bytes, "loss": float}, where=f"{site} norms")
        (norms,) = decode_tensors(payload["norms"], [(len(self.parts),)], NORMS_CODEC, where=f"{site} norms")
        if not bool(torch.isfinite(norms).all()) or bool((norms < 0).any()):
            raise ReplyRejected(f"{site} norms: a partition norm is negative or not finite")
        return norms

    def _aggregate_norms(self, st: _RoundState, replies: dict[str, Payload], min_sites: int) -> RoundResult:
        """Phase "norms": the sites' per-partition norms -> nu_p (their weighted mean) -> k_p and bins."""
        accepted: dict[str, torch.Tensor] = {}
        rejected: dict[str, str] = {}
        losses = []
        for site in sorted(replies):
            if site not in st.plans:
                rejected[site] = "reply from a site that was not asked"
                continue
            try:
                norms = self._site_norms(site, replies[site])
                losses.append(screening.reported_loss(site, replies[site]["loss"]))
                accepted[site] = norms
            except (WireError, CodecError, ReplyRejected, ValueError) as err:
                rejected[site] = str(err)
        if len(accepted) < min_sites:
            return RoundResult(False, {"num_accepted": float(len(accepted))}, rejected)
        sites = sorted(accepted)
        weights = [float(st.plans[s]["K"] * st.plans[s]["bs"]) for s in sites]
        kc = self.kcfg
        nu = aggregate_tensors([[accepted[s]] for s in sites], weights, kc.aggregator, kc.trim_frac)[0]
        self.allocate(st, nu.double().numpy(), sites)
        metrics = {
            "train_loss": sum(losses) / len(losses),
            "num_accepted": float(len(accepted)),
            "num_rejected": float(len(rejected)),
        }
        return RoundResult(True, metrics, rejected, tuple(sites))

    def _site_indices(self, st: _RoundState, site: str, payload: Payload) -> np.ndarray:
        schema: dict[str, type] = {"idx": bytes} if st.site_norms else {"idx": bytes, "loss": float}
        wire.require(payload, schema, where=f"{site} indices")
        idx = decode_indices(payload["idx"], dim=self.dim, max_count=st.budget[site], where=f"{site} indices")
        if st.kp is not None and self.parts is not None and idx.size:
            pid = self.parts.of(idx)
            allowed = np.zeros(len(self.parts), dtype=bool)
            allowed[st.bins[site]] = True
            outside = ~allowed[pid]
            if outside.any():
                first = int(np.flatnonzero(outside)[0])
                raise ReplyRejected(
                    f"{site} indices: index {int(idx[first])} lies in partition "
                    f"{int(pid[first])}, which is not in its bin"
                )
            counts = np.bincount(pid, minlength=len(self.parts))
            over = np.flatnonzero(counts > st.kp)
            if over.size:
                p = int(over[0])
                raise ReplyRejected(f"{site} indices: {int(counts[p])} in partition {p}, k_p = {int(st.kp[p])}")
        return idx

    def _aggregate_indices(self, st: _RoundState, replies: dict[str, Payload], min_sites: int) -> RoundResult:
        accepted: dict[str, np.ndarray] = {}
        rejected: dict[str, str] = {}
        losses = []
        for site in sorted(replies):
            if site not in st.budget:
                rejected[site] = "reply from a site that was not asked"
                continue
            try:
                idx = self._site_indices(st, site, replies[site])
                loss = None if st.site_norms else screening.reported_loss(site, replies[site]["loss"])
                accepted[site] = idx
                if loss is not None:
                    losses.append(loss)
            except (WireError, CodecError, ReplyRejected, ValueError) as err:
                rejected[site] = str(err)
        if len(accepted) < min_sites:
            return RoundResult(False, {"num_accepted": float(len(accepted))}, rejected)
        common = np.zeros(0, np.int64)
        if st.common is not None and self.parts is not None:
            common = self.parts.coords(st.common)
        st.union = np.unique(np.concatenate([*accepted.values(), common]))
        st.union_blob = encode_indices(st.union)
        st.senders = tuple(sorted(accepted))
        metrics = {
            **({"train_loss": sum(losses) / len(losses)} if losses else {}),
            "num_accepted": float(len(accepted)),
            "num_rejected": float(len(rejected)),
            "k": float(self.k),
            "union_size": float(len(st.union)),
            "union_over_k": len(st.union) / self.k,
            "mean_site_indices": sum(len(v) for v in accepted.values()) / len(accepted),
        }
        if st.kp is not None and self.parts is not None:
            loads = [float(selection_cost(self.parts.sizes[b], st.kp[b]).sum()) for b in st.bins.values()]
            metrics.update(
                {
                    "num_partitions": float(len(self.parts)),
                    "k_sum": float(st.kp.sum()),
                    "common_size": float(len(common)),
                    "bin_load_max_over_mean": max(loads) / (sum(loads) / len(loads)) if sum(loads) else 1.0,
                    "kp_size_gap": size_gap(st.kp, self.parts.sizes),
                }
            )
        return RoundResult(True, metrics, rejected, st.senders)

    def _aggregate_values(self, st: _RoundState, replies: dict[str, Payload], min_sites: int) -> RoundResult:
        assert st.union is not None
        accepted: dict[str, torch.Tensor] = {}
        rejected: dict[str, str] = {}
        for site in sorted(replies):
            if site not in st.senders:
                rejected[site] = "values from a site that was not asked"
                continue
            try:
                wire.require(replies[site], {"values": bytes}, where=f"{site} values")
                accepted[site] = decode_tensors(
                    replies[site]["values"], [(len(st.union),)], self.dcfg.value_codec, where=f"{site} values"
                )[0]
            except (WireError, CodecError, ReplyRejected) as err:
                rejected[site] = str(err)
        norms = {s: float(v.double().norm()) for s, v in accepted.items()}
        kc = self.kcfg
        if kc.outlier_mult and len(accepted) >= 3:  # as kavg: a scaled or corrupted update stands out
            med = sorted(norms.values())[len(norms) // 2]
            for s in list(accepted):
                if med > 0 and norms[s] > kc.outlier_mult * med:
                    rejected[s] = f"values norm {norms[s]:.4g} is {norms[s] / med:.0f}x the median site's {med:.4g}"
                    del accepted[s]
        # fixed or adaptive clip (screening.py), in every federation size
        bound = screening.clip_bound(norms, clip_norm=kc.clip_norm, clip_mult=kc.clip_mult)
        for s, factor in screening.clip_factors({s: norms[s] for s in accepted}, bound).items():
            if factor < 1.0:
                accepted[s].mul_(factor)
        while True:
            if len(accepted) < min_sites:
                return RoundResult(False, {"num_accepted": float(len(accepted))}, rejected)
            sites = sorted(accepted)
            weights = [float(st.plans[s]["K"] * st.plans[s]["bs"]) for s in sites]
            mean = aggregate_tensors([[accepted[s]] for s in sites], weights, kc.aggregator, kc.trim_frac)[0]
            if bool(torch.isfinite(mean).all()):
                break
            worst = max(sites, key=lambda s: (float(accepted[s].double().norm()), s))  # leave it out, go on
            rejected[worst] = "left out of the aggregate: with it, the aggregate is not finite"
            del accepted[worst]
        self._apply(st.union, mean)
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            # the values were finite, the sum with the parameters is not: undo, never keep inf weights
            self._apply(st.union, -mean)
            return RoundResult(False, {"num_accepted": float(len(accepted))}, {**rejected, "aggregate": "not finite"})
        if self.parts is not None and not self.site_norms:
            sq = np.bincount(self.parts.of(st.union), weights=mean.double().numpy() ** 2, minlength=len(self.parts))
            self.nu = np.sqrt(sq)
        metrics = {
            "num_accepted": float(len(accepted)),
            "num_rejected": float(len(rejected)),
            "mean_update_norm": sum(norms[s] for s in sites) / len(sites),
            "applied_norm": float(mean.double().norm()),
        }
        return RoundResult(True, metrics, rejected, tuple(sites))

    def _apply(self, idx: np.ndarray, update: torch.Tensor) -> None:
        """theta[idx] += update, split over the tensors of the manifest."""
        offsets = np.cumsum([0, *self.numels])
        for t, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            a, b = np.searchsorted(idx, [lo, hi])
            if a < b:
                local = torch.from_numpy(idx[a:b] - lo)
                self.params[t].view(-1).index_add_(0, local, update[a:b].to(torch.float32))


# ---- site ---------------------------------------------------------------------------------------


class SiteVectors:
    """A site's flat vectors of one run on disk: ``acc-<r>`` (a, between the phases of round r)
    and ``res-<r>`` (e after round r). Files, not ``state``: phases may run in other processes.
    """

    def __init__(self, folder: Path, dim: int) -> None:
        self.folder = folder
        self.dim = dim

    def _path(self, kind: str, round_idx: int) -> Path:
        return self.folder / f"{kind}-{round_idx}.npy"

    def rounds(self, kind: str) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = (re.fullmatch(rf"{kind}-(\d+)\.npy", p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, kind: str, round_idx: int, vec: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(kind, round_idx)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.save(fh, vec.detach().to("cpu", torch.float32).numpy(), allow_pickle=False)
        os.replace(tmp, path)
        prune_sibling_runs(self.folder.parent)  # this site's two most recent runs only (<run>/deft)

    def load(self, kind: str, round_idx: int) -> torch.Tensor | None:
        path = self._path(kind, round_idx)
        if not path.exists():
            return None
        arr = np.load(path, allow_pickle=False)
        if arr.shape != (self.dim,) or arr.dtype != np.float32:
            raise ValueError(f"{path}: expected {self.dim} float32 values, found {arr.shape} {arr.dtype}")
        return torch.from_numpy(arr)

    def drop(self, kind: str, keep: Callable[[int], bool] = lambda r: False) -> None:
        for r in self.rounds(kind):
            if not keep(r):
                self._path(kind, r).unlink(missing_ok=True)

    def residual_before(self, round_idx: int) -> torch.Tensor | None:
        """The residual of the newest round before ``round_idx`` (None: none yet).

        Older residuals, residuals of an earlier attempt of this round and stale accumulators
        are deleted.
        """
        older = [r for r in self.rounds("res") if r < round_idx]
        newest = max(older, default=None)
        self.drop("res", keep=lambda r: r == newest)
        self.drop("acc")
        return None if newest is None else self.load("res", newest)


class DeftClient(WeightsClient):
    """A site: K local steps, top-k indices in its assigned partitions, then values at the union."""

    def __init__(self, cfg: RunConfig, ctx: ClientContext) -> None:
        super().__init__(cfg, ctx)
        self.numels = [e.numel for e in self.manifest]
        self.dim = sum(self.numels)
        self._parts: dict[int, Partitions] = {}

    def vectors(self, run: str) -> SiteVectors:
        """The site's vector store for run ``run`` (hex id), under ``state_dir``."""
        if not isinstance(run, str) or not _RUN_HEX.fullmatch(run):
            raise ValueError(f"run id {run!r} is not a hex string")
        root = self.ctx.state_dir if self.ctx.state_dir is not None else self.ctx.workdir / "sites" / self.ctx.site_id
        return SiteVectors(Path(root) / run / "deft", self.dim)

    def step(self, phase: str, msg: Payload, state: Payload) -> tuple[Payload, Payload]:
        if phase == "norms":
            return self._norms(msg), state
        if phase == "indices":
            return self._indices(msg), state
        if phase == "values":
            return self._values(msg), state
        raise ValueError(f"deft has no phase {phase!r}")

    def _partitions(self, nsplit: int) -> Partitions:
        if nsplit < 1:
            raise ValueError(f"round message: nsplit must be >= 1, got {nsplit}")
        return self._parts.setdefault(nsplit, make_partitions(self.numels, nsplit))

    def _train(self, msg: Payload) -> tuple[dict[str, Any], torch.Tensor, list[float]]:
        """The plan's K local steps; a = update + residual of the round before, saved as ``acc``."""
        plan, start = self.load_global({"plan": msg["plan"], "params": msg["params"]})
        named = dict(self.ctx.model.named_parameters())
        chosen = [named[self.manifest.entries[i].name] for i in select(self.manifest, plan["train"])]
        losses = self.train_plan(plan, chosen)
        work = trainable_tensors(self.ctx.model, self.manifest)
        acc = torch.cat([(w.detach().to("cpu", torch.float32) - s).reshape(-1) for w, s in zip(work, start)])
        store = self.vectors(plan["run"])
        residual = store.residual_before(plan["round"])
        if residual is not None:
            acc += residual
        store.save("acc", plan["round"], acc)
        return plan, acc, losses

    def _norms(self, msg: Payload) -> Payload:
        """Phase "norms": train, then report ||a_p|| for every partition (the paper's allocation input)."""
        wire.require(msg, {"plan": bytes, "params": bytes, "nsplit": int}, where="norms message")
        parts = self._partitions(msg["nsplit"])
        _, acc, losses = self._train(msg)
        sq = np.add.reduceat(acc.double().numpy() ** 2, parts.starts) if len(parts) else np.zeros(0)
        norms = torch.from_numpy(np.sqrt(sq))
        return {"norms": encode_tensors([norms], NORMS_CODEC), "loss": sum(losses) / len(losses)}

    def _assigned(self, msg: Payload) -> list[tuple[int, int, int]]:
        """(start, size, k_p) of every partition in this site's bin."""
        parts = self._partitions(msg["nsplit"])
        pairs = decode_varints(msg["bins"], max_count=2 * len(parts), where="bins")
        if pairs.size % 2:
            raise ValueError("bins: odd number of values")
        ids, kps = np.cumsum(pairs[0::2]), pairs[1::2]
        if ids.size and ((np.diff(ids) < 1).any() or ids[-1] >= len(parts)):
            raise ValueError("bins: partition ids must be increasing and in range")
        if ((kps < 1) | (kps > parts.sizes[ids])).any() or int(kps.sum()) != msg["k"]:
            raise ValueError("bins: every k_p must be in [1, s_p] and sum to k")
        return [(int(parts.starts[p]), int(parts.sizes[p]), int(kp)) for p, kp in zip(ids, kps)]

    def _indices(self, msg: Payload) -> Payload:
        trained_before = "params" not in msg  # site-norms: phase "norms" trained and saved a
        head: dict[str, type] = {"round": int, "run": str} if trained_before else {"plan": bytes, "params": bytes}
        schema = {**head, "sel": str, "nsplit": int, "k": int, "bins": bytes}
        wire.require(msg, schema, where="indices message")
        if msg["sel"] not in {"deft", "topk"} or not 0 <= msg["k"] <= self.dim:
            raise ValueError(f"indices message: selector {msg['sel']!r}, k {msg['k']} (dimension {self.dim})")
        if trained_before and msg["sel"] != "deft":
            raise ValueError("indices message without parameters: only the deft selector has a norms phase")
        assigned = self._assigned(msg) if msg["sel"] == "deft" else []
        losses: list[float] = []
        if trained_before:
            loaded = self.vectors(msg["run"]).load("acc", msg["round"])
            if loaded is None:
                raise ValueError(f"no accumulated update for round {msg['round']} (phase 'norms' did not run here)")
            acc = loaded
        else:
            _, acc, losses = self._train(msg)
        mag = acc.abs()
        if msg["sel"] == "topk":
            chosen_idx = torch.topk(mag, msg["k"], sorted=False).indices
        else:
            picks = [torch.topk(mag[a : a + s], kp, sorted=False).indices + a for a, s, kp in assigned]
            chosen_idx = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.int64)
        idx = np.sort(chosen_idx.numpy().astype(np.int64))
        if trained_before:
            return {"idx": encode_indices(idx)}
        return {"idx": encode_indices(idx), "loss": sum(losses) / len(losses)}

    def _values(self, msg: Payload) -> Payload:
        schema = {"round": int, "run": str, "val": str, "ef": bool, "n": int, "union": bytes}
        wire.require(msg, schema, where="values message")
        if msg["val"] not in TENSOR_CODECS:
            raise ValueError(f"values message: unknown value codec {msg['val']!r}")
        idx = decode_indices(msg["union"], dim=self.dim, max_count=max(msg["n"], 0), where="union")
        if len(idx) != msg["n"]:
            raise ValueError(f"union: {len(idx)} indices, the message says {msg['n']}")
        store = self.vectors(msg["run"])
        acc = store.load("acc", msg["round"])
        if acc is None:
            raise ValueError(f"no accumulated update for round {msg['round']} (phase 'indices' did not run here)")
        at = torch.from_numpy(idx)
        sent = acc[at]
        blob = encode_tensors([sent], msg["val"])
        if msg["ef"]:
            # Keep what the codec rounded away too: e[I] = a[I] - q(a[I]) (exactly 0 for fp32).
            acc[at] = sent - decode_tensors(blob, [(len(idx),)], msg["val"], where="own values")[0]
            store.save("res", msg["round"], acc)
        store.drop("acc")
        if not msg["ef"]:
            store.drop("res")
        return {"values": blob}
