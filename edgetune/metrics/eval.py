"""Held-out evaluation: answer-token loss, label accuracy, greedy exact match and graded scores.

All use the prompt format of ``data/prompts.py``, so the model is scored on the prompts it was
trained on. None changes the model: no gradients, and its train/eval mode is put back.

* ``heldout_loss``: mean negative log-likelihood per answer token.
* ``choice_accuracy`` (examples with ``choices``, e.g. the triage data): each candidate answer is
  scored by its log-likelihood; the best one is the prediction. Candidates whose first answer
  tokens differ are ranked by that token alone (one forward pass per example); otherwise by the
  whole answer (one pass per candidate).
* ``exact_match`` and ``graded_scores`` (free-form answers, e.g. the fact-recall demo): greedy
  decoding, then the whole answer, the procedure number, and token F1 of the actions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig

from edgetune.data.choices import choices_of
from edgetune.data.prompts import (
    IGNORE_INDEX,
    TokenizedSet,
    encode_answer,
    left_padded,
    pad_token_id,
    prompt_ids,
    stop_token_ids,
)
from edgetune.models.loss import answer_loss, last_position_logits, sequence_logprobs

"""Candidates in an example's ``choices`` field are separated by newlines."""


def heldout_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    batch_size: int,
    max_length: int,
    on_batch: Callable[[int], None] | None = None,
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
    on_batch
        Called with the number of examples of each scored batch (progress bars).

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
            if on_batch is not None:
                on_batch(len(batch["input_ids"]))
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
    answers = greedy_answers(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    correct = sum(normalize_answer(a) == normalize_answer(ex["response"]) for a, ex in zip(answers, examples))
    return correct / len(examples)


def greedy_answers(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """The model's greedy answer to each example's prompt (decoded, special tokens removed);
    ``on_batch`` is called with the size of each decoded batch.
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
    answers: list[str] = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = left_padded(tokenizer, [prompt_ids(tokenizer, ex) for ex in chunk])
            out = model.generate(**{k: v.to(device) for k, v in batch.items()}, generation_config=config)
            new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
            for tokens in new_tokens:
                answers.append(tokenizer.decode(_until_stop(tokens, stops), skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(chunk))
    return answers


_PROCEDURE = re.compile(r"\bPR-(\d+)\b")


def graded_scores(answers: Sequence[str], examples: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Scores of free-form answers that move before whole answers are right.

    Returns
    -------
    dict[str, float]
        ``exact_match`` (whole answer), ``procedure_accuracy`` (the ``PR-<n>`` number matches, for
        responses that carry one) and ``action_f1`` (token F1 of the text after the first colon,
        averaged over examples).
    """
    if len(answers) != len(examples) or not examples:
        raise ValueError(f"graded_scores: {len(answers)} answers for {len(examples)} examples")
    exact = procedure_hits = procedure_total = 0
    f1s = []
    for answer, ex in zip(answers, examples):
        gold = ex["response"]
        exact += normalize_answer(answer) == normalize_answer(gold)
        gold_number = _PROCEDURE.search(gold)
        if gold_number:
            procedure_total += 1
            got = _PROCEDURE.search(answer)
            procedure_hits += bool(got) and got.group(1) == gold_number.group(1)  # type: ignore[union-attr]
        f1s.append(_token_f1(_after_colon(answer), _after_colon(gold)))
    scores = {"exact_match": exact / len(examples), "action_f1": sum(f1s) / len(f1s)}
    if procedure_total:
        scores["procedure_accuracy"] = procedure_hits / procedure_total
    return scores


def _after_colon(text: str) -> list[str]:
    body = text.split(":", 1)[1] if ":" in text else text
    return re.findall(r"[a-z0-9-]+", body.lower())


def _token_f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = 0
    remaining = list(gold)
    for t in pred:
        if t in remaining:
            remaining.remove(t)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def choice_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    batch_size: int,
    max_length: int,
    field: str = "choices",
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """Fraction of examples whose response is the best-scored of its ``choices`` (or ``field``):
    ``choice_scores(...)["accuracy"]``. Ties go to the candidate listed first.
    """
    return choice_scores(
        model, tokenizer, examples, batch_size=batch_size, max_length=max_length, field=field, on_batch=on_batch
    )["accuracy"]


def choice_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    batch_size: int,
    max_length: int,
    field: str = "choices",
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Label accuracy and the held-out choice loss from one scoring pass.

    Each example's candidates are scored by their first answer token's logit after the prompt
    (the whole answer's log-likelihood where first tokens collide).

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer.
    examples
        Example dicts with ``instruction``, ``response`` and ``choices`` (``choices_of``).
    batch_size
        Prompts (or candidate sequences) per forward pass.
    max_length
        Token limit per example, as in training.

    Returns
    -------
    dict[str, float]
        ``accuracy``: the fraction whose response scores highest (ties go to the candidate listed
        first); ``choice_loss``: the mean cross-entropy of the response among its candidates' scores,
        the objective ``spsa.objective = "choices"`` trains (``models/loss.py``).
    """
    _check(examples, batch_size)
    first_token: list[list[int]] = []
    fast: list[int] = []
    slow: list[int] = []
    for i, ex in enumerate(examples):
        prefix = ex.get("answer_prefix") or ""
        firsts = [encode_answer(tokenizer, c, prefix)[:1] for c in choices_of(ex, field)]
        ids = [f[0] if f else -1 for f in firsts]
        first_token.append(ids)
        (fast if -1 not in ids and len(set(ids)) == len(ids) else slow).append(i)
    correct = 0
    nll = 0.0
    pad = pad_token_id(tokenizer)

    def score(scores: torch.Tensor, ex: Mapping[str, str]) -> None:
        nonlocal correct, nll
        choices = choices_of(ex, field)
        right = choices.index(ex["response"])
        correct += int(torch.argmax(scores)) == right
        nll -= float(torch.log_softmax(scores.double(), dim=0)[right])

    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(fast), batch_size):
            idx = fast[start : start + batch_size]
            prompts = [prompt_ids(tokenizer, examples[i])[-max_length:] for i in idx]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, p in enumerate(prompts):
                input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                attention_mask[row, width - len(p) :] = 1
            logits = last_position_logits(model, input_ids, attention_mask)
            for row, i in enumerate(idx):
                score(logits[row, first_token[i]], examples[i])
            if on_batch is not None:
                on_batch(len(idx))
        for i in slow:
            ex = examples[i]
            rows = [{**ex, "response": c} for c in choices_of(ex, field)]
            data = TokenizedSet(tokenizer, rows, max_length)
            score(sequence_logprobs(model, data.batch(list(range(len(rows))))), ex)
            if on_batch is not None:
                on_batch(1)
    return {"accuracy": correct / len(examples), "choice_loss": nll / len(examples)}


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, str]],
    *,
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    accuracy: bool,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Held-out loss, and accuracy when ``accuracy`` (slower: ranking or greedy decoding).

    ``on_batch`` is called with the examples of every batch scored: ``len(examples)`` for the
    loss, as many again for the accuracy, and again for ``mc_accuracy``.

    Returns
    -------
    dict[str, float]
        ``{"heldout_loss": ...}``, plus, when asked for, ``"accuracy"``: label accuracy
        (``choice_scores``, with the held-out ``choice_loss`` next to it) when every example has
        ``choices``, else greedy exact match, with
        the graded scores ``procedure_accuracy`` and ``action_f1`` next to it, and ``mc_accuracy``
        (likelihood-ranked multiple choice) when every example has ``mc_choices``.
    """
    metrics = {
        "heldout_loss": heldout_loss(
            model, tokenizer, examples, batch_size=batch_size, max_length=max_length, on_batch=on_batch
        )
    }
    if accuracy:
        if all(ex.get("choices") for ex in examples):
            metrics.update(
                choice_scores(
                    model, tokenizer, examples, batch_size=batch_size, max_length=max_length, on_batch=on_batch
                )
            )
        else:
            answers = greedy_answers(
                model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens, on_batch=on_batch
            )
            graded = graded_scores(answers, examples)
            metrics["accuracy"] = graded.pop("exact_match")
            metrics.update(graded)
            if all(ex.get("mc_choices") for ex in examples):
                metrics["mc_accuracy"] = choice_accuracy(
                    model,
                    tokenizer,
                    examples,
                    batch_size=batch_size,
                    max_length=max_length,
                    field="mc_choices",
                    on_batch=on_batch,
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
