"""The ``token-bias`` trainable: one additive bias per vocabulary token on the next-token logits.

For a language-modelling task (the loss covers every token of a passage, e.g. ``data.source = "docs"``)
this trainable kind adds a vector ``b`` (vocabulary size, zero at the start) to the output layer's
logits and freezes everything else::

    logits = W h + b

On SmolLM2 that is 49,152 values: a space where zeroth-order steps make progress in a few rounds (a
site's word frequencies, the vocabulary of its documents), while the model below the head never moves.
Because nothing below the head trains, a site computes its training tokens' final hidden states once
and every probe is a product with cached exponentials (``models/biascache.py``), not a forward pass.

The bias is a parameter of its own (``lm_head.token_bias``), so a tied input embedding never moves. A
Llama-style output layer has no bias, so ``from_pretrained`` cannot carry it: a checkpoint holds the
frozen model's weights plus ``token_bias.safetensors``, which ``edgetune eval`` applies. In plain
transformers, add it yourself: ``model.lm_head.register_forward_hook(lambda m, i, out: out + bias)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

BIAS_NAME = "token_bias"
"""The parameter's attribute on ``TokenBias`` (its manifest name ends with ``lm_head.token_bias``)."""
BIAS_FILE = "token_bias.safetensors"
"""Next to a token-bias checkpoint's weights: the bias itself (fp32), which ``edgetune eval`` applies."""


def is_bias(name: str) -> bool:
    """Whether parameter ``name`` is a token bias (what ``model.trainable = "token-bias"`` trains)."""
    return name == BIAS_NAME or name.endswith("." + BIAS_NAME)


class TokenBias(nn.Module):
    """The model's output layer plus a trainable bias on every token's logit."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"model.trainable = 'token-bias' needs a linear output layer, got {type(head).__name__}")
        if getattr(head, "bias", None) is not None:
            raise ValueError("model.trainable = 'token-bias': the output layer has a bias of its own already")
        self.head = head
        self.token_bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen output weights (what code reading ``lm_head.weight`` expects)."""
        return self.head.weight  # type: ignore[return-value]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        return logits + self.token_bias.to(logits.dtype)


def add_token_bias(model: Any) -> Any:
    """Wrap ``model``'s output layer in a ``TokenBias`` (in place; returns the model)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"model.trainable = 'token-bias': {type(model).__name__} has no output layer")
    model.set_output_embeddings(TokenBias(head))
    return model


def token_bias_of(model: Any) -> TokenBias | None:
    """The ``TokenBias`` of ``model`` (or of the model under a peft wrapper), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, TokenBias) else None


@contextmanager
def plain_head(model: Any) -> Iterator[Any]:
    """``model`` with its own output layer back in place of the ``TokenBias`` (for ``save_pretrained``: the
    frozen weights under their usual names, tied as before); restored afterwards. Models without a token
    bias pass through unchanged.
    """
    head = token_bias_of(model)
    if head is None:
        yield model
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_output_embeddings(head.head)
    try:
        yield model
    finally:
        base.set_output_embeddings(head)


def save_token_bias(folder: Path, model: Any) -> None:
    """Write ``folder/token_bias.safetensors`` (the bias, fp32) for a token-bias model."""
    from safetensors.torch import save_file

    head = token_bias_of(model)
    if head is None:
        raise ValueError("save_token_bias: the model has no token bias")
    save_file({BIAS_NAME: head.token_bias.detach().float().cpu().contiguous()}, str(Path(folder) / BIAS_FILE))


def load_token_bias(folder: Path, model: Any) -> None:
    """Set ``model``'s token bias from ``folder/token_bias.safetensors`` (``ValueError`` naming what differs)."""
    from safetensors.torch import load_file

    path = Path(folder) / BIAS_FILE
    head = token_bias_of(model)
    if head is None:
        raise ValueError(f"{path}: the model to load it into has no token bias (model.trainable = 'token-bias')")
    if not path.is_file():
        raise ValueError(f"{folder}: a token-bias checkpoint needs {BIAS_FILE}, which is missing")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a bad file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    bias = tensors.get(BIAS_NAME)
    if bias is None or tuple(bias.shape) != tuple(head.token_bias.shape) or bias.dtype != torch.float32:
        shape = tuple(head.token_bias.shape)
        raise ValueError(f"{path}: expected {BIAS_NAME} as float32 {shape} (one value per vocabulary token)")
    if not torch.isfinite(bias).all():
        raise ValueError(f"{path}: {BIAS_NAME} holds non-finite values")
    with torch.no_grad():
        head.token_bias.copy_(bias.to(head.token_bias.device))
