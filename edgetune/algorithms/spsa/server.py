"""The spsa server half: plans rounds (secrets, envelopes, replay logs) and replays accepted scalars."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetune import schedules
from edgetune.algorithms import scalar_clip, screening
from edgetune.algorithms.base import ReplyRejected, RoundResult, ServerContext
from edgetune.algorithms.spsa import pool as poolmod
from edgetune.algorithms.spsa.log import MAX_LOG_ROUNDS, LogEntry, decode_log, encode_log, site_norm_factors
from edgetune.algorithms.spsa.replica import SpaceSpec, replica_for
from edgetune.comm import wire
from edgetune.comm.codecs import CodecError, codec_for
from edgetune.comm.tensors import encode_tensors
from edgetune.comm.wire import Payload, WireError
from edgetune.config import RunConfig, SpsaSection
from edgetune.crypto import envelope, schedule
from edgetune.crypto.envelope import EnvelopeError
from edgetune.io import read_state_json, write_state_json

REPLY_SCHEMA: dict[str, type] = {"codes": bytes, "hash": bytes, "loss": float}


def round_secret(cfg: RunConfig, run_id: bytes, round_idx: int) -> bytes:
    """A fresh 32-byte secret (``os.urandom``), or a seed-derived one for reproducible runs."""
    if cfg.crypto.deterministic_secrets:
        return schedule.derive(schedule.run_key(cfg.run.seed), "secret", run_id, round_idx)
    return os.urandom(32)


def pool_secret(cfg: RunConfig, run_id: bytes) -> bytes:
    """The run's seed-pool secret (run-scope pools): it keys the S directions of the whole run."""
    if cfg.crypto.deterministic_secrets:
        return schedule.derive(schedule.run_key(cfg.run.seed), "secret", run_id, "run-pool")
    return os.urandom(32)


def optimizer_spec(scfg: SpsaSection) -> poolmod.OptimizerSpec:
    return poolmod.OptimizerSpec(scfg.optimizer, scfg.momentum, scfg.adam_beta2, scfg.adam_eps)


def space_spec(scfg: SpsaSection, pool_key: bytes) -> SpaceSpec:
    run_pool = scfg.pool_scope == "run" and scfg.seed_pool > 0
    return SpaceSpec(
        sparse_frac=scfg.sparse_frac,
        pool_size=scfg.seed_pool if run_pool else 0,
        pool_key=pool_key if run_pool else b"",
        optimizer=optimizer_spec(scfg) if run_pool else poolmod.OptimizerSpec(),
    )


def reply_overhead_bytes(num_scalars: int) -> int:
    """Bytes of framing around ``num_scalars`` bytes of codes in an uplink payload (the one-byte codecs:
    one per scalar; ``sign``: ``codec_for(spec).blob_len(K, P)``).

    88 bytes for up to 39 scalars (length varints grow by one byte at 40 and at 128 scalars):
    wire header, the field names, a 16-byte state hash, the float64 train loss, and the AEAD
    nonce and tag that bind the reply to (run, round, site).
    """
    from edgetune.algorithms.spsa.replica import HASH_BYTES

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
        self.pool_key = pool_secret(cfg, ctx.run_id)
        self.space = space_spec(self.scfg, self.pool_key)
        self.replica = replica_for(
            ctx.model, ctx.run_id, ctx.workdir / "server", self.scfg.round_start, space=self.space
        )
        self.replica.start_run(ctx.run_id, self.space)  # the server defines the run: always from the base
        self.scale = float(self.scfg.scale)
        self.log: dict[int, LogEntry] = {}
        self.secrets: dict[int, bytes] = {}
        self.synced: dict[str, int] = {}
        self._plans: dict[int, dict[str, Any]] = {}
        self._sent: dict[tuple[int, str], Payload] = {}
        self._snap_cache: tuple[int, bytes] | None = None
        self._clip_streaks: dict[str, int] = {}  # scalar_clip warnings only; not part of the state

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
            "pool_key": self.pool_key.hex(),
            "log": encode_log([self.log[r] for r in keep]).hex() if keep else "",
            "secrets": {str(r): v.hex() for r, v in self.secrets.items() if r in keep or r > committed_round},
            "plans": {str(r): wire.encode(p).hex() for r, p in self._plans.items() if r > committed_round},
            # snapshots are not stored: they are the replica's state, rebuilt identically on load
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
        self.pool_key = bytes.fromhex(state["pool_key"])
        self.space = space_spec(self.scfg, self.pool_key)
        self.replica.start_run(self.run_id, self.space)
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
        n = codec_for(self.scfg.scalar_codec).blob_len(self.scfg.num_steps, self.scfg.num_probes)
        return n + reply_overhead_bytes(n)

    # ---- planning ------------------------------------------------------------------------------

    def _plan(self, round_idx: int) -> dict[str, Any]:
        if round_idx not in self._plans:
            if round_idx != self.replica.applied + 1:
                raise ValueError(f"cannot plan round {round_idx}: the model is at round {self.replica.applied}")
            self.secrets.setdefault(round_idx, round_secret(self.cfg, self.run_id, round_idx))
            self._plans[round_idx] = {
                "K": self.scfg.num_steps,
                "P": self.scfg.num_probes,
                "lr": float(schedules.parse(self.scfg.lr_schedule).value(self.scfg.lr, round_idx, self.cfg.num_rounds)),
                "eps": float(self.scfg.eps),
                "scale": self.scale,
                "codec": self.scfg.scalar_codec,
                "dirs": self.scfg.directions,
                "pool": self.scfg.seed_pool,
                "scope": self.scfg.pool_scope,
                "norm": self.scfg.normalizer,
                "diff": self.scfg.difference,
                "obj": self.scfg.objective,
                "opt": self.space.optimizer.to_text(),
                "pkey": self.space.pool_key,
                "sparse": float(self.scfg.sparse_frac),
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
        # Earlier rounds are never resent (a retry resends the current round): drop their messages,
        # or the server would hold every site's downlink of every round of the run.
        for key in [k for k in self._sent if k[0] < round_idx]:
            del self._sent[key]
        # Sites that last synced at the same round get the same log: encode it once per round, not
        # once per site (each entry holds every site's scalars, so per-site encoding is O(sites^2)).
        logs: dict[int, tuple[list[LogEntry], bytes]] = {}
        for site in site_ids:
            cached = self._sent.get((round_idx, site))
            if cached is not None:  # a retried round resends byte-identical envelopes
                out[site] = cached
                continue
            if site not in self.ctx.registry.sites:
                raise ValueError(f"site {site!r} has no registered key")
            first = self.synced.get(site, 0) + 1
            snap, snap_round = b"", -1
            if first not in logs:
                listed = [self.log[t] for t in range(first, round_idx) if t in self.log]
                logs[first] = (listed, encode_log(listed))
            entries, log_blob = logs[first]
            too_far = round_idx - first > self.scfg.snapshot_after or len(entries) != round_idx - first
            # A run-scope pool's snapshot is its coefficients (kilobytes): send it whenever it is
            # smaller than the log of the missed rounds.
            cheaper = self.space.run_pool and first < round_idx and len(self._snapshot()) < len(log_blob)
            if too_far or cheaper:
                snap, snap_round, first = self._snapshot(), self.replica.applied, round_idx
                entries, log_blob = [], encode_log([])
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
        """The current round-start state for a site too far behind: a run-scope pool's coefficients,
        else the fp32 masters in manifest order.
        """
        if self._snap_cache is None or self._snap_cache[0] != self.replica.applied:
            if self.replica.pool is not None:
                blob = poolmod.encode_state(self.replica.pool)
            else:
                blob = encode_tensors(self.replica.snapshot_tensors(), "fp32")
            self._snap_cache = (self.replica.applied, blob)
        return self._snap_cache[1]

    # ---- aggregation ---------------------------------------------------------------------------

    def _validate(self, round_idx: int, site: str, payload: Payload) -> tuple[bytes, np.ndarray, float]:
        plan = self._plans[round_idx]
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
        wire.require(inner, REPLY_SCHEMA, where=f"{site} reply")
        if inner["hash"] != plan["hash"]:
            raise ReplyRejected(f"{site} computed on state {inner['hash'].hex()}, expected {plan['hash'].hex()}")
        values = codec_for(plan["codec"]).decode(inner["codes"], plan["K"], plan["P"], plan["scale"])
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
            plan["scope"],
            plan["norm"],
        )
        with torch.no_grad():
            self.replica.apply(entry, self.secrets[round_idx])
        self.log[round_idx] = entry
        for s in sites:
            self.synced[s] = round_idx - 1
        # Next round's clip, robust to lying sites (scalar_clip.py); saturation metrics and warnings.
        # It bounds the scalars sites send; a run-scope pool's optimizer state (momentum, adam) is
        # computed by every replica from the committed codes, so the clip bounds its input too.
        clip = scalar_clip.next_clip({s: accepted[s][1] for s in sites}, plan["scale"], self.scfg, self._clip_streaks)
        self.scale, self._clip_streaks = clip.scale, clip.streaks
        # The replay scaled sites whose scalars' norm exceeds the round's bound (log.site_norm_factors).
        factors = site_norm_factors({s: accepted[s][1] for s in sites})
        metrics = {
            "train_loss": float(np.mean([accepted[s][2] for s in sites])),
            "num_accepted": float(len(sites)),
            "num_rejected": float(len(rejected)),
            "scale": plan["scale"],
            **clip.metrics,
            "norm_bounded_sites": float(sum(f < 1.0 for f in factors.values())),
            "norm_bound_min_factor": min(factors.values()),
        }
        if self.replica.pool is not None:
            metrics["pool_coeff_l1"] = float(np.abs(self.replica.pool.n).sum(dtype=np.float64) * poolmod.POOL_QUANTUM)
        return RoundResult(True, metrics, rejected, sites)

    # ---- model delivery --------------------------------------------------------------------------

    def delta_payload(self) -> Payload:
        """What ``edgetune export --delta`` writes: the run's coefficients, not its weights."""
        if self.replica.pool is None:
            raise ValueError("export --delta needs a run-scope seed pool (spsa.pool_scope = 'run', spsa.seed_pool > 0)")
        return {
            "run": self.run_id,
            "round": self.replica.applied,
            "hash": bytes.fromhex(self.replica.hash),
            "pkey": self.pool_key,
            "sparse": float(self.scfg.sparse_frac),
            "pool": poolmod.encode_state(self.replica.pool),
            "manifest": self.replica.manifest.digest(),
        }
