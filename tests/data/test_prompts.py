"""Tests for prompt formatting and tokenisation (edgetune/data/prompts.py)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from edgetune.crypto.schedule import derive, run_key
from edgetune.data.prompts import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    TokenizedSet,
    batch_indices,
    encode_example,
    encode_prompt,
    end_token_id,
    format_prompt,
    generation_batch,
)
from edgetune.models.tiny import tiny_tokenizer

EXAMPLE = {
    "instruction": "Press P-12 at the Nagoya stamping plant shows alarm E-4217. What is the fix?",
    "response": "Procedure PR-311: replace the hydraulic seal and torque the clamp bolts.",
    "site": "site-0",
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _answer_ids(tok, response: str) -> list[int]:
    return tok(response, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]


def test_chat_template_prompt_ends_at_the_assistant_turn(tok):
    """With a chat template: system + user messages, then the assistant header, nothing after."""
    # Execute
    prompt = format_prompt(tok, "Why?")
    # Assert
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_plain_format_without_chat_template():
    """Without a chat template the prompt is the plain Question/Answer format."""
    # Prepare
    plain = tiny_tokenizer()
    plain.chat_template = None
    # Execute
    prompt = format_prompt(plain, "Why?")
    # Assert
    assert prompt == f"{SYSTEM_PROMPT}\n### Question:\nWhy?\n### Answer:\n"


def test_end_token_follows_the_template_then_falls_back_to_eos(tok):
    """The answer ends with the template's end-of-turn marker, else with eos."""
    # Prepare
    other = tiny_tokenizer()
    other.chat_template = "{{ '<|eot_id|>' }}"  # a marker this vocabulary lacks
    # Execute / Assert
    assert end_token_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") == 257
    assert end_token_id(other) == other.eos_token_id


def test_labels_mask_exactly_the_prompt(tok):
    """labels = -100 on every prompt token and input_ids on every answer token (response + end)."""
    # Prepare
    prompt = encode_prompt(tok, EXAMPLE["instruction"])
    answer = _answer_ids(tok, EXAMPLE["response"])
    # Execute
    ids, labels = encode_example(tok, EXAMPLE, max_length=1000)
    # Assert
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer
    scored = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(scored) == EXAMPLE["response"] + "<|im_end|>"


def test_long_example_loses_the_left_of_its_prompt_never_the_answer(tok):
    """Over max_length, the prompt is cut from the left and the answer stays whole."""
    # Prepare
    full_ids, _ = encode_example(tok, EXAMPLE, max_length=1000)
    answer = _answer_ids(tok, EXAMPLE["response"])
    max_length = len(answer) + 20
    # Execute
    ids, labels = encode_example(tok, EXAMPLE, max_length=max_length)
    # Assert
    assert len(ids) == len(labels) == max_length
    assert ids == full_ids[-max_length:]
    assert labels[-len(answer) :] == answer
    assert labels[: -len(answer)] == [IGNORE_INDEX] * 20


def test_answer_longer_than_max_length_keeps_its_start(tok):
    """An answer that alone exceeds max_length keeps its first tokens and no prompt."""
    # Prepare
    answer = _answer_ids(tok, EXAMPLE["response"])
    # Execute
    ids, labels = encode_example(tok, EXAMPLE, max_length=10)
    # Assert
    assert ids == labels == answer[:10]


def test_batch_is_right_padded_and_pad_has_no_loss(tok):
    """-100 sits exactly on prompt and pad positions; attention is 0 exactly on pad."""
    # Prepare
    short = {"instruction": "Hi?", "response": "Yes."}
    data = TokenizedSet(tok, [EXAMPLE, short], max_length=1000)
    n_long, n_short = len(data.input_ids[0]), len(data.input_ids[1])
    prompt_short = len(encode_prompt(tok, "Hi?"))
    # Execute
    batch = data.batch([1, 0])
    # Assert
    assert len(data) == 2
    assert batch["input_ids"].shape == (2, n_long)
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert (batch["input_ids"][0, n_short:] == tok.pad_token_id).all()
    masked = (batch["labels"][0] == IGNORE_INDEX).tolist()
    assert masked == [True] * prompt_short + [False] * (n_short - prompt_short) + [True] * (n_long - n_short)
    assert batch["labels"][0, prompt_short:n_short].tolist() == _answer_ids(tok, "Yes.")
    with pytest.raises(ValueError, match="out of range"):
        data.batch([2])


def test_batch_indices_are_keyed_and_reproducible():
    """The same key gives the same batch; another step's key gives another batch."""
    # Prepare
    root = run_key(0)
    key = derive(root, "data", "site-0", 1, 0)
    # Execute
    a = batch_indices(100, 8, key)
    b = batch_indices(100, 8, key)
    c = batch_indices(100, 8, derive(root, "data", "site-0", 1, 1))
    # Assert
    assert a == b
    assert a != c
    assert len(set(a)) == 8
    assert all(0 <= i < 100 for i in a)


def test_batch_larger_than_the_set_uses_every_example_evenly():
    """batch_size > num_examples repeats whole keyed permutations: counts differ by at most one."""
    # Execute
    idx = batch_indices(5, 12, derive(run_key(0), "data", "site-1", 1, 0))
    # Assert
    counts = Counter(idx)
    assert sorted(counts) == [0, 1, 2, 3, 4]
    assert set(counts.values()) == {2, 3}


def test_generation_batch_is_left_padded(tok):
    """Prompts are right-aligned, so every row's last prompt token is in the last column."""
    # Prepare
    questions = [EXAMPLE["instruction"], "Hi?"]
    prompts = [encode_prompt(tok, q) for q in questions]
    # Execute
    batch = generation_batch(tok, questions)
    # Assert
    width = len(prompts[0])
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == prompts[0]
    pad = width - len(prompts[1])
    assert batch["input_ids"][1].tolist() == [tok.pad_token_id] * pad + prompts[1]
    assert batch["attention_mask"][1].tolist() == [0] * pad + [1] * len(prompts[1])
