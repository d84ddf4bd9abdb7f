"""The checkpoint valley probe: radii on exact quadratics, capping, exact restore of the model, no effect
on the next training round, and the checkpoint helper behind ``edgetune imv``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_flat
from torch import nn

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms.training import site_batches
from edgetune.crypto import keystream, schedule
from edgetune.evaluation import checkpoint_imv
from edgetune.federation import run_federation, run_round
from edgetune.metrics.imv import heldout_loss_fn, imv_metrics, valley_imv
from edgetune.models.load import clear_cache, load_model
from edgetune.models.params import model_sha256

KEY = schedule.run_key(7)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models step much faster on one thread than on two oversubscribed ones (shared CI boxes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Quadratic(nn.Module):
    """L(theta) = 1/2 sum_k c_k (theta_k - theta*_k)^2, evaluated at theta = theta* (the minimum)."""

    def __init__(self, curvature: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1.0, 1.0, len(curvature)))
        self.register_buffer("center", self.theta.detach().clone())
        self.register_buffer("curvature", curvature)

    def loss(self) -> float:
        return float(0.5 * (self.curvature * (self.theta.detach() - self.center).pow(2)).sum())


def _probe(model, loss_fn, **kw):
    """The probe with unit directions (``global``) unless a test asks for ``filter``."""
    args = {
        "key": KEY,
        "num_directions": 3,
        "delta": 0.1,
        "max_radius": 64.0,
        "bisect_steps": 12,
        "normalize": "global",
    }
    args.update(kw)
    return valley_imv(model, loss_fn, **args)


@pytest.mark.parametrize("curvature", [torch.full((8,), 2.0), torch.tensor([0.5, 1.0, 4.0, 8.0, 0.0, 3.0])])
def test_radius_is_where_the_loss_rises_by_delta_on_a_quadratic(curvature):
    """On L = 1/2 sum c_k dtheta_k^2 every unit Rademacher direction d (d_k^2 = 1/D) gives
    rise(rho) = rho^2 sum(c) / (2D), so each radius is sqrt(2 D delta / sum c) to within the bisection
    tolerance, with rise(radius) >= delta; IMV = 1 / mean radius."""
    # Prepare
    model = Quadratic(curvature)
    dim, delta, steps = len(curvature), 0.1, 12
    edge = math.sqrt(2 * dim * delta / float(curvature.sum()))

    # Execute
    result = _probe(model, lambda m: m.loss(), delta=delta, bisect_steps=steps)

    # Assert
    rise = [0.5 * float(curvature.sum()) * r * r / dim for r in result.radii]
    for radius, up in zip(result.radii, rise):
        assert up >= delta
        assert edge <= radius <= edge * (1 + 2.0 ** (1 - steps))
    assert result.imv == pytest.approx(1 / result.mean_radius)
    assert result.base_loss == 0.0 and result.num_capped == 0


def test_radius_along_the_regenerated_direction_matches_the_loss_threshold():
    """Re-applying theta + radius * z / sqrt(D) from derive(key, "imv", r) by hand reproduces a loss rise of
    delta (within the bisection tolerance) on an anisotropic quadratic whose minimum is off-centre, so the
    rise depends on the direction: the probe's direction r is exactly the keyed stream's."""
    # Prepare
    model = Quadratic(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    with torch.no_grad():
        model.center.add_(torch.tensor([0.3, -0.2, 0.1, 0.0, -0.4]))
    base = model.loss()
    theta = model.theta.detach().clone()

    # Execute
    result = _probe(model, lambda m: m.loss(), delta=0.05, max_radius=8.0, bisect_steps=14)

    # Assert
    for r, radius in enumerate(result.radii):
        z = keystream.rademacher(schedule.derive(KEY, "imv", r), 0, 5)
        with torch.no_grad():
            model.theta.copy_(theta + radius * z / math.sqrt(5))
        up = model.loss() - base
        with torch.no_grad():
            model.theta.copy_(theta + (radius - 8.0 * 2.0**-14) * z / math.sqrt(5))
        below = model.loss() - base
        assert up >= 0.05 > below
    assert len(set(result.radii)) == 3


def test_flat_directions_cap_at_max_radius():
    """A loss that never rises reports max_radius for every direction (IMV = 1 / max_radius), after
    exactly 11 doublings per direction (rho_0 = max_radius / 2^10) and no bisection."""
    # Prepare
    model = Quadratic(torch.zeros(4))

    # Execute
    result = _probe(model, lambda m: m.loss(), num_directions=2, max_radius=5.0)

    # Assert
    assert result.radii == [5.0, 5.0] and result.num_capped == 2
    assert result.imv == pytest.approx(0.2)
    assert result.num_loss_evals == 1 + 2 * 11


# ---- per-filter normalisation (Li et al. 2018) ---------------------------------------------------------


class RowQuadratic(nn.Module):
    """L = c/2 ||W - W0||^2 + c/2 ||b - b0||^2 at W = W0 = [[3, 0, 4], [0, 0, 0]], b = b0 = (1, 2)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]]))
        self.bias = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.register_buffer("w0", self.weight.detach().clone())
        self.register_buffer("b0", self.bias.detach().clone())
        self.c = c

    def loss(self) -> float:
        dw, db = self.weight.detach() - self.w0, self.bias.detach() - self.b0
        return float(0.5 * self.c * (dw.pow(2).sum() + db.pow(2).sum()))


def test_filter_direction_has_each_rows_norm_by_hand():
    """Row 0 has norm 5 over 3 entries, so d[0] = 5 z[0] / sqrt(3) (norm 5); row 1 is zero and the bias is
    1-D, so neither moves. rise(rho) = c/2 rho^2 25, hence radius = sqrt(2 delta / (25 c)) = 0.0632... for
    c = 2, delta = 0.1 (to the bisection tolerance), and the probe moves D = 3 parameters."""
    # Prepare
    model = RowQuadratic(2.0)
    edge = math.sqrt(2 * 0.1 / (25 * 2.0))

    # Execute
    result = _probe(model, lambda m: m.loss(), normalize="filter", max_radius=1.0, bisect_steps=14)

    # Assert
    assert result.normalize == "filter" and result.numel == 3
    for radius in result.radii:
        assert edge <= radius <= edge + 2.0**-14
    assert len(set(result.radii)) == 1  # every direction has the same norm per row here


class Normalised(nn.Module):
    """A loss that sees each row of W only through its direction (as a layer followed by RMSNorm does)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.register_buffer("target", weight / weight.norm(dim=1, keepdim=True))

    def loss(self) -> float:
        w = self.weight.detach()
        return float((w / w.norm(dim=1, keepdim=True) - self.target).pow(2).sum())


def test_filter_radius_ignores_row_rescaling_that_global_radius_does_not():
    """Two models with the same loss landscape up to a rescaling of W's rows (x10 and x0.1): the filter
    probe finds the same radii, the global probe radii that differ by more than 5x. So filter radii compare
    across models whose weight scales differ; global radii do not."""
    # Prepare
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2, 6, generator=gen)
    scaled = w * torch.tensor([[10.0], [0.1]])
    a, b = Normalised(w), Normalised(scaled)
    kw = {"delta": 0.05, "bisect_steps": 14, "num_directions": 4}

    # Execute
    fa = _probe(a, lambda m: m.loss(), normalize="filter", max_radius=4.0, **kw)
    fb = _probe(b, lambda m: m.loss(), normalize="filter", max_radius=4.0, **kw)
    ga = _probe(a, lambda m: m.loss(), max_radius=256.0, **kw)
    gb = _probe(b, lambda m: m.loss(), max_radius=256.0, **kw)

    # Assert
    assert fa.num_capped == fb.num_capped == 0
    assert fa.radii == pytest.approx(fb.radii, rel=1e-3)
    assert max(gb.mean_radius / ga.mean_radius, ga.mean_radius / gb.mean_radius) > 5


def test_filter_probe_refuses_a_model_it_cannot_move():
    """Only 1-D tensors (or all-zero rows, as LoRA's B at initialisation) give a zero direction: a clear
    error that names the way out, not a meaningless capped radius."""
    with pytest.raises(ValueError, match="imv.normalize = 'global'"):
        _probe(Quadratic(torch.ones(4)), lambda m: m.loss(), normalize="filter")
    with pytest.raises(ValueError, match="normalize"):
        _probe(Quadratic(torch.ones(4)), lambda m: m.loss(), normalize="layer")
    assert cfgmod.ImvSection().radius_limit == 1.0 and cfgmod.ImvSection(normalize="global").radius_limit == 64.0
    assert cfgmod.ImvSection(max_radius=3.0).radius_limit == 3.0


@pytest.mark.parametrize(("dtype", "normalize"), [("float32", "global"), ("bfloat16", "global"), ("float32", "filter")])
def test_probe_restores_the_model_exactly_and_leaves_global_rng_alone(dtype, normalize):
    """After a probe of the tiny model (which moves its weights by up to max_radius) the full-model
    sha256, every module's train/eval mode, requires_grad and torch's global RNG state are as before;
    the same key gives the same radii again."""
    # Prepare
    cfg = cfgmod.from_run_config(tiny_flat(**{"model.dtype": dtype, "algorithm": "kavg"}))  # spsa needs fp32
    model, tok = load_model(cfg.model, seed=0)
    model.train()
    from edgetune.data.sources import heldout_examples

    loss_fn = heldout_loss_fn(tok, heldout_examples(cfg, 2)[:4], batch_size=4, max_length=48)
    before = model_sha256(model)
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    rng = torch.random.get_rng_state()

    # Execute
    limit = 64.0 if normalize == "global" else 1.0
    first = _probe(model, loss_fn, num_directions=2, delta=0.05, max_radius=limit, bisect_steps=3, normalize=normalize)
    second = _probe(model, loss_fn, num_directions=2, delta=0.05, max_radius=limit, bisect_steps=3, normalize=normalize)

    # Assert
    assert model_sha256(model) == before
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert first.radii == second.radii and first.base_loss == second.base_loss
    matrices = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dim() >= 2)
    everything = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert first.numel == (everything if normalize == "global" else matrices)
    assert 0 < first.mean_radius <= limit  # an untrained model may not rise by delta within 1x its rows


def test_probe_restores_after_a_failing_loss():
    """An exception inside the loss function still leaves the weights bitwise as they were."""
    # Prepare
    model = Quadratic(torch.ones(6))
    theta = model.theta.detach().clone()
    calls = []

    def loss_fn(m):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return m.loss()

    # Execute / Assert
    with pytest.raises(RuntimeError, match="boom"):
        _probe(model, loss_fn)
    assert torch.equal(model.theta.detach(), theta)


@pytest.mark.parametrize("algorithm", ["kavg", "spsa"])
def test_probe_between_rounds_does_not_change_the_next_round(tmp_path, algorithm):
    """Two federations with the same run name: one probes the global model after round 1, the other does
    not. Round 2 ends in the same server state hash, the keyed round-2 batches are identical, and the
    global RNG state is what it was before the probe."""
    # Prepare
    cfg = cfgmod.from_run_config(
        tiny_flat(**{"algorithm": algorithm, "kavg.lr": 0.05, "kavg.local_steps": 1, "data.max_length": 64})
    )
    hashes, batches = {}, {}

    # Execute
    for probed in (True, False):
        clear_cache()
        server, transport, recorder, _, tok = inproc.build(cfg, 2, run_dir=tmp_path / str(probed) / "run")
        run_round(cfg, server, transport, recorder, 1)
        if probed:
            from edgetune.data.sources import heldout_examples

            rng = torch.random.get_rng_state()
            sha = model_sha256(server.global_model())
            loss_fn = heldout_loss_fn(tok, heldout_examples(cfg, 2)[:4], batch_size=4, max_length=64)
            _probe(server.global_model(), loss_fn, num_directions=2, delta=0.05, max_radius=16.0, bisect_steps=2)
            assert torch.equal(torch.random.get_rng_state(), rng)
            assert model_sha256(server.global_model()) == sha
        ctx = transport.clients["site-0"].ctx
        batches[probed] = site_batches(ctx, cfg.run.seed, 2, 1, cfg.data.batch_size)[0]["input_ids"]
        run_round(cfg, server, transport, recorder, 2)
        hashes[probed] = server.state_hash()

    # Assert
    assert hashes[True] == hashes[False]
    assert torch.equal(batches[True], batches[False])


def test_checkpoint_imv_reads_the_run_and_returns_a_json_ready_report(tmp_path):
    """checkpoint_imv on a saved kavg checkpoint: probe settings from the run's config with overrides, the
    probe's numbers (imv = 1 / mean radius), and weights_sha256 equal to the checkpoint's own."""
    # Prepare
    clear_cache()
    cfg = cfgmod.from_run_config(
        tiny_flat(**{"algorithm": "kavg", "num_rounds": 1, "kavg.local_steps": 1, "data.max_length": 64})
    )
    server, transport, recorder, evaluate, tok = inproc.build(cfg, 2, run_dir=tmp_path / "run")
    summary = run_federation(cfg, server, transport, recorder, evaluate, tok)
    overrides = {"imv.num_directions": 2, "imv.bisect_steps": 2, "imv.num_examples": 3, "imv.max_radius": 16.0}

    # Execute
    report = checkpoint_imv(summary["checkpoint"], num_sites=2, overrides=overrides)

    # Assert
    from edgetune.evaluation import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-0001", cfg)
    assert report["weights_sha256"] == model_sha256(model)
    assert report["round"] == 1 and report["num_directions"] == 2 and report["num_examples"] == 3
    assert len(report["radii"]) == 2 and report["imv"] == pytest.approx(1 / report["mean_radius"])
    assert report["normalize"] == "filter"  # the default, with the run's max_radius override
    assert report["numel"] == sum(p.numel() for p in server.model.parameters() if p.dim() >= 2)
    json.dumps(report)
    assert set(imv_metrics(_probe(Quadratic(torch.ones(2)), lambda m: m.loss()))) == {
        "imv",
        "imv_radius",
        "imv_base_loss",
        "imv_capped",
    }
