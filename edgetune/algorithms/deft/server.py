"""deft's server half: plans partitions, k_p and rotating bins; takes the index union; applies
the sparse mean (the formulas are in the package docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgetune.algorithms import screening
from edgetune.algorithms.base import ReplyRejected, RoundResult, ServerContext
from edgetune.algorithms.deft.partitions import (
    Partitions,
    allocate_k,
    make_partitions,
    pack_bins,
    rotated_bin,
    selection_cost,
    size_gap,
)
from edgetune.algorithms.weights import WeightsServer, aggregate_tensors, example_weights
from edgetune.comm import wire
from edgetune.comm.codecs import CodecError
from edgetune.comm.tensors import TENSOR_CODECS, decode_tensors
from edgetune.comm.varint import MAX_VARINT_BYTES, decode_indices, encode_indices, encode_varints
from edgetune.comm.wire import Payload, WireError
from edgetune.config import RunConfig

NORMS_CODEC = "bf16"
"""Codec of the per-partition norms sites report: 2 bytes each, fp32's range (k_p needs ~3 digits)."""
REPLY_FRAMING_BYTES = 256
"""Room for the wire framing around a reply's one or two fields."""


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
            blob = self.params_blob(round_idx)
            return {
                s: {"plan": wire.encode(st.plans[s]), "params": blob, "nsplit": self.parts.num_chunks} for s in st.plans
            }
        if phase == "indices":
            if not self.site_norms:
                self.round = self.plan_round(round_idx, site_ids)
            cur = self.round
            assert cur is not None and cur.round_idx == round_idx, "indices before norms"
            assert cur.kp is not None or not self.site_norms, "indices before norms"
            blob = b"" if self.site_norms else self.params_blob(round_idx)
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
        self.write_model()  # the model also served as a site's scratch copy: always restore it
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
        kc = self.kcfg
        weights = example_weights(st.plans, sites)
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
        kc = self.kcfg  # screened as kavg's updates: a scaled or corrupted update stands out, every one is clipped
        outliers, bound = screening.screen_norms(
            norms, outlier_mult=kc.outlier_mult, clip_norm=kc.clip_norm, clip_mult=kc.clip_mult, what="values norm"
        )
        rejected.update(outliers)
        accepted = {s: v for s, v in accepted.items() if s not in outliers}
        for s, factor in screening.clip_factors({s: norms[s] for s in accepted}, bound).items():
            if factor < 1.0:
                accepted[s].mul_(factor)
        while True:
            if len(accepted) < min_sites:
                return RoundResult(False, {"num_accepted": float(len(accepted))}, rejected)
            sites = sorted(accepted)
            weights = example_weights(st.plans, sites)
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
