"""The label-head trainable (model.trainable = "label-head", models/labelhead.py) and its feature cache
(models/headcache.py).

The head must move exactly the label tokens' scores and nothing else (not the tied input embeddings),
the cached-feature loss must be the full forward's choice loss, the cache must not depend on batching,
bad labels and data must be refused with a message naming what is wrong, and zeroth-order steps on
the cache must lower the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune import config as cfgmod
from edgetune.algorithms.spsa.local import local_steps
from edgetune.comm.codecs import codec_for
from edgetune.config import ModelSection
from edgetune.data.prompts import TokenizedSet
from edgetune.models import headcache
from edgetune.models.headcache import HeadRunner, compute_features
from edgetune.models.labelhead import LabelHead, label_head_of, label_token_ids
from edgetune.models.load import load_model
from edgetune.models.loss import choice_loss
from edgetune.models.params import manifest_of, trainable_tensors

DATA = Path(__file__).parents[1] / "algorithms" / "data" / "choices.jsonl"
LABELS = "alpha,bravo,charlie,delta,echo"


def _examples():
    return [json.loads(line) for line in DATA.read_text().splitlines()]


def _model(labels=LABELS, trainable="label-head"):
    return load_model(ModelSection(path="tiny", trainable=trainable, head_labels=labels), seed=0)


def test_label_head_moves_only_the_label_columns_and_never_the_tied_embeddings():
    """Zero delta: the logits are bitwise the plain model's. A delta moves exactly the label tokens'
    columns by D h, and the only trainable tensor is the delta."""
    plain, tok = _model(trainable="all")
    model, _ = _model()
    head = label_head_of(model)
    assert isinstance(head, LabelHead)
    assert manifest_of(model).names == ("lm_head.label_delta",)
    assert manifest_of(model).numel == 5 * head.weight.shape[1]
    x = tok("Report: oil leak. Categories", return_tensors="pt")
    emb_before = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        ref = plain(**x).logits
        assert torch.equal(model(**x).logits, ref)
        gen = torch.Generator().manual_seed(0)
        head.delta.copy_(torch.randn(head.delta.shape, generator=gen))
        out = model(**x).logits
        hidden = model.get_decoder()(**x).last_hidden_state
    ids = label_token_ids(tok, LABELS.split(","))
    moved = sorted(int(c) for c in (out - ref).abs().amax(dim=(0, 1)).nonzero().flatten())
    assert moved == sorted(ids)
    expected = ref[..., ids] + hidden @ head.delta.T
    assert torch.allclose(out[..., ids], expected, atol=1e-5)
    assert torch.equal(model.get_input_embeddings().weight, emb_before)


def test_labels_that_share_a_first_token_or_are_missing_are_refused():
    with pytest.raises(ValueError, match="same token"):
        _model(labels="alpha,apple,bravo")
    with pytest.raises(ValueError, match="at least two labels"):
        ModelSection(path="tiny", trainable="label-head", head_labels="alpha")
    with pytest.raises(ValueError, match="model.head_labels"):
        cfgmod.from_run_config({"model.path": "tiny", "model.trainable": "label-head", "data.source": "demo"})
    with pytest.raises(ValueError, match="spsa.objective = 'choices'"):
        cfgmod.from_run_config({"model.trainable": "label-head", "data.source": "triage", "spsa.objective": "answer"})


def test_triage_runs_fill_in_the_ten_categories_and_their_prefix():
    from edgetune.data import triage

    flat = {"model.path": "tiny", "model.trainable": "label-head", "data.source": "triage", "spsa.objective": "choices"}
    cfg = cfgmod.from_run_config(flat)
    assert cfg.model.head_label_list == triage.CATEGORIES and cfg.model.head_prefix == triage.ANSWER_PREFIX
    again = cfgmod.from_run_config(cfgmod.flatten(cfg))
    assert again.model == cfg.model


def test_cached_loss_is_the_full_forward_choice_loss_whatever_the_batching():
    """For a random delta, HeadRunner's loss equals choice_loss's full forward, for two batches of the
    same rows in different orders (the features come from fixed chunks, not the step's batch)."""
    model, tok = _model()
    data = TokenizedSet(tok, _examples(), 256)
    head = label_head_of(model)
    runner = HeadRunner.for_model(model, manifest_of(model).names, data, "choices")
    assert runner is not None
    with torch.no_grad():
        head.delta.copy_(torch.randn(head.delta.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        for idx in ([0, 3, 5, 6], [6, 5, 3, 0], list(range(len(data)))):
            batch = data.batch(idx, choices=True)
            full = float(choice_loss(model, batch))
            assert runner.capture(batch) == pytest.approx(full, rel=1e-5, abs=1e-6)
            head.delta.mul_(1.5)  # a probe: the captured rows' loss follows the current delta
            assert runner.loss() == pytest.approx(float(choice_loss(model, batch)), rel=1e-5, abs=1e-6)
            head.delta.div_(1.5)


def test_runner_only_serves_the_label_head_with_the_choices_objective_and_caches_once(monkeypatch):
    model, tok = _model()
    data = TokenizedSet(tok, _examples(), 256)
    names = manifest_of(model).names
    assert HeadRunner.for_model(model, names, data, "answer") is None
    plain, _ = _model(trainable="all")
    assert HeadRunner.for_model(plain, manifest_of(plain).names, data, "choices") is None
    calls = []
    real = headcache.compute_features
    monkeypatch.setattr(headcache, "compute_features", lambda *a: calls.append(1) or real(*a))
    first = HeadRunner.for_model(model, names, data, "choices")
    second = HeadRunner.for_model(model, names, data, "choices")
    assert first is not None and second is not None and first.features is second.features and len(calls) == 1
    other = TokenizedSet(tok, _examples()[:4], 256)
    assert HeadRunner.for_model(model, names, other, "choices").features is not first.features
    assert len(calls) == 2
    with pytest.raises(ValueError, match="not in the label-head feature cache"):
        HeadRunner.for_model(model, names, other, "choices").capture(data.batch([9], choices=True))


def test_a_candidate_outside_the_head_labels_is_refused_naming_the_example():
    model, tok = _model(labels="alpha,bravo,charlie,delta")  # echo is missing
    rows = [{**r, "where": f"choices.jsonl line {i + 1}"} for i, r in enumerate(_examples())]
    data = TokenizedSet(tok, rows, 256)
    with pytest.raises(ValueError, match=r"choices.jsonl line 1: .*not one of model.head_labels"):
        compute_features(model, label_head_of(model), data)


@pytest.mark.parametrize("codec", ["int8-sr", "sign:4"])
def test_zeroth_order_steps_on_the_cache_lower_the_choice_loss(codec):
    """80 forward-difference steps of 8 probes on the cached features lower the full-forward loss, with one
    byte per scalar and with one bit (sign codes, a magnitude byte per 4 steps: 1.25 bits per scalar)."""
    model, tok = _model()
    data = TokenizedSet(tok, _examples(), 256)
    manifest = manifest_of(model)
    work = trainable_tensors(model, manifest)
    batch = data.batch(list(range(len(data))), choices=True)
    with torch.no_grad():
        before = float(choice_loss(model, batch))
    k, p = 80, 8
    keys = [[bytes([s, q]) * 16 for q in range(p)] for s in range(k)]
    runner = HeadRunner.for_model(model, manifest.names, data, "choices")
    with torch.no_grad():
        codes, raw, _ = local_steps(
            model, work, [batch] * k, keys, np.full(k * p, 0.5), eps=2**-10, lr=0.05, scale=64.0,
            codec=codec, difference="forward", runner=runner,
        )  # fmt: skip
        after = float(choice_loss(model, batch))
    assert len(codes) == codec_for(codec).blob_len(k, p) == (k * p if codec == "int8-sr" else 20 + 80)
    assert np.isfinite(raw).all()
    assert after < before - 0.04, (before, after)


@pytest.mark.parametrize("tied", [False, True])
def test_a_label_head_checkpoint_loads_with_from_pretrained_and_scores_like_the_trained_model(tmp_path, tied):
    """RunRecorder.checkpoint saves a plain untied head (W + D on the label rows): transformers loads it
    without edgetune and gives the trained model's logits, with the input embeddings untouched (also when
    the model ties them to the head, as SmolLM2 does); the live model keeps its label head and its config."""
    from transformers import AutoModelForCausalLM

    from edgetune.runs import RunRecorder

    model, tok = _model()
    head = label_head_of(model)
    if tied:
        head.head.weight = model.get_input_embeddings().weight
        model.config.tie_word_embeddings = True
    with torch.no_grad():
        head.delta.copy_(torch.randn(head.delta.shape, generator=torch.Generator().manual_seed(2)))
    cfg = cfgmod.from_run_config(
        {
            "model.path": "tiny",
            "model.trainable": "label-head",
            "model.head_labels": LABELS,
            "spsa.objective": "choices",
        }
    )
    run = RunRecorder(cfg, tmp_path / "run")
    folder = run.checkpoint(model, tok, 3, {})
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    x = tok("Report: breaker trips. Categories", return_tensors="pt")
    with torch.no_grad():
        want, got = model(**x).logits, loaded(**x).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert label_head_of(model) is head and model.config.tie_word_embeddings is tied
    assert not loaded.config.tie_word_embeddings


def test_edgetune_eval_rebuilds_a_label_head_checkpoint_and_refuses_changed_weights(tmp_path):
    """A label-head run's checkpoint evaluates as the trained model (state hash verified against the run),
    and a changed plain head or a changed delta file is refused, not evaluated."""
    from safetensors.torch import load_file, save_file

    from edgetune import inproc
    from edgetune.evaluation import evaluate_checkpoint
    from edgetune.models.labelhead import LABEL_HEAD_FILE

    flat = {
        "model.path": "tiny", "model.trainable": "label-head", "model.head_labels": LABELS,
        "data.source": "file", "data.path": str(DATA), "data.partition": "iid", "data.batch_size": 4,
        "eval.num_examples": 4, "eval.batch_size": 4, "crypto.deterministic_secrets": True, "run.min_sites": 1,
        "spsa.objective": "choices", "spsa.difference": "forward", "spsa.num_steps": 4, "spsa.num_probes": 4,
        "spsa.lr": 0.05, "num_rounds": 2,
    }  # fmt: skip
    run_dir = tmp_path / "head-run"
    summary = inproc.run(cfgmod.from_run_config(flat), 2, run_dir=run_dir)
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / LABEL_HEAD_FILE).is_file()
    result = evaluate_checkpoint(ckpt)
    assert result["state_hash"] == "verified" and result["round"] == 2
    assert result["heldout_loss"] == pytest.approx(summary["heldout_loss_last"], rel=1e-5)
    weights = next(ckpt.glob("model*.safetensors"))
    tensors = load_file(str(weights))
    original = {k: v.clone() for k, v in tensors.items()}
    tensors["lm_head.weight"][0, 0] += 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not the base model's plus its label_head delta"):
        evaluate_checkpoint(ckpt)
    save_file(original, str(weights), metadata={"format": "pt"})
    head = load_file(str(ckpt / LABEL_HEAD_FILE))
    head["label_delta"][0, 0] += 1.0
    save_file(head, str(ckpt / LABEL_HEAD_FILE))
    with pytest.raises(ValueError, match="changed after the run"):
        evaluate_checkpoint(ckpt)


def test_features_on_disk_serve_another_process_and_a_damaged_or_foreign_file_is_recomputed(tmp_path, monkeypatch):
    """With a cache folder, a second model object (another process of the site) reads the features from disk
    instead of a forward pass; a truncated file is recomputed; other frozen weights get their own file."""
    model, tok = _model()
    data = TokenizedSet(tok, _examples(), 256)
    names = manifest_of(model).names
    calls = []
    real = headcache.compute_features
    monkeypatch.setattr(headcache, "compute_features", lambda *a: calls.append(1) or real(*a))
    first = HeadRunner.for_model(model, names, data, "choices", tmp_path).features
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(calls) == 1 and len(files) == 1
    other, _ = _model()  # a fresh model object: what another actor process holds
    again = HeadRunner.for_model(other, names, data, "choices", tmp_path).features
    assert len(calls) == 1 and torch.equal(again.hidden, first.hidden) and torch.equal(again.base, first.base)
    assert again.index == first.index and torch.equal(again.rows, first.rows)
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    third, _ = _model()
    assert torch.equal(HeadRunner.for_model(third, names, data, "choices", tmp_path).features.hidden, first.hidden)
    assert len(calls) == 2 and len(sorted(tmp_path.glob("*.safetensors"))) == 1
    changed, _ = _model()
    with torch.no_grad():
        changed.get_input_embeddings().weight.mul_(1.01)  # another base model: another file, not the old features
    feats = HeadRunner.for_model(changed, names, data, "choices", tmp_path).features
    assert len(calls) == 3 and len(sorted(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.equal(feats.hidden, first.hidden)


def test_features_on_disk_are_not_shared_between_label_sets(tmp_path):
    """Two label-head configurations over the same model and data (other model.head_labels order) map the
    candidates to other delta rows: each gets its own file, and its rows point at its own labels."""
    data_model, tok = _model()
    data = TokenizedSet(tok, _examples(), 256)
    names = manifest_of(data_model).names
    first = HeadRunner.for_model(data_model, names, data, "choices", tmp_path).features
    reordered, _ = _model(labels="echo,delta,charlie,bravo,alpha")
    second = HeadRunner.for_model(reordered, names, data, "choices", tmp_path).features
    assert len(sorted(tmp_path.glob("*.safetensors"))) == 2
    assert torch.equal(second.rows, 4 - first.rows) and torch.equal(second.hidden, first.hidden)
