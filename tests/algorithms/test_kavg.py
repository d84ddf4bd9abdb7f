"""kavg: K=1 equals synchronous SGD, server-set weights, update screening, robust aggregation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms.training import site_batches
from edgetune.algorithms.weights import aggregate_tensors
from edgetune.comm import wire
from edgetune.comm.tensors import decode_tensors, encode_tensors
from edgetune.federation import run_federation, run_round
from edgetune.models.load import load_model
from edgetune.models.params import manifest_of, trainable_tensors


def _cfg(**overrides):
    base = {"algorithm": "kavg", "kavg.lr": 0.05, "kavg.local_steps": 1}
    base.update(overrides)
    return cfgmod.from_run_config(tiny_flat(**base))


def _federation(tmp_path, cfg, num_sites=3, name=""):
    return inproc.build(cfg, num_sites, run_dir=tmp_path / (name or f"run-{tmp_path.name}"))


class ForgedSite:
    def __init__(self, honest, make_reply):
        self.honest, self.make_reply, self.ctx = honest, make_reply, honest.ctx

    def step(self, phase, msg, state):
        return self.make_reply(self.honest, phase, msg, state), state


def test_k1_sgd_equals_one_synchronous_step_on_the_union(tmp_path):
    """K=1 plain SGD then averaging equals one SGD step on the mean of the sites' batch losses."""
    cfg = _cfg(**{"kavg.optimizer": "sgd", "kavg.local_steps": 1, "kavg.lr": 0.1})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 3)
    start = [p.clone() for p in server.params]
    run_round(cfg, server, transport, recorder, 1)

    model, _ = load_model(cfg.model, seed=cfg.run.seed)
    manifest = manifest_of(model)
    with torch.no_grad():
        for w, p in zip(trainable_tensors(model, manifest), start):
            w.copy_(p)
    model.train()
    losses = []
    for client in transport.clients.values():
        (batch,) = site_batches(client.ctx, cfg.run.seed, 1, 1, cfg.data.batch_size)
        losses.append(model(**batch).loss)
    torch.stack(losses).mean().backward()
    with torch.no_grad():
        expected = [w - 0.1 * w.grad for w in (dict(model.named_parameters())[e.name] for e in manifest)]
    for got, want in zip(server.params, expected):
        assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)


def test_weights_come_from_the_server_not_the_reply(tmp_path):
    """A reply cannot carry a weight: extra fields such as num-examples are rejected outright."""
    cfg = _cfg()
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 3)

    def inflate(honest, phase, msg, state):
        reply, _ = honest.step(phase, msg, state)
        return {**reply, "num_examples": 10**9}

    transport.clients["site-2"] = ForgedSite(transport.clients["site-2"], inflate)
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)
    assert metrics["num_accepted"] == 2 and "unexpected fields ['num_examples']" in rejected["site-2"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [("scaled x100", "the median site's"), ("NaN", "non-finite"), ("wrong size", "expected"), ("oversized", "exceeds")],
)
def test_bad_updates_rejected_round_completes(tmp_path, case, reason):
    """A scaled, NaN, wrongly sized or oversized update is rejected with a reason; the others apply."""
    cfg = _cfg(**{"run.min_sites": 2})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 4)
    shapes = [e.shape for e in server.manifest]

    def forge(honest, phase, msg, state):
        reply, _ = honest.step(phase, msg, state)
        deltas = decode_tensors(reply["delta"], shapes, "fp32")
        if case == "scaled x100":
            return {**reply, "delta": encode_tensors([d * 100 for d in deltas], "fp32")}
        if case == "NaN":
            blob = bytearray(reply["delta"])
            blob[0:4] = b"\x00\x00\xc0\x7f"  # float32 NaN
            return {**reply, "delta": bytes(blob)}
        if case == "wrong size":
            return {**reply, "delta": reply["delta"][:-4]}
        return {**reply, "delta": reply["delta"] * 3}

    transport.clients["site-3"] = ForgedSite(transport.clients["site-3"], forge)
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)
    assert metrics["num_accepted"] == 3 and set(rejected) == {"site-3"}
    assert reason in rejected["site-3"]


def test_clip_norm_bounds_every_update(tmp_path):
    """With kavg.clip_norm, the applied update's norm never exceeds the clip."""
    cfg = _cfg(**{"kavg.clip_norm": 1e-3, "kavg.lr": 0.5})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 3)
    start = [p.clone() for p in server.params]
    run_round(cfg, server, transport, recorder, 1)
    moved = math.sqrt(sum(float((p - s).pow(2).sum()) for p, s in zip(server.params, start)))
    assert 0 < moved <= 1e-3 * (1 + 1e-5)


def test_robust_aggregators_stay_within_honest_range():
    """Median and trimmed mean keep every coordinate inside the honest sites' range with one outlier."""
    honest = [[torch.tensor([1.0, -2.0])], [torch.tensor([1.2, -1.8])], [torch.tensor([0.9, -2.1])]]
    evil = [[torch.tensor([1e6, -1e6])]]
    for aggregator, frac in (("median", 0.0), ("trimmed", 0.25)):
        (agg,) = aggregate_tensors(honest + evil, [1.0] * 4, aggregator, frac)
        assert 0.9 <= float(agg[0]) <= 1.2 and -2.1 <= float(agg[1]) <= -1.8
    (mean,) = aggregate_tensors(honest, [1.0, 1.0, 2.0], "mean", 0.0)
    assert torch.allclose(mean, torch.tensor([(1.0 + 1.2 + 1.8) / 4, (-2.0 - 1.8 - 4.2) / 4]))


def test_kavg_lowers_heldout_loss_and_counts_dense_bytes(tmp_path):
    """Three rounds lower the held-out loss; each uplink is the dense fp32 update (4 bytes per trainable
    value, decoding to the manifest's shapes) plus framing, and the ledger counts exactly the encoded reply."""
    cfg = _cfg(**{"num_rounds": 3, "kavg.local_steps": 2})
    server, transport, recorder, evaluate, tok = _federation(tmp_path, cfg, 3)
    sent: dict[str, list[dict]] = {}

    def record(honest, phase, msg, state):
        reply, _ = honest.step(phase, msg, state)
        sent.setdefault(honest.ctx.site_id, []).append(reply)  # one train exchange per round
        return reply

    for site in list(transport.clients):
        transport.clients[site] = ForgedSite(transport.clients[site], record)
    summary = run_federation(cfg, server, transport, recorder, evaluate, tok)
    assert summary["heldout_loss_last"] < summary["heldout_loss_first"] - 0.1
    numel = sum(e.numel for e in server.manifest)
    assert {site: len(replies) for site, replies in sent.items()} == {"site-0": 3, "site-1": 3, "site-2": 3}
    for site, r, reply in ((site, r, reply) for site, replies in sent.items() for r, reply in enumerate(replies, 1)):
        assert set(reply) == {"delta", "loss"} and len(reply["delta"]) == 4 * numel
        deltas = decode_tensors(reply["delta"], [e.shape for e in server.manifest], "fp32", where=site)
        assert all(torch.isfinite(d).all() for d in deltas) and any(d.abs().max() > 0 for d in deltas)
        up = recorder.ledger.per_site(round_idx=r, direction="up")[site]
        assert up == len(wire.encode(reply)) and 4 * numel < up < 4 * numel + 64


# ---- K-AVG Theorem 2: round-indexed lr and batch size ---------------------------------------------


def test_theorem2_schedule_plans_lr_and_batch_by_hand(tmp_path):
    """kavg.lr = 0.1, lr_schedule inverse:0.5 (lr_r = 0.1 / sqrt(r)), batch_schedule grow-linear:3 from
    batch 2 (2, 4, 6, 6), warm-up 1 round (round 1 x 1/2): the plans of rounds 1..4 carry exactly those
    values, and the constant default keeps kavg.lr and data.batch_size."""
    # Prepare
    cfg = _cfg(
        **{
            "num_rounds": 4,
            "kavg.lr": 0.1,
            "kavg.lr_schedule": "inverse:0.5",
            "kavg.batch_schedule": "grow-linear:3",
            "kavg.warmup_rounds": 1,
            "data.batch_size": 2,
        }
    )
    server, *_ = _federation(tmp_path, cfg, 2)
    plain, *_ = _federation(tmp_path, _cfg(**{"kavg.lr": 0.1}), 2, name="plain")

    # Execute
    plans = [
        wire.decode(server.configure(r, "train", ["site-0"])["site-0"]["plan"], max_bytes=4096) for r in (1, 2, 3, 4)
    ]
    default = wire.decode(plain.configure(3, "train", ["site-0"])["site-0"]["plan"], max_bytes=4096)

    # Assert
    assert [p["lr"] for p in plans] == pytest.approx([0.1 / 2, 0.1 / math.sqrt(2), 0.1 / math.sqrt(3), 0.05])
    assert [p["bs"] for p in plans] == [2, 4, 6, 6]
    assert default["lr"] == 0.1 and default["bs"] == 4


def test_sites_train_with_the_planned_lr_and_batch(tmp_path):
    """Round 2 of a K=1 SGD run with lr_r = 0.1 / r and batch 2 r equals one SGD step of lr 0.05 on the
    mean loss of the sites' round-2 batches of 4 examples (the sites obey the plan, not their config)."""
    # Prepare
    cfg = _cfg(
        **{
            "kavg.optimizer": "sgd",
            "kavg.lr": 0.1,
            "kavg.lr_schedule": "inverse:1",
            "kavg.batch_schedule": "grow-linear",
            "data.batch_size": 2,
        }
    )
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 2)
    run_round(cfg, server, transport, recorder, 1)
    start = [p.clone() for p in server.params]

    # Execute
    metrics, _, _ = run_round(cfg, server, transport, recorder, 2)

    # Assert
    model, _ = load_model(cfg.model, seed=cfg.run.seed)
    manifest = manifest_of(model)
    with torch.no_grad():
        for w, p in zip(trainable_tensors(model, manifest), start):
            w.copy_(p)
    model.train()
    losses = []
    for client in transport.clients.values():
        (batch,) = site_batches(client.ctx, cfg.run.seed, 2, 1, 4)
        assert batch["input_ids"].shape[0] == 4
        losses.append(model(**batch).loss)
    torch.stack(losses).mean().backward()
    with torch.no_grad():
        expected = [w - 0.05 * w.grad for w in (dict(model.named_parameters())[e.name] for e in manifest)]
    for got, want in zip(server.params, expected):
        assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kavg.lr_schedule": "cosine"}, "gives lr 0 in round 3"),
        ({"kavg.lr_schedule": "linear"}, "gives lr 0 in round 3"),
        ({"kavg.lr_schedule": "inverse:3"}, "kavg.lr_schedule"),
        ({"kavg.batch_schedule": "grow"}, "kavg.batch_schedule"),
        ({"kavg.warmup_rounds": -1}, "kavg.warmup_rounds"),
    ],
)
def test_schedules_that_cannot_train_are_refused_naming_the_key(overrides, message):
    """A schedule that reaches lr = 0 inside the run, or that does not parse, is a config error."""
    with pytest.raises(ValueError, match=message):
        _cfg(**overrides)
    cfgmod.from_run_config(tiny_flat(**{"algorithm": "kavg", "kavg.lr_schedule": "cosine:0.1"}))
