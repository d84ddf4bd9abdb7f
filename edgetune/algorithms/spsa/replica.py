"""Replica: one process's copy of theta, following the replay log of one run.

The work weights live in the model on its device (perturbed in place during local steps); the
round-start state is the source of truth, kept as fp32 masters off the accelerator
(``models/master.py``). Every way a replica reaches round r (replaying each round, replaying a
log after missed rounds, loading a signed snapshot, continuing from a saved state) ends at the
same bytes, which the state hash checks.

The perturbation space is set per run (``SpaceSpec``): an optional sparse mask (Sparse MeZO:
only the smallest-magnitude fraction of each tensor is perturbed; the mask is a function of the
run's base weights, identical on every replica) and, for a run-scope seed pool, the pool secret
and the server-side optimizer (``pool.py``: theta = theta_0 - q * sum_s n_s z_s, exactly).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetune.algorithms.base import ReplyRejected
from edgetune.algorithms.spsa import log as replay_log
from edgetune.algorithms.spsa import pool as poolmod
from edgetune.algorithms.spsa.log import LogEntry
from edgetune.io import atomic_write_bytes, read_state_json, write_state_json
from edgetune.models import master
from edgetune.models.params import Manifest, manifest_of, trainable_tensors

HASH_BYTES = 16
"""Truncated state hash carried in plans and replies (128 bits: a sync check, not a signature)."""


@dataclass(frozen=True)
class SpaceSpec:
    """How a run perturbs the trainable tensors (identical on the server and every site)."""

    sparse_frac: float = 0.0
    """0: dense. Else perturb only this fraction of each tensor (smallest |base weight|)."""
    pool_size: int = 0
    """S of a run-scope seed pool (0: directions are not a fixed per-run pool)."""
    pool_key: bytes = b""
    optimizer: poolmod.OptimizerSpec = poolmod.OptimizerSpec()

    @property
    def run_pool(self) -> bool:
        return self.pool_size > 0

    def digest(self) -> str:
        """sha256 of every field: a saved state is only continued under the space it was saved in."""
        text = f"{self.sparse_frac!r}|{self.pool_size}|{self.pool_key.hex()}|{self.optimizer.to_text()}"
        return hashlib.sha256(text.encode()).hexdigest()


def sparse_masks(tensors: Sequence[torch.Tensor], frac: float) -> list[torch.Tensor]:
    """Per tensor, True at its ceil(frac * numel) smallest magnitudes, else False.

    Ties are broken by position (a stable sort on the CPU), so the mask has exactly that many
    entries and every replica with the same weights derives the same one.
    """
    masks = []
    for t in tensors:
        mag = t.detach().to(device="cpu", dtype=torch.float32).abs().view(-1)
        k = max(1, min(mag.numel(), math.ceil(frac * mag.numel())))
        order = torch.sort(mag, stable=True).indices[:k]
        mask = torch.zeros(mag.numel(), dtype=torch.bool)
        mask[order] = True
        masks.append(mask.view(t.shape))
    return masks


class Replica:
    """A model whose trainable weights follow the replay log of one run.

    The first time a model object is seen, its trainable weights are saved as the base; a new
    run (another ``run_id``) starts again from that base.
    """

    def __init__(self, model: nn.Module, workdir: Path, store_kind: str) -> None:
        self.model = model
        self.manifest: Manifest = manifest_of(model)
        self.work = trainable_tensors(model, self.manifest)
        device = self.work[0].device
        if store_kind == "auto":
            store_kind = "host" if device.type != "cpu" else "disk"
        self.store_kind = store_kind
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.base = self._new_store("base", self.work)
        self.run_id = b""
        self.applied = 0
        self.hash = ""
        self.store: master.MasterStore = self.base
        self.space = SpaceSpec()
        self.masks: list[torch.Tensor] | None = None
        """Sparse masks on the work device (in the work dtype), or None when dense."""
        self.pool: poolmod.PoolState | None = None
        self._acc: list[torch.Tensor] = []
        self._seed_keys: dict[int, bytes] = {}

    def _new_store(self, tag: str, tensors: Sequence[torch.Tensor]) -> master.MasterStore:
        if self.store_kind == "host":
            return master.HostStore(tensors)
        path = self.workdir / f"master-{tag}-{os.getpid()}-{id(self):x}.safetensors"
        return master.DiskStore(path, self.manifest, tensors)

    def _base_tensors(self) -> list[torch.Tensor]:
        out = []
        for i, e in enumerate(self.manifest):
            t = torch.empty(e.shape, dtype=torch.float32)
            self.base.read_into(i, t)
            out.append(t)
        return out

    def start_run(self, run_id: bytes, space: SpaceSpec | None = None) -> None:
        """Reset to the base weights and follow the log of ``run_id`` from round 0."""
        space = space or SpaceSpec()
        master.reset(self.base, self.work)
        self.store = self._new_store(run_id.hex()[:12], self.work)
        self.run_id = run_id
        self.applied = 0
        self.space = space
        self.masks = None
        if space.sparse_frac > 0:
            device, dtype = self.work[0].device, self.work[0].dtype
            self.masks = [
                m.to(device=device, dtype=dtype) for m in sparse_masks(self._base_tensors(), space.sparse_frac)
            ]
        self.pool = poolmod.PoolState(space.pool_size) if space.run_pool else None
        self._acc = [torch.zeros(e.shape, dtype=torch.int64) for e in self.manifest] if space.run_pool else []
        self._seed_keys = {}
        self.hash = master.state_hash(self.store, self.manifest)

    def ensure_space(self, run_id: bytes, space: SpaceSpec) -> None:
        """Start ``run_id`` if this replica follows another run; refuse a changed space mid-run."""
        if self.run_id != run_id:
            self.start_run(run_id, space)
        elif self.space != space:
            raise ReplyRejected("this run's perturbation space changed (sparse mask, pool or optimizer)")

    # ---- applying rounds ----------------------------------------------------------------------

    def seed_key(self, index: int) -> bytes:
        key = self._seed_keys.get(index)
        if key is None:
            key = replay_log.run_seed_key(self.space.pool_key, self.run_id, index)
            self._seed_keys[index] = key
        return key

    def _host_masks(self) -> list[torch.Tensor | None] | None:
        return None if self.masks is None else [m.to("cpu") for m in self.masks]

    def apply(self, entry: LogEntry, secret: bytes) -> str:
        """Replay one committed round on the master state and refresh the work weights."""
        if entry.round_idx != self.applied + 1:
            raise ReplyRejected(f"replay of round {entry.round_idx} after round {self.applied}")
        if (entry.pool_scope == "run") != self.space.run_pool or (
            self.space.run_pool and entry.seed_pool != self.space.pool_size
        ):
            raise ReplyRejected(f"round {entry.round_idx}: its seed pool does not match this run's")
        with torch.no_grad():
            if self.space.run_pool:
                assert self.pool is not None
                dn = self.pool.step(
                    replay_log.pool_gradient(entry, secret, self.run_id), entry.lr, self.space.optimizer
                )
                self._accumulate(dn)
                self.hash = self._materialize()
                self.applied = entry.round_idx
            else:
                self.apply_terms(entry.round_idx, replay_log.replay_terms(entry, secret, self.run_id))
        return self.hash

    def apply_terms(self, round_idx: int, terms: Sequence[tuple[bytes, float]]) -> str:
        """Replay one round given its canonical (key, fp32 coefficient) terms (fresh or per-round
        pool directions).
        """
        if round_idx != self.applied + 1:
            raise ReplyRejected(f"replay of round {round_idx} after round {self.applied}")
        with torch.no_grad():
            self.hash = master.replay(self.store, self.work, terms, self.masks)
        self.applied = round_idx
        return self.hash

    def _accumulate(self, dn: np.ndarray) -> None:
        keys = {int(s): self.seed_key(int(s)) for s in np.flatnonzero(dn)}
        poolmod.accumulate_(self._acc, dn, _KeyView(keys), self._host_masks())
        poolmod.check_range(self._acc)

    def _materialize(self) -> str:
        base = self._base_tensors()
        values = [poolmod.materialize(b, a) for b, a in zip(base, self._acc, strict=True)]
        return master.write_all(self.store, self.work, values)

    def sync(self, entries: Sequence[LogEntry], secrets: Sequence[bytes]) -> None:
        """Apply the log entries this replica has not applied yet."""
        for entry, secret in zip(entries, secrets, strict=True):
            if entry.round_idx <= self.applied:
                continue
            if entry.round_idx != self.applied + 1:
                raise ReplyRejected(
                    f"replay gap: this copy applied round {self.applied}, log starts at {entry.round_idx}"
                )
            self.apply(entry, secret)

    def load_pool(self, state: poolmod.PoolState) -> None:
        """Continue from a run-scope pool's coefficients (rebuilt exactly from the base weights)."""
        if not self.space.run_pool:
            raise ReplyRejected("a coefficient snapshot for a run without a run-scope pool")
        self.pool = state.copy()
        self._acc = [torch.zeros(e.shape, dtype=torch.int64) for e in self.manifest]
        with torch.no_grad():
            self._accumulate(self.pool.n)
            self.hash = self._materialize()
        self.applied = state.round_idx

    def load_tensors(self, tensors: Sequence[torch.Tensor], round_idx: int, run_id: bytes) -> None:
        """Continue from the weights of ``round_idx`` received as a snapshot (already verified)."""
        if self.space.run_pool:
            raise ReplyRejected("a run-scope pool continues from coefficients, not from weights")
        with torch.no_grad():
            for w, t in zip(self.work, tensors, strict=True):
                w.copy_(t.view_as(w).to(w.device, w.dtype))
        self.store = self._new_store(run_id.hex()[:12], self.work)
        self.run_id, self.applied = run_id, round_idx
        self.hash = master.state_hash(self.store, self.manifest)

    def snapshot_tensors(self) -> list[torch.Tensor]:
        """The current round-start weights (fp32, host, manifest order)."""
        out = []
        for i, e in enumerate(self.manifest):
            t = torch.empty(e.shape, dtype=torch.float32)
            self.store.read_into(i, t)
            out.append(t)
        return out

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Persist the state (run, round, hash) for a later process of the same site (``folder``:
        the site's store, ``ClientContext.store.run_folder(run, "spsa")``, which prunes older runs;
        or the server's state folder).

        Dense replicas keep their fp32 masters (hard-linked when the store is a file, so saving
        costs no copy); a run-scope pool keeps only its coefficients (kilobytes).
        """
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "run": self.run_id.hex(),
            "applied": self.applied,
            "hash": self.hash,
            "manifest": self.manifest.digest(),
            "space": self.space.digest(),
        }
        if self.space.run_pool:
            assert self.pool is not None
            name = f"pool-{self.applied:06d}.bin"
            atomic_write_bytes(folder / name, poolmod.encode_state(self.pool))
        else:
            name = f"master-{self.applied:06d}.safetensors"
            target = folder / name
            if not target.exists():
                tmp = folder / f".{name}.tmp-{os.getpid()}"
                tmp.unlink(missing_ok=True)
                try:
                    if not isinstance(self.store, master.DiskStore):
                        raise OSError("host store: write a file")
                    os.link(self.store.path, tmp)
                except OSError:
                    master.DiskStore(tmp, self.manifest, self.snapshot_tensors())
                os.replace(tmp, target)
        meta["file"] = name
        write_state_json(folder / "replica.json", meta)
        for old in [*folder.glob("master-*.safetensors"), *folder.glob("pool-*.bin")]:
            if old.name != name:
                old.unlink(missing_ok=True)

    @staticmethod
    def saved_round(
        folder: Path | None, run_id: bytes, space: SpaceSpec | None = None, manifest: Manifest | None = None
    ) -> int:
        """Round of the state saved in ``folder`` for ``run_id`` (-1 if none, or if it was saved under
        another perturbation space than ``space`` or another parameter layout than ``manifest``: a run of
        the same id with other settings (run ids come from run names, which a user may reuse), whose
        state this one must not continue; the site then catches up from the log or a snapshot).
        """
        if folder is None or not (folder / "replica.json").is_file():
            return -1
        try:
            meta = read_state_json(folder / "replica.json")
        except ValueError:
            return -1
        if meta.get("run") != run_id.hex():
            return -1
        if space is not None and meta.get("space") != space.digest():
            return -1
        if manifest is not None and meta.get("manifest") != manifest.digest():
            return -1
        return int(meta["applied"])

    def load(self, folder: Path, run_id: bytes) -> None:
        """Continue from a state saved by ``save`` (checked against its recorded hash)."""
        meta = read_state_json(folder / "replica.json")
        if meta["run"] != run_id.hex():
            raise ValueError(f"{folder}: saved state belongs to run {meta['run'][:16]}, not {run_id.hex()[:16]}")
        if meta["manifest"] != self.manifest.digest():
            raise ValueError(f"{folder}: saved state has another parameter layout")
        if meta.get("space") != self.space.digest():
            raise ValueError(f"{folder}: saved state has another perturbation space (sparse mask, pool or optimizer)")
        if self.run_id != run_id:
            raise ValueError(f"{folder}: load a saved state only after starting its run")
        if self.space.run_pool:
            state = poolmod.decode_state((folder / meta["file"]).read_bytes(), size=self.space.pool_size)
            self.load_pool(state)
        else:
            saved = master.DiskStore(folder / meta["file"], self.manifest)
            with torch.no_grad():
                master.reset(saved, self.work)
            self.store = self._new_store(run_id.hex()[:12], self.work)
            self.hash = master.state_hash(self.store, self.manifest)
        if self.hash != meta["hash"]:
            raise ValueError(f"{folder}: saved state hashes to {self.hash[:12]}, recorded {meta['hash'][:12]}")
        self.applied = int(meta["applied"])

    @contextmanager
    def local(self) -> Iterator[list[torch.Tensor]]:
        """Local steps may perturb the work weights freely; they are reset from the master after."""
        try:
            yield self.work
        finally:
            with torch.no_grad():
                master.reset(self.store, self.work)

    @property
    def short_hash(self) -> bytes:
        return bytes.fromhex(self.hash)[:HASH_BYTES]


class _KeyView:
    """Index -> key for the nonzero seeds of one accumulation (a dict that reads like a list)."""

    def __init__(self, keys: dict[int, bytes]) -> None:
        self._keys = keys

    def __getitem__(self, index: int) -> bytes:
        return self._keys[index]


_REPLICAS: dict[tuple[int, str], Replica] = {}


def replica_for(
    model: nn.Module,
    run_id: bytes,
    workdir: Path,
    store_kind: str,
    namespace: str = "",
    space: SpaceSpec | None = None,
) -> Replica:
    """The process's replica of ``model`` for ``run_id`` (shared by every site in the process)."""
    key = (id(model), namespace)
    rep = _REPLICAS.get(key)
    if rep is None or rep.model is not model:
        rep = Replica(model, workdir, store_kind)
        _REPLICAS[key] = rep
    rep.ensure_space(run_id, space or SpaceSpec())
    return rep


def clear_replicas() -> None:
    """Forget every replica of this process (a new in-process run starts from the base weights)."""
    _REPLICAS.clear()
