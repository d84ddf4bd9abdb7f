"""spsa: bitwise-identical replicas, byte counts, bad replies, catch-up, convergence."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import spsa
from edgetune.comm import wire
from edgetune.comm.codecs import codec_for
from edgetune.crypto import envelope, schedule
from edgetune.crypto.guardfile import ReplayGuard
from edgetune.federation import run_federation, run_round


def _cfg(**overrides):
    return cfgmod.from_run_config(tiny_flat(**overrides))


def _federation(tmp_path, cfg, num_sites=4, *, name="", separate=False):
    """An in-process federation; the run name (hence run id) is unique per test unless given."""
    run_dir = tmp_path / (name or f"run-{tmp_path.name}")
    server, transport, recorder, evaluate, tokenizer = inproc.build(
        cfg, num_sites, run_dir=run_dir, separate_replicas=separate
    )
    return server, transport, recorder, evaluate, tokenizer


def _open_secret(client, msg):
    opened, _ = envelope.open_envelope(
        msg["env"], client.ctx.site_keys, run_id=msg["run"], guard=ReplayGuard(), now=0.0
    )
    return opened


class ForgedSite:
    """A site that answers with a payload of its own making (a faulty or malicious site)."""

    def __init__(self, honest, make_reply):
        self.honest = honest
        self.make_reply = make_reply
        self.ctx = honest.ctx

    def step(self, phase, msg, state):
        return self.make_reply(self.honest, msg), state


def _sealed(inner):
    def make(client, msg):
        opened = _open_secret(client, msg)
        blob = envelope.seal_reply(
            opened.reply_key,
            run_id=msg["run"],
            round_idx=opened.round_idx,
            site_id=client.ctx.site_id,
            payload=wire.encode(inner(opened)),
        )
        return {"blob": blob}

    return make


def test_site_replicas_match_server_bitwise(tmp_path):
    """With every site holding its own model copy, each site's replica equals the server's state
    (full sha256 of the fp32 masters) after replaying every round."""
    cfg = _cfg()
    server, transport, recorder, evaluate, tok = _federation(tmp_path, cfg, 3, separate=True)
    for r in range(1, 4):
        server_hash_before = server.state_hash()
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, r)
        assert not rejected and metrics["num_accepted"] == 3
        for c in transport.clients.values():
            rep = spsa.replica_for(c.ctx.model, server.run_id, c.ctx.workdir, "auto", c.ctx.replica_namespace)
            assert rep is not server.replica
            assert (rep.applied, rep.hash) == (r - 1, server_hash_before)
    assert server.replica.applied == 3


def test_uplink_is_k_times_p_plus_fixed_framing(tmp_path):
    """Each site's uplink payload is exactly K*P bytes of scalars plus a fixed framing of at most
    128 bytes (88 bytes below 40 scalars)."""
    assert spsa.reply_overhead_bytes(4) == 88 and spsa.reply_overhead_bytes(200) <= 128
    for k_steps, n_probes in ((1, 1), (2, 3), (1, 41)):
        overhead = spsa.reply_overhead_bytes(k_steps * n_probes)
        cfg = _cfg(**{"spsa.num_steps": k_steps, "spsa.num_probes": n_probes, "num_rounds": 1})
        server, transport, recorder, *_ = _federation(tmp_path, cfg, 2, name=f"r{k_steps}{n_probes}")
        run_round(cfg, server, transport, recorder, 1)
        ups = recorder.ledger.per_site(round_idx=1, direction="up")
        assert ups == {"site-0": k_steps * n_probes + overhead, "site-1": k_steps * n_probes + overhead}


def test_replay_terms_canonical_and_fp32():
    """Coefficients are fp32 values of lr*g/(N*P) in (site, step, probe) order."""
    entry = spsa.LogEntry(
        5, ("a", "b"), bytes([127, 1, 0, 0x81]), 0.5, 2.0, 2, 1, "per-site", 0, "int8-sr", "mean", 0.0
    )
    secret = bytes(32)
    terms = spsa.replay_terms(entry, secret, b"r" * 16)
    expected_g = [2.0, 2.0 / 127, 0.0, -127 * 2.0 / 127]
    assert [c for _, c in terms] == [float(np.float32(0.5 * g / 2)) for g in expected_g]
    keys = [spsa.probe_key(secret, b"r" * 16, 5, s, k, 0, "per-site", 0) for s in "ab" for k in range(2)]
    assert [k for k, _ in terms] == keys and len(set(keys)) == 4


def test_seed_pool_sums_per_seed():
    """With a seed pool of S, replay applies at most S terms however many probes there are."""
    entry = spsa.LogEntry(
        1, tuple(f"s{i}" for i in range(8)), bytes([3] * 8 * 4), 0.1, 1.0, 4, 1, "per-site", 3, "int8-sr", "mean", 0.0
    )
    terms = spsa.replay_terms(entry, bytes(32), b"r" * 16)
    assert 1 <= len(terms) <= 3
    total = sum(c for _, c in terms)
    assert math.isclose(total, 32 * 0.1 * (3 / 127) / 8, rel_tol=1e-6)  # 32 probes, each lr * g / 8 sites


def test_shared_trimmed_mean_stays_within_honest_range():
    """Shared directions + trimmed mean: one site at max magnitude cannot push a coordinate outside
    the honest sites' range."""
    honest = [bytes([10, 250]), bytes([12, 251]), bytes([11, 249])]  # int8: 10,-6 / 12,-5 / 11,-7
    codes = b"".join(honest) + bytes([127, 127])
    entry = spsa.LogEntry(1, ("a", "b", "c", "d"), codes, 1.0, 127.0, 2, 1, "shared", 0, "int8-sr", "trimmed", 0.25)
    coeffs = [c for _, c in spsa.replay_terms(entry, bytes(32), b"r" * 16)]
    assert 10 <= coeffs[0] <= 12 and -7 <= coeffs[1] <= -5


def test_retried_round_resends_identical_envelopes(tmp_path):
    """configure() for the same round twice returns byte-identical payloads (sites would reject a
    second, different envelope for the same round as equivocation)."""
    cfg = _cfg()
    server, transport, *_ = _federation(tmp_path, cfg, 2)
    first = server.configure(1, "train", transport.sites())
    second = server.configure(1, "train", transport.sites())
    assert {s: wire.encode(p) for s, p in first.items()} == {s: wire.encode(p) for s, p in second.items()}


BAD_REPLIES = {
    "short codes": _sealed(lambda o: {"codes": b"\x01", "hash": b"\x00" * 16, "loss": 1.0}),
    "NaN loss": _sealed(lambda o: {"codes": b"\x01\x01", "hash": b"\x00" * 16, "loss": float("nan")}),
    "float64 NaN scalars": _sealed(
        lambda o: {"codes": np.full(2, np.nan).tobytes(), "hash": b"\x00" * 16, "loss": 1.0}
    ),
    "garbage": lambda c, m: {"blob": os.urandom(60)},
    "oversized": lambda c, m: {"blob": b"\x00" * 100_000},
    "extra field": _sealed(lambda o: {"codes": b"\x01\x01", "hash": b"\x00" * 16, "loss": 1.0, "w": 1.0}),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_reply_rejected_and_round_goes_on(tmp_path, case):
    """A bad reply is rejected with a reason; the round commits with the other sites, exactly as if
    the bad site had been offline (same final state hash)."""
    cfg = _cfg(**{"num_rounds": 2, "run.min_sites": 2})
    server, transport, recorder, evaluate, tok = _federation(tmp_path / "bad", cfg, 3, name="same-run")
    transport.clients["site-2"] = ForgedSite(transport.clients["site-2"], BAD_REPLIES[case])
    rejected_all = {}
    for r in (1, 2):
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, r)
        assert metrics["num_accepted"] == 2
        rejected_all.update(rejected)
    assert set(rejected_all) == {"site-2"} and rejected_all["site-2"]

    ref_server, ref_transport, ref_recorder, *_ = _federation(tmp_path / "ref", cfg, 3, name="same-run")
    ref_transport.offline = {"site-2"}
    for r in (1, 2):
        run_round(cfg, ref_server, ref_transport, ref_recorder, r)
    assert server.state_hash() == ref_server.state_hash()


def test_nan_loss_on_site_becomes_error_reply(tmp_path):
    """A site whose loss is NaN does not send a code (NaN cannot be encoded); the server logs why."""
    cfg = _cfg(**{"num_rounds": 1})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 2)

    def nan_reply(client, msg):
        raise ValueError("step 0 probe 0: loss is not finite (nan, nan)")

    transport.clients["site-1"] = ForgedSite(transport.clients["site-1"], nan_reply)
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)
    assert metrics["num_accepted"] == 1 and "not finite" in rejected["site-1"]


def test_quorum_failure_is_retried_then_reported(tmp_path):
    """Without quorum the round is retried and finally stops the run with every site's reason."""
    cfg = _cfg(**{"run.min_sites": 2})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 2)
    transport.offline = {"site-1"}
    with pytest.raises(Exception, match="did not reach quorum.*site-1: no reply"):
        run_round(cfg, server, transport, recorder, 1)
    assert server.replica.applied == 0  # nothing half-applied


def test_site_catches_up_after_missed_rounds(tmp_path):
    """A site away for two rounds replays them from the log (bytes, not weights) and rejoins in sync."""
    cfg = _cfg(**{"num_rounds": 4})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 3, separate=True)
    run_round(cfg, server, transport, recorder, 1)
    transport.offline = {"site-2"}
    run_round(cfg, server, transport, recorder, 2)
    run_round(cfg, server, transport, recorder, 3)
    transport.offline = set()
    down = {}
    payloads = server.configure(4, "train", transport.sites())
    down = {s: len(wire.encode(p)) for s, p in payloads.items()}
    assert down["site-2"] > down["site-0"]  # it gets rounds 1..3 of log, the others only round 3
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 4)
    assert not rejected and metrics["num_accepted"] == 3


def _tamper(rep):
    import torch

    with torch.no_grad():
        rep.work[0].view(-1)[0] += 1e-3
    # local steps reset the work copy from the master, so the drift must be in the master too
    rep.store.begin()
    for i, w in enumerate(rep.work):
        rep.store.write(i, w)
    rep.store.commit()


def test_tampered_site_state_is_detected(tmp_path):
    """A site whose weights drifted (one value changed) is refused: its state hash differs."""
    cfg = _cfg()
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 2, separate=True)
    run_round(cfg, server, transport, recorder, 1)
    run_round(cfg, server, transport, recorder, 2)
    victim = transport.clients["site-1"]
    _tamper(spsa.replica_for(victim.ctx.model, server.run_id, victim.ctx.workdir, "auto", "site-1"))
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 3)
    assert metrics["num_accepted"] == 1 and "expects" in rejected["site-1"]


def test_site_on_a_foreign_lineage_resyncs_from_round_one(tmp_path):
    """While the log still starts at round 1, a drifted site restarts from the base weights, replays
    everything, and is accepted again."""
    cfg = _cfg()
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 2, separate=True)
    transport.offline = {"site-1"}
    run_round(cfg, server, transport, recorder, 1)
    victim = transport.clients["site-1"]
    _tamper(spsa.replica_for(victim.ctx.model, server.run_id, victim.ctx.workdir, "auto", "site-1"))
    transport.offline = set()
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 2)
    assert not rejected and metrics["num_accepted"] == 2


def test_loss_decreases_on_tiny_model(tmp_path):
    """Eight rounds of spsa on the tiny model lower the held-out loss measurably."""
    cfg = _cfg(**{"num_rounds": 8, "spsa.lr": 3e-3, "spsa.num_steps": 4, "data.demo_facts": 4})
    server, transport, recorder, evaluate, tok = _federation(tmp_path, cfg, 4)
    summary = run_federation(cfg, server, transport, recorder, evaluate, tok)
    assert summary["heldout_loss_last"] < summary["heldout_loss_first"] - 0.05
    rows = [json.loads(line) for line in (recorder.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(9))
    assert (recorder.dir / "loss_vs_bytes.png").stat().st_size > 1000


def test_probe_keys_unique_across_sites_steps_probes():
    """Every (site, step, probe) of a round gets its own perturbation key (no reuse)."""
    secret = schedule.derive(schedule.run_key(0), "test", "s")
    keys = {
        spsa.probe_key(secret, b"r" * 16, 3, s, k, p, "per-site", 0)
        for s in ("site-0", "site-1")
        for k in range(4)
        for p in range(3)
    }
    assert len(keys) == 24
    shared = {spsa.probe_key(secret, b"r" * 16, 3, s, 0, 0, "shared", 0) for s in ("site-0", "site-1")}
    assert len(shared) == 1


def test_recipe_files_are_runnable_configs(tmp_path):
    """Every spsa recipe loads and validates as an spsa run; those on the in-memory model run their first
    round in-process with their own settings: every site accepted, its codes (K*P bytes with a one-byte codec)
    plus framing each."""
    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes" / "spsa").glob("*.toml"))
    assert len(recipes) >= 2, "recipes/spsa/ holds no recipes"
    ran = []
    for path in recipes:
        flat = cfgmod.load_recipe(path)
        cfg = cfgmod.from_run_config(flat)
        assert cfg.algorithm == "spsa", path.name
        if cfg.model.path != "tiny":
            continue  # SmolLM2 recipes: validated above, run by the slow integration tests
        sites = cfg.run.num_sites
        server, transport, recorder, *_ = _federation(tmp_path, cfg, sites, name=path.stem)
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)
        kp = codec_for(cfg.spsa.scalar_codec).blob_len(cfg.spsa.num_steps, cfg.spsa.num_probes)
        assert rejected == {} and server.log[1].sites == tuple(f"site-{i}" for i in range(sites)), path.name
        ups = recorder.ledger.per_site(round_idx=1, direction="up")
        assert ups == {f"site-{i}": kp + spsa.reply_overhead_bytes(kp) for i in range(sites)}, path.name
        ran.append(path.name)
    assert ran, "no spsa recipe on the tiny model: nothing was run"


def test_site_in_a_fresh_process_continues_from_its_saved_state(tmp_path):
    """Deployment runs every message in a new process: a site reloads its saved replica (round and
    hash) from its state folder and needs only the last round of log."""
    from edgetune.models import load as loadmod

    cfg = _cfg(**{"num_rounds": 4})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 2, separate=True)
    for r in (1, 2, 3):
        run_round(cfg, server, transport, recorder, r)
    spsa.clear_replicas()  # forget every in-process copy, as a new ClientApp process would
    loadmod.clear_cache()
    from edgetune.build import build_client, keys_dir_for
    from edgetune.crypto.keys import site_kit_dir

    keys = keys_dir_for(cfg, recorder.dir)
    transport.clients = {
        s: build_client(cfg, s, i, 2, site_kit_dir(keys, s), workdir=tmp_path / "w2", namespace=s)
        for i, s in enumerate(["site-0", "site-1"])
    }
    payloads = server.configure(4, "train", transport.sites())
    assert [e.round_idx for e in spsa.decode_log(payloads["site-0"]["log"])] == [3]
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 4)
    assert not rejected and metrics["num_accepted"] == 2


def test_site_far_behind_gets_a_signed_snapshot(tmp_path):
    """A site more than spsa.snapshot_after rounds behind receives the fp32 weights (digest signed in
    its envelope) instead of the log, loads them, and is accepted with the server's state."""
    cfg = _cfg(**{"num_rounds": 5, "spsa.snapshot_after": 1})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 2, separate=True)
    transport.offline = {"site-1"}
    for r in (1, 2, 3):
        run_round(cfg, server, transport, recorder, r)
    transport.offline = set()
    payloads = server.configure(4, "train", transport.sites())
    assert payloads["site-1"]["snap"] and not payloads["site-0"]["snap"]
    assert spsa.decode_log(payloads["site-1"]["log"]) == []
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 4)
    assert not rejected and metrics["num_accepted"] == 2
    # a tampered snapshot is refused (its digest is in the signed plan)
    transport.offline = {"site-1"}
    run_round(cfg, server, transport, recorder, 5)
    transport.offline = set()
    bad = server.configure(6, "train", transport.sites())["site-1"]
    snap = bytearray(bad["snap"])
    snap[0] ^= 1
    with pytest.raises(ValueError, match="snapshot does not match"):
        transport.clients["site-1"].step("train", {**bad, "snap": bytes(snap)}, {})
