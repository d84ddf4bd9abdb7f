"""The classification objective (spsa.objective = "choices", models/loss.py: choice_loss).

It must score exactly what label accuracy ranks (the candidates' first answer tokens at the last
prompt position), run bitwise the same through the suffix runner, refuse data it cannot score
with a message naming the example, and make zeroth-order steps lower it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune import config as cfgmod
from edgetune.algorithms.spsa.client import check_plan
from edgetune.algorithms.spsa.local import batch_loss, local_steps
from edgetune.algorithms.spsa.pool import OptimizerSpec
from edgetune.comm.wire import WireError
from edgetune.config import ModelSection
from edgetune.data.choices import choices_of
from edgetune.data.prompts import TokenizedSet
from edgetune.metrics.eval import choice_accuracy, evaluate
from edgetune.models.load import load_model
from edgetune.models.loss import answer_loss, choice_loss, objective_loss
from edgetune.models.params import manifest_of, trainable_tensors
from edgetune.models.suffix import SuffixRunner

DATA = Path(__file__).parents[1] / "algorithms" / "data" / "choices.jsonl"


def _examples():
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    # a row with two candidates: the batch pads each row's candidate list to the longest
    other = "echo" if rows[2]["response"] != "echo" else "alpha"
    rows[2] = {**rows[2], "choices": f"{other}\n{rows[2]['response']}"}
    return rows


def _model(trainable="all", layers=""):
    section = ModelSection(path="tiny", trainable=trainable, target_modules="q_proj,v_proj", lora_layers=layers)
    return load_model(section, seed=0)


def test_choice_loss_is_the_cross_entropy_over_candidate_first_tokens_by_hand():
    """Per row: -log softmax over the candidates' first-token logits at the last prompt position,
    read from the model's own full logits; padded candidates take no probability."""
    model, tok = _model()
    examples = _examples()
    data = TokenizedSet(tok, examples, 256)
    idx = [0, 1, 2, 3, 7]
    batch = data.batch(idx, choices=True)
    assert batch["choice_ids"].shape == (5, 5) and int((batch["choice_ids"][2] >= 0).sum()) == 2
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        got = float(choice_loss(model, batch))
    by_hand = []
    for row, i in enumerate(idx):
        ex = examples[i]
        cands = choices_of(ex)
        prompt_len = next(j for j, t in enumerate(data.labels[i]) if t != -100)
        firsts = [tok(c, add_special_tokens=False)["input_ids"][0] for c in cands]
        scores = logits[row, prompt_len - 1, firsts]
        by_hand.append(-float(torch.log_softmax(scores, 0)[cands.index(ex["response"])]))
    assert got == pytest.approx(float(np.mean(by_hand)), abs=1e-5)
    assert got != pytest.approx(float(answer_loss(model, batch).detach()), abs=1e-3)  # a different objective
    assert objective_loss(model, batch) == choice_loss(model, batch)
    plain = data.batch(idx)
    assert "choice_ids" not in plain and objective_loss(model, plain) == answer_loss(model, plain)


def test_the_objectives_argmax_is_the_prediction_label_accuracy_counts():
    """For every example (and for a perturbed model too), the candidate the training objective
    scores highest is right exactly when choice_accuracy counts that example as right."""
    model, tok = _model()
    examples = _examples()
    data = TokenizedSet(tok, examples, 256)
    for shift in (0.0, 0.05):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(shift * torch.linspace(-1, 1, p.numel()).view_as(p))
        batch = data.batch(list(range(len(examples))), choices=True)
        with torch.no_grad():
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = torch.arange(len(examples))
        scores = logits[rows, batch["choice_pos"]].gather(1, batch["choice_ids"].clamp(min=0))
        scores = scores.masked_fill(batch["choice_ids"] < 0, float("-inf"))
        right = (scores.argmax(1) == batch["choice_target"]).tolist()
        counted = [choice_accuracy(model, tok, [ex], batch_size=1, max_length=256) == 1.0 for ex in examples]
        assert right == counted
        assert 0 < sum(right) < len(right)  # both outcomes occur, so the comparison says something


def test_suffix_runner_scores_choices_bitwise_like_the_full_forward():
    """With candidate batches the runner's captured and perturbed losses are the full forward's."""
    model, tok = _model(trainable="lora-b", layers="1-1")
    batch = TokenizedSet(tok, _examples(), 256).batch([0, 4, 9, 13], choices=True)
    runner = SuffixRunner.for_model(model, manifest_of(model).names)
    assert runner is not None
    base = runner.capture(batch)
    assert base == batch_loss(model, batch) == float(choice_loss(model, batch))
    with torch.no_grad():
        for i, w in enumerate(trainable_tensors(model, manifest_of(model))):
            w.add_(torch.linspace(-0.3, 0.2 + i, w.numel()).view_as(w))
    perturbed = runner.loss()
    assert perturbed == batch_loss(model, batch) and perturbed != base


def test_forward_difference_steps_lower_the_choice_loss():
    """Zeroth-order steps on the objective (forward differences, 16 probes per step, all weights of
    the tiny model) lower the choice loss of the batch they train on: reports of two of the five
    categories, a signal a random tiny model can pick up in a dozen steps."""
    model, tok = _model()
    data = TokenizedSet(tok, _examples(), 256)
    batch = data.batch([i for i in range(30) if i % 5 < 2], choices=True)
    work = trainable_tensors(model, manifest_of(model))
    before = batch_loss(model, batch)
    k, p = 12, 16
    keys = [[bytes([s, q]) * 16 for q in range(p)] for s in range(k)]
    with torch.no_grad():
        local_steps(
            model, work, [batch] * (k + 1), [*keys, keys[0]], np.full((k + 1) * p, 0.5),
            eps=2.0**-10, lr=5e-3, scale=64.0, codec="int8-sr", difference="forward",
        )  # fmt: skip
    after = batch_loss(model, batch)
    assert after < 0.7 * before, (before, after)


def test_examples_the_objective_cannot_score_are_refused_by_name():
    """No choices, candidates sharing their first token, chat rows: ValueError naming the example."""
    _, tok = _model()
    good = _examples()[0]
    missing = {"instruction": "q", "response": "alpha", "where": "plant.jsonl:7"}
    with pytest.raises(ValueError, match=r"plant\.jsonl:7.*no choices"):
        TokenizedSet(tok, [good, missing], 256).batch([0, 1], choices=True)
    clash = {**good, "choices": "alpha\nalarm\nbravo", "response": "alpha", "where": "plant.jsonl:9"}
    with pytest.raises(ValueError, match=r"plant\.jsonl:9.*'alpha', 'alarm'.*first token"):
        TokenizedSet(tok, [clash], 256).choice_row(0)
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "alpha"}]}
    with pytest.raises(ValueError, match="instruction/response rows"):
        TokenizedSet(tok, [{**chat, "choices": "alpha\nbravo"}], 256).choice_row(0)
    # answer-only batches of the same rows still work: only the choices objective needs candidates
    assert TokenizedSet(tok, [good, missing], 256).batch([0, 1])["labels"].shape[0] == 2


def test_config_and_plan_refuse_an_unknown_objective():
    with pytest.raises(ValueError, match="spsa.objective must be answer or choices"):
        cfgmod.SpsaSection(objective="tokens")
    plan = {
        "K": 1, "P": 1, "lr": 0.1, "eps": 2.0**-10, "scale": 1.0, "codec": "int8-sr", "dirs": "per-site",
        "pool": 0, "scope": "round", "norm": "mean", "diff": "forward", "obj": "choices",
        "opt": OptimizerSpec().to_text(), "pkey": b"", "sparse": 0.0, "agg": "mean", "trim": 0.0,
        "hash": b"h", "logd": b"", "secrets": b"", "first": 1, "seed": 0, "snapd": b"", "snapr": 0,
    }  # fmt: skip
    check_plan(plan)
    with pytest.raises(WireError, match="objective"):
        check_plan({**plan, "obj": "tokens"})


def test_heldout_choice_loss_is_the_training_objective_on_the_same_rows():
    """evaluate() reports, next to label accuracy, the mean choice cross-entropy: the number the
    choices objective trains, scored from left-padded prompts instead of training batches."""
    model, tok = _model()
    examples = _examples()[:12]
    metrics = evaluate(model, tok, examples, batch_size=4, max_length=256, max_new_tokens=4, accuracy=True)
    batch = TokenizedSet(tok, examples, 256).batch(list(range(12)), choices=True)
    assert metrics["choice_loss"] == pytest.approx(batch_loss(model, batch), abs=1e-4)
    assert set(metrics) == {"heldout_loss", "accuracy", "choice_loss"}
