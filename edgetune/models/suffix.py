"""Probe losses that rerun only the layers a perturbation touches.

When every perturbed tensor sits in decoder layers >= k (LoRA-B on the top layers, say), the
hidden state entering layer k is the same for the unperturbed model and for every probe of a
step: ``SuffixRunner`` keeps it from one full forward pass (a pre-hook on layer k records the
layer's input and keyword arguments: causal mask, rotary embeddings) and computes each probe's
loss from layer k on. The arithmetic of those layers is unchanged, so the loss is bitwise the
full forward's; a probe costs (L - k) / L of a forward instead of 1.

Supported: decoder-only models with a plain head (``models/loss.py``) whose decoder keeps its
blocks in ``.layers`` and its final norm in ``.norm`` (Llama, Mistral, Qwen2/3, Phi-3, OLMo).
``SuffixRunner.for_model`` returns None otherwise, or when a perturbed tensor lies outside the
decoder blocks (embeddings, head, final norm), and callers fall back to full forwards.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgetune.models.loss import CHOICE_KEYS, _plain, head_loss

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def first_layer(names: Sequence[str]) -> int | None:
    """Lowest decoder block index among parameter ``names`` (None if one is outside the blocks)."""
    indices = []
    for name in names:
        m = _LAYER.search(name)
        if m is None:
            return None
        indices.append(int(m.group(1)))
    return min(indices) if indices else None


class SuffixRunner:
    """Full forward once per batch, then losses from decoder block ``first`` on."""

    def __init__(self, model: nn.Module, base: Any, first: int) -> None:
        self.model = model
        self.base = base
        self.decoder = base.get_decoder()
        self.first = first
        self.num_layers = int(getattr(base.config, "num_hidden_layers", len(self.decoder.layers)))
        self._hidden: torch.Tensor | None = None
        self._kwargs: dict[str, Any] = {}
        self._scored: dict[str, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: nn.Module, names: Sequence[str]) -> SuffixRunner | None:
        """A runner when it saves work (perturbed tensors all in blocks >= 1), else None."""
        base = _plain(model)
        first = first_layer(names)
        if base is None or first is None or first == 0:
            return None
        decoder = base.get_decoder()
        if not isinstance(getattr(decoder, "layers", None), nn.ModuleList) or not hasattr(decoder, "norm"):
            return None
        return cls(model, base, first)

    def capture(self, batch: dict[str, torch.Tensor]) -> float:
        """The unperturbed loss of ``batch`` (a full forward), keeping block ``first``'s input.

        The loss is ``models.loss.objective_loss``'s: the choice cross-entropy when the batch
        carries candidate answers, else the answer-token loss.
        """
        device = next(self.model.parameters()).device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        keys = CHOICE_KEYS if "choice_ids" in batch else ("labels",)
        scored = {k: batch[k].to(device) for k in keys}

        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self._hidden = (args[0] if args else kwargs["hidden_states"]).detach()
            self._kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        handle = self.decoder.layers[self.first].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                hidden = self.decoder(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state
        finally:
            handle.remove()
        if self._hidden is None:
            raise RuntimeError("the decoder did not call its blocks as expected; use full forwards")
        self._scored = scored
        return self._head_loss(hidden)

    def loss(self) -> float:
        """The loss of the captured batch under the current (perturbed) weights of blocks >= first."""
        if self._hidden is None:
            raise RuntimeError("capture() a batch first")
        with torch.inference_mode():
            hidden = self._hidden
            for layer in self.decoder.layers[self.first : self.num_layers]:
                hidden = layer(hidden, **self._kwargs)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
            hidden = self.decoder.norm(hidden)
        return self._head_loss(hidden)

    def _head_loss(self, hidden: torch.Tensor) -> float:
        with torch.inference_mode():
            return float(head_loss(self.base, hidden, self._scored))
