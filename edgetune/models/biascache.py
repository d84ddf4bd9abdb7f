"""Probe losses of a token-bias model from cached exponentials of the frozen logits.

With ``model.trainable = "token-bias"`` (``models/tokenbias.py``) only a bias ``b`` on the logits trains,
so a training token's frozen logits ``L0 = W h`` never change during a run. For a pool of a site's
answer tokens ``BiasRunner`` computes, once, their final hidden states ``h`` (one pass over the training
set in fixed chunks, in index order: a function of the model and the data alone) and from them::

    m = max_v L0_v,     E_v = exp(L0_v - m),     t0 = L0_target - m

so a token's loss under any bias is ``log(sum_v E_v exp(b_v)) - t0 - b_target``: the next-token
cross-entropy, up to float rounding. The P probes of a step ``b + eps z_p`` then cost one
(tokens x vocabulary) by (vocabulary x P) product (``probe_losses``) instead of P forward passes.

The pool: up to ``examples`` training examples (a keyed draw, ``crypto.schedule``'s stream
``token-bias-pool``; all of them when there are fewer), each contributing ``ceil(pool / examples)`` of its
answer tokens (another keyed draw, from the example's index and length only). Only those examples pass
through the model, once; a site's step batches are drawn from them (``BiasRunner.examples``) and a
batch's loss is the mean over its examples' pooled tokens. ``E`` takes pool x vocabulary
float32 values (4,096 tokens of SmolLM2: 805 MB), so the pool bounds a site's memory. The hidden states
are kept on disk in a site's state folder (``cached_pool``), with a sha256 of their values (a damaged or
foreign file is computed again); ``E`` is recomputed from them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.crypto import keystream, schedule
from edgetune.data.prompts import IGNORE_INDEX
from edgetune.io import atomic_write_bytes
from edgetune.models.headcache import CHUNK, _row_key, frozen_digest
from edgetune.models.loss import _plain
from edgetune.models.tokenbias import TokenBias, is_bias, token_bias_of

log = logging.getLogger(__name__)

POOL_KEY = hashlib.sha256(b"edgetune-token-bias-pool-v1").digest()
"""The secret of the keyed draw that picks each example's pooled tokens (public: the pool is not secret)."""
ROWS = 1024
"""Tokens per product when the exponentials are computed (bounds the temporary logits)."""


@dataclass(frozen=True)
class Pool:
    """One training set's pooled tokens under one frozen model."""

    hidden: torch.Tensor
    """(tokens, hidden) float32: each pooled token's final hidden state (what predicts it)."""
    target: torch.Tensor
    """(tokens,) int64: the token to predict."""
    example: torch.Tensor
    """(tokens,) int64: the training example it comes from."""
    exps: torch.Tensor
    """(tokens, vocabulary) float32: exp(L0 - max L0)."""
    shift: torch.Tensor
    """(tokens,) float32: L0[target] - max L0."""
    spans: dict[int, tuple[int, int]]
    """Per pooled training example, its pooled tokens' rows (start, stop): the rows are ordered by example,
    so a batch's tokens are slices of ``exps``, not a gathered copy."""
    index: dict[bytes, int]
    """An example's tokens (``input_ids`` without padding, as bytes) -> its index."""


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, Pool]] = weakref.WeakKeyDictionary()


def per_example(pool: int, examples: int) -> int:
    """How many answer tokens each example contributes to a pool of ``pool`` tokens."""
    return max(1, math.ceil(pool / max(1, examples)))


def pooled_examples(n: int, limit: int) -> list[int]:
    """Which of ``n`` training examples the pool draws from (sorted): all when ``limit`` is 0 or >= n,
    else a keyed draw of ``limit``.
    """
    if limit <= 0 or n <= limit:
        return list(range(n))
    perm = schedule.permutation(schedule.derive(POOL_KEY, "token-bias-pool", "examples", n), n)
    return sorted(int(i) for i in perm[:limit])


def picked_positions(example: int, n_answer: int, quota: int) -> list[int]:
    """Which of an example's ``n_answer`` answer tokens join the pool (in order): a keyed draw of ``quota``."""
    if n_answer <= quota:
        return list(range(n_answer))
    perm = schedule.permutation(schedule.derive(POOL_KEY, "token-bias-pool", example), n_answer)
    return sorted(int(i) for i in perm[:quota])


def dataset_digest(train_set: Any) -> str:
    """sha256 of a ``TokenizedSet``'s tokens and labels: the pool cache's key for the data."""
    h = hashlib.sha256()
    for i in range(len(train_set)):
        h.update(repr((train_set.input_ids[i], train_set.labels[i])).encode())
    return h.hexdigest()


def _exps(head: TokenBias, hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight = head.weight
    exps, shift = [], []
    with torch.inference_mode():
        for s in range(0, hidden.shape[0], ROWS):
            logits = (hidden[s : s + ROWS].to(weight.dtype) @ weight.T).float()
            top = logits.max(dim=1).values
            exps.append(torch.exp(logits - top[:, None]))
            shift.append(logits.gather(1, target[s : s + ROWS, None])[:, 0] - top)
    if not exps:
        return torch.zeros(0, weight.shape[0]), torch.zeros(0)
    return torch.cat(exps), torch.cat(shift)


def _assemble(
    head: TokenBias, hidden: torch.Tensor, target: torch.Tensor, example: torch.Tensor, train_set: Any
) -> Pool:
    order = torch.sort(example, stable=True).indices  # (a no-op for a computed pool: it is made in example order)
    hidden, target, example = hidden[order], target[order], example[order]
    exps, shift = _exps(head, hidden, target)
    spans: dict[int, tuple[int, int]] = {}
    for row, ex in enumerate(example.tolist()):
        start, _ = spans.get(ex, (row, row))
        spans[ex] = (start, row + 1)
    index: dict[bytes, int] = {}  # a batch row's tokens -> a pooled example with those tokens
    for ex in spans:
        index.setdefault(_row_key(torch.tensor(train_set.input_ids[ex], dtype=torch.int64)), ex)
    return Pool(hidden, target, example, exps, shift, spans, index)


def compute_pool(model: nn.Module, head: TokenBias, train_set: Any, pool: int, examples: int = 0) -> Pool:
    """The pooled tokens of ``train_set`` (``pool`` tokens from at most ``examples`` examples, 0: all) with
    their hidden states and exponentials.
    """
    base = _plain(model)
    if base is None:
        raise ValueError("the token-bias cache needs a model with a plain linear head")
    device = head.token_bias.device
    chosen = pooled_examples(len(train_set), examples)
    quota = per_example(pool, len(chosen))
    hidden, target, example = [], [], []
    for start in range(0, len(chosen), CHUNK):
        idx = chosen[start : start + CHUNK]
        b = train_set.batch(idx)
        with torch.inference_mode():
            out = base.get_decoder()(
                input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False
            ).last_hidden_state
        targets = b["labels"][:, 1:].to(device)
        for j, i in enumerate(idx):
            at = torch.nonzero(targets[j] != IGNORE_INDEX).flatten()
            keep = at[picked_positions(i, len(at), quota)]
            hidden.append(out[j, keep].float())
            target.append(targets[j, keep])
            example.append(torch.full((len(keep),), i, dtype=torch.long, device=device))
    if not hidden or sum(len(t) for t in target) == 0:
        raise ValueError("model.trainable = 'token-bias': the training set has no answer tokens to learn from")
    return _assemble(head, torch.cat(hidden), torch.cat(target), torch.cat(example), train_set)


def _content_digest(hidden: torch.Tensor, target: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """sha256 of a pool file's tensors (shapes, dtypes and values), as 32 uint8 values stored beside them."""
    h = hashlib.sha256()
    for t in (hidden, target, example):
        t = t.detach().cpu().contiguous()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def _read(path: Path, head: TokenBias, train_set: Any) -> Pool | None:
    """A pool from a cache file, or None when it is missing, damaged (its stored digest differs) or does not
    fit ``head`` and ``train_set``.
    """
    from safetensors.torch import load

    device = head.token_bias.device
    try:
        t = load(path.read_bytes())
        hidden, target, example = (t[k] for k in ("hidden", "target", "example"))
        if not torch.equal(t["sha256"], _content_digest(hidden, target, example)):
            log.warning("token bias: %s does not match its digest; computing the pool again", path)
            return None
        hidden, target, example = (x.to(device) for x in (hidden, target, example))
    except Exception:  # missing, truncated or foreign (safetensors raises its own error types): computed again
        return None
    n = hidden.shape[0] if hidden.dim() == 2 else -1
    if n < 1 or target.shape != (n,) or example.shape != (n,) or not torch.isfinite(hidden).all():
        return None
    if hidden.shape[1] != head.weight.shape[1] or hidden.dtype != torch.float32:
        return None
    if target.dtype != torch.int64 or example.dtype != torch.int64:
        return None
    if int(target.min()) < 0 or int(target.max()) >= head.token_bias.numel():
        return None
    if int(example.min()) < 0 or int(example.max()) >= len(train_set):
        return None
    return _assemble(head, hidden, target, example, train_set)


def cached_pool(
    model: nn.Module, head: TokenBias, train_set: Any, pool: int, examples: int = 0, cache_dir: Path | None = None
) -> Pool:
    """``compute_pool`` once per (model object, training set, pool size, examples) in this process; with
    ``cache_dir`` (a site's state folder) its hidden states are also kept on disk, keyed by the frozen
    weights, the training set and the pool's sizes, for the site's other processes.
    """
    per_model = _CACHE.setdefault(model, {})
    key = f"{dataset_digest(train_set)}|{pool}|{examples}"
    if key in per_model:
        return per_model[key]
    path = None
    if cache_dir is not None:
        name = hashlib.sha256(f"token-bias|{frozen_digest(model, is_bias)}|{key}".encode()).hexdigest()[:32]
        path = Path(cache_dir) / f"{name}.safetensors"
        found = _read(path, head, train_set)
        if found is not None:
            per_model[key] = found
            return found
    n = len(pooled_examples(len(train_set), examples))
    log.info("token bias: caching the final hidden states of %d training examples", n)
    found = compute_pool(model, head, train_set, pool, examples)
    if path is not None:
        from safetensors.torch import save

        tensors = {k: getattr(found, k).detach().cpu().contiguous() for k in ("hidden", "target", "example")}
        tensors["sha256"] = _content_digest(found.hidden, found.target, found.example)
        atomic_write_bytes(path, save(tensors), mode=0o600)
    per_model[key] = found
    return found


class BiasRunner:
    """``capture(batch)`` / ``loss()`` like ``SuffixRunner``, and every probe of a step in one product
    (``probe_losses``), from a cached pool.
    """

    def __init__(self, head: TokenBias, pool: Pool) -> None:
        self.head = head
        self.pool = pool
        self._spans: list[tuple[int, int]] | None = None
        self._shift = self._target = torch.zeros(0)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        names: Sequence[str],
        train_set: Any,
        objective: str,
        pool: int,
        examples: int = 0,
        cache_dir: Path | None = None,
    ) -> BiasRunner | None:
        """A runner when the only trainable tensor is the token bias and the objective is ``answer``;
        else None (full forwards). ``pool`` tokens from at most ``examples`` examples (0: all);
        ``cache_dir``: keep the pool's hidden states on disk there too.
        """
        head = token_bias_of(model)
        if head is None or objective != "answer" or _plain(model) is None:
            return None
        if len(names) != 1 or not is_bias(names[0]):
            return None
        return cls(head, cached_pool(model, head, train_set, pool, examples, cache_dir))

    @property
    def examples(self) -> list[int]:
        """The training examples the pool draws from: a site's step batches come from these."""
        return list(self.pool.spans)

    def capture(self, batch: dict[str, torch.Tensor]) -> float:
        """Select the pooled tokens of ``batch``'s examples; return their loss under the current bias."""
        self.select(batch)
        return self.loss()

    def select(self, batch: dict[str, torch.Tensor]) -> None:
        """Select the pooled tokens of ``batch``'s examples (what ``loss`` and ``probe_losses`` score)."""
        p = self.pool
        spans = []
        for j in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][j].sum())
            i = p.index.get(_row_key(batch["input_ids"][j, :n]))
            if i is None or i not in p.spans:
                raise ValueError("a batch row is not in the token-bias pool (not one of its training examples)")
            spans.append(p.spans[i])
        self._spans = spans
        self._shift = torch.cat([p.shift[a:b] for a, b in spans])
        self._target = torch.cat([p.target[a:b] for a, b in spans])

    def _sums(self, columns: torch.Tensor) -> torch.Tensor:
        """(captured tokens, columns): sum_v E_v exp(columns_v), slice by slice of the pool (no gathered copy)."""
        if self._spans is None:
            raise RuntimeError("capture() a batch first")
        x = torch.exp(columns)
        return torch.cat([self.pool.exps[a:b] @ x for a, b in self._spans])

    def loss(self) -> float:
        """The mean next-token loss of the captured tokens under the current bias."""
        b = self.head.token_bias
        with torch.inference_mode():
            sums = self._sums(b[:, None])[:, 0]
            return float((torch.log(sums) - self._shift - b[self._target]).mean())

    def probe_losses(
        self, packs: Sequence[keystream.Directions], eps: float, difference: str, mask: torch.Tensor | None = None
    ) -> tuple[float, list[tuple[float, float]]]:
        """The base loss and every probe's (loss at b + eps z_p, loss at b - eps z_p or the base) of the
        captured tokens, from one product; the bias itself is never perturbed.
        """
        b = self.head.token_bias
        n = b.numel()
        with torch.inference_mode():
            z = torch.stack([keystream.expand(pk.tensor(0), n).to(b.device) for pk in packs], dim=1)
            if mask is not None:
                z = z * mask.reshape(-1, 1).to(z.dtype)
            cols = [b[:, None], b[:, None] + eps * z]
            if difference == "central":
                cols.append(b[:, None] - eps * z)
            shifted = torch.cat(cols, dim=1)  # (vocabulary, 1 + P [+ P])
            sums = self._sums(shifted)
            losses = (torch.log(sums) - self._shift[:, None] - shifted[self._target]).mean(dim=0).tolist()
        n_probes = len(packs)
        base, plus = losses[0], losses[1 : 1 + n_probes]
        minus = losses[1 + n_probes :] if difference == "central" else [base] * n_probes
        return base, list(zip(plus, minus, strict=True))
