"""deft's client half: K local steps, per-partition norms, top-k indices in the assigned
partitions, then the values at the union; the accumulator and residual live in the per-site store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edgetune.algorithms.base import ClientContext
from edgetune.algorithms.deft.partitions import Partitions, make_partitions
from edgetune.algorithms.deft.server import NORMS_CODEC
from edgetune.algorithms.sitestore import RoundFiles
from edgetune.algorithms.weights import WeightsClient
from edgetune.comm import wire
from edgetune.comm.tensors import TENSOR_CODECS, decode_tensors, encode_tensors
from edgetune.comm.varint import decode_indices, decode_varints, encode_indices
from edgetune.comm.wire import Payload
from edgetune.config import RunConfig
from edgetune.models.params import trainable_tensors


class SiteVectors:
    """A site's flat vectors of one run in its store: ``acc-<r>`` (a, between the phases of round r)
    and ``res-<r>`` (e after round r). Files, not ``state``: phases may run in other processes.
    """

    def __init__(self, files: RoundFiles, dim: int, layout: str = "") -> None:
        self.files = files
        self.dim = dim
        self.layout = layout
        """The trained tensors' manifest digest: a file of another layout is not this site's."""

    def save(self, kind: str, round_idx: int, vec: torch.Tensor) -> None:
        self.files.write(kind, round_idx, {"v": vec}, {"layout": self.layout})

    def load(self, kind: str, round_idx: int) -> torch.Tensor | None:
        """The vector, or None when there is none or it was stored for another layout (a run that
        reused this run's name and trained other tensors: this site then starts afresh).
        """
        if not self.files.path(kind, round_idx).is_file():
            return None
        stored = self.files.metadata(kind, round_idx).get("layout")
        if stored is not None and stored != self.layout:
            return None
        if stored is None and self.files.shapes(kind, round_idx).get("v", (self.dim,)) != (self.dim,):
            return None  # written before files named their layout, by a run of another size
        found = self.files.read(kind, round_idx, {"v": (self.dim,)})
        return None if found is None else found["v"]

    def rounds(self, kind: str) -> list[int]:
        return self.files.rounds(kind)

    def drop(self, kind: str) -> None:
        self.files.drop(kind)

    def residual_before(self, round_idx: int) -> torch.Tensor | None:
        """The residual of the newest round before ``round_idx`` (None: none yet).

        Older residuals, residuals of an earlier attempt of this round and stale accumulators
        are deleted.
        """
        newest = self.files.newest_before("res", round_idx)
        self.files.drop("res", keep=lambda r: r == newest)
        self.files.drop("acc")
        return None if newest is None else self.load("res", newest)


class DeftClient(WeightsClient):
    """A site: K local steps, top-k indices in its assigned partitions, then values at the union."""

    def __init__(self, cfg: RunConfig, ctx: ClientContext) -> None:
        super().__init__(cfg, ctx)
        self.numels = [e.numel for e in self.manifest]
        self.dim = sum(self.numels)
        self._parts: dict[int, Partitions] = {}

    def vectors(self, run: str) -> SiteVectors:
        """The site's vector store for run ``run`` (hex id), in the per-site store."""
        return SiteVectors(self.ctx.store.round_files(run, "deft"), self.dim, self.manifest.digest())

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
        losses = self.train_plan(plan, self.chosen(plan))
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
