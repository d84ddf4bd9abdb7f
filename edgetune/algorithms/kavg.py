"""kavg: K local optimizer steps per site, then averaging of the trainable parameters.

Source: Zhou & Cong 2018, "On the convergence properties of a K-step averaging stochastic
gradient descent algorithm for nonconvex optimization" (K-AVG; FedAvg with K local steps)::

    site i:  y <- theta_r ; repeat K times: y <- y - lr * grad L_i(y; B_{i,k})
             reply  Delta_i = y - theta_r                  (codec ``kavg.up_codec``)
    server:  theta_{r+1} = theta_r + sum_i w_i Delta_i / sum_i w_i

The weights w_i are the examples the server assigned to site i (K x batch size), never a
number read from a reply. ``kavg.lr_schedule``, ``kavg.batch_schedule`` and ``kavg.warmup_rounds``
make lr and the batch size functions of the round (``edgetune/schedules.py``; K-AVG's Theorem 2:
a diminishing lr_r with a growing B_r); the server evaluates them when it plans round r and sends
the values in the plan (``round_lr``, ``round_batch_size``). With K = 1 and plain SGD this is one
synchronous SGD step on the union of the sites' batches (the objective being the mean of the site
losses).

Updates are screened before they count: exact size for the codec, finite values, rejection of
updates far larger than the median site's (a scaled or corrupted update; 3+ sites), and a norm
clip in every federation size (adaptive by default, ``screening.py``); the aggregate itself must be
finite and no larger than the clipped updates allow. Coordinate-wise trimmed mean and median are
available for Byzantine sites.

``WeightsServer``/``WeightsClient`` are shared with lowrank, dppf and deft: they hold the global
trainable tensors, the per-site plans and the local training loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from edgetune.algorithms import screening
from edgetune.algorithms.base import ClientContext, ReplyRejected, RoundResult, ServerContext
from edgetune.comm import wire
from edgetune.comm.codecs import CodecError
from edgetune.comm.tensors import TENSOR_CODECS, decode_tensors, encode_tensors
from edgetune.comm.wire import Payload, WireError
from edgetune.config import RunConfig
from edgetune.crypto import schedule
from edgetune.data.prompts import batch_indices
from edgetune.io import atomic_write_bytes, read_state_json, write_state_json
from edgetune.models.loss import answer_loss
from edgetune.models.params import Manifest, manifest_of, sha256_tensors, trainable_tensors
from edgetune.schedules import parse as parse_schedule

_PLAN_SCHEMA: dict[str, type] = {
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
    """Refuse a round plan that no valid ``KavgSection`` could have produced (the config's own checks)."""
    problems = []
    if plan["K"] < 1 or plan["bs"] < 1:
        problems.append(f"K={plan['K']} and bs={plan['bs']} must be >= 1")
    # the config refuses a schedule that reaches 0 (config.RunConfig), so a plan never carries it
    if not (plan["lr"] > 0 and math.isfinite(plan["lr"])):
        problems.append(f"lr={plan['lr']} must be a finite number > 0")
    if plan["opt"] not in {"sgd", "adamw"}:
        problems.append(f"opt={plan['opt']!r} must be sgd or adamw")
    if not 0 <= plan["mom"] < 1:
        problems.append(f"mom={plan['mom']} must be in [0, 1)")
    if not (plan["wd"] >= 0 and math.isfinite(plan["wd"])):
        problems.append(f"wd={plan['wd']} must be a finite number >= 0")
    for key in ("down", "up"):
        if plan[key] not in TENSOR_CODECS:
            problems.append(f"{key}={plan[key]!r} is not a tensor codec ({', '.join(TENSOR_CODECS)})")
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


def norm(tensors: Sequence[torch.Tensor]) -> float:
    """Global L2 norm of a list of tensors."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def local_train(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    lr: float,
    optimizer: str,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    grad_accum_steps: int = 1,
    autocast: str = "none",
) -> list[float]:
    """K optimizer steps (one per batch) on ``params`` only; returns the K training losses.

    The optimizer is created here, so no optimizer state survives a round (sites keep nothing).
    ``grad_accum_steps`` > 1 runs each batch as that many micro-batches and adds their gradients,
    each weighted by its share of the batch's answer tokens, so the step is the full batch's
    (``answer_loss`` is a mean over answer tokens) with a fraction of the activation memory.
    ``autocast`` (``bf16``/``fp16``) runs forward and backward under ``torch.autocast``; fp16
    adds a gradient scaler and needs CUDA.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    keep = {id(p) for p in params}
    frozen = [p for p in trainable if id(p) not in keep]
    device = next(model.parameters()).device
    if autocast == "fp16" and device.type != "cuda":
        raise ValueError(f"model.autocast = 'fp16' needs CUDA (this site trains on {device}); use bf16 or none")
    for p in frozen:
        p.requires_grad_(False)
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type) if autocast == "fp16" else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    losses = []
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            parts = micro_batches(batch, grad_accum_steps)
            total = sum(_answer_tokens(mb) for mb in parts)
            step_loss = 0.0
            for mb in parts:
                n = _answer_tokens(mb)
                if len(parts) > 1 and n == 0:
                    continue  # rows whose answers were cut away contribute nothing
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = answer_loss(model, mb)
                if not torch.isfinite(loss):
                    raise ValueError(f"local training loss is not finite ({float(loss)})")
                # one micro-batch: the loss itself (bitwise the step without accumulation)
                weighted = loss if len(parts) == 1 else loss * (n / total)
                (scaler.scale(weighted) if scaler is not None else weighted).backward()
                step_loss += float(loss.detach()) * (n / total if len(parts) > 1 else 1.0)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
    return losses


def _answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def micro_batches(batch: dict[str, torch.Tensor], num: int) -> list[dict[str, torch.Tensor]]:
    """Split a right-padded batch into ``num`` row chunks (as even as possible), each trimmed to its
    own longest row. ``num`` 1 returns the batch itself.
    """
    rows = batch["input_ids"].shape[0]
    if num <= 1 or rows == 1:
        return [batch]
    out = []
    for idx in torch.arange(rows).tensor_split(min(num, rows)):
        width = int(batch["attention_mask"][idx].sum(dim=1).max())
        out.append({k: v[idx, :width] for k, v in batch.items()})
    return out


def site_batches(ctx: ClientContext, seed: int, round_idx: int, steps: int, batch_size: int) -> list[dict]:
    """The K batches of one site in one round, drawn from the keyed ``data`` stream."""
    data_key = schedule.run_key(seed)
    out = []
    for k in range(steps):
        idx = batch_indices(
            len(ctx.train_set), batch_size, schedule.derive(data_key, "data", ctx.site_id, round_idx, k)
        )
        out.append(ctx.train_set.batch(idx))
    return out


def select(manifest: Manifest, selector: str) -> list[int]:
    """Manifest indices a plan's ``train`` selector names: ``all`` or a substring (``lora_A``)."""
    if selector == "all":
        return list(range(len(manifest)))
    chosen = [e.index for e in manifest if selector in e.name]
    if not chosen:
        raise ValueError(f"train selector {selector!r} matches no trainable tensor")
    return chosen


class WeightsServer:
    """Holds the global trainable tensors; sends them, screens and aggregates site updates."""

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

    # ---- what subclasses adapt -----------------------------------------------------------------

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

    def combine(
        self, round_idx: int, updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]
    ) -> dict[str, float]:
        """Apply the accepted updates (site -> deltas of its trained tensors) to ``self.params``."""
        sites = sorted(updates)
        weights = [float(plans[s]["K"] * plans[s]["bs"]) for s in sites]
        mean = aggregate_tensors([updates[s] for s in sites], weights, self.kcfg.aggregator, self.kcfg.trim_frac)
        for p, d in zip(self.params, mean):
            p.add_(d)
        return {}

    def extra_state(self) -> dict[str, Any]:
        """JSON-able state beyond the parameters that a resumed server needs (subclasses)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``extra_state``."""

    # ---- resume (journal.py) ---------------------------------------------------------------------

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
        with torch.no_grad():
            for w, p in zip(trainable_tensors(self.model, self.manifest), self.params):
                w.copy_(p.to(w.device, w.dtype))
        self._down = {}
        self.load_extra_state(meta.get("extra", {}))
        return int(meta["round"])

    # ---- protocol --------------------------------------------------------------------------------

    def global_model(self) -> nn.Module:
        return self.model

    def state_hash(self) -> str:
        return sha256_tensors(self.params)

    def max_reply_bytes(self, phase: str) -> int:
        return TENSOR_CODECS[self.kcfg.up_codec].nbytes((sum(e.numel for e in self.manifest),)) * 2 + 4096

    def _params_blob(self, round_idx: int) -> bytes:
        if round_idx not in self._down:
            self._down = {round_idx: encode_tensors(self.params, self.kcfg.down_codec)}
        return self._down[round_idx]

    def configure(self, round_idx: int, phase: str, site_ids: list[str]) -> dict[str, Payload]:
        blob = self._params_blob(round_idx)
        self._plans = {s: self.site_plan(round_idx, s, site_ids) for s in site_ids}
        return {s: {"plan": wire.encode(self._plans[s]), "params": blob} for s in site_ids}

    def _validate(self, site: str, payload: Payload, plan: dict[str, Any]) -> list[torch.Tensor]:
        wire.require(payload, {"delta": bytes, "loss": float}, where=f"{site} reply")
        idx = select(self.manifest, plan["train"])
        return decode_tensors(payload["delta"], [self.shapes[i] for i in idx], plan["up"], where=f"{site} update")

    def step_bound(self, round_idx: int, norms: Sequence[float], clipped_norms: Sequence[float]) -> float:
        """Largest norm the aggregate step may have, from the updates' norms before and after the clip."""
        return min(screening.applied_bound(clipped_norms, self.kcfg.aggregator), screening.magnitude_bound(norms))

    def aggregate(self, round_idx: int, phase: str, replies: dict[str, Payload], *, min_sites: int) -> RoundResult:
        accepted: dict[str, list[torch.Tensor]] = {}
        losses: dict[str, float] = {}
        rejected: dict[str, str] = {}
        for site in sorted(replies):
            if site not in self._plans:
                rejected[site] = "reply from a site that was not asked"
                continue
            try:
                deltas = self._validate(site, replies[site], self._plans[site])
                losses[site] = screening.reported_loss(site, replies[site]["loss"])
                accepted[site] = deltas
            except (WireError, CodecError, ReplyRejected, ValueError) as err:
                rejected[site] = str(err)
        norms = {s: norm(d) for s, d in accepted.items()}
        if self.kcfg.outlier_mult and len(accepted) >= 3:
            med = sorted(norms.values())[len(norms) // 2]
            for s in list(accepted):
                if med > 0 and norms[s] > self.kcfg.outlier_mult * med:
                    rejected[s] = f"update norm {norms[s]:.4g} is {norms[s] / med:.0f}x the median site's {med:.4g}"
                    del accepted[s]
        # fixed or adaptive clip (screening.py): bounds every site's weight, whatever the number of sites
        bound = screening.clip_bound(
            {s: norms[s] for s in accepted}, clip_norm=self.kcfg.clip_norm, clip_mult=self.kcfg.clip_mult
        )
        clipped = {}
        for s, factor in screening.clip_factors({s: norms[s] for s in accepted}, bound).items():
            if factor < 1.0:
                for t in accepted[s]:
                    t.mul_(factor)
            clipped[s] = norms[s] * factor
        if len(accepted) < min_sites:
            return RoundResult(False, {"num_accepted": float(len(accepted))}, rejected)
        full = {s: self._expand(d, self._plans[s]) for s, d in accepted.items()}
        before = [p.clone() for p in self.params]
        while True:
            extra = self.combine(round_idx, full, self._plans)
            bound_now = self.step_bound(round_idx, [norms[s] for s in full], list(clipped.values()))
            problem = screening.check_applied(before, self.params, bound_now)
            if problem is None:
                break
            # undo, and leave out the largest update: the round goes on without it
            for p, b in zip(self.params, before):
                p.copy_(b)
            worst = max(full, key=lambda s: (clipped[s], s))
            rejected[worst] = f"left out of the aggregate: with it, {problem}"
            for gone in (full, accepted, clipped):
                del gone[worst]
            if len(full) < min_sites:
                return RoundResult(False, {"num_accepted": float(len(full))}, rejected)
        with torch.no_grad():
            for w, p in zip(trainable_tensors(self.model, self.manifest), self.params):
                w.copy_(p.to(w.device, w.dtype))
        metrics = {
            "train_loss": sum(losses[s] for s in accepted) / len(accepted),
            "num_accepted": float(len(accepted)),
            "num_rejected": float(len(rejected)),
            "mean_update_norm": sum(norms[s] for s in accepted) / len(accepted),
            "num_clipped": float(sum(clipped[s] < norms[s] for s in accepted)),
            **({"clip_bound": bound} if math.isfinite(bound) else {}),
            **extra,
        }
        return RoundResult(True, metrics, rejected, tuple(sorted(accepted)))

    def _expand(self, deltas: list[torch.Tensor], plan: dict[str, Any]) -> list[torch.Tensor]:
        """Deltas of the trained tensors -> a full list (zeros for tensors the site did not train)."""
        idx = select(self.manifest, plan["train"])
        full = [torch.zeros(s) for s in self.shapes]
        for i, d in zip(idx, deltas):
            full[i] = d
        return full


class WeightsClient:
    """A site: load the global tensors, K local steps on the trained subset, send the deltas."""

    def __init__(self, cfg: RunConfig, ctx: ClientContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.manifest = manifest_of(ctx.model)
        self.shapes = [e.shape for e in self.manifest]

    def load_global(self, msg: Payload) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Check the message, read the plan and set the model's trainable tensors to the global ones."""
        wire.require(msg, {"plan": bytes, "params": bytes}, where="round message")
        plan = wire.decode(msg["plan"], max_bytes=4096)
        wire.require(plan, _PLAN_SCHEMA, where="round plan")
        check_plan(plan)
        start = decode_tensors(msg["params"], self.shapes, plan["down"], where="global parameters")
        with torch.no_grad():
            for w, p in zip(trainable_tensors(self.ctx.model, self.manifest), start):
                w.copy_(p.to(w.device, w.dtype))
        return plan, start

    def train_plan(self, plan: dict[str, Any], chosen: list[torch.Tensor]) -> list[float]:
        """The plan's K local optimizer steps on ``chosen`` over this site's keyed batches; the losses."""
        batches = site_batches(self.ctx, plan["seed"], plan["round"], plan["K"], plan["bs"])
        return local_train(
            self.ctx.model,
            chosen,
            batches,
            lr=plan["lr"],
            optimizer=plan["opt"],
            momentum=plan["mom"],
            weight_decay=plan["wd"],
            # how a site fits the step into its memory is its own business: not in the plan
            grad_accum_steps=self.cfg.kavg.grad_accum_steps,
            autocast=self.cfg.model.autocast,
        )

    def step(self, phase: str, msg: Payload, state: Payload) -> tuple[Payload, Payload]:
        if phase != "train":
            raise ValueError(f"{type(self).__name__} has no phase {phase!r}")
        plan, start = self.load_global(msg)
        return self.train_and_reply(plan, start), state

    def train_and_reply(self, plan: dict[str, Any], start: list[torch.Tensor]) -> Payload:
        """The plan's local steps on the tensors it selects, from ``start``; the reply with their deltas."""
        idx = select(self.manifest, plan["train"])
        work = trainable_tensors(self.ctx.model, self.manifest)
        params = dict(self.ctx.model.named_parameters())
        chosen = [params[self.manifest.entries[i].name] for i in idx]
        losses = self.train_plan(plan, chosen)
        deltas = [work[i].detach().to("cpu", torch.float32) - start[i] for i in idx]
        return {"delta": encode_tensors(deltas, plan["up"]), "loss": sum(losses) / len(losses)}


class KavgServer(WeightsServer):
    """K-AVG server: the weighted (or robust) average of the site updates."""


class KavgClient(WeightsClient):
    """K-AVG site: K local steps from the global parameters."""
