"""Loss on answer tokens, computing the vocabulary projection only where it is needed.

SmolLM2's output layer (49,152 x 576) is about a fifth of its forward FLOPs, and only answer
tokens (about a quarter of a demo example) carry a label. For decoder-only models whose logits
are a plain linear map of the last hidden state, ``answer_loss`` runs the decoder, keeps the
hidden states at labelled positions and projects only those. Other models (logit soft-capping,
logit scales) fall back to the model's own forward and loss.

``choice_loss`` is the classification objective (MeZO's ``train_as_classification``): for rows
that carry candidate answers (``choice_ids``, from ``TokenizedSet.batch(..., choices=True)``), the
cross-entropy of the right candidate among the candidates' first tokens at the position that
predicts the answer: the same scores ``metrics.eval.choice_accuracy`` ranks. ``objective_loss``
picks it when the batch carries candidates, else ``answer_loss``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHOICE_KEYS = ("choice_ids", "choice_target", "choice_pos")
"""Batch keys of the classification objective: (rows, candidates) first-token ids padded with -1,
the right candidate's index per row, and the position whose next-token logits score them."""
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"})


def _plain(model: Any) -> Any:
    """The bare causal LM under ``model`` when its head is a plain linear layer, else None (typed Any:
    its ``get_decoder``/``get_output_embeddings`` are transformers methods nn.Module's stubs do not know).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    return base


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (differentiable)."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    base = _plain(model)
    if base is None:
        out: Any = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return out.loss
    # use_cache=False: a training/eval forward needs no key-value cache (the default builds one)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head_loss(base, hidden, {"labels": labels})


def choice_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of each row's right candidate among its candidates' first tokens.

    ``batch`` carries ``CHOICE_KEYS`` (``TokenizedSet.batch(indices, choices=True)``): the logits at
    ``choice_pos`` (the last prompt position) restricted to the row's ``choice_ids`` are a
    distribution over its candidate answers, and the loss is the usual classification loss on it.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    picked = {k: batch[k].to(device) for k in CHOICE_KEYS}
    base = _plain(model)
    if base is None:
        out: Any = model(input_ids=input_ids, attention_mask=attention_mask)
        rows = torch.arange(input_ids.shape[0], device=device)
        return _choice_ce(out.logits[rows, picked["choice_pos"]].float(), picked)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head_loss(base, hidden, picked)


def objective_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``choice_loss`` when ``batch`` carries candidate answers, else ``answer_loss``."""
    return choice_loss(model, batch) if "choice_ids" in batch else answer_loss(model, batch)


def head_loss(base: Any, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The objective from a plain-head model's last hidden states (batch, seq, dim): the choice
    cross-entropy when ``batch`` carries ``choice_ids``, else the answer-token loss from ``labels``.
    Only the positions the objective reads are projected onto the vocabulary.
    """
    head = base.get_output_embeddings()
    if "choice_ids" in batch:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return _choice_ce(head(hidden[rows, batch["choice_pos"].to(hidden.device)]).float(), batch)
    targets = batch["labels"][:, 1:].to(hidden.device)
    mask = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask])
    return F.cross_entropy(logits.float(), targets[mask])


def _choice_ce(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the candidate columns of ``logits`` (rows, vocab); -1 pads the candidates."""
    ids = batch["choice_ids"].to(logits.device)
    scores = logits.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))
    return F.cross_entropy(scores, batch["choice_target"].to(logits.device))


def last_position_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits (float32) after the last column of left-padded prompts, shape (batch, vocab)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    base = _plain(model)
    if base is None:
        out: Any = model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits[:, -1].float()
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return base.get_output_embeddings()(hidden[:, -1]).float()


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the summed log-probability (float64) of its labelled tokens (labels -100 elsewhere)."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    targets = batch["labels"][:, 1:].to(device)
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1).cpu()
