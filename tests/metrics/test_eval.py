"""Tests for held-out loss and exact-match accuracy (edgetune/metrics/eval.py)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from edgetune.data.demo import demo_heldout
from edgetune.data.prompts import IGNORE_INDEX, TokenizedSet, encode_example, encode_prompt
from edgetune.metrics.eval import evaluate, exact_match, heldout_loss, normalize_answer
from edgetune.models.tiny import tiny_model_and_tokenizer

MAX_LENGTH = 320  # byte-level tokens: a demo prompt + answer is about 250


@pytest.fixture(autouse=True)
def _one_thread():
    # A 100k-parameter model runs 20x slower with 2 intra-op threads on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def model_tok():
    return tiny_model_and_tokenizer(seed=0)


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return demo_heldout(2, facts_per_site=2, seed=0)  # 12 examples of varied lengths


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_heldout_loss_equals_hand_computed_loss_on_one_example(model_tok, examples):
    """One example: mean over answer tokens of -log p(token | prefix), nothing else."""
    # Prepare
    model, tok = model_tok
    ids, labels = encode_example(tok, examples[0], MAX_LENGTH)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    answer_positions = [t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    expected = -sum(logp[t - 1, ids[t]].item() for t in answer_positions) / len(answer_positions)
    # Execute
    loss = heldout_loss(model, tok, examples[:1], batch_size=1, max_length=MAX_LENGTH)
    # Assert
    assert loss == pytest.approx(expected, rel=1e-5)


def test_heldout_loss_is_a_token_weighted_mean_independent_of_batching(model_tok, examples):
    """Sum of token losses / answer tokens: padding and batch size do not change the value."""
    # Prepare
    model, tok = model_tok
    data = TokenizedSet(tok, examples, MAX_LENGTH)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            batch = data.batch([i])
            logits = model(input_ids=batch["input_ids"]).logits
            total += F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="sum").item()
            count += int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())
    # Execute
    losses = [heldout_loss(model, tok, examples, batch_size=b, max_length=MAX_LENGTH) for b in (1, 5, 12)]
    # Assert
    assert losses == pytest.approx([total / count] * 3, rel=1e-5)


def test_evaluation_does_not_modify_the_model(model_tok, examples):
    """Weights are bitwise unchanged and each submodule's train/eval mode is restored."""
    # Prepare
    model, tok = model_tok
    model.train()
    model.model.layers[0].eval()  # a submodule the caller froze in eval mode
    before = _state_hash(model)
    # Execute
    evaluate(model, tok, examples[:4], batch_size=2, max_length=MAX_LENGTH, max_new_tokens=3, accuracy=True)
    # Assert
    assert _state_hash(model) == before
    assert model.training and model.model.training
    assert not model.model.layers[0].training
    assert all(p.grad is None for p in model.parameters())


def test_heldout_loss_drops_after_training_on_the_heldout_examples(model_tok, examples):
    """Convergence check: a few SGD steps on the scored examples lower the held-out loss."""
    # Prepare
    model, tok = model_tok
    before = heldout_loss(model, tok, examples, batch_size=4, max_length=MAX_LENGTH)
    data = TokenizedSet(tok, examples, MAX_LENGTH)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    # Execute
    for _ in range(5):
        loss = model(**data.batch(range(len(data)))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = heldout_loss(model, tok, examples, batch_size=4, max_length=MAX_LENGTH)
    # Assert
    assert before == pytest.approx(5.6, abs=0.3)  # about ln(259): an untrained model
    assert after < before - 0.5


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("  Procedure PR-1:  Do X\n and  Y.  ", "procedure pr-1: do x and y"),
        ("done...", "done"),
        ("A. B.", "a. b"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normal):
    """Strip, lowercase, collapse whitespace, drop trailing periods."""
    assert normalize_answer(raw) == normal


def test_exact_match_scores_the_normalised_greedy_answer(model_tok, monkeypatch):
    """Stubbed generate: case, spacing, a missing period and text after the stop token do not count
    against an answer; a wrong answer does. Greedy, left-padded, stopping at <|im_end|>."""
    # Prepare
    model, tok = model_tok
    end = tok.convert_tokens_to_ids("<|im_end|>")
    examples = [
        {"instruction": "q0?", "response": "Procedure PR-100: fix it and log it."},
        {"instruction": "longer question 1?", "response": "Procedure PR-101: a and b."},
        {"instruction": "q2?", "response": "Procedure PR-102: c and d."},
        {"instruction": "q3?", "response": "Procedure PR-103: e and f."},
        {"instruction": "q4", "response": "Procedure PR-104: g and h."},
    ]
    generated = {
        "q0?": "  procedure PR-100:  Fix it and log it",  # right after normalisation
        "longer question 1?": "Procedure PR-101: a and b.<|im_end|>Procedure PR-999",  # junk after stop
        "q2?": "Procedure PR-102: c and x.",  # wrong
        "q3?": "Procedure PR-103: e and f.<|im_end|><pad><pad>",
        "q4": "Procedure PR-104: g",  # cut short by max_new_tokens: wrong
    }
    prompt_to_question = {tuple(encode_prompt(tok, ex["instruction"])): ex["instruction"] for ex in examples}
    calls = []

    def fake_generate(input_ids, attention_mask, generation_config):
        calls.append((input_ids.clone(), attention_mask.clone(), generation_config))
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            question = prompt_to_question[tuple(ids[mask.bool()].tolist())]
            rows.append(ids.tolist() + tok(generated[question], add_special_tokens=False)["input_ids"])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(model, "generate", fake_generate)
    # Execute
    accuracy = exact_match(model, tok, examples, batch_size=2, max_new_tokens=24)
    # Assert
    assert accuracy == pytest.approx(3 / 5)
    assert len(calls) == 3
    input_ids, mask, config = calls[0]
    assert (mask[:, -1] == 1).all() and mask[1, 0] == 1 and mask[0, 0] == 0  # left padding
    assert config.do_sample is False and config.max_new_tokens == 24
    assert end in config.eos_token_id


def test_evaluate_reports_accuracy_only_when_asked(model_tok, examples, monkeypatch):
    """evaluate returns heldout_loss always and accuracy only with accuracy=True."""
    # Prepare
    model, tok = model_tok
    monkeypatch.setattr(
        model, "generate", lambda input_ids, attention_mask, generation_config: input_ids
    )  # answers nothing: accuracy 0
    # Execute
    without = evaluate(model, tok, examples[:2], batch_size=2, max_length=MAX_LENGTH, max_new_tokens=4, accuracy=False)
    with_acc = evaluate(model, tok, examples[:2], batch_size=2, max_length=MAX_LENGTH, max_new_tokens=4, accuracy=True)
    # Assert
    assert set(without) == {"heldout_loss"}
    assert set(with_acc) == {"heldout_loss", "accuracy", "procedure_accuracy", "action_f1", "mc_accuracy"}
    assert with_acc["accuracy"] == with_acc["procedure_accuracy"] == with_acc["action_f1"] == 0.0
    assert 0.0 <= with_acc["mc_accuracy"] <= 1.0
    assert with_acc["heldout_loss"] == without["heldout_loss"] > 0


def test_empty_examples_are_rejected(model_tok):
    """Scoring nothing is an error, not a NaN."""
    model, tok = model_tok
    with pytest.raises(ValueError, match="at least one example"):
        heldout_loss(model, tok, [], batch_size=2, max_length=MAX_LENGTH)


def _triage_like(tok):
    """Examples whose candidates start with distinct tokens (byte tokenizer: distinct first letters)."""
    return [
        {"instruction": f"Report {i}", "response": r, "choices": "alpha\nbeta\ngamma", "answer_prefix": "Category:"}
        for i, r in enumerate(["alpha", "beta", "gamma", "beta"])
    ]


def test_choice_accuracy_ranks_by_the_first_answer_token_after_the_prefix(model_tok, monkeypatch):
    """Label accuracy picks, per example, the candidate whose first answer token has the highest
    next-token logit after the prompt (answer prefix included); checked against a model whose logits
    favour one letter."""
    from edgetune.data.prompts import encode_answer
    from edgetune.metrics import eval as evalmod

    model, tok = model_tok
    examples = _triage_like(tok)
    favoured = encode_answer(tok, "beta", "Category:")[0]

    def fake_logits(_model, input_ids, attention_mask):
        logits = torch.zeros(input_ids.shape[0], 300)
        logits[:, favoured] = 5.0
        return logits

    monkeypatch.setattr(evalmod, "last_position_logits", fake_logits)
    assert evalmod.choice_accuracy(model, tok, examples, batch_size=3, max_length=MAX_LENGTH) == 0.5


def test_choice_accuracy_falls_back_to_whole_answers_when_first_tokens_collide(model_tok):
    """Candidates sharing their first token are ranked by whole-answer log-likelihood, which equals
    the sum of per-token log-probabilities computed by hand."""
    from edgetune.metrics.eval import choice_accuracy
    from edgetune.models.loss import sequence_logprobs

    model, tok = model_tok
    ex = {"instruction": "Which?", "response": "abc", "choices": "abc\nabd"}
    rows = TokenizedSet(tok, [ex, {**ex, "response": "abd"}], MAX_LENGTH)
    scores = sequence_logprobs(model, rows.batch([0, 1]))
    expected = float(scores[0] >= scores[1])
    assert choice_accuracy(model, tok, [ex], batch_size=2, max_length=MAX_LENGTH) == expected


def test_choices_must_contain_the_response(model_tok):
    """A row whose response is not among its choices is a clear error, not a silent miss."""
    from edgetune.metrics.eval import choice_accuracy

    model, tok = model_tok
    with pytest.raises(ValueError, match="include its response"):
        choice_accuracy(
            model, tok, [{"instruction": "q", "response": "x", "choices": "a\nb"}], batch_size=1, max_length=64
        )


def test_graded_scores_count_procedure_numbers_and_action_overlap():
    """Procedure accuracy compares the PR-number; action F1 is token F1 after the colon."""
    from edgetune.metrics.eval import graded_scores

    gold = [
        {"response": "Procedure PR-311: replace the seal and torque the bolts."},
        {"response": "Procedure PR-120: reset the relay and check the door switch."},
    ]
    answers = ["Procedure PR-311: replace the seal.", "Procedure PR-999: reset the relay and check the door switch."]
    scores = graded_scores(answers, gold)
    assert scores["exact_match"] == 0.0 and scores["procedure_accuracy"] == 0.5
    f1_first = 2 * (3 / 3) * (3 / 7) / (3 / 3 + 3 / 7)
    assert scores["action_f1"] == pytest.approx((f1_first + 1.0) / 2)


def test_answer_prefix_is_prompt_not_answer(model_tok):
    """With an answer prefix, the prefix tokens end the prompt (no loss) and the labels cover what
    follows it plus the end-of-turn token."""
    from edgetune.data.prompts import encode_answer, end_token_id

    _, tok = model_tok
    ids, labels = encode_example(tok, {"instruction": "q", "response": "beta", "answer_prefix": "Category:"}, 512)
    answer = encode_answer(tok, "beta", "Category:") + [end_token_id(tok)]
    assert [t for t in labels if t != IGNORE_INDEX] == answer
    assert ids[: len(ids) - len(answer)] == encode_prompt(tok, "q", None, "Category:")
