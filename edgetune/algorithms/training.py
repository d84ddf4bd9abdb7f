"""Local training of the weight algorithms: K optimizer steps on a site's keyed batches.

kavg, lowrank, dppf and deft train the same way (``WeightsClient.train_plan``, ``weights.py``);
lowrank's full-rank phase calls ``local_train`` on the adapted layers' dense weights. Nothing
here survives a round: the optimizer is created per call.

A site with several devices (``model.device = cuda:0,cuda:1``) trains data parallel in one
process: each step's batch is split into micro-batches (at least one per device), the devices
compute their micro-batches' gradients at once (one thread each, on a replica of the model), and
the gradients are added on the first device in micro-batch order, the order one device
accumulates them in. So G devices give bitwise the step of one device with as many micro-batches
(``grad_accum_steps``); only the first device's optimizer steps, and the replicas get its updated
tensors before the next step.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from edgetune.algorithms.base import ClientContext
from edgetune.crypto import schedule
from edgetune.data.prompts import batch_indices
from edgetune.models.loss import answer_loss


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
    replicas: Sequence[nn.Module] = (),
) -> list[float]:
    """K optimizer steps (one per batch) on ``params`` only; returns the K training losses.

    The optimizer is created here, so no optimizer state survives a round (sites keep nothing).
    ``grad_accum_steps`` > 1 runs each batch as that many micro-batches and adds their gradients,
    each weighted by its share of the batch's answer tokens, so the step is the full batch's
    (``answer_loss`` is a mean over answer tokens) with a fraction of the activation memory.
    ``autocast`` (``bf16``/``fp16``) runs forward and backward under ``torch.autocast``; fp16
    adds a gradient scaler and needs CUDA.
    ``replicas``: copies of ``model`` on the site's further devices (``device_replicas``); each
    batch is then split into at least one micro-batch per device (module docstring).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    keep = {id(p) for p in params}
    frozen = [p for p in trainable if id(p) not in keep]
    device = next(model.parameters()).device
    if autocast == "fp16" and device.type != "cuda":
        raise ValueError(f"model.autocast = 'fp16' needs CUDA (this site trains on {device}); use bf16 or none")
    for p in frozen:
        p.requires_grad_(False)
    for p in model.parameters():  # a call that failed mid-step (a non-finite loss) left its gradients
        p.grad = None
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
        if replicas:
            return _parallel_steps(
                model, params, batches, opt, scaler, amp_dtype, replicas, max(grad_accum_steps, 1 + len(replicas))
            )
        for batch in batches:
            parts = micro_batches(batch, grad_accum_steps)
            total = sum(_answer_tokens(mb) for mb in parts)
            step_loss = 0.0
            for mb in parts:
                n = _answer_tokens(mb)
                if len(parts) > 1 and n == 0:
                    continue  # rows whose answers were cut away contribute nothing
                loss = _backward(model, mb, amp_dtype, scaler, None if len(parts) == 1 else n / total)
                step_loss += loss * (n / total if len(parts) > 1 else 1.0)
            _step(opt, scaler)
            losses.append(step_loss)
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
    return losses


def _parallel_steps(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    amp_dtype: torch.dtype | None,
    replicas: Sequence[nn.Module],
    num_parts: int,
) -> list[float]:
    """``local_train``'s steps with the micro-batches spread over ``model`` and its ``replicas``."""
    models = [model, *replicas]
    names = _names_of(model, params)
    lane_params = [list(params)] + [[dict(r.named_parameters())[n] for n in names] for r in replicas]
    _mirror(model, replicas)
    devices = [next(m.parameters()).device for m in models]
    if scaler is not None:
        scaler.scale(torch.ones((), device=devices[0]))  # its scale exists before the lanes' threads use it

    def part_grads(lane: int, part: dict[str, torch.Tensor], weight: float | None) -> tuple[float, list]:
        """One micro-batch on one lane: its loss and its (weighted) gradients, taken off the lane."""
        loss = _backward(models[lane], {k: v.to(devices[lane]) for k, v in part.items()}, amp_dtype, scaler, weight)
        grads = [p.grad for p in lane_params[lane]]
        for p in lane_params[lane]:
            p.grad = None
        return loss, grads

    losses = []
    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        for step, batch in enumerate(batches):
            if step:
                with torch.no_grad():  # the replicas take the primary's tensors after its step
                    for lane in lane_params[1:]:
                        for q, p in zip(lane, params):
                            q.copy_(p)
            parts = micro_batches(batch, num_parts)
            total = sum(_answer_tokens(mb) for mb in parts)
            work = [(mb, n) for mb in parts if (n := _answer_tokens(mb)) > 0 or len(parts) == 1]
            weights = [None if len(parts) == 1 else n / total for _, n in work]  # None: the loss itself
            done: list[tuple[float, list]] = []  # (loss, gradients) per micro-batch, in order
            for start in range(0, len(work), len(models)):
                futures = [
                    pool.submit(part_grads, lane, mb, weights[start + lane])
                    for lane, (mb, _) in enumerate(work[start : start + len(models)])
                ]
                done += [f.result() for f in futures]
            step_loss = 0.0
            for p_i, p in enumerate(params):  # added in micro-batch order, as one device accumulates them
                acc = None
                for _, grads in done:
                    g = grads[p_i]
                    if g is None:
                        continue
                    g = g.to(p.device)
                    acc = g if acc is None else acc + g
                p.grad = acc
            for (loss, _), weight in zip(done, weights):
                step_loss += loss * (1.0 if weight is None else weight)
            _step(opt, scaler)
            losses.append(step_loss)
    return losses


def _backward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    weight: float | None,
) -> float:
    """Forward and backward of one micro-batch (its loss times ``weight``; None: the loss itself, bitwise
    the step without accumulation); returns the unweighted loss.
    """
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = answer_loss(model, batch)
    if not torch.isfinite(loss):
        raise ValueError(f"local training loss is not finite ({float(loss)})")
    weighted = loss if weight is None else loss * weight
    (scaler.scale(weighted) if scaler is not None else weighted).backward()
    return float(loss.detach())


def _step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """One optimizer step on the gradients in place (through the fp16 scaler when there is one)."""
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def _names_of(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(f"local training on several devices: tensor {missing[0]} is not a parameter of the model")
    return [by_id[id(p)] for p in params]


def _mirror(model: nn.Module, replicas: Sequence[nn.Module]) -> None:
    """Every replica takes the model's parameters, buffers and requires_grad flags (a copy: bitwise)."""
    ours = dict(model.named_parameters())
    bufs = dict(model.named_buffers())
    with torch.no_grad():
        for r in replicas:
            theirs = dict(r.named_parameters())
            if theirs.keys() != ours.keys():
                raise ValueError("local training on several devices: a replica has other parameters than the model")
            for n, q in theirs.items():
                q.copy_(ours[n])
                q.requires_grad_(ours[n].requires_grad)
                q.grad = None
            for n, b in r.named_buffers():
                b.copy_(bufs[n])
            r.train(model.training)


_REPLICAS: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def device_replicas(model: nn.Module, devices: Sequence[torch.device]) -> list[nn.Module]:
    """Copies of ``model`` on ``devices[1:]`` (made once per process and model; ``local_train``
    sets their tensors from the model's at every call). None for one device.
    """
    if len(devices) < 2:
        return []
    first = next(model.parameters()).device
    if devices[0].type != first.type:
        raise ValueError(f"several devices: the model is on {first}, not on the first device {devices[0]}")
    cache = _REPLICAS.setdefault(model, {})
    out = []
    for slot, dev in enumerate(devices[1:], start=1):
        key = f"{slot}:{dev}"
        if key not in cache:
            cache[key] = copy.deepcopy(model).to(dev)
        out.append(cache[key])
    return out


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
