"""The token-bias trainable (model.trainable = "token-bias", models/tokenbias.py) and its pool of cached
exponentials (models/biascache.py).

The bias must move every logit by exactly its value and train nothing else; the cached loss must be the
full forward's answer loss; one product must score every probe as the in-place perturbation would; the
pool must be a keyed function of the data alone, kept on disk for a site's other processes; bad files
and configurations must be refused naming what is wrong; zeroth-order steps on the pool must lower the
loss; and a checkpoint must evaluate as the trained model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune.algorithms.spsa.local import local_steps
from edgetune.config import ModelSection
from edgetune.crypto import keystream
from edgetune.data.demo import demo_site
from edgetune.data.prompts import TokenizedSet
from edgetune.models import biascache
from edgetune.models.biascache import BiasRunner, per_example, picked_positions, pooled_examples
from edgetune.models.load import load_model
from edgetune.models.loss import answer_loss
from edgetune.models.params import manifest_of, trainable_tensors
from edgetune.models.tokenbias import BIAS_FILE, TokenBias, token_bias_of


def _model(trainable="token-bias"):
    return load_model(ModelSection(path="tiny", trainable=trainable), seed=0)


def _data(tok, n=12):
    return TokenizedSet(tok, list(demo_site(0, 4, facts_per_site=n).train)[:n], 128)


def _random_bias(model, seed=1, scale=0.5):
    head = token_bias_of(model)
    with torch.no_grad():
        head.token_bias.copy_(torch.randn(head.token_bias.shape, generator=torch.Generator().manual_seed(seed)) * scale)
    return head


def test_the_bias_moves_every_logit_by_its_value_and_is_the_only_trainable_tensor():
    plain, tok = _model(trainable="all")
    model, _ = _model()
    head = token_bias_of(model)
    assert isinstance(head, TokenBias)
    assert manifest_of(model).names == ("lm_head.token_bias",)
    x = tok("The pump at line 3 overheats", return_tensors="pt")
    emb = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        ref = plain(**x).logits
        assert torch.equal(model(**x).logits, ref)
        _random_bias(model)
        assert torch.allclose(model(**x).logits, ref + head.token_bias, atol=1e-6)
    assert torch.equal(model.get_input_embeddings().weight, emb)


def test_cached_loss_is_the_full_forward_answer_loss_of_the_pooled_tokens():
    """With every token pooled, the runner's loss for a random bias is answer_loss's full forward, for
    batches in any order, and follows an in-place change of the bias."""
    model, tok = _model()
    data = _data(tok)
    runner = BiasRunner.for_model(model, manifest_of(model).names, data, "answer", pool=1 << 20)
    assert runner is not None and runner.examples == list(range(len(data)))
    head = _random_bias(model)
    with torch.no_grad():
        for idx in ([0, 3, 5], [5, 3, 0], list(range(len(data)))):
            batch = data.batch(idx)
            assert runner.capture(batch) == pytest.approx(float(answer_loss(model, batch)), rel=1e-5)
            head.token_bias.mul_(1.5)
            assert runner.loss() == pytest.approx(float(answer_loss(model, batch)), rel=1e-5)
            head.token_bias.div_(1.5)


@pytest.mark.parametrize("difference", ["forward", "central"])
def test_one_product_scores_every_probe_as_the_perturbed_bias_would(difference):
    """probe_losses(...) = [loss at b + eps z_p, loss at b - eps z_p (central) or the base], z_p the
    keystream's direction (masked when sparse), and the bias is left bitwise as it was."""
    model, tok = _model()
    data = _data(tok)
    runner = BiasRunner.for_model(model, manifest_of(model).names, data, "answer", pool=200)
    head = _random_bias(model)
    n = head.token_bias.numel()
    mask = (torch.arange(n) % 3 == 0).float()
    packs = [keystream.directions(bytes([7, p]) * 16, [n]) for p in range(5)]
    eps = 2.0**-6
    before = head.token_bias.detach().clone()
    with torch.no_grad():
        runner.capture(data.batch([1, 2, 4, 8]))
        base, pairs = runner.probe_losses(packs, eps, difference, mask)
        assert torch.equal(head.token_bias, before)
        assert base == pytest.approx(runner.loss(), rel=1e-6)
        for pk, (plus, minus) in zip(packs, pairs, strict=True):
            z = keystream.expand(pk.tensor(0), n) * mask
            head.token_bias.copy_(before + eps * z)
            assert plus == pytest.approx(runner.loss(), rel=1e-6)
            head.token_bias.copy_(before - eps * z)
            assert minus == pytest.approx(runner.loss() if difference == "central" else base, rel=1e-6)
        head.token_bias.copy_(before)


def test_the_pool_is_a_keyed_draw_of_the_data_alone():
    """Pooled examples and positions depend only on counts and indices: fixed, sorted, the right size."""
    assert pooled_examples(10, 0) == pooled_examples(10, 10) == list(range(10))
    picked = pooled_examples(1000, 200)
    assert picked == pooled_examples(1000, 200) and picked == sorted(set(picked)) and len(picked) == 200
    assert picked != list(range(200)) and pooled_examples(1001, 200) != picked
    assert per_example(4096, 200) == 21 and per_example(10, 100) == 1
    pos = picked_positions(3, 50, 7)
    assert pos == picked_positions(3, 50, 7) and len(pos) == 7 and pos == sorted(set(pos)) and max(pos) < 50
    assert picked_positions(4, 50, 7) != pos and picked_positions(3, 5, 7) == list(range(5))


def test_pool_sizes_and_a_batch_outside_the_pool(monkeypatch):
    """bias_examples bounds the examples that pass through the model (and so the step batches), bias_pool
    the tokens; a batch of another example is refused."""
    model, tok = _model()
    data = _data(tok)
    names = manifest_of(model).names
    seen = []
    real = biascache.compute_pool
    monkeypatch.setattr(biascache, "compute_pool", lambda *a: seen.append(a[3:]) or real(*a))
    runner = BiasRunner.for_model(model, names, data, "answer", 20, 4)
    assert runner is not None and len(runner.examples) == 4 and seen == [(20, 4)]
    counts = [b - a for a, b in (runner.pool.spans[i] for i in runner.examples)]
    assert all(c <= 5 for c in counts) and runner.pool.exps.shape == (sum(counts), runner.head.token_bias.numel())
    assert BiasRunner.for_model(model, names, data, "answer", 20, 4).pool is runner.pool and len(seen) == 1
    outside = next(i for i in range(len(data)) if i not in runner.examples)
    with pytest.raises(ValueError, match="not in the token-bias pool"):
        runner.capture(data.batch([runner.examples[0], outside]))
    assert BiasRunner.for_model(model, names, data, "choices", 20) is None
    plain, _ = _model(trainable="all")
    assert BiasRunner.for_model(plain, manifest_of(plain).names, data, "answer", 20) is None


def test_pool_on_disk_serves_another_process_and_a_damaged_or_foreign_file_is_recomputed(tmp_path, monkeypatch):
    model, tok = _model()
    data = _data(tok)
    names = manifest_of(model).names
    calls = []
    real = biascache.compute_pool
    monkeypatch.setattr(biascache, "compute_pool", lambda *a: calls.append(1) or real(*a))
    first = BiasRunner.for_model(model, names, data, "answer", 40, 0, tmp_path).pool
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(calls) == 1 and len(files) == 1
    other, _ = _model()
    again = BiasRunner.for_model(other, names, data, "answer", 40, 0, tmp_path).pool
    assert len(calls) == 1 and torch.equal(again.hidden, first.hidden) and torch.equal(again.exps, first.exps)
    assert torch.equal(again.target, first.target) and again.spans == first.spans
    files[0].write_bytes(files[0].read_bytes()[:100])
    third, _ = _model()
    assert torch.equal(BiasRunner.for_model(third, names, data, "answer", 40, 0, tmp_path).pool.exps, first.exps)
    assert len(calls) == 2
    changed, _ = _model()
    with torch.no_grad():
        changed.get_input_embeddings().weight.mul_(1.01)
    BiasRunner.for_model(changed, names, data, "answer", 40, 0, tmp_path)
    BiasRunner.for_model(_model()[0], names, data, "answer", 41, 0, tmp_path)  # another pool size: its own file
    assert len(calls) == 4 and len(sorted(tmp_path.glob("*.safetensors"))) == 3


def test_a_pool_file_with_flipped_bits_or_another_width_is_computed_again(tmp_path, monkeypatch):
    """A parseable file whose values changed (one bit of a hidden state, well inside the data) fails its
    digest; a file of another model's width fails its shape: both are computed again, never used."""
    from safetensors.torch import load, save

    model, tok = _model()
    data = _data(tok)
    names = manifest_of(model).names
    calls = []
    real = biascache.compute_pool
    monkeypatch.setattr(biascache, "compute_pool", lambda *a: calls.append(1) or real(*a))
    first = BiasRunner.for_model(model, names, data, "answer", 40, 0, tmp_path).pool
    (path,) = tmp_path.glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10  # the file ends with the last tensor's values
    path.write_bytes(bytes(raw))
    again = BiasRunner.for_model(_model()[0], names, data, "answer", 40, 0, tmp_path).pool
    assert len(calls) == 2 and torch.equal(again.hidden, first.hidden)
    t = load(path.read_bytes())
    wide = torch.cat([t["hidden"], t["hidden"][:, :1]], dim=1)  # a width the model does not have
    t.update(hidden=wide, sha256=biascache._content_digest(wide, t["target"], t["example"]))
    path.write_bytes(save(t))
    third = BiasRunner.for_model(_model()[0], names, data, "answer", 40, 0, tmp_path).pool
    assert len(calls) == 3 and torch.equal(third.hidden, first.hidden)


@pytest.mark.parametrize("codec", ["int8-sr", "sign:4"])
def test_zeroth_order_steps_on_the_pool_lower_the_full_forward_loss(codec):
    model, tok = _model()
    data = _data(tok)
    manifest = manifest_of(model)
    work = trainable_tensors(model, manifest)
    runner = BiasRunner.for_model(model, manifest.names, data, "answer", pool=1 << 20)
    batch = data.batch(list(range(len(data))))
    with torch.no_grad():
        before = float(answer_loss(model, batch))
        k, p = 60, 8
        keys = [[bytes([s, q]) * 16 for q in range(p)] for s in range(k)]
        _, raw, _ = local_steps(
            model, work, [batch] * k, keys, np.full(k * p, 0.5), eps=2**-7, lr=0.5, scale=64.0,
            codec=codec, difference="forward", runner=runner,
        )  # fmt: skip
        after = float(answer_loss(model, batch))
    assert np.isfinite(raw).all()
    assert after < before - 0.3, (before, after)


def test_config_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="spsa.objective = 'answer'"):
        cfgmod.from_run_config(tiny_flat(**{"model.trainable": "token-bias", "spsa.objective": "choices"}))
    with pytest.raises(ValueError, match="spsa.bias_pool"):
        cfgmod.from_run_config(tiny_flat(**{"model.trainable": "token-bias", "spsa.bias_pool": 0}))
    with pytest.raises(ValueError, match="spsa.bias_examples"):
        cfgmod.from_run_config(tiny_flat(**{"model.trainable": "token-bias", "spsa.bias_examples": -1}))


def test_edgetune_eval_rebuilds_a_token_bias_checkpoint_and_refuses_bad_files(tmp_path):
    """The checkpoint holds the frozen weights (loadable by transformers as the base model) and the bias;
    edgetune eval gives the run's held-out loss with the state hash verified, and refuses a damaged bias
    file, a changed one (hash), and frozen weights of another model."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from edgetune import inproc
    from edgetune.evaluation import evaluate_checkpoint

    flat = tiny_flat(
        **{
            "model.trainable": "token-bias", "spsa.difference": "forward", "spsa.num_probes": 4,
            "spsa.lr": 0.5, "spsa.eps": 2.0**-7, "spsa.bias_pool": 64, "num_rounds": 2, "run.num_sites": 2,
        }
    )  # fmt: skip
    summary = inproc.run(cfgmod.from_run_config(flat), 2, run_dir=tmp_path / "run")
    ckpt = Path(summary["checkpoint"])
    assert summary["heldout_loss_last"] < summary["heldout_loss_first"]
    plain = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)
    assert not any("token_bias" in k for k in plain.state_dict())
    result = evaluate_checkpoint(ckpt)
    assert result["state_hash"] == "verified"
    assert result["heldout_loss"] == pytest.approx(summary["heldout_loss_last"], rel=1e-5)
    bias = load_file(str(ckpt / BIAS_FILE))
    original = bias["token_bias"].clone()
    bias["token_bias"][3] += 0.5
    save_file(bias, str(ckpt / BIAS_FILE))
    with pytest.raises(ValueError, match="changed after the run"):
        evaluate_checkpoint(ckpt)
    save_file({"token_bias": torch.full_like(original, float("nan"))}, str(ckpt / BIAS_FILE))
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_checkpoint(ckpt)
    save_file({"token_bias": original[:-1].clone()}, str(ckpt / BIAS_FILE))
    with pytest.raises(ValueError, match="one value per vocabulary token"):
        evaluate_checkpoint(ckpt)
    save_file({"token_bias": original}, str(ckpt / BIAS_FILE))
    weights = next(ckpt.glob("model*.safetensors"))
    tensors = load_file(str(weights))
    key = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    tensors[key][0, 0] += 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not the recipe's base model's"):
        evaluate_checkpoint(ckpt)


def test_a_pool_file_in_another_row_order_serves_the_same_losses(tmp_path):
    """Rows on disk are regrouped by example when read (a batch's tokens are slices of the pool), so a file
    written in another order gives every batch the same loss as the computed pool."""
    from safetensors.torch import load_file, save_file

    model, tok = _model()
    data = _data(tok)
    names = manifest_of(model).names
    first = BiasRunner.for_model(model, names, data, "answer", 40, 0, tmp_path)
    path = next(tmp_path.glob("*.safetensors"))
    t = load_file(str(path))
    perm = torch.randperm(t["target"].numel(), generator=torch.Generator().manual_seed(3))
    rows = {k: t[k][perm].contiguous() for k in ("hidden", "target", "example")}
    save_file({**rows, "sha256": biascache._content_digest(*rows.values())}, str(path))
    other, _ = _model()
    again = BiasRunner.for_model(other, names, data, "answer", 40, 0, tmp_path)
    assert again.pool is not first.pool and again.pool.spans == first.pool.spans
    _random_bias(model)
    _random_bias(other)
    with torch.no_grad():
        for idx in ([0, 1, 2], [7, 3, 3, 11]):
            batch = data.batch(idx)
            assert again.capture(batch) == pytest.approx(first.capture(batch), rel=1e-6)
