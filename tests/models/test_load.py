"""Loading any HF causal LM from local files (edgetune/models/folders.py, load.py, fingerprint.py): cache ids, dtypes,
fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_fixtures import put_in_hf_cache, save_tiny_model

from edgetune import config as cfgmod
from edgetune.models import load as loadmod
from edgetune.models.fingerprint import check_fingerprint, folder_fingerprint, model_fingerprint
from edgetune.models.folders import cached_snapshot, model_folder
from edgetune.models.load import load_model
from edgetune.models.params import model_sha256
from edgetune.models.tiny import tiny_model_and_tokenizer


def _model(**kw) -> cfgmod.ModelSection:
    return cfgmod.ModelSection(**{"device": "cpu", "trainable": "all", **kw})


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_model_id_in_the_hf_cache_loads_offline_with_the_saved_weights(tmp_path, hf_cache):
    """``model.path = "org/name"`` resolves refs/main -> snapshots/<commit> in $HF_HUB_CACHE and loads the
    weights that were saved there, bit for bit."""
    # Prepare
    src = save_tiny_model(tmp_path / "src", seed=3)
    snapshot = put_in_hf_cache(hf_cache, "acme/tiny-chat", src)
    expected, _ = tiny_model_and_tokenizer(seed=3)

    # Execute
    model, tok = load_model(_model(path="acme/tiny-chat"))

    # Assert
    assert model_folder(_model(path="acme/tiny-chat")) == snapshot
    assert model_sha256(model) == model_sha256(expected)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_model_id_not_in_the_cache_names_the_id_the_cache_and_the_fix(hf_cache):
    """A model id the cache lacks is refused without any network access, saying where edgetune looked
    and how to get the model there."""
    with pytest.raises(ValueError) as err:
        load_model(_model(path="acme/absent-7b"))
    text = str(err.value)
    assert "'acme/absent-7b'" in text and str(hf_cache) in text
    assert "hf download acme/absent-7b" in text and "never downloads" in text


def test_missing_revision_and_partial_snapshot_are_refused(tmp_path, hf_cache):
    """A revision that was never cached lists the cached refs; a snapshot without weights (an
    interrupted download) is refused, not half-loaded."""
    # Prepare
    src = save_tiny_model(tmp_path / "src")
    put_in_hf_cache(hf_cache, "acme/tiny-chat", src)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(src / "config.json", partial / "config.json")
    put_in_hf_cache(hf_cache, "acme/partial", partial)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"not at revision 'v2' \(cached refs: main\)"):
        cached_snapshot("acme/tiny-chat", "v2")
    with pytest.raises(ValueError, match="has no weights"):
        model_folder(_model(path="acme/partial"))
    with pytest.raises(ValueError, match="does not exist"):
        model_folder(_model(path=str(tmp_path / "nowhere" / "model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        model_folder(_model(path=str(tmp_path / "empty")))


def test_bf16_loads_directly_in_bf16_and_lora_factors_stay_fp32(tmp_path):
    """dtype = bfloat16 gives bf16 base weights straight from the files; LoRA factors on top are fp32
    (peft's adapter autocast), so the trained tensors keep full precision."""
    # Prepare
    folder = save_tiny_model(tmp_path / "m")

    # Execute
    model, _ = load_model(_model(path=str(folder), dtype="bfloat16", trainable="lora", target_modules="q_proj,v_proj"))

    # Assert
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_dtype_auto_follows_the_models_config(tmp_path):
    """dtype = auto loads a bf16-saved model in bf16 and an fp32-saved one in fp32 (transformers' "auto")."""
    bf16 = save_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16)
    fp32 = save_tiny_model(tmp_path / "fp32", dtype=torch.float32)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    m16, _ = load_model(_model(path=str(bf16), dtype="auto"))
    m32, _ = load_model(_model(path=str(fp32), dtype="auto"))
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in m32.parameters()} == {torch.float32}


def test_fingerprint_is_the_same_for_every_copy_and_differs_for_another_model(tmp_path, hf_cache):
    """The same weights give one fingerprint as one file, as shards and in the HF cache; one changed
    weight, another dtype or another architecture change it."""
    # Prepare
    one = save_tiny_model(tmp_path / "one")
    shards = save_tiny_model(tmp_path / "shards", max_shard_size="100KB")
    assert len(list(shards.glob("*.safetensors"))) > 1
    put_in_hf_cache(hf_cache, "acme/tiny-chat", one)
    other_seed = save_tiny_model(tmp_path / "seed1", seed=1)
    bf16 = save_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16)

    # Execute
    prints = {
        "one": folder_fingerprint(one),
        "shards": folder_fingerprint(shards),
        "cache": model_fingerprint(_model(path="acme/tiny-chat")),
        "seed1": folder_fingerprint(other_seed),
        "bf16": folder_fingerprint(bf16),
    }

    # Assert
    assert prints["one"] == prints["shards"] == prints["cache"]
    assert len({prints["one"], prints["seed1"], prints["bf16"]}) == 3
    assert model_fingerprint(_model(path="tiny"), seed=0) != model_fingerprint(_model(path="tiny"), seed=1)


def test_site_with_another_model_is_refused_naming_both_fingerprints(tmp_path):
    """model.sha256 pins the base model: a copy with other weights is refused before anything loads,
    the message naming the site, its path and both fingerprints; the right copy passes."""
    # Prepare
    good = save_tiny_model(tmp_path / "good")
    bad = save_tiny_model(tmp_path / "bad", seed=7)
    pinned = folder_fingerprint(good)

    # Execute / Assert
    check_fingerprint(_model(path=str(good), sha256=pinned), who="site plant-a")
    with pytest.raises(ValueError) as err:
        check_fingerprint(_model(path=str(bad), sha256=pinned), who="site plant-b")
    text = str(err.value)
    assert text.startswith("site plant-b:") and str(bad) in text
    assert pinned[:16] in text and folder_fingerprint(bad)[:16] in text


def test_quantize_is_refused_clearly_where_it_cannot_work(tmp_path, monkeypatch):
    """4/8-bit base weights need LoRA (config), CUDA and bitsandbytes (load): each refusal says what to do."""
    folder = save_tiny_model(tmp_path / "m")
    with pytest.raises(ValueError, match="needs model.trainable = 'lora'"):
        _model(path=str(folder), quantize="4bit")
    lora = _model(path=str(folder), quantize="4bit", trainable="lora")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        load_model(lora)
    monkeypatch.setattr(loadmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'edgetune\[gpu\]'"):
        loadmod._quantization_config(lora, torch.device("cuda"))
    with pytest.raises(ValueError, match="model.quantize must be 'none'"):
        cfgmod.RunConfig(model=lora)  # spsa, the default algorithm


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    """With gradient checkpointing on, the LoRA gradients of one batch equal those without it
    (recomputation changes memory, not math)."""
    from edgetune.data.demo import demo_sites
    from edgetune.data.prompts import TokenizedSet
    from edgetune.models.loss import answer_loss

    folder = save_tiny_model(tmp_path / "m")
    grads = []
    for checkpointing in (False, True):
        model, tok = load_model(_model(path=str(folder), trainable="lora", gradient_checkpointing=checkpointing))
        batch = TokenizedSet(tok, demo_sites(1, facts_per_site=2)[0].train[:4], 64).batch([0, 1, 2, 3])
        model.train()
        answer_loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        base = model.get_base_model()
        assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules()) == checkpointing
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
