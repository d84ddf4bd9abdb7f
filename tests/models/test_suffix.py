"""SuffixRunner (edgetune/models/suffix.py): probes rerun only the perturbed blocks, bitwise."""

from __future__ import annotations

import numpy as np
import torch

from edgetune.algorithms.spsa.local import batch_loss, local_steps
from edgetune.config import ModelSection
from edgetune.data.demo import demo_sites
from edgetune.data.prompts import TokenizedSet
from edgetune.models.load import load_model
from edgetune.models.params import manifest_of, trainable_tensors
from edgetune.models.suffix import SuffixRunner, first_layer


def _setup(trainable="lora-b", layers="1-1"):
    model, tok = load_model(
        ModelSection(path="tiny", trainable=trainable, target_modules="q_proj,v_proj", lora_layers=layers), seed=0
    )
    batch = TokenizedSet(tok, demo_sites(1, facts_per_site=2)[0].train, 256).batch([0, 1, 2, 3])
    return model, batch


def test_first_layer_reads_block_indices_and_refuses_non_block_tensors():
    """The lowest block index among names; None when any tensor is outside the blocks."""
    assert first_layer(["model.layers.3.self_attn.q_proj.weight", "model.layers.7.mlp.up.weight"]) == 3
    assert first_layer(["model.layers.3.x", "model.embed_tokens.weight"]) is None
    assert first_layer([]) is None


def test_runner_exists_only_when_it_saves_work():
    """LoRA-B on block 1 of 2 gets a runner starting at block 1; all blocks or the embeddings get none."""
    model, _ = _setup(layers="1-1")
    runner = SuffixRunner.for_model(model, manifest_of(model).names)
    assert runner is not None and runner.first == 1
    all_blocks, _ = _setup(layers="")
    assert SuffixRunner.for_model(all_blocks, manifest_of(all_blocks).names) is None
    full, _ = _setup(trainable="all", layers="")
    assert SuffixRunner.for_model(full, manifest_of(full).names) is None


def test_suffix_losses_equal_full_forward_losses_bitwise():
    """Captured (unperturbed) and suffix (perturbed) losses are bitwise the full forward's."""
    model, batch = _setup()
    work = trainable_tensors(model, manifest_of(model))
    runner = SuffixRunner.for_model(model, manifest_of(model).names)
    base = runner.capture(batch)
    assert base == batch_loss(model, batch)
    with torch.no_grad():
        for i, w in enumerate(work):
            w.add_(torch.linspace(-0.3, 0.2 + i, w.numel()).view_as(w))
    perturbed = runner.loss()
    assert perturbed == batch_loss(model, batch) and perturbed != base


def test_local_steps_give_the_same_codes_with_and_without_the_runner():
    """Forward and central differences produce byte-identical codes whether probes rerun the whole
    model or only the perturbed blocks."""
    model, batch = _setup()
    work = trainable_tensors(model, manifest_of(model))
    start = [w.clone() for w in work]
    keys = [[bytes([p + 1]) * 32 for p in range(4)], [bytes([p + 9]) * 32 for p in range(4)]]
    uniforms = np.linspace(0.1, 0.9, 8)
    for diff in ("forward", "central"):
        codes = []
        for runner in (None, SuffixRunner.for_model(model, manifest_of(model).names)):
            with torch.no_grad():
                for w, s in zip(work, start, strict=True):
                    w.copy_(s)
                c, _, _ = local_steps(
                    model,
                    work,
                    [batch, batch],
                    keys,
                    uniforms,
                    eps=2.0**-8,
                    lr=0.5,
                    scale=4.0,
                    codec="int8-sr",
                    difference=diff,
                    runner=runner,
                )
            codes.append(c)
        assert codes[0] == codes[1] and len(codes[0]) == 8
