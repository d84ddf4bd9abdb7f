"""Weight algorithms are bounded in small federations: an adaptive clip by default, a checked aggregate,
no trimmed mean that trims nothing, and no absurd reported loss (issue 13, item 5 and the 1e308 loss)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_flat

from benchmarks.byzantine import WeightsAttacker
from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms.weights import norm, select
from edgetune.comm import wire
from edgetune.comm.tensors import decode_tensors
from edgetune.federation import run_federation
from edgetune.models.params import trainable_tensors


class Recording:
    """An honest site that remembers the norm of the update it sent."""

    def __init__(self, honest) -> None:
        self.honest, self.ctx, self.norms = honest, honest.ctx, []

    def step(self, phase, msg, state):
        reply, state = self.honest.step(phase, msg, state)
        plan = wire.decode(msg["plan"], max_bytes=4096)
        shapes = [self.honest.shapes[i] for i in select(self.honest.manifest, plan["train"])]
        self.norms.append(norm(decode_tensors(reply["delta"], shapes, plan["up"], where="delta")))
        return reply, state


class LossLiar:
    """An honest site that reports a training loss of 1e308."""

    def __init__(self, honest) -> None:
        self.honest, self.ctx = honest, honest.ctx

    def step(self, phase, msg, state):
        reply, state = self.honest.step(phase, msg, state)
        return {**reply, "loss": 1e308}, state


def _build(tmp_path, rounds=1, sites=2, **extra):
    flat = tiny_flat(
        **{
            "algorithm": "kavg",
            "num_rounds": rounds,
            "kavg.lr": 0.1,
            "kavg.local_steps": 2,
            "data.demo_facts": 2,
            "eval.num_examples": 2,
            **extra,
        }
    )
    cfg = cfgmod.from_run_config(flat)
    return cfg, inproc.build(cfg, sites, run_dir=tmp_path / "run")


def _params(server):
    return [t.detach().clone().double() for t in trainable_tensors(server.model, server.manifest)]


def test_two_sites_a_1e6_scaled_update_moves_the_model_at_most_as_the_clip_allows(tmp_path):
    """Two sites, site-1 sends its update x1e6 (there is no third site for the outlier screen): the default
    adaptive clip holds it to 2x the honest site's norm, so the averaged step is at most 1.5x the honest
    update's norm (without the clip it was about 5e5x)."""
    # Prepare
    cfg, (server, transport, recorder, evaluate, tok) = _build(tmp_path)
    honest = transport.clients["site-0"] = Recording(transport.clients["site-0"])
    transport.clients["site-1"] = WeightsAttacker(transport.clients["site-1"], "scaled")
    before = _params(server)

    # Execute
    summary = run_federation(cfg, server, transport, recorder, evaluate, tok)

    # Assert
    step = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(_params(server), before)))
    assert step <= 1.5 * honest.norms[0] * (1 + 1e-5), (step, honest.norms[0])
    assert recorder.rows[1]["num_clipped"] == 1.0 and recorder.rows[1]["num_accepted"] == 2.0
    assert math.isfinite(summary["heldout_loss_last"])


@pytest.mark.parametrize("clip_mult", [2.0, 0.0])
def test_an_update_near_flt_max_never_makes_the_weights_inf(tmp_path, clip_mult):
    """A site sending +-3e38 in every value: with the default clip it is scaled down; with the clip off, the
    aggregate (1.5e38: finite in fp32, but far beyond what the other site's update allows) is refused, the site
    left out, and the round commits with the other site. Either way every weight stays finite and all three
    rounds commit."""
    cfg, (server, transport, recorder, evaluate, tok) = _build(tmp_path, rounds=3, **{"kavg.clip_mult": clip_mult})
    transport.clients["site-1"] = WeightsAttacker(transport.clients["site-1"], "max")
    summary = run_federation(cfg, server, transport, recorder, evaluate, tok)
    assert summary["rounds_completed"] == 3
    assert all(bool(torch.isfinite(p).all()) for p in server.params)
    assert math.isfinite(summary["heldout_loss_last"])
    if clip_mult == 0.0:
        rounds = recorder.rows[1:]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert all("left out of the aggregate" in r["rejected"]["site-1"] for r in rounds)


def test_a_reported_loss_of_1e308_is_refused_not_averaged_to_inf(tmp_path):
    """A site reporting a training loss of 1e308: its reply is refused with the reason, the round goes on,
    and train_loss stays finite."""
    cfg, (server, transport, recorder, evaluate, tok) = _build(tmp_path)
    transport.clients["site-1"] = LossLiar(transport.clients["site-1"])
    run_federation(cfg, server, transport, recorder, evaluate, tok)
    row = recorder.rows[1]
    assert math.isfinite(row["train_loss"]) and row["num_accepted"] == 1.0
    assert "training loss of 1e+308" in row["rejected"]["site-1"]


@pytest.mark.parametrize("section", ["spsa", "kavg"])
def test_a_trimmed_mean_that_trims_nothing_is_refused(section):
    """4 sites and trim_frac 0.125 trims floor(0.5) = 0 sites: a mean under another name, refused with what to
    change. With min_sites 8 (or trim_frac 0.25 and 4 sites) one site per side is trimmed: accepted."""
    algorithm = {"algorithm": "spsa", "spsa.directions": "shared"} if section == "spsa" else {"algorithm": "kavg"}
    flat = {**algorithm, f"{section}.aggregator": "trimmed", f"{section}.trim_frac": 0.125, "run.min_sites": 4}
    with pytest.raises(ValueError, match=f"{section}.aggregator = 'trimmed' .* trims nothing"):
        cfgmod.from_run_config(flat)
    cfgmod.from_run_config({**flat, "run.min_sites": 8})
    cfgmod.from_run_config({**flat, f"{section}.trim_frac": 0.25})
