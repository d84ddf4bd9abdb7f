"""benchmarks/head_space.py on synthetic cached features (the real ones need SmolLM2 and minutes): the
first-order probe learns a separable problem, the zeroth-order simulation improves on it with the same
curve for the same seed and another for another seed, and padded candidates never win."""

from __future__ import annotations

import torch

from benchmarks import head_space as hs


def _split(n: int, seed: int, rows: int = 4, dim: int = 8, candidates: int = 3) -> hs.Split:
    """n examples whose right candidate's label row is the one their feature points at; the base scores
    are uninformative (zero) and the last candidate of every example is padding (-inf)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(rows, dim) * 3.0
    label_rows = torch.stack([torch.randperm(rows, generator=gen)[: candidates - 1] for _ in range(n)])
    target = torch.randint(0, candidates - 1, (n,), generator=gen)
    h = centres[label_rows[torch.arange(n), target]] + 0.3 * torch.randn(n, dim, generator=gen)
    s0 = torch.zeros(n, candidates)
    s0[:, -1] = float("-inf")
    label_rows = torch.cat([label_rows, torch.zeros(n, 1, dtype=torch.long)], 1)
    return h, s0, label_rows, target


def test_first_order_learns_the_separable_probe_and_padding_never_wins():
    sites, held = [_split(40, s) for s in range(3)], _split(60, 9)
    curve = hs.first_order(sites, held, 4, lr=0.1, steps=60, every=20)
    assert [p["step"] for p in curve] == [0, 20, 40, 60]
    assert curve[0]["accuracy"] <= 0.6 and curve[-1]["accuracy"] >= 0.95
    assert curve[-1]["choice_loss"] < curve[0]["choice_loss"]
    assert hs.scores(torch.randn(4, 8), held)[:, -1].eq(float("-inf")).all()


def test_zeroth_order_improves_and_its_curve_is_a_function_of_the_seed():
    sites, held = [_split(40, s) for s in range(3)], _split(60, 9)
    kw = dict(rounds=4, local_steps=20, probes=4, lr=0.05, eps=1e-3)
    a = hs.zeroth_order(sites, held, 4, seed=0, **kw)
    assert a == hs.zeroth_order(sites, held, 4, seed=0, **kw)  # every draw keyed by (seed, round, site)
    assert a != hs.zeroth_order(sites, held, 4, seed=1, **kw)
    assert len(a) == 5 and a[-1]["choice_loss"] < a[0]["choice_loss"] and a[-1]["accuracy"] > a[0]["accuracy"]


def test_zeroth_order_with_a_codec_probes_the_same_directions_and_sign_codes_still_learn():
    """With int8-sr the curve stays close to the exact one (same directions, quantised scalars), with one-bit
    sign codes it still improves; a magnitude byte per round (sign:20 = the whole round) is no longer the same
    run, and an unknown codec is refused."""
    sites, held = [_split(40, s) for s in range(3)], _split(60, 9)
    kw = dict(rounds=4, local_steps=20, probes=4, lr=0.05, eps=1e-3, seed=0)
    exact = hs.zeroth_order(sites, held, 4, **kw)
    int8 = hs.zeroth_order(sites, held, 4, codec="int8-sr", **kw)
    sign = hs.zeroth_order(sites, held, 4, codec="sign:2", **kw)
    assert int8 != exact and abs(int8[-1]["choice_loss"] - exact[-1]["choice_loss"]) < 0.1 * exact[0]["choice_loss"]
    assert sign[-1]["choice_loss"] < sign[0]["choice_loss"] and sign[-1]["accuracy"] > sign[0]["accuracy"]
    assert hs.zeroth_order(sites, held, 4, codec="sign:20", **kw) != sign
    import pytest

    with pytest.raises(ValueError, match="scalar codec"):
        hs.zeroth_order(sites, held, 4, codec="fp4", **kw)
