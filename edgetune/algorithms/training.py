"""Local training of the weight algorithms: K optimizer steps on a site's keyed batches.

kavg, lowrank, dppf and deft train the same way (``WeightsClient.train_plan``, ``weights.py``);
lowrank's full-rank phase calls ``local_train`` on the adapted layers' dense weights. Nothing
here survives a round: the optimizer is created per call.
"""

from __future__ import annotations

from collections.abc import Sequence

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
