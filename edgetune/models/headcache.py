"""Probe losses of a label-head model from cached final hidden states.

With ``model.trainable = "label-head"`` (``models/labelhead.py``) nothing below the output layer
trains, so a training example's final hidden state at the position that predicts its answer never
changes during a run. ``HeadRunner`` computes it once per example (one pass over the site's training
set in fixed chunks, in index order, so the features are a function of the model and the data alone,
not of which batches came first), together with the frozen head's scores of the example's candidates.
Every probe loss is then the choice cross-entropy (``models.loss.choice_loss``) from those features::

    scores[c] = W[id_c] . h  +  D[row_c] . h        (D: the label head's delta, perturbed per probe)

a (batch x hidden) by (hidden x labels) product instead of a forward pass. The cross-entropy is the
same function as the full forward's, up to float rounding (the features come from fixed chunks rather
than the step's batch).

It serves the ``choices`` objective (the batch carries candidate answers); ``for_model`` returns None
otherwise, and callers fall back to full forwards. Features are kept per process for the model object
and the training set's tokens (``weakref``: they go with the model), and, given a site's state folder,
on disk for the site's other processes (``cached_features``).
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.io import atomic_write_bytes
from edgetune.models.labelhead import LabelHead, is_delta, label_head_of
from edgetune.models.loss import _plain

log = logging.getLogger(__name__)

FEATURES_FOLDER = "label-head-features"
"""The folder in a site's state folder that holds its features on disk."""
CHUNK = 16
"""Examples per forward pass of the feature pass (fixed: the features must not depend on batching)."""


@dataclass(frozen=True)
class Features:
    """One training set's cached features under one frozen model."""

    hidden: torch.Tensor
    """(examples, hidden) float32: the final hidden state at each example's ``choice_pos``."""
    base: torch.Tensor
    """(examples, most candidates) float32: the frozen head's candidate scores, -inf on padding."""
    rows: torch.Tensor
    """(examples, most candidates) int64: each candidate's row of the delta (0 on padding)."""
    target: torch.Tensor
    """(examples,) int64: the right candidate."""
    index: dict[bytes, int]
    """An example's tokens (``input_ids`` without padding, as bytes) -> its row."""


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, Features]] = weakref.WeakKeyDictionary()


def _row_key(ids: torch.Tensor) -> bytes:
    return ids.to(device="cpu", dtype=torch.int64).numpy().tobytes()


def _index(train_set: Any) -> dict[bytes, int]:
    """An example's tokens (as ``_row_key`` reads a batch row) -> its first index in ``train_set``."""
    index: dict[bytes, int] = {}
    for i, ids in enumerate(train_set.input_ids):
        index.setdefault(_row_key(torch.tensor(ids, dtype=torch.int64)), i)
    return index


def dataset_digest(train_set: Any) -> str:
    """sha256 of a ``TokenizedSet``'s tokens and candidates: the feature cache's key for the data."""
    h = hashlib.sha256()
    for i in range(len(train_set)):
        ids, target, pos = train_set.choice_row(i)
        h.update(repr((train_set.input_ids[i], ids, target, pos)).encode())
    return h.hexdigest()


def compute_features(model: nn.Module, head: LabelHead, train_set: Any) -> Features:
    """Final hidden states and frozen candidate scores of every example of ``train_set``.

    Raises ``ValueError`` naming an example whose candidate's first token is not a label-head row.
    """
    base = _plain(model)
    if base is None:
        raise ValueError("the label-head feature cache needs a model with a plain linear head")
    device = head.delta.device
    label_row = {int(t): r for r, t in enumerate(head.token_ids.tolist())}
    weight = head.weight
    hidden, scores, rows, target = [], [], [], []
    most = max(len(train_set.choice_row(i)[0]) for i in range(len(train_set)))
    for start in range(0, len(train_set), CHUNK):
        idx = list(range(start, min(start + CHUNK, len(train_set))))
        b = train_set.batch(idx, choices=True)
        with torch.inference_mode():
            out = base.get_decoder()(
                input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False
            ).last_hidden_state
            h = out[torch.arange(len(idx), device=device), b["choice_pos"].to(device)].float()
            for j, i in enumerate(idx):
                ids, tgt, _ = train_set.choice_row(i)
                missing = [t for t in ids if t not in label_row]
                if missing:
                    where = train_set._examples[i].get("where") or f"example {i}"
                    raise ValueError(
                        f"{where}: a candidate's first token ({missing[0]}) is not one of model.head_labels' "
                        "first tokens; list every label of your data in model.head_labels"
                    )
                pad = most - len(ids)
                cand = torch.tensor(ids, dtype=torch.long, device=device)
                s = (weight[cand].float() @ h[j]).float()
                scores.append(torch.cat([s, torch.full((pad,), float("-inf"), device=device)]))
                rows.append(torch.tensor([label_row[t] for t in ids] + [0] * pad, dtype=torch.long))
                target.append(tgt)
            hidden.append(h)
    return Features(
        hidden=torch.cat(hidden),
        base=torch.stack(scores),
        rows=torch.stack(rows).to(device),
        target=torch.tensor(target, dtype=torch.long, device=device),
        index=_index(train_set),
    )


_FROZEN: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


def frozen_digest(model: nn.Module, trained: Callable[[str], bool] = is_delta) -> str:
    """sha256 of every weight of ``model`` but those ``trained`` names (the label head's delta by default:
    what the features depend on), once per model object and kind of trainable.
    """
    per_model = _FROZEN.setdefault(model, {})
    tag = getattr(trained, "__qualname__", repr(trained))
    if tag not in per_model:
        h = hashlib.sha256(b"edgetune-label-head-features-v1\0")
        for name, t in model.state_dict().items():
            if trained(name):
                continue
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data.cast("B"))
        per_model[tag] = h.hexdigest()
    return per_model[tag]


def _read(path: Path, train_set: Any, device: torch.device) -> Features | None:
    """Features from a cache file, or None when it is missing or does not fit ``train_set``."""
    from safetensors.torch import load

    try:
        t = load(path.read_bytes())
        hidden, base, rows, target = (t[k].to(device) for k in ("hidden", "base", "rows", "target"))
    except Exception:  # missing, truncated or foreign (safetensors raises its own error types): computed again
        return None
    n = len(train_set)
    if hidden.dim() != 2 or hidden.shape[0] != n or base.shape != rows.shape or base.shape[0] != n:
        return None
    if target.shape != (n,) or not torch.isfinite(hidden).all():
        return None
    return Features(hidden=hidden, base=base, rows=rows, target=target, index=_index(train_set))


def cached_features(model: nn.Module, head: LabelHead, train_set: Any, cache_dir: Path | None = None) -> Features:
    """``compute_features`` once per (model object, training set tokens) in this process.

    With ``cache_dir`` (a site's state folder) the features are also kept on disk, keyed by the frozen
    weights' and the training set's digests, so another process of the same site (Flower's simulation
    runs a site on whichever actor is free; a restarted site) reads them instead of a forward pass over
    its training set. A file that does not fit is computed again and replaced.
    """
    per_model = _CACHE.setdefault(model, {})
    key = dataset_digest(train_set)
    if key in per_model:
        return per_model[key]
    path = None
    if cache_dir is not None:
        # the label rows a candidate maps to depend on the head's token ids (model.head_labels), not in state_dict
        ids = ",".join(str(t) for t in head.token_ids.tolist())
        name = hashlib.sha256(f"{frozen_digest(model)}|{key}|{ids}".encode()).hexdigest()[:32]
        path = Path(cache_dir) / f"{name}.safetensors"
        found = _read(path, train_set, head.delta.device)
        if found is not None:
            per_model[key] = found
            return found
    log.info("label head: caching the final hidden states of %d training examples", len(train_set))
    feats = compute_features(model, head, train_set)
    if path is not None:
        from safetensors.torch import save

        tensors = {"hidden": feats.hidden, "base": feats.base, "rows": feats.rows, "target": feats.target}
        atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}), mode=0o600)
    per_model[key] = feats
    return feats


class HeadRunner:
    """``capture(batch)`` / ``loss()`` like ``SuffixRunner``, from cached features."""

    def __init__(self, head: LabelHead, features: Features) -> None:
        self.head = head
        self.features = features
        self._picked: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def for_model(
        cls, model: nn.Module, names: Sequence[str], train_set: Any, objective: str, cache_dir: Path | None = None
    ) -> HeadRunner | None:
        """A runner when the only trainable tensor is the label head's delta and the objective is
        ``choices``; else None (full forwards). ``cache_dir``: keep the features on disk there too.
        """
        head = label_head_of(model)
        if head is None or objective != "choices" or _plain(model) is None:
            return None
        if len(names) != 1 or not is_delta(names[0]):
            return None
        return cls(head, cached_features(model, head, train_set, cache_dir))

    def capture(self, batch: dict[str, torch.Tensor]) -> float:
        """Select ``batch``'s rows from the cache; return their loss under the current delta."""
        f = self.features
        rows = []
        for j in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][j].sum())
            key = _row_key(batch["input_ids"][j, :n])
            if key not in f.index:
                raise ValueError("a batch row is not in the label-head feature cache (not from this training set)")
            rows.append(f.index[key])
        sel = torch.tensor(rows, dtype=torch.long, device=f.hidden.device)
        self._picked = (f.hidden[sel], f.base[sel], f.rows[sel], f.target[sel])
        return self.loss()

    def loss(self) -> float:
        """The choice cross-entropy of the captured rows under the label head's current delta."""
        if self._picked is None:
            raise RuntimeError("capture() a batch first")
        h, s0, rows, y = self._picked
        with torch.inference_mode():
            scores = s0 + (h @ self.head.delta.T).gather(1, rows)
            return float(F.cross_entropy(scores, y))
