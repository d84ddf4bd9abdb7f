"""Trainable-parameter manifest, state hashes and flat views.

The manifest is the canonical order of the trainable tensors: every perturbation stream,
replay and hash walks it in this order, so it is part of the determinism contract.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from edgetune.models import labelhead, tokenbias


@dataclass(frozen=True)
class Entry:
    """One trainable tensor: its position in the manifest, name and shape."""

    index: int
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Manifest:
    """Ordered trainable tensors of a model."""

    entries: tuple[Entry, ...]

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def digest(self) -> str:
        """sha256 of the names and shapes: two sites with equal digests walk the same layout."""
        blob = json.dumps([[e.name, list(e.shape)] for e in self.entries]).encode()
        return hashlib.sha256(blob).hexdigest()

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)


def select_trainable(model: nn.Module, patterns: Iterable[str]) -> Manifest:
    """Mark parameters trainable by name and return their manifest.

    ``patterns`` holds ``all``, ``lora`` (parameters whose name contains ``lora_``), ``lora-b``
    (``lora_B`` only), ``label-head`` (the label head's delta, ``models/labelhead.py``), ``token-bias``
    (the logits' bias, ``models/tokenbias.py``) or
    substrings of parameter names. Everything else gets ``requires_grad = False``.
    Raises ``ValueError`` if nothing matches.
    """
    pats = tuple(patterns)
    entries: list[Entry] = []
    for name, param in model.named_parameters():
        if "all" in pats:
            keep = True
        elif "lora" in pats:
            keep = "lora_" in name
        elif "lora-b" in pats:
            keep = "lora_B" in name
        elif "label-head" in pats:
            keep = labelhead.is_delta(name)
        elif "token-bias" in pats:
            keep = tokenbias.is_bias(name)
        else:
            keep = any(p in name for p in pats)
        param.requires_grad_(keep)
        if keep:
            entries.append(Entry(len(entries), name, tuple(param.shape)))
    if not entries:
        raise ValueError(f"model.trainable = {','.join(pats)!r} matches no parameter of the model")
    return Manifest(tuple(entries))


def manifest_of(model: nn.Module) -> Manifest:
    """Manifest of the parameters that currently require grad, in ``named_parameters`` order."""
    entries: list[Entry] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            entries.append(Entry(len(entries), name, tuple(param.shape)))
    return Manifest(tuple(entries))


def trainable_tensors(model: nn.Module, manifest: Manifest) -> list[torch.Tensor]:
    """The model's parameter tensors in manifest order (views, not copies)."""
    params = dict(model.named_parameters())
    missing = [e.name for e in manifest if e.name not in params]
    if missing:
        raise ValueError(f"model lacks manifest parameters: {missing[:3]}")
    return [params[e.name].data for e in manifest]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t.view(torch.uint8).numpy().data.cast("B")


def sha256_tensors(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the fp32 bytes of ``tensors`` in order (the state hash)."""
    h = hashlib.sha256()
    for t in tensors:
        if t.dtype != torch.float32:
            t = t.float()
        h.update(tensor_bytes(t))
    return h.hexdigest()


def model_sha256(model: nn.Module) -> str:
    """sha256 of all weights (names, dtypes and bytes) in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + b"\0")
        h.update(tensor_bytes(t))
    return h.hexdigest()
