"""LoRA sites as FlowerTune users run them: gradient accumulation, autocast, QLoRA (training.local_train)."""

from __future__ import annotations

import math

import pytest
import torch
from hf_fixtures import save_tiny_model

from edgetune import config as cfgmod
from edgetune.algorithms.training import local_train, micro_batches
from edgetune.data.demo import demo_sites
from edgetune.data.prompts import TokenizedSet
from edgetune.models.load import load_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _lora(device: str = "cpu", **kw):
    cfg = cfgmod.ModelSection(path="tiny", device=device, trainable="lora", target_modules="q_proj,v_proj", **kw)
    model, tok = load_model(cfg, seed=0)
    with torch.no_grad():  # B = 0 at init gives A no gradient; give both factors some
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
    return model, tok


def _batches(tok, num: int, size: int):
    examples = demo_sites(1, facts_per_site=6)[0].train
    data = TokenizedSet(tok, examples, 64)
    # rows of different lengths, so micro-batches carry different numbers of answer tokens
    return [data.batch([(k * size + i) % len(data) for i in range(size)]) for k in range(num)]


def _train(model, batches, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    losses = local_train(model, params, batches, lr=0.5, optimizer="sgd", **kw)
    return losses, [p.detach().clone() for p in params]


def test_micro_batches_split_rows_and_trim_padding():
    """A batch splits into near-equal row chunks, each cut to its own longest row; 1 returns it whole."""
    _, tok = _lora()
    (batch,) = _batches(tok, 1, 7)
    parts = micro_batches(batch, 3)
    assert [p["input_ids"].shape[0] for p in parts] == [3, 2, 2]
    for p in parts:
        assert int(p["attention_mask"][:, -1].sum()) >= 1  # no all-padding column left at the end
    assert micro_batches(batch, 1) == [batch]


def test_gradient_accumulation_gives_the_same_steps_as_the_whole_batch():
    """K steps with each batch in 3 token-weighted micro-batches equal the K full-batch steps (float
    rounding only) and report the same losses."""
    model_a, tok = _lora()
    model_b, _ = _lora()
    start = [p.detach().clone() for p in model_a.parameters() if p.requires_grad]
    batches = _batches(tok, 3, 7)
    losses_a, params_a = _train(model_a, batches)
    losses_b, params_b = _train(model_b, batches, grad_accum_steps=3)
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert max(float((a - s).abs().max()) for a, s in zip(params_a, start)) > 1e-3  # the steps did something
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains_close_to_fp32_and_fp16_needs_cuda():
    """bf16 autocast (available on CPU too) takes nearly the fp32 step; fp16 autocast is refused off CUDA."""
    model_a, tok = _lora()
    model_b, _ = _lora()
    start = [p.detach().clone() for p in model_a.parameters() if p.requires_grad]
    batches = _batches(tok, 2, 4)
    _, fp32 = _train(model_a, batches)
    _, bf16 = _train(model_b, batches, autocast="bf16")
    d32 = torch.cat([(a - s).flatten() for a, s in zip(fp32, start)])
    d16 = torch.cat([(b - s).flatten() for b, s in zip(bf16, start)])
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.98
    assert {p.dtype for p in model_b.parameters()} == {torch.float32}  # autocast leaves weights alone
    with pytest.raises(ValueError, match="'fp16' needs CUDA"):
        _train(model_b, batches, autocast="fp16")


@needs_cuda
@pytest.mark.gpu
def test_fp16_autocast_with_scaler_on_cuda():
    """fp16 autocast on a GPU takes finite steps with the gradient scaler."""
    model, tok = _lora(device="cuda")
    losses, params = _train(model, _batches(tok, 2, 4), autocast="fp16")
    assert all(torch.isfinite(p).all() for p in params) and all(math.isfinite(x) for x in losses)


@needs_cuda
@pytest.mark.gpu
def test_qlora_4bit_site_trains_fp32_factors_over_a_4bit_base(tmp_path):
    """model.quantize = 4bit loads NF4 base weights (bitsandbytes) and trains fp32 LoRA factors."""
    pytest.importorskip("bitsandbytes")
    folder = save_tiny_model(tmp_path / "m")
    cfg = cfgmod.ModelSection(path=str(folder), device="cuda", trainable="lora", quantize="4bit", dtype="bfloat16")
    model, tok = load_model(cfg)
    assert any("4bit" in type(m).__name__ for m in model.modules())
    losses, params = _train(model, _batches(tok, 2, 4), autocast="bf16")
    assert {p.dtype for p in params} == {torch.float32} and all(math.isfinite(x) for x in losses)
