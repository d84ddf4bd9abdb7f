"""Prompt format and tokenisation: one place decides what the model sees and what it is scored on.

Training, held-out loss and greedy evaluation all build prompts here and tokenise them the same
way (``add_special_tokens=False``: chat templates carry their own special tokens), so the model is
evaluated on exactly the prompt it was trained on. The loss covers answers only.

An example is a dict in one of two shapes:

* ``{"instruction", "response"}`` (optionally ``"system"``, ``"template"`` and ``"answer_prefix"``,
  text such as ``Category:`` that ends the prompt and starts the answer line): the prompt is the
  model's chat template with a system and a user message (or ``template``, the recipe's
  ``data.prompt_template``, or the built-in ``### Question:`` layout when the tokenizer has no chat
  template); the loss covers the response and the end-of-turn token.
* ``{"messages": [{"role", "content"}, ...]}`` (optionally ``"system"``, used when the conversation has
  no system message): rendered with the model's own chat template; the loss covers every assistant
  turn (its content and end-of-turn token) and nothing else. Such examples also carry
  ``instruction``/``response`` (the last user and assistant turns) for display and exact match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from edgetune.crypto import schedule

SYSTEM_PROMPT = "You are a factory maintenance assistant. Answer with the procedure only."
"""The fact-recall demo's system prompt, and what ``format_prompt`` uses when given ``system=None``.
Data sources set every example's ``"system"`` explicitly (``""``: no system message)."""

PLAIN_TEMPLATE = "{system}\n### Question:\n{instruction}\n### Answer:\n"
"""Prompt layout for tokenizers without a chat template (the ``{system}`` line is dropped when empty)."""

IGNORE_INDEX = -100
"""Label of positions without loss (prompt and padding); PyTorch's cross-entropy default."""

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
"""End-of-turn markers of common chat templates, tried before the plain eos token."""

CHAT_ROLES = ("system", "user", "assistant")
"""Roles a ``messages`` row may use."""


def format_prompt(
    tokenizer: Any, instruction: str, system: str | None = None, answer_prefix: str = "", *, template: str | None = None
) -> str:
    """The prompt text for ``instruction``, up to where the answer starts.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer. With a chat template: system + user messages and the
        generation prompt. Without: ``PLAIN_TEMPLATE``.
    instruction
        The question.
    system
        System prompt; ``None`` uses ``SYSTEM_PROMPT``, ``""`` none (no system message).
    answer_prefix
        Text the answer starts with that is part of the prompt, not of the answer (the triage
        data's ``Category:``): the model is scored on what follows it. It follows the template too.
    template
        A recipe's ``data.prompt_template`` (``{instruction}``, ``{system}``); used when given.

    Returns
    -------
    str
        Prompt text; the answer follows it directly.
    """
    system = SYSTEM_PROMPT if system is None else system
    if template:
        return template.format(instruction=instruction, system=system) + answer_prefix
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": instruction})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix
    plain = PLAIN_TEMPLATE if system else PLAIN_TEMPLATE.removeprefix("{system}\n")
    return plain.format(instruction=instruction, system=system) + answer_prefix


def end_token_id(tokenizer: Any) -> int:
    """Id of the token that ends an answer: the chat template's end-of-turn marker, else eos.

    Raises ``ValueError`` if the tokenizer has neither.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        for token in END_OF_TURN_TOKENS:
            # Llama 3 has eos <|end_of_text|> but ends turns with <|eot_id|>: follow the template.
            if token in template:
                token_id = tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                    return token_id
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token and no end-of-turn marker")
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end greedy decoding: the end-of-turn token and eos."""
    ids = [end_token_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """Padding id: the tokenizer's pad token, else its eos (padding is masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an eos token")


def encode_prompt(
    tokenizer: Any, instruction: str, system: str | None = None, answer_prefix: str = "", *, template: str | None = None
) -> list[int]:
    """Token ids of ``format_prompt(tokenizer, instruction, system, answer_prefix, template=template)``."""
    text = format_prompt(tokenizer, instruction, system, answer_prefix, template=template)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_answer(tokenizer: Any, response: str, answer_prefix: str = "") -> list[int]:
    """Token ids of an answer (without the end-of-turn token).

    After an ``answer_prefix`` the answer is ``" " + response`` tokenised as the continuation of the
    prefix (``"Category: mechanical"`` minus the tokens of ``"Category:"``), which is how the text
    reads as a whole.
    """
    if not answer_prefix:
        return list(tokenizer(response, add_special_tokens=False)["input_ids"])
    head = list(tokenizer(answer_prefix, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(f"{answer_prefix} {response}", add_special_tokens=False)["input_ids"])
    if full[: len(head)] == head and len(full) > len(head):
        return full[len(head) :]
    return list(tokenizer(f" {response}", add_special_tokens=False)["input_ids"])


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def chat_messages(example: Mapping[str, Any]) -> list[dict[str, str]]:
    """The conversation of a ``messages`` example, the example's ``system`` first when it has none,
    cut after its last assistant turn (later turns train nothing).
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    system = example.get("system")
    if system and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise ValueError("a messages example needs at least one assistant turn")
    return messages[: last + 1]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"chat messages need a tokenizer with a chat template; {name} has none: give instruction/response "
            "rows instead (or a model whose tokenizer_config.json has a chat_template)"
        )
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
        raise ValueError(f"the model's chat template rejected this conversation: {type(err).__name__}: {err}") from err


def chat_segments(tokenizer: Any, example: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces, in order.

    Each assistant turn is the text the template adds between the prompt for that turn (all
    earlier messages with the generation prompt) and the conversation up to and including it.
    That needs a template whose rendering of earlier turns does not change when later turns
    follow; ``ValueError`` says so when a template breaks it (some drop past reasoning).
    """
    messages = chat_messages(example)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(
                "the model's chat template renders earlier turns differently once later turns follow, so "
                "assistant tokens cannot be told apart; give one conversation per assistant turn"
            )
        pieces.append((prompt[len(done) :], False))
        pieces.append((full[len(prompt) :], True))
        done = full
    return [(text, flag) for text, flag in pieces if text]


def prompt_ids(tokenizer: Any, example: Mapping[str, Any]) -> list[int]:
    """Token ids of the prompt the model answers for ``example`` (generation, choice scoring)."""
    if "messages" in example:
        messages = chat_messages(example)
        return _ids(tokenizer, _render(tokenizer, messages[:-1], generation_prompt=True))
    return encode_prompt(
        tokenizer,
        example["instruction"],
        example.get("system"),
        example.get("answer_prefix") or "",
        template=example.get("template"),
    )


def _encode_chat(tokenizer: Any, example: Mapping[str, Any], max_length: int) -> tuple[list[int], list[int]]:
    end = end_token_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    last_span = (0, 0)
    for text, assistant in chat_segments(tokenizer, example):
        piece = _ids(tokenizer, text)
        if assistant:
            # the turn's content and its end-of-turn token; what the template puts after it
            # (a newline) belongs to the next prompt
            cut = piece.index(end) + 1 if end in piece else len(piece)
            last_span = (len(ids), len(ids) + cut)
            labels.extend(piece[:cut] + [IGNORE_INDEX] * (len(piece) - cut))
        else:
            labels.extend([IGNORE_INDEX] * len(piece))
        ids.extend(piece)
    if len(ids) > max_length:
        start, stop = last_span
        if stop - start >= max_length:
            ids, labels = ids[start : start + max_length], labels[start : start + max_length]
        else:
            # keep the end (the last answer and the turns right before it), drop the oldest turns
            keep = max(stop, max_length)
            ids, labels = ids[keep - max_length : keep], labels[keep - max_length : keep]
    return ids, labels


def encode_example(tokenizer: Any, example: Mapping[str, Any], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example; the loss covers the answer(s) only.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer.
    example
        ``{"instruction": str, "response": str, ...}``, optionally ``"system"`` (its system prompt)
        and ``"template"`` (see ``format_prompt``) and ``"answer_prefix"``; or ``{"messages": [...], ...}``
        (see the module docstring).
    max_length
        Most tokens kept. A longer example loses the left of its prompt (for conversations: its
        oldest turns), never its last answer; an answer longer than ``max_length`` on its own keeps
        its first ``max_length`` tokens and no prompt.

    Returns
    -------
    input_ids, labels
        Equal-length lists. ``labels`` is ``IGNORE_INDEX`` on prompt tokens and equals
        ``input_ids`` on answer tokens (response + end-of-turn token).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if "messages" in example:
        return _encode_chat(tokenizer, example, max_length)
    prompt = prompt_ids(tokenizer, example)
    answer = encode_answer(tokenizer, example["response"], example.get("answer_prefix") or "")
    answer.append(end_token_id(tokenizer))
    if len(answer) >= max_length:
        answer, prompt = answer[:max_length], []
    else:
        # Cut from the left: the instruction's end sits next to the answer and the chat
        # template's assistant header must stay intact, while a system prompt can go.
        prompt = prompt[max(0, len(prompt) - (max_length - len(answer))) :]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


class TokenizedSet:
    """Examples tokenised once, served as right-padded training batches.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer.
    examples
        Example dicts (``instruction``, ``response``).
    max_length
        Token limit per example, as in ``encode_example``.
    """

    def __init__(self, tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_length: int) -> None:
        if not examples:
            raise ValueError("TokenizedSet needs at least one example")
        self.pad_id = pad_token_id(tokenizer)
        encoded = []
        for i, ex in enumerate(examples):
            try:
                encoded.append(encode_example(tokenizer, ex, max_length))
            except ValueError as err:
                where = ex.get("where") or f"example {i}"
                raise ValueError(f"{where}: {err}") from None
        self.input_ids = [ids for ids, _ in encoded]
        self.labels = [labels for _, labels in encoded]
        self._tokenizer = tokenizer
        self._examples = list(examples)
        self._choices: dict[int, tuple[list[int], int, int]] = {}

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: Sequence[int], *, choices: bool = False) -> dict[str, torch.Tensor]:
        """Right-padded batch of the examples at ``indices``.

        With ``choices``, the batch also carries what the classification objective
        (``models.loss.choice_loss``) scores: ``choice_ids`` (rows, most candidates; the
        first answer token of each of the example's ``choices``, -1 padding), ``choice_target``
        (the response's index among them) and ``choice_pos`` (the last prompt position, whose
        next-token logits score the candidates). ``ValueError`` names an example that cannot be
        scored so (``choice_row``).

        Returns
        -------
        dict[str, torch.Tensor]
            ``input_ids``, ``attention_mask`` and ``labels``, int64, shape (batch, longest);
            padding has attention 0 and label ``IGNORE_INDEX``.
        """
        if len(indices) == 0:
            raise ValueError("batch needs at least one index")
        for i in indices:
            if not 0 <= i < len(self):
                raise ValueError(f"batch index {i} out of range for {len(self)} examples")
        width = max(len(self.input_ids[i]) for i in indices)
        input_ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            input_ids[row, :n] = torch.tensor(self.input_ids[i], dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(self.labels[i], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if choices:
            rows = [self.choice_row(i) for i in indices]
            most = max(len(ids) for ids, _, _ in rows)
            out["choice_ids"] = torch.full((len(indices), most), -1, dtype=torch.long)
            for row, (ids, _, _) in enumerate(rows):
                out["choice_ids"][row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            out["choice_target"] = torch.tensor([target for _, target, _ in rows], dtype=torch.long)
            out["choice_pos"] = torch.tensor([pos for _, _, pos in rows], dtype=torch.long)
        return out

    def choice_row(self, i: int) -> tuple[list[int], int, int]:
        """Example ``i``'s candidates' first answer tokens, its response's index among them and its
        last prompt position (cached).

        Raises ``ValueError`` naming the example when it has no ``choices`` (or they do not include
        its response), when two candidates start with the same token (their first tokens cannot
        tell them apart), or when truncation left no prompt before the answer.
        """
        if i not in self._choices:
            from edgetune.data.choices import choice_row  # (choices.py builds on this module)

            ex = self._examples[i]
            self._choices[i] = choice_row(
                self._tokenizer, ex, self.input_ids[i], self.labels[i], ex.get("where") or f"example {i}"
            )
        return self._choices[i]


def batch_indices(num_examples: int, batch_size: int, key: bytes) -> list[int]:
    """A keyed random batch of example indices.

    Parameters
    ----------
    num_examples
        Size of the site's example set.
    batch_size
        Indices drawn.
    key
        Stream key, ``derive(run_key(seed), "data", site_id, round_idx, step)``.

    Returns
    -------
    list[int]
        Without replacement within the batch: the first ``batch_size`` entries of a keyed
        permutation. If ``batch_size > num_examples``, successive keyed permutations are
        concatenated, so every example appears ``floor`` or ``ceil(batch_size / num_examples)``
        times.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(
            f"batch_indices needs num_examples >= 1 and batch_size >= 1, got {num_examples} and {batch_size}"
        )
    out: list[int] = []
    nonce = 0
    while len(out) < batch_size:
        take = min(batch_size - len(out), num_examples)
        out.extend(schedule.permutation(key, num_examples, nonce=nonce)[:take].tolist())
        nonce += 1
    return out


def generation_batch(
    tokenizer: Any,
    instructions: Sequence[str],
    systems: Sequence[str | None] | None = None,
    answer_prefixes: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched greedy decoding (instruction examples).

    Left padding puts every prompt's last token in the last column, so all rows start
    generating at the same position.

    Returns
    -------
    dict[str, torch.Tensor]
        ``input_ids`` and ``attention_mask``, int64, shape (batch, longest prompt).
    """
    if len(instructions) == 0:
        raise ValueError("generation_batch needs at least one instruction")
    if systems is not None and len(systems) != len(instructions):
        raise ValueError(f"{len(instructions)} instructions but {len(systems)} system prompts")
    prompts = [
        encode_prompt(
            tokenizer,
            q,
            None if systems is None else systems[i],
            "" if answer_prefixes is None else answer_prefixes[i],
        )
        for i, q in enumerate(instructions)
    ]
    return left_padded(tokenizer, prompts)


def left_padded(tokenizer: Any, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` and ``attention_mask`` (int64, batch x longest)."""
    if len(prompts) == 0:
        raise ValueError("left_padded needs at least one prompt")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[row, width - len(p) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
