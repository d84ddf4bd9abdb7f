"""Held-out evaluation: answer-token loss and greedy exact-match accuracy.

Both use the prompt format of ``data/prompts.py``, so the model is scored on the prompts it
was trained on. Neither changes the model: no gradients, and its train/eval mode is put back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig

from edgetune.data.prompts import (
    IGNORE_INDEX,
    TokenizedSet,
    generation_batch,
    pad_token_id,
    stop_token_ids,
)
from edgetune.models.loss import answer_loss


def heldout_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    batch_size: int,
    max_length: int,
) -> float:
    """Mean negative log-likelihood per answer token over ``examples``.

    Parameters
    ----------
    model
        A causal LM returning ``logits``; evaluated in eval mode on its own device.
    tokenizer
        Its tokenizer.
    examples
        Example dicts (``instruction``, ``response``).
    batch_size
        Examples per forward pass; the result does not depend on it.
    max_length
        Token limit per example, as in training (``encode_example``).

    Returns
    -------
    float
        Sum of the answer tokens' losses divided by the number of answer tokens (not a
        mean of batch means, which would weight short answers up).
    """
    _check(examples, batch_size)
    data = TokenizedSet(tokenizer, examples, max_length)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))))
            # answer_loss projects only the answer positions; mean x count = this batch's sum.
            n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n_tokens:
                total += answer_loss(model, batch).double().cpu() * n_tokens
            count += n_tokens
    if count == 0:
        raise ValueError("heldout_loss: no answer tokens to score (max_length too small?)")
    return float(total / count)


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace, strip surrounding space and trailing periods."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(".").rstrip()


def exact_match(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    batch_size: int,
    max_new_tokens: int,
) -> float:
    """Fraction of examples whose greedy answer equals the response, after ``normalize_answer``.

    Parameters
    ----------
    model
        A causal LM with ``generate``.
    tokenizer
        Its tokenizer.
    examples
        Example dicts (``instruction``, ``response``).
    batch_size
        Prompts per ``generate`` call (left-padded).
    max_new_tokens
        Decoding stops here or at the end-of-turn / eos token.

    Returns
    -------
    float
        Correct answers / number of examples.
    """
    _check(examples, batch_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = stop_token_ids(tokenizer)
    # An explicit config, so a checkpoint's sampling defaults (temperature, top_p) never apply.
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_token_id(tokenizer),
    )
    device = _device(model)
    correct = 0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = generation_batch(tokenizer, [ex["instruction"] for ex in chunk])
            out = model.generate(**{k: v.to(device) for k, v in batch.items()}, generation_config=config)
            new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
            for ex, tokens in zip(chunk, new_tokens, strict=True):
                answer = tokenizer.decode(_until_stop(tokens, stops), skip_special_tokens=True)
                correct += normalize_answer(answer) == normalize_answer(ex["response"])
    return correct / len(examples)


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    accuracy: bool,
) -> dict[str, float]:
    """Held-out loss, and exact-match accuracy when ``accuracy`` (greedy decoding is slower).

    Returns
    -------
    dict[str, float]
        ``{"heldout_loss": ...}``, plus ``"accuracy"`` when asked for.
    """
    metrics = {"heldout_loss": heldout_loss(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)}
    if accuracy:
        metrics["accuracy"] = exact_match(
            model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
    return metrics


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    # Finished rows keep emitting pad after their stop token; cut at the first stop.
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


def _check(examples: Sequence[Mapping[str, str]], batch_size: int) -> None:
    if len(examples) == 0:
        raise ValueError("evaluation needs at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    # Dropout off while scoring, then every submodule's own mode back: evaluation must not
    # change the model (model.train(True) would also wake submodules frozen in eval mode).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
