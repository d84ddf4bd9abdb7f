"""run.sites_per_round: a keyed sample of sites per round, the same on a retry or a resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.federation import RoundFailed, run_round, sample_sites

SITES = [f"site-{i}" for i in range(16)]


def _cfg(**overrides):
    return cfgmod.from_run_config(tiny_flat(**overrides))


@pytest.mark.parametrize(
    ("spr", "min_sites", "expected"), [(0.25, 1, 4), (0.3, 1, 5), (3, 1, 3), (0.1, 5, 5), (40, 1, 16)]
)
def test_sample_size(spr, min_sites, expected):
    cfg = _cfg(**{"run.sites_per_round": spr, "run.min_sites": min_sites})
    picked = sample_sites(cfg, 1, SITES)
    assert len(picked) == expected == len(set(picked))
    assert set(picked) <= set(SITES)


def test_zero_asks_every_site_in_order():
    assert sample_sites(_cfg(), 7, SITES[::-1]) == SITES[::-1]


def test_sample_is_keyed_not_global_rng():
    cfg = _cfg(**{"run.sites_per_round": 0.25})
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state().clone())
    first = [sample_sites(cfg, r, SITES) for r in range(1, 11)]
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])
    # a restarted server (a new config object, sites listed in another order) asks the same sites
    again = _cfg(**{"run.sites_per_round": 0.25})
    assert [sorted(sample_sites(again, r, SITES[::-1])) for r in range(1, 11)] == [sorted(p) for p in first]
    assert len({tuple(p) for p in first}) > 1  # it changes from round to round
    other_seed = _cfg(**{"run.sites_per_round": 0.25, "run.seed": 1})
    assert [sample_sites(other_seed, r, SITES) for r in range(1, 11)] != first


@pytest.mark.parametrize("bad", [-1, 1.5, float("nan"), 2.5])
def test_bad_sites_per_round_is_refused(bad):
    with pytest.raises(ValueError, match="run.sites_per_round"):
        _cfg(**{"run.sites_per_round": bad})


def test_federation_asks_only_the_sampled_sites(tmp_path):
    cfg = _cfg(**{"run.sites_per_round": 0.5, "num_rounds": 3})
    server, transport, recorder, *_ = inproc.build(cfg, 4, run_dir=tmp_path / "run")
    asked = []
    exchange = transport.exchange

    def spy(round_idx, phase, blobs, **kw):
        asked.append(sorted(blobs))
        return exchange(round_idx, phase, blobs, **kw)

    transport.exchange = spy
    for r in (1, 2, 3):
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, r)
        assert not rejected and metrics["num_accepted"] == 2
        assert asked[-1] == sorted(sample_sites(cfg, r, transport.sites()))


def test_a_quorum_larger_than_the_sites_is_refused_with_the_numbers(tmp_path):
    """run.min_sites above the sites there are can never commit: the config (num_sites), an in-process
    run (its site count) and a round whose connected sites fell below the quorum each say so, with
    the two numbers, instead of "no site answered" after three attempts."""
    with pytest.raises(ValueError, match="run.min_sites = 3 is more than run.num_sites = 2"):
        _cfg(**{"run.num_sites": 2, "run.min_sites": 3})
    cfg = _cfg(**{"run.min_sites": 3, "num_rounds": 1})
    with pytest.raises(ValueError, match="run.min_sites = 3 is more than the 2 sites simulated here"):
        inproc.build(cfg, 2, run_dir=tmp_path / "a")
    server, transport, recorder, *_ = inproc.build(cfg, 3, run_dir=tmp_path / "b")
    transport.clients.pop(next(iter(transport.clients)))  # a site left before the round
    with pytest.raises(RoundFailed, match="2 sites are connected, fewer than run.min_sites = 3"):
        run_round(cfg, server, transport, recorder, 1)
