"""The spsa client half: a site opens its envelope, catches up, probes, and replies with K*P bytes."""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetune.algorithms.base import ClientContext, ReplyRejected
from edgetune.algorithms.spsa import pool as poolmod
from edgetune.algorithms.spsa.local import DIFFERENCES, OBJECTIVES, Lane, local_steps
from edgetune.algorithms.spsa.log import decode_log, probe_key
from edgetune.algorithms.spsa.replica import Replica, SpaceSpec, replica_for
from edgetune.comm import wire
from edgetune.comm.codecs import is_codec
from edgetune.comm.tensors import decode_tensors
from edgetune.comm.wire import Payload, WireError
from edgetune.config import RunConfig
from edgetune.crypto import envelope, guardfile, schedule
from edgetune.crypto.envelope import EnvelopeError
from edgetune.crypto.guardfile import ReplayGuard
from edgetune.data.prompts import TokenizedSet, batch_indices
from edgetune.models.biascache import BiasRunner
from edgetune.models.headcache import FEATURES_FOLDER, HeadRunner
from edgetune.models.load import resolve_devices
from edgetune.models.params import trainable_tensors
from edgetune.models.suffix import SuffixRunner

PLAN_SCHEMA: dict[str, type] = {
    "K": int,
    "P": int,
    "lr": float,
    "eps": float,
    "scale": float,
    "codec": str,
    "dirs": str,
    "pool": int,
    "scope": str,
    "norm": str,
    "diff": str,
    "obj": str,
    "opt": str,
    "pkey": bytes,
    "sparse": float,
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

MAX_SCALARS = 1 << 16
"""Most scalars (K*P) a plan may ask of a site in one round."""


def check_plan(plan: Payload) -> None:
    """Reject a signed plan no configuration can produce (defence in depth behind the signature)."""
    wire.require(plan, PLAN_SCHEMA, where="round plan")
    if not (1 <= plan["K"] and 1 <= plan["P"] and plan["K"] * plan["P"] <= MAX_SCALARS):
        raise WireError(f"round plan asks for {plan['K']} x {plan['P']} probes")
    if not is_codec(plan["codec"]) or plan["diff"] not in DIFFERENCES or plan["obj"] not in OBJECTIVES:
        raise WireError("round plan: unknown codec, difference or objective")
    if plan["dirs"] not in {"per-site", "shared"} or plan["scope"] not in {"round", "run"}:
        raise WireError("round plan: unknown directions or pool scope")
    if plan["norm"] not in {"mean", "sqrt"} or not 0.0 <= plan["sparse"] < 1.0 or plan["pool"] < 0:
        raise WireError("round plan: bad normalizer, sparse fraction or pool size")
    if plan["scope"] == "run" and (plan["pool"] < 1 or len(plan["pkey"]) != 32):
        raise WireError("round plan: a run-scope pool needs pool >= 1 and a 32-byte pool key")
    if not (plan["lr"] > 0 and plan["eps"] > 0 and plan["scale"] > 0):
        raise WireError("round plan: lr, eps and scale must be positive")
    poolmod.OptimizerSpec.from_text(plan["opt"])


def space_of(plan: Payload) -> SpaceSpec:
    run_pool = plan["scope"] == "run"
    return SpaceSpec(
        sparse_frac=float(plan["sparse"]),
        pool_size=plan["pool"] if run_pool else 0,
        pool_key=plan["pkey"] if run_pool else b"",
        optimizer=poolmod.OptimizerSpec.from_text(plan["opt"]) if run_pool else poolmod.OptimizerSpec(),
    )


class SpsaClient:
    """A site: opens its envelope, replays the log, runs K x P probes, replies with K*P bytes."""

    def __init__(self, cfg: RunConfig, ctx: ClientContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        if cfg.spsa.objective == "choices":
            # when the client is built, before any probe: every training example must be scorable by its candidates
            for i in range(len(ctx.train_set)):
                ctx.train_set.choice_row(i)

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
        check_plan(plan)
        if hashlib.sha256(msg["log"]).digest() != plan["logd"]:
            raise ValueError("replay log does not match the digest in the signed plan")
        entries = decode_log(msg["log"])
        secrets = [plan["secrets"][32 * i : 32 * (i + 1)] for i in range(len(entries))]
        if len(plan["secrets"]) != 32 * len(entries):
            raise ValueError("round plan carries the wrong number of catch-up secrets")
        space = space_of(plan)
        replica = replica_for(
            self.ctx.model, run_id, self.ctx.workdir, self.cfg.spsa.round_start, self.ctx.replica_namespace, space
        )
        site_dir = self.ctx.store.run_folder(run_id.hex(), "spsa") if self.ctx.store.persistent else None
        saved = Replica.saved_round(site_dir, run_id, space, replica.manifest)
        target = opened.round_idx - 1  # this round starts from theta after round r-1
        if site_dir is not None and replica.applied < saved <= target:
            replica.load(site_dir, run_id)  # a fresh process: continue from this site's saved state
        if (hashlib.sha256(msg["snap"]).digest() if msg["snap"] else b"") != plan["snapd"]:
            raise ValueError("weights snapshot does not match the digest in the signed plan")
        if plan["snapr"] >= 0 and replica.applied != plan["snapr"]:
            if space.run_pool:
                replica.load_pool(poolmod.decode_state(msg["snap"], size=space.pool_size))
            else:
                shapes = [e.shape for e in replica.manifest]
                snap = decode_tensors(msg["snap"], shapes, "fp32", where="weights snapshot")
                replica.load_tensors(snap, plan["snapr"], run_id)
        replica.sync(entries, secrets)
        if replica.short_hash != plan["hash"] and plan["first"] == 1:
            # This process followed another lineage under the same run id (a restarted run); the
            # log starts at round 1, so start again from the base weights and replay all of it.
            replica.start_run(run_id, space)
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

    def _features_dir(self) -> Path | None:
        """Where this site keeps its label-head features on disk (its state folder), or None."""
        return None if self.ctx.state_dir is None else Path(self.ctx.state_dir) / FEATURES_FOLDER

    def _local_round(
        self, replica: Replica, secret: bytes, run_id: bytes, r: int, plan: Payload
    ) -> tuple[bytes, float]:
        site = self.ctx.site_id
        k_steps, n_probes = plan["K"], plan["P"]
        data_key = schedule.run_key(plan["seed"])
        keys = [
            [
                probe_key(secret, run_id, r, site, k, p, plan["dirs"], plan["pool"], plan["scope"], plan["pkey"])
                for p in range(n_probes)
            ]
            for k in range(k_steps)
        ]
        uniforms = np.concatenate(
            [
                schedule.uniform(schedule.derive(secret, "quant", run_id, r, site, k, p), 1)
                for k in range(k_steps)
                for p in range(n_probes)
            ]
        )
        pool = (self.cfg.spsa.bias_pool, self.cfg.spsa.bias_examples)
        with replica.local() as work, torch.no_grad():
            runner = probe_runner(
                replica.model, replica.manifest.names, self.ctx.train_set, plan["obj"], self._features_dir(), pool
            )
            # a token bias's steps draw from its pool's examples (the only ones whose tokens are cached)
            population = runner.examples if isinstance(runner, BiasRunner) else list(range(len(self.ctx.train_set)))
            batches = []
            for k in range(k_steps):
                key = schedule.derive(data_key, "data", site, r, k)
                idx = [population[i] for i in batch_indices(len(population), self.cfg.data.batch_size, key)]
                batches.append(self.ctx.train_set.batch(idx, choices=plan["obj"] == "choices"))
            lanes = (
                []
                if isinstance(runner, BiasRunner)
                else probe_lanes(replica, self.cfg.model.device, batches, self.ctx.train_set, plan["obj"])
            )
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
                difference=plan["diff"],
                masks=replica.masks,
                runner=runner,
                extra_lanes=lanes,
            )
        return codes, loss


def probe_runner(
    model: nn.Module,
    names: tuple[str, ...],
    train_set: TokenizedSet | None,
    objective: str,
    features_dir: Path | None = None,
    bias_pool: tuple[int, int] = (4096, 0),
) -> HeadRunner | BiasRunner | SuffixRunner | None:
    """What computes the probe losses cheaper than a full forward: cached features for a label head
    (``models/headcache.py``) or a token bias (``models/biascache.py``; ``bias_pool``: its tokens and
    examples, ``spsa.bias_pool`` and ``spsa.bias_examples``; both also on disk in ``features_dir``), the
    upper blocks only for perturbations there (``models/suffix.py``); None: full forwards.
    """
    if train_set is not None:
        head = HeadRunner.for_model(model, names, train_set, objective, features_dir)
        if head is not None:
            return head
        bias = BiasRunner.for_model(model, names, train_set, objective, *bias_pool, features_dir)
        if bias is not None:
            return bias
    return SuffixRunner.for_model(model, names)


_LANE_MODELS: dict[tuple[int, int, str], nn.Module] = {}


def probe_lanes(
    replica: Replica,
    device_spec: str,
    batches: list[dict[str, torch.Tensor]],
    train_set: TokenizedSet | None = None,
    objective: str = "answer",
) -> list[Lane]:
    """Replicas of the site's model on the further devices of ``model.device`` (none for one device).

    The model is copied to each further device once per process; at every round its trainable
    tensors are set from the primary's (a copy: bitwise equal), so every lane starts the round
    from the same weights. The primary is the replica's own model, on the first device.
    """
    devices = resolve_devices(device_spec)
    primary = replica.work[0].device
    if len(devices) < 2:
        return []
    if devices[0].type != primary.type:
        raise ValueError(f"model.device = {device_spec!r}: the model is on {primary}, not on the first device")
    lanes = []
    for slot, dev in enumerate(devices[1:], start=1):
        key = (id(replica.model), slot, str(dev))
        model = _LANE_MODELS.get(key)
        if model is None:
            model = copy.deepcopy(replica.model).to(dev)
            _LANE_MODELS[key] = model
        work = trainable_tensors(model, replica.manifest)
        for w, src in zip(work, replica.work, strict=True):
            w.copy_(src)
        lanes.append(
            Lane(
                model=model,
                work=work,
                batches=[{k: v.to(dev) for k, v in b.items()} for b in batches],
                masks=None if replica.masks is None else [m.to(dev) for m in replica.masks],
                runner=probe_runner(model, replica.manifest.names, train_set, objective),
            )
        )
    return lanes
