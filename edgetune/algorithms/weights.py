"""The machinery of the algorithms that send weights: kavg, lowrank, dppf and deft.

``WeightsServer`` holds the global trainable tensors (fp32, manifest order), plans each site's
round from ``[kavg]`` (K, lr, optimizer, codecs, batch size; ``site_plan``), sends the tensors,
and aggregates the replies in four steps, each a method an algorithm may override::

    decode   a site's reply -> the deltas of the tensors its plan trained     (bad reply: rejected)
    screen   all decoded updates -> outliers rejected, the rest clipped      (``screening.py``)
    combine  the screened updates -> new ``params``                          (no default: the algorithm)
    check    the step is finite and within ``step_bound``; otherwise it is undone, the largest
             update left out, and combine runs again (the round goes on without it)

The default screen works on the updates' L2 norms (lowrank screens in dW space instead). The
server's state (``save_state``/``load_state``) is the parameters plus ``extra_state``.

``WeightsClient`` is a site: check the plan, load the global tensors, K local steps on the tensors
the plan selects (``training.py``), reply with their deltas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from edgetune.algorithms import screening, training
from edgetune.algorithms.base import ClientContext, ReplyRejected, RoundResult, ServerContext
from edgetune.comm import wire
from edgetune.comm.codecs import CodecError
from edgetune.comm.tensors import TENSOR_CODECS, decode_tensors, encode_tensors
from edgetune.comm.wire import Payload, WireError
from edgetune.config import KavgSection, RunConfig
from edgetune.io import atomic_write_bytes, read_state_json, write_state_json
from edgetune.models.load import resolve_devices
from edgetune.models.params import Manifest, manifest_of, sha256_tensors, trainable_tensors
from edgetune.schedules import parse as parse_schedule

PLAN_SCHEMA: dict[str, type] = {
    "round": int,
    "K": int,
    "lr": float,
    "opt": str,
    "mom": float,
    "wd": float,
    "down": str,
    "up": str,
    "train": str,
    "seed": int,
    "bs": int,
    "run": str,
}


def check_plan(plan: dict[str, Any]) -> None:
    """Refuse a round plan that no valid ``KavgSection`` could have produced.

    The plan's values go through ``KavgSection``'s own checks; what only a plan can get wrong
    (a batch size below 1, an infinite lr or weight decay: the config's schedules never produce
    them) is checked here.
    """
    problems = []
    if plan["bs"] < 1:
        problems.append(f"bs={plan['bs']} must be >= 1")
    problems += [f"{k}={plan[k]} must be finite" for k in ("lr", "wd") if not math.isfinite(plan[k])]
    if not problems:
        try:
            KavgSection(
                local_steps=plan["K"],
                lr=plan["lr"],
                optimizer=plan["opt"],
                momentum=plan["mom"],
                weight_decay=plan["wd"],
                down_codec=plan["down"],
                up_codec=plan["up"],
            )
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("round plan refused: " + "; ".join(problems))


def round_lr(cfg: RunConfig, round_idx: int) -> float:
    """``kavg.lr`` in round ``round_idx`` under ``kavg.lr_schedule`` and ``kavg.warmup_rounds``."""
    k = cfg.kavg
    sched = parse_schedule(k.lr_schedule, key="kavg.lr_schedule")
    return sched.value(float(k.lr), round_idx, cfg.num_rounds, k.warmup_rounds)


def round_batch_size(cfg: RunConfig, round_idx: int) -> int:
    """``data.batch_size`` in round ``round_idx`` under ``kavg.batch_schedule`` (at least 1)."""
    sched = parse_schedule(cfg.kavg.batch_schedule, key="kavg.batch_schedule")
    return sched.int_value(cfg.data.batch_size, round_idx, cfg.num_rounds)


def aggregate_tensors(
    updates: Sequence[Sequence[torch.Tensor]], weights: Sequence[float], aggregator: str, trim_frac: float
) -> list[torch.Tensor]:
    """Combine per-site tensor lists coordinate-wise: weighted mean, trimmed mean or median."""
    total = float(sum(weights))
    out = []
    for parts in zip(*updates, strict=True):
        stacked = torch.stack([p.to(torch.float64) for p in parts])
        n = len(parts)
        if aggregator == "median":
            ordered = stacked.sort(dim=0).values
            agg = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        elif aggregator == "trimmed":
            cut = int(math.floor(trim_frac * n))
            ordered = stacked.sort(dim=0).values
            agg = ordered[cut : n - cut].mean(dim=0) if n > 2 * cut else ordered.mean(dim=0)
        else:
            w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * (stacked.dim() - 1)))
            agg = (stacked * w).sum(dim=0) / total
        out.append(agg.to(torch.float32))
    return out


def example_weights(plans: dict[str, dict[str, Any]], sites: Sequence[str]) -> list[float]:
    """w_i = K x batch size: the examples the server assigned to each site (never read from a reply)."""
    return [float(plans[s]["K"] * plans[s]["bs"]) for s in sites]


def norm(tensors: Sequence[torch.Tensor]) -> float:
    """Global L2 norm of a list of tensors."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def select(manifest: Manifest, selector: str) -> list[int]:
    """Manifest indices a plan's ``train`` selector names: ``all`` or a substring (``lora_A``)."""
    if selector == "all":
        return list(range(len(manifest)))
    chosen = [e.index for e in manifest if selector in e.name]
    if not chosen:
        raise ValueError(f"train selector {selector!r} matches no trainable tensor")
    return chosen


@dataclass
class Screened:
    """What ``screen`` kept: the updates (scaled in place by the clip) and their norms."""

    updates: dict[str, list[torch.Tensor]]
    norms: dict[str, float]
    """Site -> the norm the screen measured, before the clip."""
    clipped: dict[str, float]
    """Site -> the same norm after the clip."""
    rejected: dict[str, str]
    bound: float
    """The clip (``inf``: none)."""

    def drop(self, site: str) -> None:
        for d in (self.updates, self.norms, self.clipped):
            d.pop(site, None)


class WeightsServer:
    """Holds the global trainable tensors; sends them, screens and combines site updates."""

    phases: tuple[str, ...] = ("train",)

    def __init__(self, cfg: RunConfig, ctx: ServerContext) -> None:
        self.cfg = cfg
        self.kcfg = cfg.kavg
        self.ctx = ctx
        self.model = ctx.model
        self.manifest = manifest_of(self.model)
        self.params = [
            t.detach().to("cpu", torch.float32).clone() for t in trainable_tensors(self.model, self.manifest)
        ]
        self.shapes = [e.shape for e in self.manifest]
        self._down: dict[int, bytes] = {}
        self._plans: dict[str, dict[str, Any]] = {}

    # ---- hooks -----------------------------------------------------------------------------------

    def site_plan(self, round_idx: int, site: str, sites: list[str]) -> dict[str, Any]:
        """The plan one site gets (``train`` selects the tensors it trains and uploads)."""
        k = self.kcfg
        return {
            "round": round_idx,
            "K": k.local_steps,
            "lr": round_lr(self.cfg, round_idx),
            "opt": k.optimizer,
            "mom": float(k.momentum),
            "wd": float(k.weight_decay),
            "down": k.down_codec,
            "up": k.up_codec,
            "train": "all",
            "seed": self.cfg.run.seed,
            "bs": round_batch_size(self.cfg, round_idx),
            "run": self.ctx.run_id.hex(),
        }

    def decode(self, site: str, payload: Payload, plan: dict[str, Any]) -> list[torch.Tensor]:
        """A reply's deltas of the tensors its plan trained (``WireError``/``CodecError``: rejected)."""
        wire.require(payload, {"delta": bytes, "loss": float}, where=f"{site} reply")
        idx = select(self.manifest, plan["train"])
        return decode_tensors(payload["delta"], [self.shapes[i] for i in idx], plan["up"], where=f"{site} update")

    def expand(self, deltas: list[torch.Tensor], plan: dict[str, Any]) -> list[torch.Tensor]:
        """Deltas of the trained tensors -> a full list (zeros for tensors the site did not train)."""
        idx = select(self.manifest, plan["train"])
        full = [torch.zeros(s) for s in self.shapes]
        for i, d in zip(idx, deltas):
            full[i] = d
        return full

    def screen(self, round_idx: int, updates: dict[str, list[torch.Tensor]]) -> Screened:
        """Reject updates far larger than the median site's (3+ sites), clip the rest (L2 norms)."""
        norms = {s: norm(d) for s, d in updates.items()}
        k = self.kcfg
        rejected, bound = screening.screen_norms(
            norms, outlier_mult=k.outlier_mult, clip_norm=k.clip_norm, clip_mult=k.clip_mult
        )
        kept = {s: d for s, d in updates.items() if s not in rejected}
        clipped = {}
        for s, factor in screening.clip_factors({s: norms[s] for s in kept}, bound).items():
            if factor < 1.0:
                for t in kept[s]:
                    t.mul_(factor)
            clipped[s] = norms[s] * factor
        return Screened(kept, {s: norms[s] for s in kept}, clipped, rejected, bound)

    def combine(
        self, round_idx: int, updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]
    ) -> dict[str, float]:
        """Apply the screened updates (site -> full delta list) to ``self.params``; extra metrics."""
        raise NotImplementedError(f"{type(self).__name__} must say how updates combine")

    def step_bound(self, round_idx: int, screened: Screened) -> float:
        """Largest norm the combined step may have, from the updates' norms before and after the clip."""
        clipped, norms = list(screened.clipped.values()), list(screened.norms.values())
        return min(screening.applied_bound(clipped, self.kcfg.aggregator), screening.magnitude_bound(norms))

    def round_metrics(self, round_idx: int, screened: Screened) -> dict[str, float]:
        """Metrics of a committed round beyond the common ones (subclasses)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """JSON-able state beyond the parameters that a resumed server needs (subclasses)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``extra_state``."""

    # ---- protocol --------------------------------------------------------------------------------

    def global_model(self) -> nn.Module:
        return self.model

    def state_hash(self) -> str:
        return sha256_tensors(self.params)

    def max_reply_bytes(self, phase: str) -> int:
        return TENSOR_CODECS[self.kcfg.up_codec].nbytes((sum(e.numel for e in self.manifest),)) * 2 + 4096

    def params_blob(self, round_idx: int) -> bytes:
        """The global tensors with ``kavg.down_codec`` (encoded once per round)."""
        if round_idx not in self._down:
            self._down = {round_idx: encode_tensors(self.params, self.kcfg.down_codec)}
        return self._down[round_idx]

    def configure(self, round_idx: int, phase: str, site_ids: list[str]) -> dict[str, Payload]:
        blob = self.params_blob(round_idx)
        self._plans = {s: self.site_plan(round_idx, s, site_ids) for s in site_ids}
        return {s: {"plan": wire.encode(self._plans[s]), "params": blob} for s in site_ids}

    def aggregate(self, round_idx: int, phase: str, replies: dict[str, Payload], *, min_sites: int) -> RoundResult:
        decoded: dict[str, list[torch.Tensor]] = {}
        losses: dict[str, float] = {}
        rejected: dict[str, str] = {}
        for site in sorted(replies):
            if site not in self._plans:
                rejected[site] = "reply from a site that was not asked"
                continue
            try:
                deltas = self.decode(site, replies[site], self._plans[site])
                losses[site] = screening.reported_loss(site, replies[site]["loss"])
                decoded[site] = deltas
            except (WireError, CodecError, ReplyRejected, ValueError) as err:
                rejected[site] = str(err)
        sc = self.screen(round_idx, decoded)
        rejected.update(sc.rejected)
        if len(sc.updates) < min_sites:
            return RoundResult(False, {"num_accepted": float(len(sc.updates))}, rejected)
        full = {s: self.expand(d, self._plans[s]) for s, d in sc.updates.items()}
        before = [p.clone() for p in self.params]
        while True:
            extra = self.combine(round_idx, full, self._plans)
            problem = screening.check_applied(before, self.params, self.step_bound(round_idx, sc))
            if problem is None:
                break
            for p, b in zip(self.params, before):  # undo, and leave out the largest update
                p.copy_(b)
            worst = max(full, key=lambda s: (sc.clipped[s], s))
            rejected[worst] = f"left out of the aggregate: with it, {problem}"
            sc.drop(worst)
            del full[worst]
            if len(full) < min_sites:
                return RoundResult(False, {"num_accepted": float(len(full))}, rejected)
        self.write_model()
        accepted = sorted(full)
        metrics = {
            "train_loss": sum(losses[s] for s in accepted) / len(accepted),
            "num_accepted": float(len(accepted)),
            "num_rejected": float(len(rejected)),
            "mean_update_norm": sum(sc.norms[s] for s in accepted) / len(accepted),
            "num_clipped": float(sum(sc.clipped[s] < sc.norms[s] for s in accepted)),
            **({"clip_bound": sc.bound} if math.isfinite(sc.bound) else {}),
            **extra,
            **self.round_metrics(round_idx, sc),
        }
        return RoundResult(True, metrics, rejected, tuple(accepted))

    def write_model(self) -> None:
        """Copy ``params`` into the model's trainable tensors (the model also serves evaluation)."""
        with torch.no_grad():
            for w, p in zip(trainable_tensors(self.model, self.manifest), self.params):
                w.copy_(p.to(w.device, w.dtype))

    # ---- resume (federation.py) ------------------------------------------------------------------

    def save_state(self, folder: Path, committed_round: int) -> None:
        """Persist the global parameters of ``committed_round`` (once) and the extra state."""
        folder.mkdir(parents=True, exist_ok=True)
        meta_path = folder / "weights.json"
        meta = read_state_json(meta_path) if meta_path.is_file() else {}
        name = f"params-{committed_round:06d}.safetensors"
        if meta.get("round") != committed_round or not (folder / name).is_file():
            tensors = {e.name: p.contiguous() for e, p in zip(self.manifest, self.params)}
            atomic_write_bytes(folder / name, safetensors_bytes(tensors))
        write_state_json(
            meta_path,
            {
                "round": committed_round,
                "file": name,
                "hash": self.state_hash(),
                "manifest": self.manifest.digest(),
                "extra": self.extra_state(),
            },
        )
        for old in folder.glob("params-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load_state(self, folder: Path) -> int:
        """Restore what ``save_state`` wrote; returns the committed round."""
        meta = read_state_json(folder / "weights.json")
        if meta["manifest"] != self.manifest.digest():
            raise ValueError(f"{folder}: saved server state has another parameter layout")
        loaded = safetensors_load((folder / meta["file"]).read_bytes())
        self.params = [loaded[e.name].to(torch.float32).clone() for e in self.manifest]
        if self.state_hash() != meta["hash"]:
            raise ValueError(f"{folder}: saved parameters do not match their recorded hash")
        self.write_model()
        self._down = {}
        self.load_extra_state(meta.get("extra", {}))
        return int(meta["round"])


class WeightsClient:
    """A site: check the plan, load the global tensors, K local steps on the trained subset."""

    def __init__(self, cfg: RunConfig, ctx: ClientContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.manifest = manifest_of(ctx.model)
        self.shapes = [e.shape for e in self.manifest]

    def load_global(self, msg: Payload) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Check the message, read the plan and set the model's trainable tensors to the global ones."""
        wire.require(msg, {"plan": bytes, "params": bytes}, where="round message")
        plan = wire.decode(msg["plan"], max_bytes=4096)
        wire.require(plan, PLAN_SCHEMA, where="round plan")
        check_plan(plan)
        start = decode_tensors(msg["params"], self.shapes, plan["down"], where="global parameters")
        with torch.no_grad():
            for w, p in zip(trainable_tensors(self.ctx.model, self.manifest), start):
                w.copy_(p.to(w.device, w.dtype))
        return plan, start

    def chosen(self, plan: dict[str, Any]) -> list[torch.Tensor]:
        """The model's parameters the plan's ``train`` selector names, in manifest order."""
        named = dict(self.ctx.model.named_parameters())
        return [named[self.manifest.entries[i].name] for i in select(self.manifest, plan["train"])]

    def train_plan(self, plan: dict[str, Any], params: list[torch.Tensor]) -> list[float]:
        """The plan's K local optimizer steps on ``params`` over this site's keyed batches; the losses."""
        batches = training.site_batches(self.ctx, plan["seed"], plan["round"], plan["K"], plan["bs"])
        return training.local_train(
            self.ctx.model,
            params,
            batches,
            lr=plan["lr"],
            optimizer=plan["opt"],
            momentum=plan["mom"],
            weight_decay=plan["wd"],
            # how a site fits the step into its memory is its own business: not in the plan
            grad_accum_steps=self.cfg.kavg.grad_accum_steps,
            autocast=self.cfg.model.autocast,
            replicas=training.device_replicas(self.ctx.model, resolve_devices(self.cfg.model.device)),
        )

    def train_and_reply(self, plan: dict[str, Any], start: list[torch.Tensor]) -> Payload:
        """The plan's local steps on the tensors it selects, from ``start``; the reply with their deltas."""
        losses = self.train_plan(plan, self.chosen(plan))
        work = trainable_tensors(self.ctx.model, self.manifest)
        deltas = [work[i].detach().to("cpu", torch.float32) - start[i] for i in select(self.manifest, plan["train"])]
        return {"delta": encode_tensors(deltas, plan["up"]), "loss": sum(losses) / len(losses)}
