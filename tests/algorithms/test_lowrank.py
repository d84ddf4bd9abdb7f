"""lowrank: exact product merging, fedavg's bias, only-b, AB-training groups, screening, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_flat
from peft import PeftModel

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms.base import ServerContext
from edgetune.algorithms.lowrank import (
    FULL_RANK,
    LowrankServer,
    ab_group,
    full_rank_merge,
    is_refactor_round,
    rebound_lr,
)
from edgetune.algorithms.weights import Screened, select
from edgetune.comm import wire
from edgetune.comm.tensors import decode_tensors, encode_tensors
from edgetune.federation import run_federation, run_round
from edgetune.models.load import clear_cache, load_model
from edgetune.models.lora import resplit, svd_of_sum
from edgetune.models.tiny import tiny_model_and_tokenizer

RANK = 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny-model ops gain nothing from threads, and on a shared 2-core box OpenMP threads wait on
    each other: one thread runs these tests several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(mode, **overrides):
    base = {
        "algorithm": "lowrank",
        "lowrank.mode": mode,
        "model.trainable": "lora",
        "model.target_modules": "q_proj,v_proj",
        "model.lora_rank": RANK,
        "model.lora_alpha": 8.0,
        "kavg.optimizer": "adamw",
        "kavg.lr": 1e-2,
        "kavg.local_steps": 2,
        "lowrank.refactor_every": 2,
        "lowrank.rebound_rounds": 1,
        "lowrank.rebound_lr": 1e-3,
    }
    base.update(overrides)
    return cfgmod.from_run_config(tiny_flat(**base))


def _federation(tmp_path, cfg, num_sites, name="run"):
    # In-process federations share one cached model whose LoRA weights they move: start fresh.
    clear_cache()
    return inproc.build(cfg, num_sites, run_dir=tmp_path / name)


def _server(tmp_path, cfg):
    """A server half on its own tiny model, for the merge math without sites."""
    model, tok = load_model(cfg.model, seed=cfg.run.seed)
    return LowrankServer(cfg, ServerContext(run_id=bytes(16), model=model, tokenizer=tok, workdir=tmp_path))


def _products(server, params=None):
    """s B A per LoRA layer, dense, float64."""
    params = server.params if params is None else params
    return [s * params[ib].double() @ params[ia].double() for (ia, ib), s in zip(server.pairs, server.scales)]


def _randomise(server, gen, scale=0.3):
    for p in server.params:
        p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _mean_products(server, updates, weights):
    """sum_i w_i s B_i A_i / W per layer, with B_i, A_i = global + site delta."""
    total = sum(weights.values())
    full = {s: [p + d for p, d in zip(server.params, updates[s])] for s in updates}
    per_site = {s: _products(server, full[s]) for s in updates}
    return [sum(weights[s] * per_site[s][j] for s in updates) / total for j in range(len(server.pairs))]


def _plans(weights, train="all"):
    return {s: {"K": w, "bs": 1, "train": train} for s, w in weights.items()}


def _frob(mats):
    return math.sqrt(sum(float(m.pow(2).sum()) for m in mats))


class ForgedSite:
    """A site that answers with a payload of its own making (a faulty or malicious site)."""

    def __init__(self, honest, make_reply):
        self.honest, self.make_reply, self.ctx = honest, make_reply, honest.ctx

    def step(self, phase, msg, state):
        return self.make_reply(self.honest, phase, msg, state), state


# ---- the math ----------------------------------------------------------------------------------------


def test_svd_of_sum_with_full_rank_budget_reproduces_the_mean_exactly():
    """With a rank budget >= N r, the QR/SVD route loses nothing: s B A equals sum_i w_i s B_i A_i / W."""
    gen = torch.Generator().manual_seed(0)
    bs = [torch.randn(12, 2, generator=gen, dtype=torch.float64) for _ in range(3)]
    as_ = [torch.randn(2, 10, generator=gen, dtype=torch.float64) for _ in range(3)]
    w, scale = [1.0, 2.0, 5.0], 2.0
    mean = sum(wi * scale * b @ a for wi, b, a in zip(w, bs, as_)) / sum(w)

    u, s, vh = svd_of_sum([wi * scale / sum(w) * b for wi, b in zip(w, bs)], as_)
    b, a, kept = resplit(u, s, vh, rank=6, cutoff=0.0, scale=scale)

    assert kept == 6 and b.shape == (12, 6) and a.shape == (6, 10)
    assert torch.allclose(scale * b @ a, mean, atol=1e-12, rtol=0)


def test_resplit_cutoff_zeroes_small_components_and_keeps_shapes():
    """svd_cutoff c zeroes every s_j <= c s_1; the factors stay rank R and balanced (||B_j|| = ||A_j||)."""
    gen = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(8, 4, generator=gen, dtype=torch.float64)).Q
    vh = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=torch.float64)).Q.T
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)

    b, a, kept = resplit(u, s, vh, rank=4, cutoff=0.3, scale=2.0)

    assert kept == 2 and b.shape == (8, 4) and a.shape == (4, 6)
    assert torch.allclose(2.0 * b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-12)
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), atol=1e-12)
    assert float(b[:, 2:].abs().max()) == 0.0 and float(a[2:].abs().max()) == 0.0


def test_exact_equals_the_mean_of_products_when_it_has_rank_r(tmp_path):
    """exact: when the sites' products share a rank-r row space (A_i = G_i A), s B' A' is the weighted
    mean of s B_i A_i to float32 rounding, and the re-split is balanced: ||B'[:, j]|| = ||A'[j]||."""
    server = _server(tmp_path, _cfg("exact"))
    gen = torch.Generator().manual_seed(2)
    _randomise(server, gen)
    weights = {"a": 1, "b": 2, "c": 3}
    updates = {}
    for site in weights:
        deltas = [torch.zeros_like(p) for p in server.params]
        for ia, ib in server.pairs:
            g = torch.eye(RANK) + 0.3 * torch.randn(RANK, RANK, generator=gen)
            deltas[ia] = g @ server.params[ia] - server.params[ia]
            deltas[ib] = 0.3 * torch.randn(server.params[ib].shape, generator=gen)
        updates[site] = deltas
    want = _mean_products(server, updates, weights)

    metrics = server.combine(1, updates, _plans(weights))

    for got, ref in zip(_products(server), want):
        assert torch.allclose(got, ref, atol=2e-6 * float(ref.abs().max()), rtol=0)
    for ia, ib in server.pairs:
        assert torch.allclose(server.params[ib].norm(dim=0), server.params[ia].norm(dim=1), rtol=1e-4)
    assert metrics["refactor"] == 1.0 and metrics["svd_rank"] == RANK and metrics["svd_tail"] < 1e-5


def test_exact_truncation_is_the_best_rank_r_approximation(tmp_path):
    """exact with random sites (mean of rank N r): ||s B' A' - M|| equals the norm of M's discarded
    singular values (Eckart-Young), and svd_tail reports that fraction."""
    server = _server(tmp_path, _cfg("exact"))
    gen = torch.Generator().manual_seed(3)
    _randomise(server, gen)
    weights = {"a": 1, "b": 1, "c": 2}
    updates = {s: [0.3 * torch.randn(p.shape, generator=gen) for p in server.params] for s in weights}
    mean = _mean_products(server, updates, weights)

    metrics = server.combine(1, updates, _plans(weights))

    tails, total = 0.0, 0.0
    for got, ref in zip(_products(server), mean):
        sv = torch.linalg.svdvals(ref)
        assert sv[RANK] > 1e-3 * sv[0]  # the mean really has rank > r, so truncation does something
        err = float(torch.linalg.matrix_norm(got - ref))
        assert err == pytest.approx(float(sv[RANK:].pow(2).sum().sqrt()), rel=1e-4)
        tails += float(sv[RANK:].pow(2).sum())
        total += float(sv.pow(2).sum())
    assert metrics["svd_tail"] == pytest.approx(math.sqrt(tails / total), rel=1e-4)


def test_fedavg_product_differs_from_the_mean_of_products(tmp_path, capsys):
    """fedavg (A, B averaged separately) misses the mean of s B_i A_i by the cross terms; the gap
    is > 0 for random factors, and the product_gap metric measures it."""
    server = _server(tmp_path, _cfg("fedavg"))
    gen = torch.Generator().manual_seed(4)
    _randomise(server, gen)
    weights = {"a": 1, "b": 1, "c": 1}
    updates = {s: [0.3 * torch.randn(p.shape, generator=gen) for p in server.params] for s in weights}
    before = [p.clone() for p in server.params]
    mean = _mean_products(server, updates, weights)

    metrics = server.combine(1, updates, _plans(weights))

    gap = _frob([g - m for g, m in zip(_products(server), mean)])
    move = _frob([m - b for m, b in zip(mean, _products(server, before))])
    with capsys.disabled():
        print(f"\nfedavg bias on random factors: ||s B'A' - mean s B_i A_i|| / ||mean update|| = {gap / move:.3f}")
    assert gap / move > 0.05
    assert metrics["product_gap"] == pytest.approx(gap / move, rel=1e-4)


def test_only_b_averaging_is_exact(tmp_path):
    """only-b: A is shared and unchanged, so s mean(B_i) A = mean(s B_i A) (product_gap ~ 0)."""
    server = _server(tmp_path, _cfg("only-b"))
    gen = torch.Generator().manual_seed(5)
    a_before = [server.params[ia].clone() for ia, _ in server.pairs]
    weights = {"a": 1, "b": 3}
    updates = {}
    for site in weights:
        deltas = [torch.zeros_like(p) for p in server.params]
        for _, ib in server.pairs:
            deltas[ib] = torch.randn(server.params[ib].shape, generator=gen)
        updates[site] = deltas
    mean = _mean_products(server, updates, weights)

    metrics = server.combine(1, updates, _plans(weights, "lora_B"))

    assert all(torch.equal(server.params[ia], a) for (ia, _), a in zip(server.pairs, a_before))
    for got, ref in zip(_products(server), mean):
        assert torch.allclose(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    assert metrics["product_gap"] < 1e-5


def test_exact_median_of_products_ignores_one_huge_site(tmp_path):
    """exact with kavg.aggregator = median merges dense products coordinate-wise: one site with a
    x1000 product leaves the result on the honest sites' scale."""
    server = _server(tmp_path, _cfg("exact", **{"kavg.aggregator": "median"}))
    gen = torch.Generator().manual_seed(6)
    _randomise(server, gen)
    updates = {s: [0.1 * torch.randn(p.shape, generator=gen) for p in server.params] for s in "abc"}
    honest = max(_frob(_products(server, [p + d for p, d in zip(server.params, updates[s])])) for s in "ab")
    updates["c"] = [1000 * (p + d) - p for p, d in zip(server.params, updates["c"])]

    server.combine(1, updates, _plans(dict.fromkeys("abc", 1)))

    assert _frob(_products(server)) < 2 * honest


# ---- plans and schedule ------------------------------------------------------------------------------


def test_refactor_rounds_rebound_and_group_rotation(tmp_path):
    """ab-groups: rounds 1, 1+F, 1+2F re-factorise (every site trains both factors); the lr restarts at
    rebound_lr after each and climbs linearly to kavg.lr; in between half the sites train A, half B,
    and every site swaps factor each round."""
    assert [r for r in range(1, 13) if is_refactor_round(r, 4)] == [1, 5, 9]
    assert not any(is_refactor_round(r, 0) for r in range(1, 9))
    lrs = [rebound_lr(r, lr=1e-3, refactor_every=4, rebound_rounds=2, start=1e-5) for r in range(1, 10)]
    assert lrs == pytest.approx([1e-3, 1e-5, 5.05e-4, 1e-3, 1e-3, 1e-5, 5.05e-4, 1e-3, 1e-3])
    assert rebound_lr(3, lr=1e-3, refactor_every=4, rebound_rounds=0, start=1e-5) == 1e-3

    cfg = _cfg(
        "ab-groups",
        **{"lowrank.refactor_every": 4, "lowrank.rebound_rounds": 2, "lowrank.rebound_lr": 1e-5, "kavg.lr": 1e-3},
    )
    server = _server(tmp_path, cfg)
    sites = ["site-0", "site-1", "site-2", "site-3"]
    plans = {r: {s: server.site_plan(r, s, sites) for s in sites} for r in range(1, 10)}
    for r, round_plans in plans.items():
        trains = [p["train"] for p in round_plans.values()]
        assert [p["lr"] for p in round_plans.values()] == pytest.approx([lrs[r - 1]] * 4)
        if r in (1, 5, 9):
            assert trains == ["all"] * 4
        else:
            assert sorted(trains) == ["lora_A", "lora_A", "lora_B", "lora_B"]
            if r - 1 not in (1, 5, 9):
                assert all(plans[r - 1][s]["train"] != round_plans[s]["train"] for s in sites)
    assert ab_group(2, 0) != ab_group(2, 1) and ab_group(2, 0) != ab_group(3, 0)


def test_rebound_climbs_back_to_the_scheduled_lr(tmp_path):
    """With kavg.lr_schedule step:4:0.5 (1e-3 in rounds 1-4, 5e-4 in 5-8, 2.5e-4 in 9) the rebound after
    each re-factorisation (rounds 1, 5, 9) starts at 1e-5 and climbs to that round's scheduled rate."""
    cfg = _cfg(
        "ab-groups",
        **{
            "num_rounds": 9,
            "kavg.lr": 1e-3,
            "kavg.lr_schedule": "step:4:0.5",
            "lowrank.refactor_every": 4,
            "lowrank.rebound_rounds": 2,
            "lowrank.rebound_lr": 1e-5,
        },
    )
    server = _server(tmp_path, cfg)
    got = [server.site_plan(r, "site-0", ["site-0", "site-1"])["lr"] for r in range(1, 10)]
    half = 1e-5 + (5e-4 - 1e-5) / 2
    assert got == pytest.approx([1e-3, 1e-5, 5.05e-4, 1e-3, 5e-4, 1e-5, half, 5e-4, 2.5e-4])


# ---- whole rounds ------------------------------------------------------------------------------------


def test_ab_groups_uplink_is_half_of_fedavg(tmp_path):
    """ab-groups: in an AB round an A-group site sends exactly the A factors (fedavg's reply less the
    B bytes) and a B-group site the B factors, so the mean uplink per site is half of fedavg's
    (framing aside); a re-factorisation round costs what fedavg does."""
    fed_cfg, ab_cfg = _cfg("fedavg"), _cfg("ab-groups")
    server, transport, recorder, *_ = _federation(tmp_path, fed_cfg, 4, "fedavg")
    run_round(fed_cfg, server, transport, recorder, 1)
    fedavg_up = recorder.ledger.per_site(round_idx=1, direction="up")
    numel = {f: sum(e.numel for e in server.manifest if f in e.name) for f in ("lora_A", "lora_B")}

    server, transport, recorder, *_ = _federation(tmp_path, ab_cfg, 4, "ab")
    run_round(ab_cfg, server, transport, recorder, 1)
    run_round(ab_cfg, server, transport, recorder, 2)
    refactor_up = recorder.ledger.per_site(round_idx=1, direction="up")
    ab_up = recorder.ledger.per_site(round_idx=2, direction="up")

    full = fedavg_up["site-0"]
    assert set(fedavg_up.values()) == {full} and set(refactor_up.values()) == {full}
    for site, up in ab_up.items():
        trained = server._plans[site]["train"]
        dropped = numel["lora_B" if trained == "lora_A" else "lora_A"]
        assert up == full - 4 * dropped, (site, trained)
    framing = full - 4 * (numel["lora_A"] + numel["lora_B"])
    assert sum(ab_up.values()) / 4 == pytest.approx((full + framing) / 2)
    print(f"\nuplink per site: fedavg {full} B, ab-groups {sorted(ab_up.values())} B")


@pytest.mark.parametrize("mode", ["fedavg", "exact", "only-b", "ab-groups"])
def test_each_mode_lowers_heldout_loss_and_checkpoints_a_peft_adapter(tmp_path, mode):
    """Three rounds on three sites lower the held-out loss; the final checkpoint is a peft adapter
    that PeftModel.from_pretrained loads onto the base model with exactly the server's factors."""
    cfg = _cfg(mode, num_rounds=3)
    server, transport, recorder, evaluate, tok = _federation(tmp_path, cfg, 3)

    summary = run_federation(cfg, server, transport, recorder, evaluate, tok)

    assert summary["heldout_loss_last"] < summary["heldout_loss_first"] - 0.1
    base, _ = tiny_model_and_tokenizer(seed=cfg.run.seed)
    loaded = dict(PeftModel.from_pretrained(base, summary["checkpoint"]).named_parameters())
    for entry, param in zip(server.manifest, server.params):
        assert torch.equal(loaded[entry.name].detach(), param), entry.name


# ---- AB-training's full-rank phase -------------------------------------------------------------------


def test_full_rank_merge_truncates_the_mean_dense_weight_by_hand():
    """Rank 1, s = 2: B A = 0 and site deltas diag(3, 0), diag(1, 2) with equal weights give
    M = diag(2, 1), truncated to s B' A' = diag(2, 0) (singular values 2 and 1, the tail 1 dropped)."""
    # Prepare
    b, a = torch.zeros(2, 1), torch.zeros(1, 2)
    dense = [torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([1.0, 2.0]))]

    # Execute
    nb, na, kept, sv = full_rank_merge(b, a, dense, [1.0, 1.0], scale=2.0, cutoff=0.0)

    # Assert
    assert kept == 1 and sv.tolist() == pytest.approx([2.0, 1.0])
    assert torch.allclose(2.0 * nb @ na, torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64)))
    assert nb.shape == (2, 1) and na.shape == (1, 2)


def test_full_rank_phase_regrows_a_slot_that_factor_training_cannot():
    """Rank 2, s = 1, B = [[1, 0], [0, 0]], A = I: slot 2 is dead (its B column and A row are 0, so
    both its gradients vanish, and an exact product merge of such factors keeps it at 0). A dense
    delta diag(0, 0.5) makes M = diag(1, 0.5): both slots live again."""
    # Prepare
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    a = torch.eye(2)
    u, sv, vh = svd_of_sum([b], [a])  # the exact merge of a site that kept these factors
    _, _, exact_kept = resplit(u, sv, vh, rank=2, cutoff=0.0, scale=1.0)

    # Execute
    nb, na, kept, _ = full_rank_merge(b, a, [torch.diag(torch.tensor([0.0, 0.5]))], [1.0], scale=1.0, cutoff=0.0)

    # Assert
    assert exact_kept == 1 and kept == 2
    assert torch.allclose(nb @ na, torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float64)))
    assert (nb.abs().sum(dim=0) > 0).all() and (na.abs().sum(dim=1) > 0).all()


def test_full_rank_round_sends_dense_deltas_and_merges_them(tmp_path):
    """ab-groups with full_rank_steps D = 3: round 1 (a re-factorisation round) plans D dense steps at
    full_rank_lr; every site sends one dense dW per adapted layer (bytes counted: 4 O I each, fp32);
    the server's new s B A is the rank-r truncation of s B0 A0 + the mean dW; the base weights are
    unchanged; round 2 is an ordinary AB round on the factors."""
    # Prepare
    cfg = _cfg("ab-groups", **{"lowrank.full_rank_steps": 3, "lowrank.full_rank_lr": 1e-3})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 3)
    base = {n: p.detach().clone() for n, p in server.model.named_parameters() if "base_layer" in n}
    before = [p.clone() for p in server.params]
    replies = {}

    class Spy:
        def __init__(self, honest):
            self.honest, self.ctx = honest, honest.ctx

        def step(self, phase, msg, state):
            reply, state = self.honest.step(phase, msg, state)
            replies[self.ctx.site_id] = (wire.decode(msg["plan"], max_bytes=4096), reply)
            return reply, state

    transport.clients = {s: Spy(c) for s, c in transport.clients.items()}

    # Execute
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)
    round1, after1 = dict(replies), [p.clone() for p in server.params]
    run_round(cfg, server, transport, recorder, 2)

    # Assert
    assert not rejected and metrics["full_rank"] == 1.0 and metrics["refactor"] == 1.0
    shapes = server.dense_shapes
    assert all(p["train"] == FULL_RANK and p["K"] == 3 and p["lr"] == 1e-3 for p, _ in round1.values())
    dense = {s: decode_tensors(r["delta"], shapes, "fp32", where=s) for s, (_, r) in round1.items()}
    assert all(d.abs().max() > 0 for ds in dense.values() for d in ds)
    up = recorder.ledger.per_site(round_idx=1, direction="up")
    expected_bytes = len(wire.encode({"delta": bytes(4 * sum(o * i for o, i in shapes)), "loss": 1.0}))
    assert set(up.values()) == {expected_bytes}
    for layer, ((ia, ib), scale) in enumerate(zip(server.pairs, server.scales)):
        target = scale * before[ib].double() @ before[ia].double()
        target += sum(dense[s][layer].double() for s in dense) / len(dense)
        u, sv, vh = torch.linalg.svd(target)
        best = u[:, :RANK] @ torch.diag(sv[:RANK]) @ vh[:RANK]
        got = scale * after1[ib].double() @ after1[ia].double()
        assert torch.allclose(got, best, atol=1e-5), layer
    assert base and all("lora" not in n for n in base)
    for n, p in server.model.named_parameters():
        if n in base:
            assert torch.equal(p.detach(), base[n]), n
    assert {p["train"] for p, _ in replies.values()} == {"lora_A", "lora_B"}


# ---- bad replies -------------------------------------------------------------------------------------


def _honest_deltas(honest, phase, msg, state, manifest):
    """The honest reply and its decoded deltas, with the manifest indices they belong to."""
    reply, _ = honest.step(phase, msg, state)
    idx = select(manifest, wire.decode(msg["plan"], max_bytes=4096)["train"])
    return reply, decode_tensors(reply["delta"], [manifest.entries[i].shape for i in idx], "fp32"), idx


def _forge(case, manifest):
    def make(honest, phase, msg, state):
        reply, deltas, idx = _honest_deltas(honest, phase, msg, state, manifest)
        if case == "wrong rank":  # rank r - 1 factors: the byte count no longer matches
            short = [
                d[: RANK - 1] if "lora_A" in manifest.entries[i].name else d[:, : RANK - 1] for i, d in zip(idx, deltas)
            ]
            return {**reply, "delta": encode_tensors(short, "fp32")}
        if case == "NaN":
            blob = bytearray(reply["delta"])
            blob[4:8] = b"\x00\x00\xc0\x7f"
            return {**reply, "delta": bytes(blob)}
        if case == "oversized":
            return {**reply, "delta": reply["delta"] * 3}
        return {**reply, "delta": encode_tensors([100 * d for d in deltas], "fp32")}  # scaled x100

    return make


@pytest.mark.parametrize(
    ("case", "reason"),
    [("wrong rank", "expected"), ("NaN", "non-finite"), ("oversized", "exceeds"), ("scaled x100", "median site's")],
)
def test_bad_factor_reply_rejected_and_others_applied(tmp_path, case, reason):
    """A wrong-rank, NaN, oversized or x100 factor update is rejected with its reason; the round
    commits with the other sites, to exactly the state of a round where the bad site was offline."""
    cfg = _cfg("exact", **{"run.min_sites": 2})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 4, "bad")
    transport.clients["site-3"] = ForgedSite(transport.clients["site-3"], _forge(case, server.manifest))
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)
    assert metrics["num_accepted"] == 3 and set(rejected) == {"site-3"} and reason in rejected["site-3"]

    ref, ref_transport, ref_recorder, *_ = _federation(tmp_path, cfg, 4, "ref")
    ref_transport.offline = {"site-3"}
    run_round(cfg, ref, ref_transport, ref_recorder, 1)
    assert server.state_hash() == ref.state_hash()


def test_rescaled_factors_cb_a_over_c_are_rejected(tmp_path):
    """(c B_i, A_i / c) keeps a site's product, so a pure product-norm screen passes it, yet it
    multiplies fedavg's factor average; the dW-space screen rejects it and the others apply."""
    cfg = _cfg("fedavg", **{"run.min_sites": 2})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 4, "bad")
    shapes = [e.shape for e in server.manifest]
    seen = {}

    def rescale(honest, phase, msg, state):
        reply, deltas, _ = _honest_deltas(honest, phase, msg, state, server.manifest)
        start = decode_tensors(msg["params"], shapes, "fp32")
        factors = [p + d for p, d in zip(start, deltas)]
        forged = list(factors)
        for ia, ib in server.pairs:
            forged[ia], forged[ib] = factors[ia] / 100, factors[ib] * 100
        seen["honest"], seen["forged"] = _products(server, factors), _products(server, forged)
        return {**reply, "delta": encode_tensors([f - p for f, p in zip(forged, start)], "fp32")}

    transport.clients["site-3"] = ForgedSite(transport.clients["site-3"], rescale)
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)

    for h, f in zip(seen["honest"], seen["forged"]):
        assert torch.allclose(h, f, rtol=1e-4, atol=1e-6 * float(h.abs().max()))
    assert metrics["num_accepted"] == 3 and "median site's" in rejected["site-3"]
    ref, ref_transport, ref_recorder, *_ = _federation(tmp_path, cfg, 4, "ref")
    ref_transport.offline = {"site-3"}
    run_round(cfg, ref, ref_transport, ref_recorder, 1)
    assert server.state_hash() == ref.state_hash()


@pytest.mark.parametrize(("mode", "bound"), [("only-b", 1.0), ("exact", 2.0)])
def test_clip_norm_bounds_the_product_change(tmp_path, mode, bound):
    """With kavg.clip_norm C (outlier screen off), a x100 site is clipped, not rejected, and the global
    dW = s B A moves by at most C (only-b: a mean of changes <= C) or 2C (exact: the truncation
    adds at most as much again, by Eckart-Young)."""
    clip = 0.05
    cfg = _cfg(mode, **{"kavg.clip_norm": clip, "kavg.outlier_mult": 0.0})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 3)
    transport.clients["site-2"] = ForgedSite(transport.clients["site-2"], _forge("scaled x100", server.manifest))
    before = _products(server)

    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)

    moved = _frob([a - b for a, b in zip(_products(server), before)])
    assert not rejected and metrics["num_accepted"] == 3
    assert metrics["mean_delta_w_norm"] == pytest.approx(clip, rel=1e-6)
    assert 0 < moved <= bound * clip * (1 + 1e-5)


def test_ab_groups_step_bound_is_per_tensor_so_an_a_site_and_a_b_site_may_both_count(tmp_path):
    """In an AB round each tensor is averaged over the sites that trained it: an A-only site with factor
    delta norm 3 and a B-only site with norm 4 give a step of norm 5, which the bound must allow (it was
    max(3, 4) = 4, and on SmolLM2 such a round left a site out and failed its quorum). By hand: the bound
    is sqrt(sum over tensors of the largest squared delta norm), here 5."""
    cfg = _cfg("ab-groups")
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 4, "ab-bound")
    run_round(cfg, server, transport, recorder, 1)
    server.configure(2, "train", ["site-0", "site-1", "site-2", "site-3"])
    by_train = {}
    for s in ("site-0", "site-1", "site-2", "site-3"):
        by_train.setdefault(server._plans[s]["train"], s)
    a_site, b_site = by_train["lora_A"], by_train["lora_B"]
    updates = {}
    for site, norm_target in ((a_site, 3.0), (b_site, 4.0)):
        idx = select(server.manifest, server._plans[site]["train"])
        deltas = [torch.ones(server.shapes[i]) for i in idx]
        total = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
        updates[site] = [d * (norm_target / total) for d in deltas]
    screened = Screened(updates, {s: 0.0 for s in updates}, {s: 0.0 for s in updates}, {}, math.inf)
    assert server.step_bound(2, screened) == pytest.approx(5.0, rel=1e-6)
