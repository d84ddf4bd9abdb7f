"""Tests for the in-memory tiny Llama and byte-level tokenizer (edgetune/models/tiny.py)."""

from __future__ import annotations

import numpy as np
import torch

from edgetune.models.tiny import INIT_SCALE, tiny_llama, tiny_model_and_tokenizer, tiny_tokenizer


def _norm_names(model) -> set[str]:
    return {name for name in model.state_dict() if "norm" in name}


def test_same_seed_gives_bitwise_identical_weights():
    """Keyed initialisation: two builds with one seed have equal state dicts, bit for bit."""
    # Execute
    a, _ = tiny_model_and_tokenizer(seed=3)
    b, _ = tiny_model_and_tokenizer(seed=3)
    # Assert
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype
        assert torch.equal(sa[name].view(torch.uint8), sb[name].view(torch.uint8)), name


def test_different_seed_changes_every_random_tensor():
    """Another seed changes every non-norm weight; norm weights stay 1."""
    # Execute
    a = tiny_llama(seed=0)
    b = tiny_llama(seed=1)
    # Assert
    sa, sb = a.state_dict(), b.state_dict()
    for name, _ in a.named_parameters():
        if name in _norm_names(a):
            assert torch.equal(sa[name], torch.ones_like(sa[name])), name
        else:
            assert not torch.equal(sa[name], sb[name]), name


def test_construction_leaves_global_rng_untouched():
    """No draw from torch's (or numpy's) global generator while building the model."""
    # Prepare
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    # Execute
    tiny_model_and_tokenizer(seed=0)
    # Assert
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_model_shape_range_mode_and_rope_buffers():
    """fp32, eval mode, 2 layers of width 64, weights in (-scale, scale), RoPE buffers computed."""
    # Execute
    model, tok = tiny_model_and_tokenizer()
    # Assert
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        2,
        64,
        4,
        2,
    )
    assert cfg.intermediate_size == 128 and cfg.vocab_size == len(tok) == 259
    assert not model.training
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.device.type == "cpu"
        if name not in _norm_names(model):
            assert p.abs().max() < INIT_SCALE and p.std() > INIT_SCALE / 4, name
    head_dim = 64 // 4
    expected = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    assert torch.allclose(model.model.rotary_emb.inv_freq, expected)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 259) and torch.isfinite(logits).all()


def test_tokenizer_round_trips_bytes_and_has_chatml_specials():
    """One token per UTF-8 byte (id = byte value); ChatML specials at 256..258; eos = <|im_end|>."""
    # Prepare
    tok = tiny_tokenizer()
    text = "Alarm E-4217 — Düsseldorf 日本 \t\n end"
    # Execute
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Assert
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<pad>"]) == [256, 257, 258]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<pad>")
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [257]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_load_model_marks_only_the_configured_parameters_trainable():
    """model.trainable decides the manifest: attention projections only, or everything."""
    from edgetune.config import ModelSection
    from edgetune.models.load import load_model
    from edgetune.models.params import manifest_of

    attn, _ = load_model(ModelSection(path="tiny", trainable="q_proj,v_proj"))
    names = manifest_of(attn).names
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)
    full, _ = load_model(ModelSection(path="tiny", trainable="all"))
    assert len(manifest_of(full)) == len(list(full.parameters()))
