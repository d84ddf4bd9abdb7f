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


# ---- chat messages, system prompts and templates ----------------------------------------------------

CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Alarm E-1?"},
        {"role": "assistant", "content": "PR-100."},
        {"role": "user", "content": "And E-2?"},
        {"role": "assistant", "content": "PR-101."},
    ]
}


def _scored_spans(tok, ids, labels):
    """The decoded runs of consecutive labelled tokens."""
    spans, run = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if run:
                spans.append(tok.decode(run))
            run = []
        else:
            assert label == i
            run.append(i)
    if run:
        spans.append(tok.decode(run))
    return spans


def test_chat_loss_covers_exactly_the_assistant_turns(tok):
    """Rendered with the model's chat template, a conversation is scored on each assistant turn's
    content and end-of-turn token, never on system or user text or the template's newlines."""
    ids, labels = encode_example(tok, CHAT, max_length=1000)
    assert tok.decode(ids) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert _scored_spans(tok, ids, labels) == ["PR-100.<|im_end|>", "PR-101.<|im_end|>"]


def test_single_turn_chat_equals_the_instruction_example(tok):
    """[system, user, assistant] gives the same tokens and labels as instruction/response with that system."""
    chat = {"messages": CHAT["messages"][:3]}
    pair = {"instruction": "Alarm E-1?", "response": "PR-100.", "system": "You are terse."}
    chat_ids, chat_labels = encode_example(tok, chat, 1000)
    pair_ids, pair_labels = encode_example(tok, pair, 1000)
    # the chat render ends with the template's newline after <|im_end|>, unscored
    assert chat_ids[: len(pair_ids)] == pair_ids and chat_labels[: len(pair_labels)] == pair_labels
    assert chat_labels[len(pair_labels) :] == [IGNORE_INDEX] * (len(chat_ids) - len(pair_ids))


def test_system_prompt_fills_only_conversations_without_one(tok):
    """An example's ``system`` is inserted when the conversation has no system message, never over its own."""
    no_system = {"messages": CHAT["messages"][1:3], "system": "Recipe prompt."}
    own_system = {"messages": CHAT["messages"][:3], "system": "Recipe prompt."}
    assert "Recipe prompt." in tok.decode(encode_example(tok, no_system, 1000)[0])
    text = tok.decode(encode_example(tok, own_system, 1000)[0])
    assert "You are terse." in text and "Recipe prompt." not in text


def test_long_conversation_drops_its_oldest_turns_and_keeps_the_last_answer(tok):
    """Cut to max_length, a conversation keeps its end: the last answer whole, older turns cut from the left."""
    full_ids, _ = encode_example(tok, CHAT, 1000)
    ids, labels = encode_example(tok, CHAT, max_length=30)
    assert len(ids) == 30 and _scored_spans(tok, ids, labels)[-1] == "PR-101.<|im_end|>"
    assert ids == full_ids[len(full_ids) - 31 : -1]  # the trailing newline after the last turn goes first


def test_empty_system_and_recipe_template(tok):
    """system "" means no system message; a recipe template replaces the chat template for instruction rows."""
    assert format_prompt(tok, "Why?", system="") == "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    template = "Q: {instruction}\nA: "
    ids, labels = encode_example(tok, {"instruction": "Why?", "response": "Because.", "template": template}, 1000)
    assert tok.decode(ids) == "Q: Why?\nA: Because.<|im_end|>"
    plain = tiny_tokenizer()
    plain.chat_template = None
    assert format_prompt(plain, "Why?", system="") == "### Question:\nWhy?\n### Answer:\n"


def test_chat_rows_need_a_template_that_keeps_earlier_turns_stable(tok):
    """A tokenizer without a chat template, or one that re-renders earlier turns once later ones follow,
    cannot mark assistant tokens: the error says so (and TokenizedSet names the row)."""
    plain = tiny_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        encode_example(plain, CHAT, 1000)
    unstable = tiny_tokenizer()
    unstable.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
        "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match=r"c.jsonl:4: the model's chat template renders earlier turns differently"):
        TokenizedSet(unstable, [{**CHAT, "where": "c.jsonl:4"}], 1000)


@pytest.mark.parametrize("template", ["", "Q: {instruction}\nA:"])
def test_answer_prefix_follows_any_prompt_and_is_not_scored(tok, template):
    """An answer prefix (triage's ``Category:``) ends the prompt whether it comes from the chat template or
    a recipe template; only the answer after it and the end-of-turn token carry loss, and generation and
    training see the same prompt tokens."""
    from edgetune.data.prompts import encode_answer, prompt_ids

    ex = {"instruction": "Pump 3 leaks oil", "response": "mechanical", "answer_prefix": "Category:"}
    if template:
        ex["template"] = template
    ids, labels = encode_example(tok, ex, 1000)
    prompt = prompt_ids(tok, ex)
    text = format_prompt(tok, ex["instruction"], None, "Category:", template=template or None)
    assert text.endswith("Category:") and (not template or text == "Q: Pump 3 leaks oil\nA:Category:")
    assert ids[: len(prompt)] == prompt == encode_prompt(tok, ex["instruction"], None, "Category:", template=template)
    answer = encode_answer(tok, "mechanical", "Category:") + [end_token_id(tok)]
    assert ids[len(prompt) :] == answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer
    assert tok.decode(ids).endswith("Category: mechanical<|im_end|>")
