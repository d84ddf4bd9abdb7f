"""spsa's levers (issue 11): perturbation spaces, forward differences, run-scope seed pools with a
server-side optimizer, sparse masks, the sqrt normaliser. Every one must keep every replica
bitwise equal to the server, and the run-scope pool must make the state a function of its
integer coefficients alone (catch-up and model delivery by coefficients)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import spsa
from edgetune.algorithms.spsa import pool as poolmod
from edgetune.algorithms.spsa.local import local_steps
from edgetune.federation import run_round
from edgetune.models.load import load_model
from edgetune.models.params import manifest_of, model_sha256, trainable_tensors

LABEL_HEAD = {
    "data.source": "file",
    "data.path": str(Path(__file__).parent / "data" / "choices.jsonl"),
    "data.partition": "iid",
    "model.trainable": "label-head",
    "model.head_labels": "alpha,bravo,charlie,delta,echo",
    "spsa.objective": "choices",
    "spsa.difference": "forward",
    "spsa.lr": 0.05,
}
"""The label-head space (models/labelhead.py) with its cached-feature probes (models/headcache.py)."""
TOKEN_BIAS = {
    "model.trainable": "token-bias",
    "spsa.difference": "forward",
    "spsa.lr": 0.5,
    "spsa.eps": 2.0**-7,
    "spsa.bias_pool": 64,
    "spsa.bias_examples": 5,
}
"""The token-bias space (models/tokenbias.py) with its probes batched on cached exponentials (models/biascache.py)."""

VARIANTS = {
    "forward": {"spsa.difference": "forward", "spsa.num_probes": 3},
    "sqrt-normalizer": {"spsa.normalizer": "sqrt", "spsa.num_probes": 2},
    "lora-b": {"model.trainable": "lora-b", "model.target_modules": "q_proj,v_proj", "spsa.lr": 0.05},
    "sparse": {"spsa.sparse_frac": 0.25},
    "round-pool": {"spsa.seed_pool": 5, "spsa.difference": "forward", "spsa.num_probes": 2},
    "run-pool-sgd": {"spsa.seed_pool": 7, "spsa.pool_scope": "run", "spsa.num_probes": 2},
    "run-pool-momentum": {
        "spsa.seed_pool": 7,
        "spsa.pool_scope": "run",
        "spsa.optimizer": "momentum",
        "spsa.difference": "forward",
        "spsa.num_probes": 2,
    },
    "run-pool-momentum-cosine-lr": {
        "spsa.seed_pool": 7,
        "spsa.pool_scope": "run",
        "spsa.optimizer": "momentum",
        "spsa.lr_schedule": "cosine:0.1",
        "spsa.num_probes": 2,
    },
    "choices-objective": {
        "data.source": "file",
        "data.path": str(Path(__file__).parent / "data" / "choices.jsonl"),
        "data.partition": "iid",
        "spsa.objective": "choices",
        "spsa.difference": "forward",
        "spsa.num_probes": 3,
    },
    "label-head-run-pool": {
        **LABEL_HEAD,
        "spsa.num_steps": 6,
        "spsa.num_probes": 4,
        "spsa.seed_pool": 64,
        "spsa.pool_scope": "run",
    },  # fmt: skip
    "sign-codes": {
        "spsa.scalar_codec": "sign:2",
        "spsa.num_steps": 5,
        "spsa.num_probes": 3,
        "spsa.difference": "forward",
    },
    "sign-codes-shared-median": {
        "spsa.scalar_codec": "sign:1",
        "spsa.num_probes": 2,
        "spsa.directions": "shared",
        "spsa.aggregator": "median",
    },
    "label-head-sign": {**LABEL_HEAD, "spsa.scalar_codec": "sign", "spsa.num_steps": 20, "spsa.num_probes": 4},
    "token-bias-sign": {**TOKEN_BIAS, "spsa.scalar_codec": "sign", "spsa.num_steps": 20, "spsa.num_probes": 8},
    "token-bias-central-run-pool": {
        **TOKEN_BIAS,
        "spsa.difference": "central",
        "spsa.num_probes": 4,
        "spsa.seed_pool": 32,
        "spsa.pool_scope": "run",
        "spsa.optimizer": "momentum",
    },
    "run-pool-adam-lora-b-shared-median": {
        "spsa.seed_pool": 6,
        "spsa.pool_scope": "run",
        "spsa.optimizer": "adam",
        "spsa.lr": 1e-3,
        "spsa.directions": "shared",
        "spsa.aggregator": "median",
        "model.trainable": "lora-b",
    },
}


def _cfg(**overrides):
    return cfgmod.from_run_config(tiny_flat(**overrides))


def _federation(tmp_path, cfg, num_sites, name, *, separate=True):
    return inproc.build(cfg, num_sites, run_dir=tmp_path / name, separate_replicas=separate)


def _site_replica(server, client):
    c = client
    return spsa.replica_for(c.ctx.model, server.run_id, c.ctx.workdir, "auto", c.ctx.replica_namespace, server.space)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_keeps_site_replicas_bitwise_equal_to_the_server(tmp_path, variant):
    """Three sites with their own model copies, three rounds: every round commits all three sites,
    each site's replica equals the server's full sha256 before the next round, and the model moved."""
    # Prepare
    cfg = _cfg(**{**VARIANTS[variant], "num_rounds": 3})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 3, variant)
    start_hash = server.state_hash()
    # Execute / Assert
    for r in range(1, 4):
        before = server.state_hash()
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, r)
        assert not rejected and metrics["num_accepted"] == 3
        for client in transport.clients.values():
            rep = _site_replica(server, client)
            assert rep is not server.replica
            assert (rep.applied, rep.hash) == (r - 1, before)
    assert server.state_hash() != start_hash


def test_lora_b_perturbs_only_b_and_every_replica_derives_the_same_a():
    """model.trainable = lora-b: the manifest holds only lora_B tensors (zero at start), and two
    independent loads derive bitwise the same keyed A (which is never sent)."""
    cfg = cfgmod.ModelSection(path="tiny", trainable="lora-b", target_modules="q_proj,v_proj")
    m1, _ = load_model(cfg, seed=3)
    m2, _ = load_model(cfg, seed=3)
    names = manifest_of(m1).names
    assert names and all("lora_B" in n for n in names)
    assert all(float(t.abs().max()) == 0.0 for t in trainable_tensors(m1, manifest_of(m1)))
    a1 = {n: p for n, p in m1.named_parameters() if "lora_A" in n}
    a2 = {n: p for n, p in m2.named_parameters() if "lora_A" in n}
    assert a1 and all(torch.equal(a1[n], a2[n]) for n in a1)
    assert not any(p.requires_grad for p in a1.values())


def test_sparse_mask_moves_only_the_smallest_base_weights(tmp_path):
    """With spsa.sparse_frac = f, after two rounds every changed coordinate is inside the mask of the
    smallest |base weight|, the unmasked ones are bitwise their base values, and each mask holds
    exactly ceil(f * numel) coordinates (ties broken by position)."""
    cfg = _cfg(**{"spsa.sparse_frac": 0.2, "num_rounds": 2})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 2, "sparse", separate=False)
    base = [t.clone() for t in server.replica._base_tensors()]
    for r in (1, 2):
        run_round(cfg, server, transport, recorder, r)
    now = server.replica.snapshot_tensors()
    masks = spsa.replica.sparse_masks(base, 0.2)
    moved = 0
    for b, n, m in zip(base, now, masks, strict=True):
        assert torch.equal(n[~m], b[~m])
        moved += int((n != b).sum())
        assert int(m.sum()) == math.ceil(0.2 * m.numel())
        assert float(b.abs()[m].max()) <= float(b.abs()[~m].min())
    assert moved > 0


def test_forward_difference_costs_p_plus_one_forwards_and_agrees_with_central(monkeypatch):
    """One step of P probes: forward differences run P + 1 forward passes (central: 2P), and both
    estimate the same directional derivatives (close for a small eps)."""
    from edgetune.algorithms.spsa import local as localmod
    from edgetune.data.demo import demo_sites
    from edgetune.data.prompts import TokenizedSet

    model, tok = load_model(cfgmod.ModelSection(path="tiny", trainable="all"), seed=0)
    work = trainable_tensors(model, manifest_of(model))
    batch = TokenizedSet(tok, demo_sites(1, facts_per_site=2)[0].train, 256).batch([0, 1, 2, 3])
    keys = [[bytes([p]) * 32 for p in range(8)]]
    uniforms = np.full(8, 0.5)
    calls = []
    real = localmod.batch_loss
    monkeypatch.setattr(localmod, "batch_loss", lambda m, b: calls.append(1) or real(m, b))
    raws = {}
    for diff in ("forward", "central"):
        calls.clear()
        before = [w.clone() for w in work]
        with torch.no_grad():
            _, raws[diff], _ = local_steps(
                model, work, [batch], keys, uniforms, eps=2.0**-12, lr=1e-3, scale=1e3, codec="int8-sr", difference=diff
            )
            for w, b in zip(work, before, strict=True):
                w.copy_(b)
        assert len(calls) == (9 if diff == "forward" else 16)
    assert np.allclose(raws["forward"], raws["central"], rtol=0.05, atol=0.05)
    assert np.corrcoef(raws["forward"], raws["central"])[0, 1] > 0.99


def test_pool_optimizers_match_their_formulas_by_hand():
    """sgd, momentum and adam on the coefficients give dn = rint(dC / q) with dC from the formulas
    (adam's bias corrections by repeated products)."""
    q = poolmod.POOL_QUANTUM
    g1, g2 = np.array([1.0, -2.0, 0.0]), np.array([0.5, 0.0, 0.0])
    sgd = poolmod.PoolState(3)
    assert list(sgd.step(g1, 0.01, poolmod.OptimizerSpec("sgd"))) == list(np.rint(0.01 * g1 / q).astype(int))
    mom = poolmod.PoolState(3)
    spec = poolmod.OptimizerSpec("momentum", momentum=0.5)
    mom.step(g1, 0.01, spec)
    dn = mom.step(g2, 0.01, spec)
    assert list(dn) == list(np.rint(0.01 * (0.5 * g1 + g2) / q).astype(int))
    adam = poolmod.PoolState(3)
    spec = poolmod.OptimizerSpec("adam", momentum=0.9, beta2=0.99, delta=1e-8)
    adam.step(g1, 1e-3, spec)
    dn = adam.step(g2, 1e-3, spec)
    m = 0.9 * (0.1 * g1) + 0.1 * g2
    v = 0.99 * (0.01 * g1**2) + 0.01 * g2**2
    expected = 1e-3 * (m / (1 - 0.9 * 0.9)) / (np.sqrt(v / (1 - 0.99 * 0.99)) + 1e-8)
    assert list(dn) == list(np.rint(expected / q).astype(int))
    assert adam.n[2] == 0  # a seed never probed never moves


def test_pool_state_round_trips_and_rejects_bad_payloads():
    """A pool state survives encode/decode exactly; wrong sizes, NaN moments and out-of-range
    coefficients are refused."""
    state = poolmod.PoolState(4)
    state.step(np.array([1.0, 0.0, -3.0, 0.25]), 0.1, poolmod.OptimizerSpec("adam"))
    blob = poolmod.encode_state(state)
    back = poolmod.decode_state(blob, size=4)
    assert back.round_idx == 1 and np.array_equal(back.n, state.n) and np.array_equal(back.v, state.v)
    assert back.bias1 == state.bias1
    with pytest.raises(Exception, match="seeds"):
        poolmod.decode_state(blob, size=5)
    bad = state.to_payload()
    bad["m"] = np.array([np.nan, 0, 0, 0], dtype="<f8").tobytes()
    with pytest.raises(Exception, match="not finite"):
        poolmod.PoolState.from_payload(bad, size=4)
    bad = state.to_payload()
    bad["n"] = np.array([2**62, 0, 0, 0], dtype="<i8").tobytes()
    with pytest.raises(Exception, match="out of range"):
        poolmod.PoolState.from_payload(bad, size=4)


def test_run_pool_state_is_a_function_of_the_coefficients_alone(tmp_path):
    """A replica that applied 6 rounds one by one, and a fresh replica that rebuilt A from the
    coefficient vector only, hold bitwise the same weights (same full sha256)."""
    cfg = _cfg(**{"spsa.seed_pool": 9, "spsa.pool_scope": "run", "spsa.optimizer": "momentum", "num_rounds": 6})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 2, "pool-path", separate=False)
    for r in range(1, 7):
        run_round(cfg, server, transport, recorder, r)
    state = server.replica.pool.copy()
    model, _ = load_model(cfg.model, seed=cfg.run.seed)
    fresh = spsa.Replica(model, tmp_path / "fresh", "host")
    fresh.start_run(server.run_id, server.space)
    fresh.load_pool(state)
    assert fresh.hash == server.state_hash() and fresh.applied == 6


SPACES = {"all": {}, "label-head": LABEL_HEAD, "token-bias": TOKEN_BIAS}


@pytest.mark.parametrize("space", sorted(SPACES))
def test_site_that_missed_20_rounds_catches_up_from_coefficients(tmp_path, space):
    """Run-scope pool: a site offline for 20 rounds gets the pool's coefficients (kilobytes, its
    digest signed in the envelope) instead of 20 rounds of log, and is accepted with the server's
    state. The snapshot is smaller than the log it replaces."""
    s = 16
    cfg = _cfg(
        **{
            **SPACES[space],
            "spsa.seed_pool": s,
            "spsa.pool_scope": "run",
            "spsa.optimizer": "momentum",
            "spsa.num_steps": 1,
            "spsa.num_probes": 4,
            "num_rounds": 22,
        }
    )
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 3, f"catchup-{space}")
    transport.offline = {"site-2"}
    for r in range(1, 21):
        run_round(cfg, server, transport, recorder, r)
    transport.offline = set()
    payloads = server.configure(21, "train", transport.sites())
    snap = payloads["site-2"]["snap"]
    log_blob = spsa.encode_log([server.log[r] for r in range(1, 21)])
    assert snap and spsa.decode_log(payloads["site-2"]["log"]) == []
    assert len(snap) < len(log_blob) and len(snap) <= 24 * s + 128
    before = server.state_hash()
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 21)
    assert not rejected and metrics["num_accepted"] == 3
    rep = _site_replica(server, transport.clients["site-2"])
    assert (rep.applied, rep.hash) == (20, before)


def test_config_refuses_inconsistent_spsa_levers():
    """Combinations that cannot work are refused at config time, naming the key."""
    with pytest.raises(ValueError, match="spsa.pool_scope"):
        _cfg(**{"spsa.optimizer": "momentum"})
    with pytest.raises(ValueError, match="spsa.seed_pool"):
        _cfg(**{"spsa.pool_scope": "run"})
    with pytest.raises(ValueError, match="spsa.difference"):
        _cfg(**{"spsa.difference": "backward"})
    with pytest.raises(ValueError, match="spsa.sparse_frac"):
        _cfg(**{"spsa.sparse_frac": 1.0})
    with pytest.raises(ValueError, match="spsa.normalizer"):
        _cfg(**{"spsa.normalizer": "sum"})


def test_lr_schedule_sets_each_rounds_plan_and_a_late_site_replays_the_changing_lr(tmp_path):
    """spsa.lr_schedule: round r's plan and log entry carry the schedule's lr for r, a site that
    missed rounds replays them with their own lrs to the server's hash, and a schedule that reaches
    lr 0 (or is not one) is refused at config time."""
    # Prepare
    cfg = _cfg(**{"spsa.lr": 0.01, "spsa.lr_schedule": "cosine:0.1", "spsa.num_probes": 2, "num_rounds": 5})
    server, transport, recorder, *_ = _federation(tmp_path, cfg, 3, "lr-schedule")
    transport.offline = {"site-2"}
    # Execute
    for r in range(1, 5):
        run_round(cfg, server, transport, recorder, r)
    transport.offline = set()
    before = server.state_hash()
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 5)
    # Assert
    want = [0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (r - 1) / 4))) for r in range(1, 5)]
    assert [server.log[r].lr for r in range(1, 5)] == pytest.approx(want, rel=1e-12)
    assert want[0] > want[1] > want[3] > server.log[5].lr == pytest.approx(0.001)
    assert not rejected and metrics["num_accepted"] == 3
    rep = _site_replica(server, transport.clients["site-2"])
    assert (rep.applied, rep.hash) == (4, before)
    with pytest.raises(ValueError, match="spsa.lr_schedule"):
        _cfg(**{"spsa.lr_schedule": "cosine", "num_rounds": 4})
    with pytest.raises(ValueError, match="spsa.lr_schedule"):
        _cfg(**{"spsa.lr_schedule": "warp"})


def test_sqrt_normalizer_divides_by_the_root_of_the_scalar_count():
    """normalizer = sqrt: c = fp32(lr * g / sqrt(N P)) (Just One Byte); mean: lr * g / (N P)."""
    codes = bytes([127, 64, 0, 0x81, 10, 20])
    base = (3, ("a", "b", "c"), codes, 0.5, 2.0, 1, 2, "per-site", 0, "int8-sr", "mean", 0.0, "round")
    g = np.array([127, 64, 0, -127, 10, 20]) * 2.0 / 127
    mean = spsa.replay_terms(spsa.LogEntry(*base, "mean"), bytes(32), b"r" * 16)
    root = spsa.replay_terms(spsa.LogEntry(*base, "sqrt"), bytes(32), b"r" * 16)
    assert [c for _, c in mean] == [float(np.float32(0.5 * x / 6)) for x in g]
    assert [c for _, c in root] == [float(np.float32(0.5 * x / math.sqrt(6))) for x in g]


REPLAY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(int(sys.argv[2]))
    from edgetune import config as cfgmod
    from edgetune.algorithms import spsa
    from edgetune.algorithms.spsa.server import space_spec
    from edgetune.models.load import load_model
    from edgetune.models.params import model_sha256

    for name, blob in json.loads(open(sys.argv[1]).read()).items():
        cfg = cfgmod.from_run_config(blob["cfg"])
        model, _ = load_model(cfg.model, seed=cfg.run.seed)
        rep = spsa.Replica(model, f"{sys.argv[3]}/{name}", "disk")
        rep.start_run(bytes.fromhex(blob["run_id"]), space_spec(cfg.spsa, bytes.fromhex(blob["pool_key"])))
        rep.sync(spsa.decode_log(bytes.fromhex(blob["log"])), [bytes.fromhex(s) for s in blob["secrets"]])
        print(name, rep.hash, model_sha256(model))
    """
)
REPLAYED = {"default": {}, **{v: VARIANTS[v] for v in (
    "run-pool-momentum",
    "run-pool-adam-lora-b-shared-median",
    "sparse",
    "forward",
    "lora-b",
    "choices-objective",
    "label-head-run-pool",
    "sign-codes",
    "label-head-sign",
    "token-bias-sign",
    "token-bias-central-run-pool",
)}}  # fmt: skip


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """Every variant of REPLAYED runs three rounds in process; then two fresh processes, with 1 and 2 torch
    threads, replay all their committed logs (one process per thread count: a process start costs more than
    a replay). Returns {variant: (server hashes, [hashes of the 1-thread process, of the 2-thread process])}."""
    tmp = tmp_path_factory.mktemp("replayed")
    blobs, expected = {}, {}
    for name, overrides in REPLAYED.items():
        flat = tiny_flat(**{**overrides, "num_rounds": 3})
        cfg = cfgmod.from_run_config(flat)
        server, transport, recorder, *_ = _federation(tmp, cfg, 2, name, separate=False)
        for r in (1, 2, 3):
            run_round(cfg, server, transport, recorder, r)
        blobs[name] = {
            "cfg": flat,
            "run_id": server.run_id.hex(),
            "pool_key": server.pool_key.hex(),
            "log": spsa.encode_log([server.log[r] for r in (1, 2, 3)]).hex(),
            "secrets": [server.secrets[r].hex() for r in (1, 2, 3)],
        }
        expected[name] = (server.state_hash(), model_sha256(server.global_model()))
    (tmp / "logs.json").write_text(json.dumps(blobs))
    (tmp / "replay.py").write_text(REPLAY_SCRIPT)
    seen: dict[str, list[tuple[str, str]]] = {name: [] for name in REPLAYED}
    for threads in (1, 2):
        out = subprocess.run(
            [sys.executable, str(tmp / "replay.py"), str(tmp / "logs.json"), str(threads), str(tmp / f"w{threads}")],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert out.returncode == 0, out.stderr[-3000:]
        for line in out.stdout.splitlines():
            name, state, weights = line.split()
            seen[name].append((state, weights))
    return {name: (expected[name], seen[name]) for name in REPLAYED}


@pytest.mark.parametrize("variant", sorted(REPLAYED))
def test_two_processes_with_1_and_2_threads_replay_to_the_same_hash(replayed, variant):
    """Fresh processes with 1 and 2 torch threads replay the committed log of a variant and end with
    the server's full state sha256 and the sha256 of all its weights."""
    expected, seen = replayed[variant]
    assert seen == [expected, expected]


@pytest.mark.parametrize("space", sorted(SPACES))
def test_exported_delta_rebuilds_the_servers_weights_bitwise_and_refuses_tampering(tmp_path, space):
    """edgetune export --delta: a file of S coefficients + metadata, 0600, which rebuilds from the
    base model exactly the run's final weights (full sha256); a changed coefficient is refused."""
    from safetensors.torch import load_file, save_file

    from edgetune.algorithms.spsa.delta import export_run_delta, load_delta, read_delta

    extra = SPACES[space]
    cfg = _cfg(
        **{**extra, "spsa.seed_pool": 32, "spsa.pool_scope": "run", "spsa.optimizer": "momentum", "num_rounds": 4}
    )
    run_dir = tmp_path / f"delta-run-{space}"
    summary = inproc.run(cfg, 2, run_dir=run_dir)
    out = tmp_path / "model.delta"
    info = export_run_delta(run_dir, out)
    assert (out.stat().st_mode & 0o777) == 0o600
    assert info["round"] == 4 and info["bytes"] < 8 * 32 + 8192
    model, _, cfg2, loaded = load_delta(out)
    assert loaded["state_sha256"] == summary["final_state_hash"] == info["state_sha256"]
    assert cfg2.spsa.seed_pool == 32
    n, meta = read_delta(out)
    bad = tmp_path / "bad.delta"
    # one coefficient moved by one quantum: too small to change fp32 weights, caught by the coefficients' digest
    moved = n.copy()
    moved[int(np.flatnonzero(n)[0])] += 1
    save_file({"n": torch.from_numpy(moved)}, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="coefficients hash to"):
        load_delta(bad)
    # a recorded state hash that the coefficients do not rebuild (e.g. another base model)
    save_file({"n": torch.from_numpy(n)}, str(bad), metadata={**meta, "state_sha256": "0" * 64})
    with pytest.raises(ValueError, match="rebuilt weights hash to"):
        load_delta(bad)
    del meta["coefficients_sha256"]
    save_file({"n": torch.from_numpy(n)}, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="no coefficients_sha256"):
        load_delta(bad)
    assert load_file(str(out))["n"].dtype == torch.int64
