"""dppf: pull-push math, the lam/alpha fixed point, kavg reproduced bitwise, the site's persisted copy,
and the worker spread MV / IMV the server logs (params and delta-w spaces).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import dppf
from edgetune.comm import wire
from edgetune.comm.tensors import decode_tensors
from edgetune.comm.wire import WireError
from edgetune.federation import run_round
from edgetune.models.load import clear_cache, load_model
from edgetune.models.lora import lora_pairs, lora_scale
from edgetune.models.params import manifest_of


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models step much faster on one thread than on two oversubscribed ones (shared CI boxes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(algorithm="dppf", **overrides):
    base = {
        "algorithm": algorithm,
        "kavg.lr": 0.01,
        "kavg.local_steps": 1,
        "data.max_length": 64,
        "dppf.alpha": 0.5,
        "dppf.lam": 0.05,
    }
    base.update(overrides)
    return cfgmod.from_run_config(tiny_flat(**base))


def _federation(tmp_path, cfg, num_sites=3, folder="a", name="run"):
    """An in-process federation whose sites keep their state in ``tmp_path/<folder>/state/<site>``.

    The run folder's name (not its parent) fixes the run id, so ``name`` alike means keyed streams alike.
    """
    clear_cache()  # start from the keyed initial weights, whatever earlier tests did to the shared model
    server, transport, recorder, evaluate, tok = inproc.build(cfg, num_sites, run_dir=tmp_path / folder / name)
    for site, client in transport.clients.items():
        client.ctx = dataclasses.replace(client.ctx, state_dir=tmp_path / folder / "state" / site)
    return server, transport, recorder


class Spy:
    """Passes messages to the honest site and records its decoded deltas per round."""

    def __init__(self, honest, shapes):
        self.honest, self.shapes, self.ctx = honest, shapes, honest.ctx
        self.deltas: dict[int, list[torch.Tensor]] = {}

    def step(self, phase, msg, state):
        reply, state = self.honest.step(phase, msg, state)
        plan = wire.decode(msg["plan"], max_bytes=4096)
        self.deltas[plan["round"]] = decode_tensors(reply["delta"], self.shapes, plan["up"])
        return reply, state


def _site_copy(tmp_path, folder, site, server, round_idx):
    store = dppf.SiteCopy(tmp_path / folder / "state" / site / server.ctx.run_id.hex() / "dppf", server.manifest)
    return store, store.load_before(round_idx + 1)


def _norm(tensors):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


# ---- pull_push and the schedules ------------------------------------------------------------------


def test_pull_push_alpha_one_lam_zero_is_the_average_bitwise():
    """alpha = 1, lam = 0 returns x_bar bit for bit (signed zeros included), in new tensors."""
    # Prepare
    gen = torch.Generator().manual_seed(1)
    x_bar = [torch.randn(5, 3, generator=gen), torch.tensor([-0.0, 0.0, 1e-30, -3.5])]
    x_i = [torch.randn(5, 3, generator=gen), torch.tensor([2.0, -1.0, 0.0, 7.0])]

    # Execute
    out = dppf.pull_push(x_i, x_bar, 1.0, 0.0)

    # Assert
    for o, b in zip(out, x_bar):
        assert torch.equal(o.view(torch.int32), b.view(torch.int32))
        assert o.data_ptr() != b.data_ptr()


def test_pull_push_moves_the_offset_to_one_minus_alpha_times_r_plus_lam():
    """The new offset is d (1 - alpha + lam / ||d||): radius (1 - alpha) r + lam, same direction; with
    d = 0 the copy stays at the average (u = 0, no push)."""
    # Prepare
    gen = torch.Generator().manual_seed(2)
    x_bar = [torch.randn(40, generator=gen), torch.randn(3, 4, generator=gen)]
    x_i = [b + 0.3 * torch.randn(b.shape, generator=gen) for b in x_bar]
    d = [a - b for a, b in zip(x_i, x_bar)]
    r = _norm(d)

    # Execute
    out = dppf.pull_push(x_i, x_bar, 0.25, 0.1)
    same = dppf.pull_push(x_bar, x_bar, 0.25, 0.1)

    # Assert
    new = [o - b for o, b in zip(out, x_bar)]
    assert _norm(new) == pytest.approx(0.75 * r + 0.1, rel=1e-6)
    cos = sum(float((a.double() * b.double()).sum()) for a, b in zip(new, d)) / (_norm(new) * r)
    assert cos == pytest.approx(1.0, abs=1e-6)
    assert all(torch.equal(s, b) for s, b in zip(same, x_bar))
    with pytest.raises(ValueError):
        dppf.pull_push(x_i, x_bar, 1.5, 0.1)


def test_linear_schedule_ramps_the_push_only_by_default():
    """linear, ramp = push: f(r) = min(1, (r - 1) / W), lam_r = f lam by hand, alpha_r = alpha in every round."""
    # Prepare
    lin = cfgmod.DppfSection(alpha=0.5, lam=0.2, schedule="linear", warmup_rounds=4)
    const = cfgmod.DppfSection(alpha=0.5, lam=0.2)

    # Execute
    ramped = [dppf.strengths(lin, r) for r in range(1, 8)]

    # Assert: W = 4 gives f = 0, 1/4, 2/4, 3/4, 1, 1, 1
    assert [lam for _, lam in ramped] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    assert [a for a, _ in ramped] == [0.5] * 7
    assert [dppf.strengths(const, r) for r in (1, 9)] == [(0.5, 0.2), (0.5, 0.2)]


def test_pull_push_ramp_keeps_the_old_behaviour_reachable():
    """ramp = pull-push: alpha_r = f alpha and lam_r = f lam (ratio lam / alpha fixed), edgetune's earlier default."""
    # Prepare
    both = cfgmod.DppfSection(alpha=0.5, lam=0.2, schedule="linear", warmup_rounds=4, ramp="pull-push")

    # Execute
    ramped = [dppf.strengths(both, r) for r in range(1, 8)]

    # Assert
    assert [a for a, _ in ramped] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert all(lam == pytest.approx(0.4 * a) for a, lam in ramped)
    with pytest.raises(ValueError, match="dppf.ramp"):
        cfgmod.DppfSection(ramp="pull")


@pytest.mark.parametrize(("alpha", "lam", "start_spread"), [(0.5, 0.1, 0.0), (0.2, 0.05, 0.0), (0.8, 0.4, 3.0)])
def test_radius_converges_to_lam_over_alpha_on_a_quadratic(alpha, lam, start_spread):
    """M workers on f(x) = 1/2 ||x||^2 (K noisy gradient steps per round, then averaging and pull-push):
    the mean radius settles at lam / alpha (within 2%), from below and from above. With the local
    contraction c = (1 - lr)^K the exact fixed point is c lam / (1 - c (1 - alpha)) (within 0.5%)."""
    # Prepare
    gen = torch.Generator().manual_seed(0)
    num_workers, dim, steps, lr, sigma = 4, 20, 2, 1e-3, 1e-4
    xs = [[torch.ones(dim) + start_spread * torch.randn(dim, generator=gen)] for _ in range(num_workers)]
    x_bar = [sum(x[0] for x in xs) / num_workers]
    mvs = []

    # Execute
    for _ in range(150):
        xs = [dppf.pull_push(x, x_bar, alpha, lam) for x in xs]
        for x in xs:
            for _ in range(steps):
                x[0] = x[0] - lr * x[0] + sigma * torch.randn(dim, generator=gen)
        x_bar = [sum(x[0] for x in xs) / num_workers]
        mvs.append(dppf.spread([[x[0] - x_bar[0]] for x in xs]))

    # Assert
    settled = sum(mvs[-20:]) / 20
    c = (1 - lr) ** steps
    assert settled == pytest.approx(lam / alpha, rel=0.02)
    assert settled == pytest.approx(c * lam / (1 - c * (1 - alpha)), rel=0.005)


# ---- rounds on the tiny model ---------------------------------------------------------------------


def test_alpha_one_lam_zero_reproduces_kavg_bitwise(tmp_path):
    """dppf with alpha = 1, lam = 0 and kavg, same config and run name: identical server state hashes
    after every one of 3 rounds (the pull-push hands back x_bar itself)."""
    # Prepare
    hashes = {}
    for algorithm in ("kavg", "dppf"):
        cfg = _cfg(algorithm, **{"dppf.alpha": 1.0, "dppf.lam": 0.0})
        server, transport, recorder = _federation(tmp_path, cfg, folder=algorithm)

        # Execute
        hashes[algorithm] = []
        for r in range(1, 4):
            run_round(cfg, server, transport, recorder, r)
            hashes[algorithm].append(server.state_hash())

    # Assert
    assert hashes["dppf"] == hashes["kavg"]
    assert len(set(hashes["kavg"])) == 3  # the rounds did train


def test_site_copy_persists_across_objects_and_carries_the_push(tmp_path):
    """The site's x_i' lives in state_dir/<run>/dppf, equals x_bar_r + Delta_i, and drives the next round
    even through a fresh client object: with alpha = 1, lam > 0 round 1 equals kavg, and in round 2 the
    site's update differs from kavg's by about lam along u_i = (x_i' - x_bar_2) / ||x_i' - x_bar_2||.
    Only the newest copy and the one before it are kept."""
    # Prepare
    lam = 0.05
    runs = {}
    for algorithm in ("kavg", "dppf"):
        cfg = _cfg(algorithm, **{"dppf.alpha": 1.0, "dppf.lam": lam, "kavg.lr": 1e-3})
        server, transport, recorder = _federation(tmp_path, cfg, folder=algorithm)
        transport.clients = {s: Spy(c, server.shapes) for s, c in transport.clients.items()}
        runs[algorithm] = (cfg, server, transport, recorder)

    # Execute
    cfg, server, transport, recorder = runs["dppf"]
    x_bar_1 = [p.clone() for p in server.params]
    for algorithm in ("kavg", "dppf"):
        run_round(*runs[algorithm], 1)
    x_bar_2 = [p.clone() for p in server.params]
    copies = {s: _site_copy(tmp_path, "dppf", s, server, 1)[1] for s in transport.clients}
    # a fresh object per site: nothing but the files carries x_i into round 2
    transport.clients = {s: Spy(dppf.DppfClient(cfg, c.ctx), server.shapes) for s, c in transport.clients.items()}
    for algorithm in ("kavg", "dppf"):
        run_round(*runs[algorithm], 2)
    run_round(cfg, server, transport, recorder, 3)

    # Assert
    assert runs["kavg"][1].state_hash() != server.state_hash()
    for site, spy in transport.clients.items():
        x_1 = copies[site]
        store, _ = _site_copy(tmp_path, "dppf", site, server, 3)
        assert store.rounds() == [2, 3]
        kavg_spy = runs["kavg"][2].clients[site]
        for x, b, d in zip(x_1, x_bar_1, kavg_spy.deltas[1]):  # round 1 is kavg's: same delta
            assert torch.allclose(x, b + d, atol=1e-6)
        u = [x - b for x, b in zip(x_1, x_bar_2)]
        r = _norm(u)
        diff = [a - k for a, k in zip(spy.deltas[2], kavg_spy.deltas[2])]
        assert _norm(diff) == pytest.approx(lam, rel=0.1)
        cos = sum(float((a.double() * b.double()).sum()) for a, b in zip(diff, u)) / (_norm(diff) * r)
        assert cos > 0.95


def test_worker_mv_matches_the_sites_copies_and_settles_near_lam_over_alpha(tmp_path):
    """worker_mv (computed by the server from the uploads) equals mean_i ||x_i' - x_bar_{r+1}|| read from the
    sites' own files; worker_imv = 1 / worker_mv; with a small lr the spread ends within 25% of lam / alpha."""
    # Prepare
    alpha, lam = 0.5, 0.05
    cfg = _cfg(**{"dppf.alpha": alpha, "dppf.lam": lam, "kavg.lr": 1e-3})
    server, transport, recorder = _federation(tmp_path, cfg)

    # Execute
    rows = []
    for r in range(1, 7):
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, r)
        rows.append(metrics)
    copies = [_site_copy(tmp_path, "a", s, server, 6)[1] for s in transport.clients]

    # Assert
    from_files = sum(_norm([x - p for x, p in zip(c, server.params)]) for c in copies) / len(copies)
    assert rows[-1]["worker_mv"] == pytest.approx(from_files, rel=1e-4)
    assert all(m["worker_imv"] == pytest.approx(1 / m["worker_mv"]) for m in rows)
    assert all(m["dppf_alpha"] == alpha and m["dppf_lam"] == lam for m in rows)
    assert rows[0]["worker_mv"] < 0.3 * lam / alpha  # round 1: only training spreads the sites
    assert rows[-1]["worker_mv"] == pytest.approx(lam / alpha, rel=0.25)


def test_delta_w_spread_is_the_spread_of_the_lora_products(tmp_path):
    """distance = delta-w: worker_mv = mean_i sqrt(sum_layers ||s B_i A_i - mean_j s B_j A_j||^2) over the
    sites' stored factors (dense check); delta-w without LoRA factors is refused."""
    # Prepare
    lora = {
        "model.trainable": "lora",
        "model.lora_rank": 4,
        "model.lora_alpha": 8.0,
        "dppf.distance": "delta-w",
        "kavg.optimizer": "adamw",
        "kavg.lr": 1e-2,
    }
    cfg = _cfg(**lora)
    server, transport, recorder = _federation(tmp_path, cfg)

    # Execute
    for r in (1, 2):
        metrics, _, _ = run_round(cfg, server, transport, recorder, r)
    copies = [_site_copy(tmp_path, "a", s, server, 2)[1] for s in transport.clients]

    # Assert
    pairs = lora_pairs(server.manifest)
    scales = [lora_scale(server.model, server.manifest.entries[a].name) for a, _ in pairs]
    sq = [0.0] * len(copies)
    for (ia, ib), s in zip(pairs, scales):
        prods = [s * c[ib].double() @ c[ia].double() for c in copies]
        mean = sum(prods) / len(prods)
        for k, p in enumerate(prods):
            sq[k] += float((p - mean).pow(2).sum())
    expected = sum(math.sqrt(x) for x in sq) / len(sq)
    assert expected > 0
    assert metrics["worker_mv"] == pytest.approx(expected, rel=1e-5)
    full = _cfg(**{"dppf.distance": "delta-w"})
    model, tok = load_model(full.model, seed=full.run.seed)
    with pytest.raises(ValueError, match="LoRA"):
        dppf.DppfServer(full, dataclasses.replace(server.ctx, model=model, tokenizer=tok))


# ---- the store and the message ----------------------------------------------------------------------


def test_site_copy_reads_the_round_before_and_drops_stale_files(tmp_path):
    """load_before(r) reads the newest copy of a round < r (a retried round never reads its own attempt);
    saving round r keeps r and the newest older copy and removes later rounds (a reused run name);
    a copy stored for another manifest (a reused run name that trained other tensors) is not this site's:
    none is loaded, as for a new site (tests/algorithms/test_site_files_layout.py runs it end to end)."""
    # Prepare
    manifest = manifest_of(torch.nn.Linear(3, 2))
    store = dppf.SiteCopy(tmp_path / "dppf", manifest)
    x = {r: [torch.full((2, 3), float(r)), torch.full((2,), float(r))] for r in (1, 2, 3, 9)}

    # Execute
    store.save(9, x[9])  # a stale file of an earlier run with the same name
    store.save(1, x[1])
    after_first = store.rounds()
    store.save(2, x[2])
    store.save(3, x[3])
    retried = store.load_before(3)

    # Assert
    assert store.load_before(1) is None
    assert after_first == [1]
    assert store.rounds() == [2, 3]
    assert torch.equal(retried[0], x[2][0])
    other = dppf.SiteCopy(tmp_path / "dppf", manifest_of(torch.nn.Linear(3, 5)))
    assert other.load_before(4) is None


def test_site_refuses_bad_strengths_and_missing_fields(tmp_path):
    """A round message with alpha outside [0, 1] or without lam is refused before any training."""
    # Prepare
    cfg = _cfg()
    server, transport, _ = _federation(tmp_path, cfg, num_sites=1)
    site = transport.clients["site-0"]
    msg = server.configure(1, "train", ["site-0"])["site-0"]

    # Execute / Assert
    with pytest.raises(ValueError, match="alpha"):
        site.step("train", {**msg, "alpha": 1.5}, {})
    with pytest.raises(WireError):
        site.step("train", {k: v for k, v in msg.items() if k != "lam"}, {})
