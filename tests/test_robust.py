"""One bad site among eight: robust aggregation keeps every aggregated value in the honest range."""

from __future__ import annotations

import numpy as np
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms.weights import aggregate_tensors
from edgetune.comm import wire
from edgetune.crypto import envelope
from edgetune.crypto.guardfile import ReplayGuard
from edgetune.federation import run_federation

NUM_SITES = 8
EVIL = "site-5"


class MaxMagnitude:
    """A site that answers every probe with the largest code (+127 or -127, alternating)."""

    def __init__(self, honest, nan: bool = False) -> None:
        self.honest, self.ctx, self.nan = honest, honest.ctx, nan

    def step(self, phase, msg, state):
        reply, state = self.honest.step(phase, msg, state)  # stays in sync, then lies
        opened, _ = envelope.open_envelope(
            msg["env"], self.ctx.site_keys, run_id=msg["run"], guard=ReplayGuard(), now=0.0
        )
        inner = wire.decode(
            envelope.open_reply(
                opened.reply_key,
                run_id=msg["run"],
                round_idx=opened.round_idx,
                site_id=self.ctx.site_id,
                blob=reply["blob"],
                max_bytes=4096,
            ),
            max_bytes=4096,
        )
        n = len(inner["codes"])
        codes = np.full(n, np.nan).tobytes() if self.nan else np.array([127, -127] * n, np.int8)[:n].tobytes()
        forged = wire.encode({**inner, "codes": codes})
        blob = envelope.seal_reply(
            opened.reply_key, run_id=msg["run"], round_idx=opened.round_idx, site_id=self.ctx.site_id, payload=forged
        )
        return {"blob": blob}, state


def _run(tmp_path, name, attacker=None):
    """Run four rounds; also return, per round, the (key, coefficient) terms the server applied to its model."""
    flat = tiny_flat(
        **{
            "num_rounds": 4,
            "spsa.directions": "shared",
            "spsa.aggregator": "trimmed",
            "spsa.trim_frac": 0.25,
            "spsa.lr": 3e-3,
            "spsa.num_steps": 2,
            "data.demo_facts": 2,
            "run.min_sites": 6,
        }
    )
    cfg = cfgmod.from_run_config(flat)
    server, transport, recorder, evaluate, tok = inproc.build(cfg, NUM_SITES, run_dir=tmp_path / name / "run")
    if attacker is not None:
        transport.clients[EVIL] = attacker(transport.clients[EVIL])
    applied: dict[int, list[tuple[bytes, float]]] = {}
    apply_terms = server.replica.apply_terms

    def spy(round_idx, terms):
        applied.setdefault(round_idx, list(terms))
        return apply_terms(round_idx, terms)

    server.replica.apply_terms = spy
    summary = run_federation(cfg, server, transport, recorder, evaluate, tok)
    return server, summary, applied


def _norm_bounded(decoded: dict[str, np.ndarray], mult: float = 2.0) -> dict[str, np.ndarray]:
    """Each site's scalars scaled to at most ``mult`` x the lower median of the sites' L2 norms."""
    norms = {s: float(np.linalg.norm(np.asarray(g, dtype=np.float64))) for s, g in decoded.items()}
    bound = mult * sorted(norms.values())[(len(norms) - 1) // 2]
    return {s: g * (bound / norms[s]) if norms[s] > bound else g for s, g in decoded.items()}


def test_max_magnitude_site_stays_inside_honest_range_and_loss_within_5pct(tmp_path):
    """Shared directions + trimmed mean: with site-5 sending +-127 on every probe, every coefficient the
    server applied to its model in every round lies within [min, max] of the seven honest sites' values and
    is the mean of the middle four of eight (not the plain mean), and the final held-out loss is within 5% of
    a clean eight-site run. The sites' values are taken after the per-site norm bound (issue 13: a site's
    scalar vector is scaled to at most 2x the lower-median site norm), recomputed here with numpy."""
    _, clean, _ = _run(tmp_path, "clean")
    server, attacked, applied = _run(tmp_path, "attacked", MaxMagnitude)
    assert sorted(applied) == sorted(server.log) == [1, 2, 3, 4]
    for r, entry in server.log.items():
        assert EVIL in entry.sites and len(entry.sites) == NUM_SITES  # the lie was well-formed: aggregated
        assert (entry.normalizer, entry.seed_pool) == ("mean", 0)  # one term per (step, probe): lr * g / P
        decoded = _norm_bounded(entry.decoded())
        honest = np.stack([decoded[s] for s in entry.sites if s != EVIL])
        got = np.array([c for _, c in applied[r]]) * entry.num_probes / entry.lr
        assert got.shape == (entry.num_steps * entry.num_probes,)
        tol = 1e-6 * np.abs(honest).max(axis=0) + 1e-12  # the terms are fp32
        assert np.all(got >= honest.min(axis=0) - tol) and np.all(got <= honest.max(axis=0) + tol), r
        everyone = np.sort(np.stack([decoded[s] for s in entry.sites]), axis=0)
        assert np.allclose(got, everyone[2:-2].mean(axis=0), rtol=1e-6, atol=1e-12), r  # 2 of 8 cut per side
        assert np.any(np.abs(got - everyone.mean(axis=0)) > tol), r  # not what a plain mean would apply
    assert abs(attacked["heldout_loss_last"] - clean["heldout_loss_last"]) <= 0.05 * clean["heldout_loss_last"]
    assert attacked["heldout_loss_last"] < attacked["heldout_loss_first"]


def test_nan_scalars_are_rejected_not_aggregated(tmp_path):
    """NaN cannot be sent as a one-byte code; a site sending float NaN bytes instead is rejected
    every round and the others carry the run."""
    server, summary, _ = _run(tmp_path, "nan", lambda honest: MaxMagnitude(honest, nan=True))
    assert all(EVIL not in e.sites and len(e.sites) == NUM_SITES - 1 for e in server.log.values())
    assert np.isfinite(summary["heldout_loss_last"])


def test_factor_median_stays_inside_honest_range():
    """Coordinate-wise median over eight sites' updates, one at +-1e3: inside the honest range."""
    gen = torch.Generator().manual_seed(0)
    honest = [[torch.randn(64, generator=gen) * 0.01] for _ in range(NUM_SITES - 1)]
    evil = [torch.where(torch.arange(64) % 2 == 0, 1e3, -1e3)]
    (agg,) = aggregate_tensors([*honest, evil], [1.0] * NUM_SITES, "median", 0.0)
    stacked = torch.stack([h[0] for h in honest])
    assert bool((agg >= stacked.min(0).values).all()) and bool((agg <= stacked.max(0).values).all())
