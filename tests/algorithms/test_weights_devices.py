"""Several devices at one kavg/lowrank/dppf/deft site: data parallel in one process, each step's
micro-batches spread over replicas and their gradients added in micro-batch order, so G devices give
bitwise the steps of one device with as many micro-batches (two CPU "devices" stand in for GPUs)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_flat
from test_local_training import _batches, _lora

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import training
from edgetune.federation import run_round

CPU2 = [torch.device("cpu"), torch.device("cpu")]
CPU3 = [torch.device("cpu")] * 3


def _train(model, batches, replicas=(), optimizer="sgd", **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    losses = training.local_train(model, params, batches, lr=0.5, optimizer=optimizer, replicas=replicas, **kw)
    return losses, [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    ("devices", "accum", "optimizer"),
    [
        (CPU2, 1, "sgd"),  # two devices: two micro-batches per step
        (CPU2, 3, "adamw"),  # more micro-batches than devices: waves of two
        (CPU3, 4, "sgd"),  # three devices, four micro-batches: an uneven last wave
    ],
)
def test_devices_give_bitwise_the_steps_of_one_device_with_as_many_micro_batches(devices, accum, optimizer):
    one, tok = _lora()
    many, _ = _lora()
    batches = _batches(tok, 3, 7)
    parts = max(accum, len(devices))
    losses_one, after_one = _train(one, batches, grad_accum_steps=parts, optimizer=optimizer)
    replicas = training.device_replicas(many, devices)
    assert len(replicas) == len(devices) - 1
    losses_many, after_many = _train(many, batches, replicas, grad_accum_steps=accum, optimizer=optimizer)
    assert losses_many == losses_one
    for a, b in zip(after_one, after_many, strict=True):
        assert torch.equal(a, b)
    # and the steps did move the weights (a run that trains nothing would also be "equal")
    fresh, _ = _lora()
    start = [p for p in fresh.parameters() if p.requires_grad]
    assert any(not torch.equal(a, s) for a, s in zip(after_one, start))


def test_replicas_take_the_models_weights_at_every_call():
    """A replica left with other weights (an earlier round, a reused cache entry) is reset from the
    model before it computes anything: the result is still bitwise one device's."""
    one, tok = _lora()
    many, _ = _lora()
    batches = _batches(tok, 2, 6)
    replicas = training.device_replicas(many, CPU2)
    with torch.no_grad():
        for p in replicas[0].parameters():
            p.add_(0.25)
    _, after_one = _train(one, batches, grad_accum_steps=2)
    _, after_many = _train(many, batches, replicas)
    for a, b in zip(after_one, after_many, strict=True):
        assert torch.equal(a, b)
    assert training.device_replicas(many, CPU2)[0] is replicas[0]  # made once per model and process


def test_replicas_follow_the_frozen_set_of_each_call():
    """Training a subset (as lowrank's full-rank phase and kavg's selectors do) on several devices:
    only the subset moves, on the model, and the replica's gradients never leak into others."""
    one, tok = _lora()
    many, _ = _lora()
    batches = _batches(tok, 2, 6)
    pick = lambda m: [p for n, p in m.named_parameters() if "lora_B" in n]  # noqa: E731
    before = {n: p.detach().clone() for n, p in many.named_parameters()}
    replicas = training.device_replicas(many, CPU2)
    training.local_train(one, pick(one), batches, lr=0.5, optimizer="sgd", grad_accum_steps=2)
    training.local_train(many, pick(many), batches, lr=0.5, optimizer="sgd", replicas=replicas)
    for (name, a), (_, b) in zip(one.named_parameters(), many.named_parameters(), strict=True):
        assert torch.equal(a, b), name
        if "lora_B" not in name:
            assert torch.equal(b, before[name]), name
    assert all(p.grad is None for p in many.parameters())
    assert all(p.grad is None for p in replicas[0].parameters())


def test_a_model_on_another_kind_of_device_is_refused():
    model, _ = _lora()
    with pytest.raises(ValueError, match="not on the first device"):
        training.device_replicas(model, [torch.device("meta"), torch.device("cpu")])


def _hash_after(tmp_path, name, flat, rounds=2):
    cfg = cfgmod.from_run_config(flat)
    server, transport, recorder, *_ = inproc.build(cfg, 2, run_dir=tmp_path / name)
    for r in range(1, rounds + 1):
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, r)
        assert not rejected and metrics["num_accepted"] == 2
    return server.state_hash()


FULL_RANK = {  # lowrank's AB rounds with a full-rank phase: the dense base weights train (round 1)
    "lowrank.mode": "ab-groups",
    "lowrank.refactor_every": 2,
    "lowrank.full_rank_steps": 2,
    "lowrank.full_rank_lr": 1e-3,
    "model.target_modules": "q_proj,v_proj",
}


@pytest.mark.parametrize("algorithm", ["kavg", "lowrank", "lowrank-full-rank", "dppf", "deft"])
def test_a_run_with_two_devices_per_site_equals_one_device_with_two_micro_batches(tmp_path, algorithm):
    """Whole runs: every round commits, and the server's state hash after two rounds is the one of a
    run whose sites use one device and two micro-batches per step."""
    base = {"algorithm": algorithm.split("-")[0], "data.batch_size": 6, "run.name": "devices"}
    if algorithm.startswith("lowrank"):
        base["model.trainable"] = "lora"
    if algorithm == "lowrank-full-rank":
        base.update(FULL_RANK)
    one = _hash_after(tmp_path, "one", tiny_flat(**base, **{"kavg.grad_accum_steps": 2}))
    two = _hash_after(tmp_path, "two", tiny_flat(**base, **{"model.device": "cpu,cpu"}))
    whole = _hash_after(tmp_path, "whole", tiny_flat(**base))
    assert two == one
    assert whole != one  # the micro-batch split matters (rounding), so the equality above says something


@pytest.mark.parametrize("devices", [[torch.device("cpu")], CPU2])
def test_gradients_left_by_a_failed_call_do_not_leak_into_the_next(devices):
    """A call that stops mid-step (a non-finite loss raises) leaves gradients on the model and its
    copies; the next call must not add them to its first step: it equals a clean call bitwise."""
    clean, tok = _lora()
    dirty, _ = _lora()
    batches = _batches(tok, 2, 6)
    replicas = training.device_replicas(dirty, devices)
    for m in [dirty, *replicas]:
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, 7.0)
    _, after_clean = _train(clean, batches, training.device_replicas(clean, devices), grad_accum_steps=2)
    _, after_dirty = _train(dirty, batches, replicas, grad_accum_steps=2)
    for a, b in zip(after_clean, after_dirty, strict=True):
        assert torch.equal(a, b)


def test_quantised_base_weights_on_several_devices_are_refused():
    """The copies on further devices are plain deep copies: a 4/8-bit base model is refused at config time
    instead of failing inside a round."""
    flat = tiny_flat(**{"algorithm": "lowrank", "model.trainable": "lora", "model.quantize": "4bit"})
    with pytest.raises(ValueError, match="several devices"):
        cfgmod.from_run_config({**flat, "model.device": "cuda:0,cuda:1"})
