"""spsa: shared-seed zeroth-order fine-tuning, one byte per probe on the wire.

Sources: Zelikman et al. 2023, "Just One Byte (per gradient)" (shared randomness, scalars only);
Malladi et al. 2023, MeZO (SPSA in inference memory); Qin et al. 2024, FedKSeed (seed pool).

One round r, site i, K steps x P probes::

    z_{k,p} = Rademacher(key(S_r, i, k, p))                    # crypto/keystream.py, portable
    g = [L(w + eps z; B_k) - L(w - eps z; B_k)] / (2 eps)      # two forwards, no backward
    code = one byte (stochastic rounding inside [-scale, scale]) # comm/codecs.py
    local: w <- w - lr * g_hat * z / P                         # the site's own trajectory
    reply: K*P bytes                                            # + 88 bytes framing (K*P < 40)

    server and every site:  theta_{r+1} = theta_r - sum_{i,k,p} c_{i,k,p} z_{i,k,p}
                            c = fp32(lr * g_hat / (N * P)), float64 then one cast,
                            applied in canonical order (site id, step, probe)

Every copy of theta replays the same list of (key, c) from the same round-start state, so the
server and all sites hold bitwise identical weights after every round; the state hash travels
in the (signed) round plan and comes back in every reply. The round secret S_r reaches a site
only inside its seed envelope (``crypto/envelope.py``); the plan and the catch-up secrets ride
in the envelope's encrypted part, and the replay log's digest is bound into it.

``directions = "shared"`` makes all sites evaluate the same K*P directions, so each coordinate
has one value per site and can be aggregated robustly (mean, trimmed mean, median). A seed pool
(FedKSeed) maps every probe onto one of S per-round seeds and sums coefficients per seed, so
replay costs S tensor passes however many sites there are.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetune.algorithms import scalar_clip, screening
from edgetune.algorithms.base import ClientContext, ReplyRejected, RoundResult, ServerContext
from edgetune.comm import wire
from edgetune.comm.codecs import SCALAR_CODECS, CodecError
from edgetune.comm.tensors import decode_tensors, encode_tensors
from edgetune.comm.wire import Payload, WireError
from edgetune.config import RunConfig
from edgetune.crypto import envelope, guardfile, keystream, schedule
from edgetune.crypto.envelope import EnvelopeError, ReplayGuard
from edgetune.data.prompts import batch_indices
from edgetune.io import prune_sibling_runs, read_state_json, write_state_json
from edgetune.models import master
from edgetune.models.loss import answer_loss
from edgetune.models.params import Manifest, manifest_of, trainable_tensors

HASH_BYTES = 16
"""Truncated state hash carried in plans and replies (128 bits: a sync check, not a signature)."""
MAX_LOG_ROUNDS = 200
"""Longest replay log one message carries; a site further behind needs a snapshot."""

_PLAN_SCHEMA: dict[str, type] = {
    "K": int,
    "P": int,
    "lr": float,
    "eps": float,
    "scale": float,
    "codec": str,
    "dirs": str,
    "pool": int,
    "agg": str,
    "trim": float,
    "hash": bytes,
    "logd": bytes,
    "secrets": bytes,
    "first": int,
    "seed": int,
    "snapd": bytes,
    "snapr": int,
}
_ENTRY_SCHEMA: dict[str, type] = {
    "r": int,
    "K": int,
    "P": int,
    "lr": float,
    "scale": float,
    "codec": str,
    "dirs": str,
    "pool": int,
    "agg": str,
    "trim": float,
    "sites": str,
    "codes": bytes,
}
_REPLY_SCHEMA: dict[str, type] = {"codes": bytes, "hash": bytes, "loss": float}


# --------------------------------------------------------------------------------------------
# The replay log and its arithmetic (shared by server and sites)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    """Everything needed to replay one committed round (the secret travels separately)."""

    round_idx: int
    sites: tuple[str, ...]
    codes: bytes
    """K*P one-byte codes per site, concatenated in ``sites`` order (sorted site ids)."""
    lr: float
    scale: float
    num_steps: int
    num_probes: int
    directions: str
    seed_pool: int
    codec: str
    aggregator: str
    trim_frac: float

    def to_payload(self) -> Payload:
        return {
            "r": self.round_idx,
            "K": self.num_steps,
            "P": self.num_probes,
            "lr": self.lr,
            "scale": self.scale,
            "codec": self.codec,
            "dirs": self.directions,
            "pool": self.seed_pool,
            "agg": self.aggregator,
            "trim": self.trim_frac,
            "sites": ",".join(self.sites),
            "codes": self.codes,
        }

    @classmethod
    def from_payload(cls, p: Payload) -> LogEntry:
        wire.require(p, _ENTRY_SCHEMA, where="replay log entry")
        sites = tuple(s for s in p["sites"].split(",") if s)
        if list(sites) != sorted(set(sites)):
            raise WireError("replay log entry: sites are not sorted and unique")
        if p["K"] < 1 or p["P"] < 1 or p["codec"] not in SCALAR_CODECS or p["pool"] < 0:
            raise WireError("replay log entry: bad K, P, codec or pool")
        if len(p["codes"]) != len(sites) * p["K"] * p["P"]:
            raise WireError("replay log entry: codes length does not match sites x K x P")
        return cls(
            p["r"],
            sites,
            p["codes"],
            float(p["lr"]),
            float(p["scale"]),
            p["K"],
            p["P"],
            p["dirs"],
            p["pool"],
            p["codec"],
            p["agg"],
            float(p["trim"]),
        )

    def decoded(self) -> dict[str, np.ndarray]:
        """Site -> the K*P decoded scalars (float64)."""
        n = self.num_steps * self.num_probes
        codec = SCALAR_CODECS[self.codec]
        return {s: codec.decode(self.codes[i * n : (i + 1) * n], n, self.scale) for i, s in enumerate(self.sites)}


def encode_log(entries: Sequence[LogEntry]) -> bytes:
    return wire.encode({"n": len(entries), **{str(i): wire.encode(e.to_payload()) for i, e in enumerate(entries)}})


def decode_log(blob: bytes) -> list[LogEntry]:
    outer = wire.decode(blob, max_bytes=64 << 20)
    n = outer.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_LOG_ROUNDS:
        raise WireError("replay log: bad entry count")
    wire.require(outer, {"n": int, **{str(i): bytes for i in range(n)}}, where="replay log")
    entries = [LogEntry.from_payload(wire.decode(outer[str(i)], max_bytes=64 << 20)) for i in range(n)]
    rounds = [e.round_idx for e in entries]
    if rounds and rounds != list(range(rounds[0], rounds[0] + n)):
        raise WireError("replay log: rounds are not consecutive")
    return entries


def probe_key(
    secret: bytes, run_id: bytes, round_idx: int, site_id: str, step: int, probe: int, directions: str, seed_pool: int
) -> bytes:
    """Key of the perturbation z that site ``site_id`` evaluates at (step, probe)."""
    who = "*" if directions == "shared" else site_id
    if seed_pool:
        pick = schedule.derive(secret, "pool", run_id, round_idx, "pick", who, step, probe)
        j = int(schedule.integers(pick, 1, seed_pool)[0])
        return schedule.derive(secret, "pool", run_id, round_idx, "seed", j)
    return schedule.derive(secret, "pert", run_id, round_idx, who, step, probe)


def _robust(values: list[float], aggregator: str, trim_frac: float) -> float:
    # math.fsum is exactly rounded, so the sum does not depend on summation order or SIMD width.
    if aggregator == "median":
        return float(statistics.median(values))
    if aggregator == "trimmed":
        ordered = sorted(values)
        cut = int(math.floor(trim_frac * len(ordered)))
        kept = ordered[cut : len(ordered) - cut] or ordered
        return math.fsum(kept) / len(kept)
    return math.fsum(values) / len(values)


def replay_terms(entry: LogEntry, secret: bytes, run_id: bytes) -> list[tuple[bytes, float]]:
    """The canonical (key, fp32 coefficient) list of a committed round."""
    decoded = entry.decoded()
    k_steps, n_probes = entry.num_steps, entry.num_probes
    contributions: list[tuple[bytes, float]] = []  # float64, canonical order
    if entry.directions == "shared":
        for k in range(k_steps):
            for p in range(n_probes):
                g = _robust(
                    [float(decoded[s][k * n_probes + p]) for s in entry.sites], entry.aggregator, entry.trim_frac
                )
                key = probe_key(secret, run_id, entry.round_idx, "*", k, p, "shared", entry.seed_pool)
                contributions.append((key, entry.lr * g / n_probes))
    else:
        n_sites = len(entry.sites)
        for s in entry.sites:
            for k in range(k_steps):
                for p in range(n_probes):
                    g = float(decoded[s][k * n_probes + p])
                    key = probe_key(secret, run_id, entry.round_idx, s, k, p, "per-site", entry.seed_pool)
                    contributions.append((key, entry.lr * g / (n_sites * n_probes)))
    if entry.seed_pool:
        # FedKSeed: one coefficient per pool seed, summed exactly in float64, in seed order.
        sums: dict[bytes, list[float]] = {}
        for key, c in contributions:
            sums.setdefault(key, []).append(c)
        ordered = sorted(sums.items())
        return [(key, float(np.float32(math.fsum(cs)))) for key, cs in ordered]
    return [(key, float(np.float32(c))) for key, c in contributions]


# --------------------------------------------------------------------------------------------
# Replica: one process's copy of theta (work weights on the device + fp32 master off it)
# --------------------------------------------------------------------------------------------


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

    def _new_store(self, tag: str, tensors: Sequence[torch.Tensor]) -> master.MasterStore:
        if self.store_kind == "host":
            return master.HostStore(tensors)
        path = self.workdir / f"master-{tag}-{os.getpid()}-{id(self):x}.safetensors"
        return master.DiskStore(path, self.manifest, tensors)

    def start_run(self, run_id: bytes) -> None:
        """Reset to the base weights and follow the log of ``run_id`` from round 0."""
        master.reset(self.base, self.work)
        self.store = self._new_store(run_id.hex()[:12], self.work)
        self.run_id = run_id
        self.applied = 0
        self.hash = master.state_hash(self.store, self.manifest)

    def apply(self, round_idx: int, terms: list[tuple[bytes, float]]) -> str:
        """Replay one round on the master state and refresh the work weights."""
        assert round_idx == self.applied + 1, f"replay of round {round_idx} after round {self.applied}"
        with torch.no_grad():
            self.hash = master.replay(self.store, self.work, terms)
        self.applied = round_idx
        return self.hash

    def sync(self, entries: Sequence[LogEntry], secrets: Sequence[bytes]) -> None:
        """Apply the log entries this replica has not applied yet."""
        for entry, secret in zip(entries, secrets, strict=True):
            if entry.round_idx <= self.applied:
                continue
            if entry.round_idx != self.applied + 1:
                raise ReplyRejected(
                    f"replay gap: this copy applied round {self.applied}, log starts at {entry.round_idx}"
                )
            self.apply(entry.round_idx, replay_terms(entry, secret, self.run_id))

    def save(self, folder: Path) -> None:
        """Persist the master state (run, round, hash) for a later process of the same site.

        In deployment every message runs in a fresh ClientApp process; without this the site
        would start from the base weights each time. The file is hard-linked when possible (the
        store writes each round to a new inode), so saving costs no copy.
        """
        folder.mkdir(parents=True, exist_ok=True)
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
                tensors = [torch.empty(e.shape, dtype=torch.float32) for e in self.manifest]
                for i, t in enumerate(tensors):
                    self.store.read_into(i, t)
                master.DiskStore(tmp, self.manifest, tensors)
            os.replace(tmp, target)
        write_state_json(
            folder / "replica.json",
            {
                "run": self.run_id.hex(),
                "applied": self.applied,
                "hash": self.hash,
                "manifest": self.manifest.digest(),
                "file": name,
            },
        )
        for old in folder.glob("master-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        prune_sibling_runs(folder)  # keep the saved states of this site's two most recent runs only

    @staticmethod
    def saved_round(folder: Path | None, run_id: bytes) -> int:
        """Round of the state saved in ``folder`` for ``run_id`` (-1 if none)."""
        if folder is None or not (folder / "replica.json").is_file():
            return -1
        try:
            meta = read_state_json(folder / "replica.json")
        except ValueError:
            return -1
        return int(meta["applied"]) if meta.get("run") == run_id.hex() else -1

    def load(self, folder: Path, run_id: bytes) -> None:
        """Continue from a state saved by ``save`` (checked against its recorded hash)."""
        meta = read_state_json(folder / "replica.json")
        if meta["run"] != run_id.hex():
            raise ValueError(f"{folder}: saved state belongs to run {meta['run'][:16]}, not {run_id.hex()[:16]}")
        if meta["manifest"] != self.manifest.digest():
            raise ValueError(f"{folder}: saved state has another parameter layout")
        saved = master.DiskStore(folder / meta["file"], self.manifest)
        with torch.no_grad():
            master.reset(saved, self.work)
        self.store = self._new_store(run_id.hex()[:12], self.work)
        h = master.state_hash(self.store, self.manifest)
        if h != meta["hash"]:
            raise ValueError(f"{folder}: saved state hashes to {h[:12]}, recorded {meta['hash'][:12]}")
        self.run_id, self.applied, self.hash = run_id, int(meta["applied"]), h

    def load_tensors(self, tensors: Sequence[torch.Tensor], round_idx: int, run_id: bytes) -> None:
        """Continue from the weights of ``round_idx`` received as a snapshot (already verified)."""
        with torch.no_grad():
            for w, t in zip(self.work, tensors, strict=True):
                w.copy_(t.view_as(w).to(w.device, w.dtype))
        self.store = self._new_store(run_id.hex()[:12], self.work)
        self.run_id, self.applied = run_id, round_idx
        self.hash = master.state_hash(self.store, self.manifest)

    @contextmanager
    def local(self):  # type: ignore[no-untyped-def]
        """Local steps may perturb the work weights freely; they are reset from the master after."""
        try:
            yield self.work
        finally:
            with torch.no_grad():
                master.reset(self.store, self.work)

    @property
    def short_hash(self) -> bytes:
        return bytes.fromhex(self.hash)[:HASH_BYTES]


_REPLICAS: dict[tuple[int, str], Replica] = {}


def replica_for(model: nn.Module, run_id: bytes, workdir: Path, store_kind: str, namespace: str = "") -> Replica:
    """The process's replica of ``model`` for ``run_id`` (shared by every site in the process)."""
    key = (id(model), namespace)
    rep = _REPLICAS.get(key)
    if rep is None or rep.model is not model:
        rep = Replica(model, workdir, store_kind)
        _REPLICAS[key] = rep
    if rep.run_id != run_id:
        rep.start_run(run_id)
    return rep


# --------------------------------------------------------------------------------------------
# Local work on a site
# --------------------------------------------------------------------------------------------


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Mean next-token loss over the answer tokens of ``batch`` (labels -100 elsewhere)."""
    with torch.inference_mode():
        return float(answer_loss(model, batch))


def _apply_all(work: Sequence[torch.Tensor], packed: Sequence[torch.Tensor], alpha: float) -> None:
    for i, (w, bits) in enumerate(zip(work, packed)):
        keystream.add_(w, b"", i, alpha, packed=bits)


def local_steps(
    model: nn.Module,
    work: Sequence[torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    keys: Sequence[Sequence[bytes]],
    uniforms: np.ndarray,
    *,
    eps: float,
    lr: float,
    scale: float,
    codec: str,
) -> tuple[bytes, np.ndarray, float]:
    """K SPSA steps of P probes on ``work`` (perturbed in place; the caller resets it).

    Returns the K*P one-byte codes, the raw (unquantised) scalars and the mean train loss.
    """
    n_probes = len(keys[0])
    device = work[0].device
    numels = [w.numel() for w in work]
    cod = SCALAR_CODECS[codec]
    codes = bytearray()
    raw = []
    losses = []
    for k, batch in enumerate(batches):
        packs = [[keystream.tensor_bits(key, i, n, device) for i, n in enumerate(numels)] for key in keys[k]]
        g_hat = []
        for p, packed in enumerate(packs):
            _apply_all(work, packed, eps)
            loss_plus = batch_loss(model, batch)
            _apply_all(work, packed, -2.0 * eps)
            loss_minus = batch_loss(model, batch)
            g = (loss_plus - loss_minus) / (2.0 * eps)
            if not math.isfinite(g):
                raise ValueError(f"step {k} probe {p}: loss is not finite ({loss_plus}, {loss_minus})")
            u = uniforms[k * n_probes + p : k * n_probes + p + 1]
            code = cod.encode(np.array([g]), u, scale)
            codes += code
            g_hat.append(float(cod.decode(code, 1, scale)[0]))
            raw.append(g)
            losses.append(0.5 * (loss_plus + loss_minus))
            if n_probes > 1:
                _apply_all(work, packed, eps)
        # The site's own step, with the values the server will apply (so its trajectory is the
        # one its scalars describe). With one probe, undo -eps and step in one pass.
        for p, packed in enumerate(packs):
            step = -lr * g_hat[p] / n_probes
            _apply_all(work, packed, step + (eps if n_probes == 1 else 0.0))
    return bytes(codes), np.array(raw), float(np.mean(losses))


# --------------------------------------------------------------------------------------------
# Server half
# --------------------------------------------------------------------------------------------


def round_secret(cfg: RunConfig, run_id: bytes, round_idx: int) -> bytes:
    """A fresh 32-byte secret (``os.urandom``), or a seed-derived one for reproducible runs."""
    if cfg.crypto.deterministic_secrets:
        return schedule.derive(schedule.run_key(cfg.run.seed), "secret", run_id, round_idx)
    return os.urandom(32)


def reply_overhead_bytes(num_scalars: int) -> int:
    """Bytes of framing around ``num_scalars`` one-byte codes in an uplink payload.

    88 bytes for up to 39 scalars (length varints grow by one byte at 40 and at 128 scalars):
    wire header, the field names, a 16-byte state hash, the float64 train loss, and the AEAD
    nonce and tag that bind the reply to (run, round, site).
    """
    inner = wire.encode({"codes": bytes(num_scalars), "hash": bytes(HASH_BYTES), "loss": 0.0})
    return len(wire.encode({"blob": bytes(len(inner) + envelope.REPLY_OVERHEAD)})) - num_scalars


class SpsaServer:
    """Plans rounds (secrets, envelopes, replay logs) and replays the accepted scalars."""

    phases = ("train",)

    def __init__(self, cfg: RunConfig, ctx: ServerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.scfg = cfg.spsa
        self.run_id = ctx.run_id
        self.replica = replica_for(ctx.model, ctx.run_id, ctx.workdir / "server", self.scfg.round_start)
        self.replica.start_run(ctx.run_id)  # the server defines the run: always from the base weights
        self.scale = float(self.scfg.scale)
        self.log: dict[int, LogEntry] = {}
        self.secrets: dict[int, bytes] = {}
        self.synced: dict[str, int] = {}
        self._plans: dict[int, dict[str, Any]] = {}
        self._sent: dict[tuple[int, str], Payload] = {}

    def global_model(self) -> nn.Module:
        return self.ctx.model

    def state_hash(self) -> str:
        return self.replica.hash

    # ---- resume (journal.py) ---------------------------------------------------------------------

    def save_state(self, folder: Path, committed_round: int) -> None:
        """Persist everything a restarted server needs: the replica, the replay log, the secrets,
        and the byte-identical payloads of a planned but uncommitted round.
        """
        assert committed_round == self.replica.applied
        folder.mkdir(parents=True, exist_ok=True)
        self.replica.save(folder / "replica")
        keep = sorted(self.log)[-MAX_LOG_ROUNDS:]
        state = {
            "applied": self.replica.applied,
            "hash": self.replica.hash,
            "scale": self.scale,
            "synced": self.synced,
            "log": encode_log([self.log[r] for r in keep]).hex() if keep else "",
            "secrets": {str(r): v.hex() for r, v in self.secrets.items() if r in keep or r > committed_round},
            "plans": {str(r): wire.encode(p).hex() for r, p in self._plans.items() if r > committed_round},
            # snapshots are not stored: they are the replica's weights, rebuilt identically on load
            "sent": {
                f"{r}|{site}": wire.encode({**p, "snap": b"\x01" if p["snap"] else b""}).hex()
                for (r, site), p in self._sent.items()
                if r > committed_round
            },
        }
        write_state_json(folder / "spsa.json", state)

    def load_state(self, folder: Path) -> int:
        """Restore what ``save_state`` wrote; returns the committed round."""
        state = read_state_json(folder / "spsa.json")
        self.replica.load(folder / "replica", self.run_id)
        if (self.replica.applied, self.replica.hash) != (state["applied"], state["hash"]):
            raise ValueError(f"{folder}: replica and spsa.json disagree (a torn save?)")
        self.scale = float(state["scale"])
        self.synced = {str(k): int(v) for k, v in state["synced"].items()}
        entries = decode_log(bytes.fromhex(state["log"])) if state["log"] else []
        self.log = {e.round_idx: e for e in entries}
        self.secrets = {int(r): bytes.fromhex(v) for r, v in state["secrets"].items()}
        self._plans = {int(r): wire.decode(bytes.fromhex(v), max_bytes=1 << 16) for r, v in state["plans"].items()}
        self._sent = {}
        for key, v in state["sent"].items():
            r, site = key.split("|", 1)
            payload = wire.decode(bytes.fromhex(v), max_bytes=64 << 20)
            if payload["snap"]:
                payload["snap"] = self._snapshot()
            self._sent[(int(r), site)] = payload
        return self.replica.applied

    def max_reply_bytes(self, phase: str) -> int:
        n = self.scfg.num_steps * self.scfg.num_probes
        return n + reply_overhead_bytes(n)

    def _plan(self, round_idx: int) -> dict[str, Any]:
        if round_idx not in self._plans:
            if round_idx != self.replica.applied + 1:
                raise ValueError(f"cannot plan round {round_idx}: the model is at round {self.replica.applied}")
            self.secrets.setdefault(round_idx, round_secret(self.cfg, self.run_id, round_idx))
            self._plans[round_idx] = {
                "K": self.scfg.num_steps,
                "P": self.scfg.num_probes,
                "lr": float(self.scfg.lr),
                "eps": float(self.scfg.eps),
                "scale": self.scale,
                "codec": self.scfg.scalar_codec,
                "dirs": self.scfg.directions,
                "pool": self.scfg.seed_pool,
                "agg": self.scfg.aggregator,
                "trim": float(self.scfg.trim_frac),
                "hash": self.replica.short_hash,
                "seed": self.cfg.run.seed,
            }
        return self._plans[round_idx]

    def configure(self, round_idx: int, phase: str, site_ids: list[str]) -> dict[str, Payload]:
        plan = self._plan(round_idx)
        secret = self.secrets[round_idx]
        out: dict[str, Payload] = {}
        for site in site_ids:
            cached = self._sent.get((round_idx, site))
            if cached is not None:  # a retried round resends byte-identical envelopes
                out[site] = cached
                continue
            if site not in self.ctx.registry.sites:
                raise ValueError(f"site {site!r} has no registered key")
            first = self.synced.get(site, 0) + 1
            snap, snap_round = b"", -1
            if round_idx - first > self.scfg.snapshot_after or any(t not in self.log for t in range(first, round_idx)):
                # too far behind (or the log was pruned): the signed weights instead of the log
                snap, snap_round, first = self._snapshot(), self.replica.applied, round_idx
            entries = [self.log[t] for t in range(first, round_idx)]
            log_blob = encode_log(entries)
            extra = wire.encode(
                {
                    **plan,
                    "logd": hashlib.sha256(log_blob).digest(),
                    "secrets": b"".join(self.secrets[e.round_idx] for e in entries),
                    "first": first,
                    "snapd": hashlib.sha256(snap).digest() if snap else b"",
                    "snapr": snap_round,
                }
            )
            env = envelope.seal(
                self.ctx.server_keys,
                self.ctx.registry.sites[site],
                run_id=self.run_id,
                round_idx=round_idx,
                site_id=site,
                secret=secret,
                extra=extra,
                not_after=time.time() + self.cfg.crypto.envelope_ttl_s,
            )
            out[site] = {"run": self.run_id, "env": env, "log": log_blob, "snap": snap}
            self._sent[(round_idx, site)] = out[site]
        return out

    def _snapshot(self) -> bytes:
        """The current round-start weights (fp32 masters, manifest order), for a site too far behind."""
        cached = getattr(self, "_snap_cache", None)
        if cached is None or cached[0] != self.replica.applied:
            tensors = []
            for i, e in enumerate(self.replica.manifest):
                t = torch.empty(e.shape, dtype=torch.float32)
                self.replica.store.read_into(i, t)
                tensors.append(t)
            self._snap_cache = (self.replica.applied, encode_tensors(tensors, "fp32"))
        return self._snap_cache[1]

    def _validate(self, round_idx: int, site: str, payload: Payload) -> tuple[bytes, np.ndarray, float]:
        plan = self._plans[round_idx]
        n = plan["K"] * plan["P"]
        wire.require(payload, {"blob": bytes}, where=f"{site} reply")
        inner_blob = envelope.open_reply(
            envelope.reply_key(self.ctx.server_keys, self.run_id, round_idx, site),  # this site's own key
            run_id=self.run_id,
            round_idx=round_idx,
            site_id=site,
            blob=payload["blob"],
            max_bytes=self.max_reply_bytes("train"),
        )
        inner = wire.decode(inner_blob, max_bytes=self.max_reply_bytes("train"))
        wire.require(inner, _REPLY_SCHEMA, where=f"{site} reply")
        if inner["hash"] != plan["hash"]:
            raise ReplyRejected(f"{site} computed on state {inner['hash'].hex()}, expected {plan['hash'].hex()}")
        values = SCALAR_CODECS[plan["codec"]].decode(inner["codes"], n, plan["scale"])
        return inner["codes"], values, screening.reported_loss(site, inner["loss"])

    def aggregate(self, round_idx: int, phase: str, replies: dict[str, Payload], *, min_sites: int) -> RoundResult:
        plan = self._plan(round_idx)
        accepted: dict[str, tuple[bytes, np.ndarray, float]] = {}
        rejected: dict[str, str] = {}
        for site in sorted(replies):
            try:
                accepted[site] = self._validate(round_idx, site, replies[site])
            except (WireError, CodecError, EnvelopeError, ReplyRejected) as err:
                rejected[site] = str(err)
        if len(accepted) < min_sites:
            return RoundResult(False, {"num_accepted": float(len(accepted))}, rejected)
        sites = tuple(sorted(accepted))
        entry = LogEntry(
            round_idx,
            sites,
            b"".join(accepted[s][0] for s in sites),
            plan["lr"],
            plan["scale"],
            plan["K"],
            plan["P"],
            plan["dirs"],
            plan["pool"],
            plan["codec"],
            plan["agg"],
            plan["trim"],
        )
        self.replica.apply(round_idx, replay_terms(entry, self.secrets[round_idx], self.run_id))
        self.log[round_idx] = entry
        for s in sites:
            self.synced[s] = round_idx - 1
        # Next round's clip, robust to lying sites (scalar_clip.py); saturation metrics and warnings.
        clip = scalar_clip.next_clip(
            {s: accepted[s][1] for s in sites}, plan["scale"], self.scfg, getattr(self, "_clip_streaks", None)
        )
        self.scale, self._clip_streaks = clip.scale, clip.streaks
        metrics = {
            "train_loss": float(np.mean([accepted[s][2] for s in sites])),
            "num_accepted": float(len(sites)),
            "num_rejected": float(len(rejected)),
            "scale": plan["scale"],
            **clip.metrics,
        }
        return RoundResult(True, metrics, rejected, sites)


# --------------------------------------------------------------------------------------------
# Client half
# --------------------------------------------------------------------------------------------


class SpsaClient:
    """A site: opens its envelope, replays the log, runs K x P probes, replies with K*P bytes."""

    def __init__(self, cfg: RunConfig, ctx: ClientContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    def step(self, phase: str, msg: Payload, state: Payload) -> tuple[Payload, Payload]:
        if phase != "train":
            raise ValueError(f"spsa has no phase {phase!r}")
        wire.require(msg, {"run": bytes, "env": bytes, "log": bytes, "snap": bytes}, where="spsa round message")
        run_id = msg["run"]
        if "run" in state and state["run"] != run_id:
            # the state (and its replay guard) belongs to one run; a signed envelope of another run
            # sent here must not replace that guard, or old envelopes of this run open again
            raise EnvelopeError("run", f"envelope of run {run_id.hex()[:16]}, this site is in another run")
        guard = ReplayGuard.from_bytes(state["guard"]) if "guard" in state else ReplayGuard()
        guard_file = None
        if self.ctx.state_dir is not None:  # the guard outlives this process (guardfile.py)
            guard_file = guardfile.guard_path(self.ctx.state_dir, self.ctx.site_keys.server_kid, run_id)
            guard = guardfile.newest(guard, guardfile.load(guard_file))
        opened, guard = envelope.open_envelope(
            msg["env"],
            self.ctx.site_keys,
            run_id=run_id,
            guard=guard,
            now=time.time(),
            max_skip=self.cfg.crypto.max_skip,
        )
        if guard_file is not None:
            guardfile.store(guard_file, guard)  # before the secret is used
        plan = wire.decode(opened.extra, max_bytes=1 << 16)
        wire.require(plan, _PLAN_SCHEMA, where="round plan")
        if hashlib.sha256(msg["log"]).digest() != plan["logd"]:
            raise ValueError("replay log does not match the digest in the signed plan")
        entries = decode_log(msg["log"])
        secrets = [plan["secrets"][32 * i : 32 * (i + 1)] for i in range(len(entries))]
        if len(plan["secrets"]) != 32 * len(entries):
            raise ValueError("round plan carries the wrong number of catch-up secrets")
        replica = replica_for(
            self.ctx.model, run_id, self.ctx.workdir, self.cfg.spsa.round_start, self.ctx.replica_namespace
        )
        site_dir = self.ctx.state_dir / "spsa" / run_id.hex() if self.ctx.state_dir else None
        saved = Replica.saved_round(site_dir, run_id)
        target = opened.round_idx - 1  # this round starts from theta after round r-1
        if site_dir is not None and replica.applied < saved <= target:
            replica.load(site_dir, run_id)  # a fresh process: continue from this site's saved state
        if (hashlib.sha256(msg["snap"]).digest() if msg["snap"] else b"") != plan["snapd"]:
            raise ValueError("weights snapshot does not match the digest in the signed plan")
        if plan["snapr"] >= 0 and replica.applied != plan["snapr"]:
            shapes = [e.shape for e in replica.manifest]
            snap = decode_tensors(msg["snap"], shapes, "fp32", where="weights snapshot")
            replica.load_tensors(snap, plan["snapr"], run_id)
        replica.sync(entries, secrets)
        if replica.short_hash != plan["hash"] and plan["first"] == 1:
            # This process followed another lineage under the same run id (a restarted run); the
            # log starts at round 1, so start again from the base weights and replay all of it.
            replica.start_run(run_id)
            replica.sync(entries, secrets)
        if replica.short_hash != plan["hash"]:
            raise ReplyRejected(
                f"{self.ctx.site_id}: state {replica.short_hash.hex()} after replay, "
                f"server expects {plan['hash'].hex()}"
            )
        if site_dir is not None and replica.applied > saved:
            replica.save(site_dir)
        r = opened.round_idx
        codes, loss = self._local_round(replica, opened.secret, run_id, r, plan)
        inner = wire.encode({"codes": codes, "hash": replica.short_hash, "loss": loss})
        blob = envelope.seal_reply(
            opened.reply_key, run_id=run_id, round_idx=r, site_id=self.ctx.site_id, payload=inner
        )
        return {"blob": blob}, {"run": run_id, "guard": guard.to_bytes()}

    def _local_round(
        self, replica: Replica, secret: bytes, run_id: bytes, r: int, plan: Payload
    ) -> tuple[bytes, float]:
        site = self.ctx.site_id
        k_steps, n_probes = plan["K"], plan["P"]
        data_key = schedule.run_key(plan["seed"])
        batches = []
        for k in range(k_steps):
            key = schedule.derive(data_key, "data", site, r, k)
            idx = batch_indices(len(self.ctx.train_set), self.cfg.data.batch_size, key)
            batches.append(self.ctx.train_set.batch(idx))
        keys = [
            [probe_key(secret, run_id, r, site, k, p, plan["dirs"], plan["pool"]) for p in range(n_probes)]
            for k in range(k_steps)
        ]
        uniforms = np.concatenate(
            [
                schedule.uniform(schedule.derive(secret, "quant", run_id, r, site, k, p), 1)
                for k in range(k_steps)
                for p in range(n_probes)
            ]
        )
        with replica.local() as work, torch.no_grad():
            codes, _raw, loss = local_steps(
                replica.model,
                work,
                batches,
                keys,
                uniforms,
                eps=plan["eps"],
                lr=plan["lr"],
                scale=plan["scale"],
                codec=plan["codec"],
            )
        return codes, loss
