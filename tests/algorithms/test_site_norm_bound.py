"""spsa's per-site norm bound (``log.site_norm_factors``): a site's scalar vector is scaled down to at most
``SITE_NORM_MULT`` x the lower median of the round's site norms, from the committed codes only, so every
replica applies it bitwise the same and no byte is added on the wire."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from conftest import RewriteCodes, tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import spsa
from edgetune.algorithms.spsa import log as spsalog
from edgetune.federation import run_round

MULT = spsalog.SITE_NORM_MULT


def _entry(codes_by_site: dict[str, list[int]], scale: float = 2.0, k: int = 2, p: int = 2) -> spsa.LogEntry:
    sites = tuple(sorted(codes_by_site))
    codes = b"".join(np.array(codes_by_site[s], dtype=np.int8).tobytes() for s in sites)
    return spsa.LogEntry(1, sites, codes, 0.5, scale, k, p, "per-site", 0, "int8-sr", "mean", 0.0)


def test_a_site_above_the_bound_is_scaled_to_it_and_the_others_are_untouched():
    """Norms 1, 2, 3 and 100: the bound is MULT x 2 (the lower median); the 100 is scaled to exactly the bound,
    the others (below it) keep factor 1.0."""
    decoded = {
        "a": np.array([1.0, 0.0]),
        "b": np.array([0.0, -2.0]),
        "c": np.array([3.0, 0.0]),
        "evil": np.array([60.0, -80.0]),
    }
    factors = spsalog.site_norm_factors(decoded)
    bound = MULT * 2.0
    assert factors["a"] == factors["b"] == 1.0
    assert factors["c"] == (1.0 if 3.0 <= bound else bound / 3.0)
    assert factors["evil"] == bound / 100.0
    assert math.isclose(spsalog.site_norm(decoded["evil"] * factors["evil"]), bound, rel_tol=1e-15)


@pytest.mark.parametrize("seed", range(20))
def test_the_bound_follows_the_honest_sites_whatever_a_minority_sends(seed):
    """n sites, f < n/2 of them sending anything (zeros, huge, tiny): the bound lies within MULT x the honest
    norms' range, so no liar's scaled vector is longer than MULT x the longest honest one."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    f = int(rng.integers(1, (n + 1) // 2))
    honest = {f"h{i}": rng.normal(size=6) * rng.uniform(0.1, 3) for i in range(n - f)}
    liars = {f"x{i}": rng.choice([0.0, 1e-9, 1e6]) * np.sign(rng.normal(size=6)) for i in range(f)}
    factors = spsalog.site_norm_factors({**honest, **liars})
    norms = [spsalog.site_norm(g) for g in honest.values()]
    scaled = {s: spsalog.site_norm(g * factors[s]) for s, g in {**honest, **liars}.items()}
    assert all(v <= MULT * max(norms) * (1 + 1e-12) for v in scaled.values())
    assert all(0 < factors[s] <= 1.0 for s in honest)


def test_factors_do_not_depend_on_site_order_or_on_a_round_trip_through_the_log():
    """The same scalars in any site order give the same factors, bit for bit; a log entry encoded and decoded
    (as a site receives it) replays to the same terms."""
    rng = random.Random(0)
    codes = {f"site-{i}": [rng.randint(-40, 40) for _ in range(4)] for i in range(5)}
    codes["site-9"] = [127, -127, 127, -127]
    entry = _entry(codes)
    decoded = entry.decoded()
    reference = spsalog.site_norm_factors(decoded)
    for _ in range(5):
        order = list(decoded)
        rng.shuffle(order)
        assert spsalog.site_norm_factors({s: decoded[s] for s in order}) == reference
    assert reference["site-9"] < 1.0
    again = spsa.decode_log(spsa.encode_log([entry]))[0]
    secret, run_id = bytes(range(32)), b"r" * 16
    assert spsa.replay_terms(again, secret, run_id) == spsa.replay_terms(entry, secret, run_id)


def test_replay_applies_the_bound_to_the_long_site_only():
    """unit_contributions: an honest site's terms are g / D as decoded; the max-code site's terms are its codes
    scaled by its factor, so their norm times D is the bound."""
    entry = _entry({"a": [10, -20, 5, 0], "b": [-15, 8, 12, 3], "c": [7, 7, -30, 1], "z": [127, -127, 127, -127]})
    decoded = entry.decoded()
    denom = len(entry.sites) * entry.num_probes
    units = spsalog.unit_contributions(entry)
    by_site = {s: np.array([u for who, _, _, u in units if who == s]) for s in entry.sites}
    for s in "abc":
        assert np.array_equal(by_site[s], decoded[s] / denom)
    bound = MULT * spsalog.lower_median([spsalog.site_norm(g) for g in decoded.values()])
    assert spsalog.site_norm(decoded["z"]) > bound
    assert math.isclose(spsalog.site_norm(by_site["z"] * denom), bound, rel_tol=1e-12)


def _max_codes(codes: bytes) -> bytes:
    """+-127 on every probe (int8-sr's largest codes)."""
    n = len(codes)
    return np.array([127, -127] * n, np.int8)[:n].tobytes()


@pytest.mark.parametrize("pool", [False, True], ids=["fresh-directions", "run-pool-momentum"])
def test_replicas_agree_bitwise_when_the_bound_scales_a_site(tmp_path, pool):
    """Four sites, each with its own model copy, one sending max codes: the bound scales that site in most rounds
    (counted in the round's metrics), and every site's replica, replaying the log itself, equals the server's
    state bitwise after each round (fresh directions, and a run-scope pool with momentum)."""
    overrides = {"spsa.num_probes": 4, "num_rounds": 3}
    if pool:
        overrides.update({"spsa.seed_pool": 8, "spsa.pool_scope": "run", "spsa.optimizer": "momentum"})
    cfg = cfgmod.from_run_config(tiny_flat(**overrides))
    server, transport, recorder, *_ = inproc.build(cfg, 4, run_dir=tmp_path / f"bound-{pool}", separate_replicas=True)
    transport.clients["site-3"] = RewriteCodes(transport.clients["site-3"], _max_codes)
    scaled = 0
    for r in range(1, 4):
        before = server.state_hash()
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, r)
        assert not rejected and metrics["num_accepted"] == 4
        factors = spsalog.site_norm_factors(server.log[r].decoded())
        assert factors["site-3"] == metrics["norm_bound_min_factor"]
        assert metrics["norm_bounded_sites"] == sum(f < 1.0 for f in factors.values())
        scaled += factors["site-3"] < 1.0
        for c in transport.clients.values():
            rep = spsa.replica_for(
                c.ctx.model, server.run_id, c.ctx.workdir, "auto", c.ctx.replica_namespace, server.space
            )
            assert (rep.applied, rep.hash) == (r - 1, before)
    for c in transport.clients.values():  # the last round, replayed by each site from the log
        rep = spsa.replica_for(c.ctx.model, server.run_id, c.ctx.workdir, "auto", c.ctx.replica_namespace, server.space)
        rep.sync([server.log[3]], [server.secrets[3]])
        assert (rep.applied, rep.hash) == (3, server.state_hash())
    assert scaled >= 2  # the bound did scale the liar (not every round: honest norms vary with 8 scalars)
