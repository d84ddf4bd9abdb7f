"""The ``label-head`` trainable: an additive delta on the output rows of a task's label tokens.

For a classification task whose answers are a few labels (the triage demo's ten categories), the
prediction is read from the next-token logits of the labels' first tokens (``metrics/eval.py``). This
trainable kind adds a delta ``D`` (labels x hidden size, zero at the start) to exactly those output
rows and freezes everything else::

    logits = W h                     (the model's own head, tied to the input embeddings or not)
    logits[..., ids] += D h          (only the label tokens' scores move)

``D`` is a parameter of its own (``lm_head.label_delta``), so a tied input embedding never moves and
the rest of the vocabulary keeps its scores. On SmolLM2 with ten labels it is 5,760 values: a space
small enough for zeroth-order steps to make progress in a few rounds (``benchmarks/head_space.py``).
Because nothing below the head trains, a site computes each training example's final hidden state
once and every later probe is a small matmul on it (``models/headcache.py``).

The label token ids are part of the model's definition: the same recipe gives every replica the same
ids (``label_token_ids``), and ``LabelHead`` keeps them in a buffer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.data.prompts import encode_answer

DELTA_NAME = "label_delta"
"""The parameter's attribute on ``LabelHead`` (its manifest name ends with ``lm_head.label_delta``)."""


def is_delta(name: str) -> bool:
    """Whether parameter ``name`` is a label head's delta (what ``model.trainable = "label-head"`` trains)."""
    return name == DELTA_NAME or name.endswith("." + DELTA_NAME)


class LabelHead(nn.Module):
    """The model's output layer plus a trainable delta on the rows of ``token_ids``."""

    token_ids: torch.Tensor

    def __init__(self, head: nn.Module, token_ids: Sequence[int]) -> None:
        super().__init__()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"model.trainable = 'label-head' needs a linear output layer, got {type(head).__name__}")
        ids = [int(t) for t in token_ids]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= weight.shape[0]:
            raise ValueError(f"label-head token ids must be distinct ids below {weight.shape[0]}, got {ids[:12]}")
        self.head = head
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=weight.device), persistent=False)
        self.label_delta = nn.Parameter(
            torch.zeros(len(ids), weight.shape[1], dtype=torch.float32, device=weight.device)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The frozen output weights (what code reading ``lm_head.weight`` expects)."""
        return self.head.weight  # type: ignore[return-value]

    @property
    def delta(self) -> torch.Tensor:
        return self.label_delta

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        extra = (hidden.to(self.delta.dtype) @ self.delta.T).to(logits.dtype)
        return logits.index_add(-1, self.token_ids, extra)


def label_token_ids(tokenizer: Any, labels: Sequence[str], prefix: str = "") -> list[int]:
    """Each label's first answer token (as ``encode_answer`` tokenises it after ``prefix``).

    Raises ``ValueError`` when a label has no token or two labels share their first token (their
    scores could not be told apart).
    """
    ids = []
    for label in labels:
        toks = encode_answer(tokenizer, label, prefix)
        if not toks:
            raise ValueError(f"model.head_labels: {label!r} has no tokens")
        ids.append(int(toks[0]))
    clash = sorted({lab for lab, t in zip(labels, ids) if ids.count(t) > 1})
    if clash:
        raise ValueError(
            f"model.head_labels: {clash} start with the same token, so the label head cannot tell them apart"
        )
    return ids


def add_label_head(model: Any, token_ids: Sequence[int]) -> Any:
    """Wrap ``model``'s output layer in a ``LabelHead`` over ``token_ids`` (in place; returns the model)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"model.trainable = 'label-head': {type(model).__name__} has no output layer")
    model.set_output_embeddings(LabelHead(head, token_ids))
    return model


def label_head_of(model: Any) -> LabelHead | None:
    """The ``LabelHead`` of ``model`` (or of the model under a peft wrapper), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, LabelHead) else None


@contextmanager
def merged_head(model: Any) -> Iterator[Any]:
    """``model`` with its label head merged into a plain, untied output layer, for ``save_pretrained``.

    A checkpoint must load with ``AutoModelForCausalLM.from_pretrained`` and score like the trained
    model; ``from_pretrained`` knows no ``label_delta``. Inside the context the output layer is a
    ``Linear`` whose rows ``token_ids`` are ``W + D`` and whose other rows are ``W``, and the config
    says ``tie_word_embeddings = False`` (the input embeddings keep ``W``). Afterwards the label head and
    the config are restored. Models without a label head pass through unchanged.
    """
    head = label_head_of(model)
    if head is None:
        yield model
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        weight = head.weight.detach().clone()
        weight.index_add_(0, head.token_ids, head.delta.detach().to(weight.dtype))
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    plain.weight = nn.Parameter(weight, requires_grad=False)
    tied = getattr(base.config, "tie_word_embeddings", None)
    base.set_output_embeddings(plain)
    base.config.tie_word_embeddings = False
    try:
        yield model
    finally:
        base.set_output_embeddings(head)
        base.config.tie_word_embeddings = tied


LABEL_HEAD_FILE = "label_head.safetensors"
"""Next to a label-head checkpoint's plain weights: the delta itself and its token ids (``edgetune eval``
rebuilds the trained model from the base and this file, and checks the plain weights against it)."""


def save_label_head(folder: Path, model: Any) -> None:
    """Write ``folder/label_head.safetensors`` (the delta, fp32, and its token ids) for a label-head model."""
    from safetensors.torch import save_file

    head = label_head_of(model)
    if head is None:
        raise ValueError("save_label_head: the model has no label head")
    tensors = {"label_delta": head.delta.detach().float().cpu().contiguous(), "token_ids": head.token_ids.cpu()}
    save_file(tensors, str(Path(folder) / LABEL_HEAD_FILE))


def load_label_head(folder: Path, model: Any) -> None:
    """Set ``model``'s label-head delta from ``folder/label_head.safetensors`` (``ValueError`` naming what differs)."""
    from safetensors.torch import load_file

    path = Path(folder) / LABEL_HEAD_FILE
    head = label_head_of(model)
    if head is None:
        raise ValueError(f"{path}: the model to load it into has no label head (model.trainable = 'label-head')")
    if not path.is_file():
        raise ValueError(f"{folder}: a label-head checkpoint needs {LABEL_HEAD_FILE}, which is missing")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a bad file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    delta, ids = tensors.get("label_delta"), tensors.get("token_ids")
    if delta is None or ids is None or tuple(delta.shape) != tuple(head.delta.shape):
        raise ValueError(f"{path}: expected label_delta {tuple(head.delta.shape)} and token_ids")
    if not torch.equal(ids.to(head.token_ids.device), head.token_ids):
        raise ValueError(f"{path}: its token ids are not this configuration's (another model.head_labels or tokenizer)")
    if not torch.isfinite(delta).all():
        raise ValueError(f"{path}: label_delta holds non-finite values")
    with torch.no_grad():
        head.delta.copy_(delta.to(head.delta.device))
