"""Candidate answers: an example's ``choices`` and what the classification objective scores of them.

A row of a classification task lists its candidate answers in ``choices`` (one per line, the response
among them). Label accuracy (``metrics/eval.py``) ranks the candidates by their first answer token's
logit after the prompt; the ``choices`` objective of spsa (``models/loss.py``: ``choice_loss``) trains
the cross-entropy of the right one among the same scores. ``choice_row`` says, for one tokenised
training example, which token ids and which position those are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgetune.data.prompts import IGNORE_INDEX, encode_answer

CHOICE_SEPARATOR = "\n"
"""Separates an example's candidate answers in its ``choices`` (and ``mc_choices``) field."""


def choices_of(example: Mapping[str, str], field: str = "choices") -> list[str]:
    """The candidate answers of ``example`` (its ``choices`` field, newline-separated)."""
    raw = example.get(field)
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"example has no choices: {str(example.get('instruction', ''))[:80]!r}")
    choices = [c for c in raw.split(CHOICE_SEPARATOR) if c]
    if len(set(choices)) != len(choices) or example["response"] not in choices:
        raise ValueError(f"example's choices must be distinct and include its response: {choices!r}")
    return choices


def choice_row(
    tokenizer: Any, example: Mapping[str, Any], input_ids: Sequence[int], labels: Sequence[int], where: str
) -> tuple[list[int], int, int]:
    """The candidates' first answer tokens of ``example``, its response's index among them and its last
    prompt position in ``input_ids``/``labels`` (``encode_example``'s output for it).

    Raises ``ValueError`` naming ``where`` when the example has no ``choices`` (or they do not include
    its response), when two candidates start with the same token (their first tokens cannot tell them
    apart), or when truncation left no prompt before the answer.
    """
    if "messages" in example:
        raise ValueError(f"{where}: the choices objective needs instruction/response rows, not messages")
    try:
        cands = choices_of(example)
    except ValueError as err:
        why = "the choices objective needs every training example's candidates"
        raise ValueError(f"{where}: {err} ({why})") from None
    prefix = example.get("answer_prefix") or ""
    firsts = [encode_answer(tokenizer, c, prefix)[:1] for c in cands]
    ids = [f[0] if f else -1 for f in firsts]
    if -1 in ids or len(set(ids)) != len(ids):
        clash = [c for c, t in zip(cands, ids) if ids.count(t) > 1 or t == -1]
        raise ValueError(
            f"{where}: candidates {clash!r} start with the same token (or none), so their first tokens "
            "cannot rank them; the choices objective needs candidates that differ in their first token"
        )
    prompt_len = next(j for j, t in enumerate(labels) if t != IGNORE_INDEX)
    if prompt_len == 0:
        raise ValueError(f"{where}: no prompt is left before the answer at data.max_length; raise it")
    target = cands.index(example["response"])
    if input_ids[prompt_len] != ids[target]:
        raise ValueError(f"{where}: the response's first token differs from its candidate's; check answer_prefix")
    return ids, target, prompt_len - 1
