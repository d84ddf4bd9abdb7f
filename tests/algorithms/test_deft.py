"""deft: partitions, k_p, LPT bins and rotation, index union vs plain top-k, error feedback,
bad replies, byte counts, and a short run that learns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import session_cache, tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import deft
from edgetune.algorithms.base import ServerContext
from edgetune.comm import varint, wire
from edgetune.comm.tensors import decode_tensors, encode_tensors
from edgetune.federation import run_round
from edgetune.models.load import clear_cache
from edgetune.models.params import trainable_tensors
from edgetune.runs import RunRecorder

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**overrides):
    flat = tiny_flat(
        **{
            "algorithm": "deft",
            "kavg.lr": 0.1,
            "kavg.local_steps": 1,
            "deft.density": 0.05,
            "deft.allocation": "applied",  # the two-phase protocol; site-norms has its own tests below
            "data.max_length": 64,
            **overrides,
        }
    )
    return cfgmod.from_run_config(flat)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_fresh_models():
    """Tiny models step ~50x faster on one thread than on two oversubscribed ones (shared CI boxes).
    The cached models these tests train are dropped afterwards, so later tests start from keyed weights."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    clear_cache()


@pytest.fixture(scope="module")
def fed8(tmp_path_factory):
    """One in-process federation of 8 tiny sites; tests take subsets of its sites and fresh servers."""
    cache = session_cache(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETUNE_CACHE", cache)
        clear_cache()  # start from the keyed initial weights, whatever earlier tests did to the shared model
        cfg = _cfg()
        server, transport, _, _, _ = inproc.build(cfg, 8, run_dir=tmp_path_factory.mktemp("deft") / "fed8")
        start = [t.clone() for t in server.params]
        yield {"cfg": cfg, "server": server, "clients": transport.clients, "start": start}


def _server(fed, label, **overrides):
    """A fresh DeftServer from the initial weights, with its own run id (so its own site files)."""
    with torch.no_grad():
        for w, p in zip(trainable_tensors(fed["server"].model, fed["server"].manifest), fed["start"]):
            w.copy_(p)
    cfg = _cfg(**overrides)
    ctx = dataclasses.replace(fed["server"].ctx, run_id=hashlib.sha256(label.encode()).digest()[:16])
    return cfg, deft.DeftServer(cfg, ctx)


def _transport(fed, num_sites, wrap=None):
    clients = {f"site-{i}": fed["clients"][f"site-{i}"] for i in range(num_sites)}
    if wrap:
        clients = {s: wrap(s, c) for s, c in clients.items()}
    return inproc.InProcTransport(clients)


def _flat(tensors):
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


class Spy:
    """Passes every message to the honest site; may rewrite its reply; records what it sent."""

    def __init__(self, honest, rewrite=None):
        self.honest, self.rewrite, self.ctx = honest, rewrite, honest.ctx
        self.sent: dict[str, int] = {}
        self.acc: dict[int, list[torch.Tensor]] = {}
        """round -> a after phase 1, one per attempt."""

    def step(self, phase, msg, state):
        reply, state = self.honest.step(phase, msg, state)
        if phase == "norms" or (phase == "indices" and "plan" in msg):  # where the site trained
            plan = wire.decode(msg["plan"], max_bytes=4096)
            acc = self.honest.vectors(plan["run"]).load("acc", plan["round"]).clone()
            self.acc.setdefault(plan["round"], []).append(acc)
        if self.rewrite:
            reply = self.rewrite(phase, msg, reply)
        self.sent[phase] = len(wire.encode(reply))
        return reply, state


# ---- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numels", "num_chunks"),
    [([16576, 4096, 2048, 2048, 64, 16576], 8), ([10, 1, 1000, 7, 3], 3), ([5, 2], 4), ([100], 1)],
)
def test_partitions_cover_every_coordinate_exactly_once(numels, num_chunks):
    """Partitions tile [0, D) without gaps or overlaps, never cross a tensor boundary, and exactly
    the tensors above D/N are cut, into min(N, s) chunks whose sizes differ by at most 1."""
    # Execute
    parts = deft.make_partitions(numels, num_chunks)

    # Assert
    hits = np.zeros(sum(numels), dtype=np.int64)
    for a, s in zip(parts.starts, parts.sizes):
        hits[a : a + s] += 1
    assert (hits == 1).all() and (parts.sizes >= 1).all()
    offsets = np.cumsum([0, *numels])
    for t, n in enumerate(numels):
        mine = parts.sizes[parts.tensor == t]
        assert (parts.starts[parts.tensor == t] >= offsets[t]).all() and mine.sum() == n
        expected = min(num_chunks, n) if n * num_chunks > sum(numels) else 1
        assert len(mine) == expected and mine.max() - mine.min() <= 1
    assert (parts.of(np.arange(sum(numels))) == np.repeat(np.arange(len(parts)), parts.sizes)).all()


def test_k_p_is_norm_proportional_within_bounds():
    """k_p follows DEFT's rule (traced by hand below): it lies in [1, s_p], a capped partition's
    excess goes to the others, and the sum is k unless a bound binds at the end of the visit;
    all-zero norms fall back to the sizes."""
    # Prepare
    sizes = np.array([1000, 1000, 50, 4000, 10, 3000])
    nu = np.array([4.0, 1.0, 100.0, 0.0, 0.5, 2.0])

    # Execute
    kp = deft.allocate_k(nu, sizes, 400)
    uncapped = deft.allocate_k(np.array([4.0, 1.0, 3.0, 0.5, 0.25, 2.0]), sizes * 10, 400)
    by_size = deft.allocate_k(np.zeros(6), sizes, 400)

    # Assert
    # visit 2, 0, 5, 1, 4, 3: floor(400*100/107.5)=372 -> 50 (cap); floor(350*4/7.5)=186; floor(164*2/3.5)=93;
    # floor(71*1/1.5)=47; floor(24*.5/.5)=24 -> 10 (cap); nu=0 -> 1. The cap at the end leaves 13 unspent.
    assert kp.tolist() == [186, 47, 50, 1, 10, 93]
    assert uncapped.sum() == 400 and (uncapped >= 1).all()
    assert all(abs(uncapped[i] - 400 * w / 10.75) <= 2 for i, w in enumerate([4.0, 1.0, 3.0, 0.5, 0.25, 2.0]))
    assert by_size.sum() == 400 and abs(by_size[3] - 400 * 4000 / sizes.sum()) <= 1


def test_lpt_bins_are_disjoint_and_balanced():
    """LPT bins cover every partition once and max load - min load <= the largest single cost
    (so max load <= 4/3 of the optimum's lower bound for these costs)."""
    # Prepare
    sizes = np.array([16576, 4096, 2048, 2048, 4096, 8192, 8192, 8192, 64, 64, 300, 900, 5000])
    kp = deft.allocate_k(sizes.astype(float), sizes, 1000)
    costs = deft.selection_cost(sizes, kp)

    # Execute
    bins = deft.pack_bins(costs, range(len(sizes)), 4)

    # Assert
    members = np.concatenate(bins)
    assert sorted(members.tolist()) == list(range(len(sizes)))
    loads = [costs[b].sum() for b in bins]
    assert max(loads) - min(loads) <= costs.max()
    assert max(loads) <= 4 / 3 * max(costs.sum() / 4, costs.max())


def test_indices_codec_round_trips_and_refuses_bad_lists():
    """Index lists round-trip at ~1 byte per index at 1% density; decoding refuses more than the
    allowed count, a repeated index, an index >= D, a truncated or an overlong number."""
    # Prepare
    idx = np.sort(np.random.default_rng(0).choice(1_000_000, 10_000, replace=False))

    # Execute
    blob = varint.encode_indices(idx)

    # Assert
    assert (varint.decode_indices(blob, dim=1_000_000, max_count=10_000, where="t") == idx).all()
    assert len(blob) < 1.6 * len(idx)
    bad = {
        "at most": (blob, 9_999),
        "repeated": (varint.encode_varints(np.array([5, 0])), 10),
        "out of range": (varint.encode_indices(np.array([3, 1_000_000])), 10),
        "ends inside": (b"\x85", 10),
        "longer than": (b"\xff" * 6 + b"\x01", 10),
        "minimally": (b"\x85\x00", 10),
    }
    for message, (raw, limit) in bad.items():
        with pytest.raises(ValueError, match=message):
            varint.decode_indices(raw, dim=1_000_000, max_count=limit, where="t")


# ---- with a federation ----------------------------------------------------------------------------


def _site_bins(payloads):
    out = {}
    for s, p in payloads.items():
        pairs = varint.decode_varints(p["bins"], max_count=10_000, where="t")
        out[s] = tuple(np.cumsum(pairs[0::2]).tolist())
    return out


def test_bins_rotate_across_rounds(fed8):
    """With the same k_p, site j gets in round r+1 the bin site j+1 had in round r; the bins of a
    round are disjoint and, with the common set, cover every partition."""
    # Prepare
    _, server = _server(fed8, "rotate")
    sites = [f"site-{i}" for i in range(4)]

    # Execute
    r1 = _site_bins(server.configure(1, "indices", sites))
    common = set(server.round.common.tolist())
    r2 = _site_bins(server.configure(2, "indices", sites))

    # Assert
    assert [r2[sites[j]] for j in range(4)] == [r1[sites[(j + 1) % 4]] for j in range(4)]
    assert r1[sites[0]] != r2[sites[0]]
    flat = [p for b in r1.values() for p in b]
    assert len(flat) == len(set(flat)) and set(flat) | common == set(range(len(server.parts)))


def _indices_phase(fed, selector, num_sites):
    """Phase 1 of round 1 through the protocol: (server metrics, each site's accepted indices)."""
    cfg, server = _server(fed, f"union-{selector}-{num_sites}", **{"deft.selector": selector})
    transport = _transport(fed, num_sites)
    blobs = {s: wire.encode(p) for s, p in server.configure(1, "indices", transport.sites()).items()}
    raw = transport.exchange(1, "indices", blobs, timeout_s=60)
    replies = {s: wire.decode(b, max_bytes=1 << 30) for s, b in raw.items()}
    result = server.aggregate(1, "indices", replies, min_sites=num_sites)
    assert result.committed
    dim = server.dim
    sent = {s: varint.decode_indices(r["idx"], dim=dim, max_count=dim, where=s) for s, r in replies.items()}
    return result.metrics, sent


def test_deft_union_stays_near_k_while_topk_union_grows(fed8):
    """Same sites, same data, same weights: DEFT's union is at most sum k_p (~ k, with the common
    set) for 2, 4 and 8 sites, while plain top-k's union grows with the number of sites. (A site's
    top-k in round 1 does not depend on the number of sites, so one 8-site top-k phase gives all three.)"""
    # Execute
    d = {n: _indices_phase(fed8, "deft", n)[0] for n in (2, 4, 8)}
    t8, topk_sent = _indices_phase(fed8, "topk", 8)
    topk_union = {n: len(np.unique(np.concatenate([topk_sent[f"site-{i}"] for i in range(n)]))) for n in (2, 4, 8)}

    # Assert
    k = d[2]["k"]
    for n in (2, 4, 8):
        assert d[n]["union_size"] <= d[n]["k_sum"] <= k + d[n]["num_partitions"]
        assert d[n]["union_size"] >= 0.9 * k
    assert all(len(v) == k for v in topk_sent.values()) and topk_union[8] == t8["union_size"]
    assert k < topk_union[2] < topk_union[4] < topk_union[8]
    assert topk_union[8] > 1.5 * d[8]["union_size"]


@pytest.mark.parametrize("error_feedback", [True, False])
def test_error_feedback_carries_unsent_mass_to_next_round(fed8, error_feedback):
    """After round r a site keeps e = a_r with the union zeroed; round r+1's a is exactly its new
    update plus e. Without error feedback nothing is kept and a_{r+1} is the update alone."""
    # Prepare
    cfg, server = _server(fed8, f"ef-{error_feedback}", **{"deft.error_feedback": error_feedback})
    spies = {}
    transport = _transport(fed8, 2, wrap=lambda s, c: spies.setdefault(s, Spy(c)))
    recorder = RunRecorder(cfg, Path(server.ctx.workdir).parent / f"rec-ef-{error_feedback}")
    run_round(cfg, server, transport, recorder, 1)
    union = torch.from_numpy(server.round.union)
    a1 = spies["site-0"].acc[1][-1]
    store = fed8["clients"]["site-0"].vectors(server.ctx.run_id.hex())
    e1 = store.load("res", 1)

    # Execute: round 2, phase 1 of site-0 alone; its update is what the shared model now holds
    msg = server.configure(2, "indices", transport.sites())["site-0"]
    fed8["clients"]["site-0"].step("indices", msg, {})
    delta2 = _flat(trainable_tensors(server.model, server.manifest)) - _flat(server.params)
    a2 = store.load("acc", 2)

    # Assert
    if error_feedback:
        expected_e1 = a1.clone()
        expected_e1[union] = 0
        assert torch.equal(e1, expected_e1) and e1.norm() > 0.5 * a1.norm()
        assert torch.allclose(a2, delta2 + e1, atol=1e-6)
    else:
        assert e1 is None and store.rounds("res") == []
        assert torch.allclose(a2, delta2, atol=1e-6)


@pytest.mark.parametrize("allocation", ["applied", "site-norms"])
def test_retried_round_does_not_count_a_residual_twice(fed8, allocation):
    """When the values phase misses quorum the whole round is retried: the training phase runs again
    from the residual of the previous round (the one the failed attempt wrote is dropped), so every
    site's a is the same in both attempts, and the retry commits."""
    # Prepare
    cfg, server = _server(fed8, f"retry-{allocation}", **{"run.min_sites": 2, "deft.allocation": allocation})
    failed = []

    def fail_once(phase, msg, reply):
        if phase == "values" and not failed:
            failed.append(True)
            raise ValueError("injected: link down")
        return reply

    spies = {}
    transport = _transport(fed8, 2, wrap=lambda s, c: spies.setdefault(s, Spy(c, fail_once if s == "site-1" else None)))
    recorder = RunRecorder(cfg, Path(server.ctx.workdir).parent / f"rec-retry-{allocation}")

    # Execute
    metrics, _, attempts = run_round(cfg, server, transport, recorder, 1)

    # Assert
    assert attempts == 2 and metrics["num_accepted"] == 2
    for spy in spies.values():
        first, second = spy.acc[1]
        assert torch.equal(first, second)


def _forge_indices(server, how):
    def rewrite(phase, msg, reply):
        if phase != "indices":
            return reply
        st, parts = server.round, server.parts
        mine = st.bins["site-2"]
        idx = varint.decode_indices(reply["idx"], dim=server.dim, max_count=1 << 30, where="t")
        if how == "out of range":
            idx = np.append(idx[:-1], server.dim)
            blob = varint.encode_varints(np.diff(idx, prepend=0))
        elif how == "not in its bin":
            other = next(p for p in range(len(parts)) if p not in mine and p not in st.common)
            blob = varint.encode_indices(np.sort(np.append(idx[:-1], parts.starts[other])))
        elif how == "repeated":
            gaps = np.diff(idx, prepend=0)
            gaps[-1] = 0
            blob = varint.encode_varints(gaps)
        else:  # one more index than k_p in its first partition, one fewer elsewhere
            p = int(mine[0])
            full = np.arange(parts.starts[p], parts.starts[p] + st.kp[p] + 1)
            blob = varint.encode_indices(np.union1d(idx[parts.of(idx) != p][:-1], full))
        return {**reply, "idx": blob}

    return rewrite


def _forge_values(how):
    def rewrite(phase, msg, reply):
        if phase != "values":
            return reply
        v = np.frombuffer(reply["values"], dtype="<f4").copy()
        if how == "expected":
            return {"values": v[:-1].tobytes()}
        if how == "non-finite":
            v[3] = np.nan
        else:
            v *= 1e4
        return {"values": v.tobytes()}

    return rewrite


CASES = {
    "index out of range": ("indices", "out of range"),
    "index outside its bin": ("indices", "not in its bin"),
    "repeated index": ("indices", "repeated"),
    "k_p exceeded": ("indices", "k_p ="),
    "values of wrong length": ("values", "expected"),
    "NaN value": ("values", "non-finite"),
    "scaled values": ("values", "median"),
}


def test_bad_replies_are_rejected_and_the_round_completes(fed8):
    """Each malformed index list or value vector from site-2 is rejected with a reason naming the
    problem, and every round still commits with the two honest sites."""
    # Prepare
    cfg, server = _server(fed8, "bad", **{"run.min_sites": 2})
    recorder = RunRecorder(cfg, Path(server.ctx.workdir).parent / "rec-bad")

    for r, (case, (phase, message)) in enumerate(CASES.items(), start=1):
        forge = _forge_indices(server, message) if phase == "indices" else _forge_values(message)
        transport = _transport(fed8, 3, wrap=lambda s, c, forge=forge: Spy(c, forge) if s == "site-2" else c)

        # Execute
        metrics, rejected, attempts = run_round(cfg, server, transport, recorder, r)

        # Assert
        assert attempts == 1 and set(rejected) == {"site-2"}, case
        assert message in rejected["site-2"], (case, rejected)
        assert metrics["num_accepted"] == 2, case
        assert metrics["indices.num_accepted"] == (2 if phase == "indices" else 3), case


def test_uplink_bytes_are_indices_plus_values_and_far_below_dense(fed8):
    """Per site and round the ledger holds exactly the encoded indices reply and values reply;
    values cost 4 bytes each at the union, the sum is under a tenth of a dense fp32 update and
    below plain top-k's. The model moves only at the union, and next round's nu is its per-partition norm."""
    uplink = {}
    for selector in ("deft", "topk"):
        # Prepare
        cfg, server = _server(fed8, f"bytes-{selector}", **{"deft.selector": selector})
        spies = {}
        transport = _transport(fed8, 4, wrap=lambda s, c, spies=spies: spies.setdefault(s, Spy(c)))
        recorder = RunRecorder(cfg, Path(server.ctx.workdir).parent / f"rec-bytes-{selector}")
        before = _flat(server.params)

        # Execute
        run_round(cfg, server, transport, recorder, 1)

        # Assert
        n = len(server.round.union)
        values_bytes = len(wire.encode({"values": bytes(4 * n)}))
        for s, spy in spies.items():
            rows = {(r.phase, r.direction): r.num_bytes for r in recorder.ledger.rows if r.site_id == s}
            assert rows[("indices", "up")] == spy.sent["indices"] and rows[("values", "up")] == spy.sent["values"]
            assert spy.sent["values"] == values_bytes
        uplink[selector] = recorder.ledger.per_site(round_idx=1, direction="up")
        changed = torch.flatten(torch.nonzero(_flat(server.params) != before))
        assert set(changed.tolist()) <= set(server.round.union.tolist())
        if selector == "deft":
            diff = (_flat(server.params) - before).double().numpy()
            parts = server.parts
            expected = [np.linalg.norm(diff[a : a + s]) for a, s in zip(parts.starts, parts.sizes)]
            assert np.allclose(server.nu, expected, rtol=1e-4, atol=1e-6)
    dense = len(wire.encode({"delta": bytes(4 * server.dim), "loss": 1.0}))
    assert max(uplink["deft"].values()) < dense / 10
    assert max(uplink["deft"].values()) < min(uplink["topk"].values())


# ---- the paper's allocation: k_p from the sites' reported norms ----------------------------------


class Toy(torch.nn.Module):
    """Three trainable tensors (default 10, 20 and 30 values: with 2 sites none is split, n * 2 <= 60)."""

    def __init__(self, sizes=(10, 20, 30)):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(sizes[0]))
        self.b = torch.nn.Parameter(torch.zeros(sizes[1] // 5, 5))
        self.c = torch.nn.Parameter(torch.zeros(sizes[2]))


def _toy_server(tmp_path, allocation, sizes=(10, 20, 30)):
    cfg = _cfg(**{"deft.density": 0.2, "deft.allocation": allocation})
    ctx = ServerContext(run_id=b"\x01" * 16, model=Toy(sizes), tokenizer=None, workdir=tmp_path)
    return deft.DeftServer(cfg, ctx)


def _norms_reply(values):
    return {"norms": encode_tensors([torch.tensor(values)], deft.NORMS_CODEC), "loss": 1.0}


def test_site_norms_allocation_follows_the_papers_rule_by_hand(tmp_path):
    """Partitions of 10, 20, 30 values, k = 0.2 * 60 = 12. Sites report ||a_p|| = (3, 1, 0) and
    (1, 1, 4); equal weights give nu = (2, 1, 2). Visit p0, p2 (ties: lower id), p1 with
    N_rem = 5, 3, 1: k_p0 = floor(12*2/5) = 4, k_p2 = floor(8*2/3) = 5, k_p1 = floor(3*1/1) = 3.
    ``applied`` in round 1 allocates by size instead: p2, p1, p0 get floor(12*30/60) = 6,
    floor(6*20/30) = 4, floor(2*10/10) = 2."""
    # Prepare
    server = _toy_server(tmp_path, "site-norms")
    applied = _toy_server(tmp_path, "applied")

    # Execute
    msgs = server.configure(1, "norms", ["s0", "s1"])
    result = server.aggregate(1, "norms", {"s0": _norms_reply([3, 1, 0]), "s1": _norms_reply([1, 1, 4])}, min_sites=2)
    down = server.configure(1, "indices", ["s0", "s1"])
    applied.configure(1, "indices", ["s0", "s1"])

    # Assert
    assert server.phases == ("norms", "indices", "values") and applied.phases == ("indices", "values")
    assert set(msgs["s0"]) == {"plan", "params", "nsplit"} and msgs["s0"]["nsplit"] == 2
    assert result.committed and server.parts.sizes.tolist() == [10, 20, 30]
    assert server.round.kp.tolist() == [4, 3, 5]
    assert applied.round.kp.tolist() == [2, 4, 6]
    assert "params" not in down["s0"] and sum(d["k"] for d in down.values()) == 12


def test_bad_norms_are_rejected_and_the_rest_allocate(tmp_path):
    """A negative, non-finite or wrong-length norm vector, or a non-finite reported loss, is rejected naming
    the problem; the others
    decide k_p (three partitions of 20, k = 12, nu = (2, 1, 2): 4, 3, 5 as in the test above), and
    only they are asked for indices."""
    # Prepare: bf16 bits written by hand for the NaN case (encode_tensors refuses non-finite values)
    nan_bits = np.array([0x4040, 0x7FC0, 0x0000], "<u2").tobytes()
    cases = {
        "negative": _norms_reply([3.0, -1.0, 0.0]),
        "non-finite": {"norms": nan_bits, "loss": 1.0},
        "expected": _norms_reply([3.0, 1.0]),
        "loss": {**_norms_reply([3.0, 1.0, 0.0]), "loss": float("inf")},
    }

    for reason, forged in cases.items():
        server = _toy_server(tmp_path, "site-norms", sizes=(20, 20, 20))
        server.configure(1, "norms", ["s0", "s1", "s2"])
        replies = {"s0": _norms_reply([3, 1, 0]), "s1": _norms_reply([1, 1, 4]), "s2": forged}

        # Execute
        result = server.aggregate(1, "norms", replies, min_sites=2)
        asked = server.configure(1, "indices", ["s0", "s1", "s2"])

        # Assert
        assert result.committed and set(result.rejected) == {"s2"}, reason
        assert reason in result.rejected["s2"], (reason, result.rejected)
        assert server.round.kp.tolist() == [4, 3, 5] and set(asked) == {"s0", "s1"}


def test_site_norms_round_reports_the_update_norms_and_counts_their_bytes(fed8):
    """Through the protocol (4 tiny sites): each site's reported norms are the per-partition norms of
    the a it saved (to bf16's 2^-8), the server's k_p is DEFT's rule on their mean, the ledger counts
    2 bytes per partition plus framing for them, and the indices message carries no parameters."""
    # Prepare
    cfg, server = _server(fed8, "site-norms-bytes", **{"deft.allocation": "site-norms"})
    spies = {}
    transport = _transport(fed8, 4, wrap=lambda s, c: spies.setdefault(s, Spy(c)))
    recorder = RunRecorder(cfg, Path(server.ctx.workdir).parent / "rec-site-norms")
    reported = {}
    real_aggregate = server.aggregate

    def capture(round_idx, phase, replies, *, min_sites):
        if phase == "norms":
            reported.update(
                {s: decode_tensors(r["norms"], [(len(server.parts),)], "bf16", where=s)[0] for s, r in replies.items()}
            )
        return real_aggregate(round_idx, phase, replies, min_sites=min_sites)

    server.aggregate = capture

    # Execute
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)

    # Assert
    parts = server.parts
    assert not rejected and metrics["num_accepted"] == 4 and metrics["norms.num_accepted"] == 4
    for s, spy in spies.items():
        a = spy.acc[1][-1].double().numpy()
        expected = np.array([np.linalg.norm(a[st : st + n]) for st, n in zip(parts.starts, parts.sizes)])
        assert np.allclose(reported[s].double().numpy(), expected, rtol=2**-8, atol=1e-12)
        rows = {(r.phase, r.direction): r.num_bytes for r in recorder.ledger.rows if r.site_id == s}
        norms_bytes = len(wire.encode({"norms": bytes(2 * len(parts)), "loss": 1.0}))
        assert rows[("norms", "up")] == spy.sent["norms"] == norms_bytes
        assert rows[("indices", "down")] < rows[("norms", "down")] / 20  # bins only, no parameters
    nu = torch.stack([reported[s] for s in sorted(reported)]).double().mean(dim=0).numpy()
    assert server.round.kp.tolist() == deft.allocate_k(nu, parts.sizes, server.k).tolist()
    assert metrics["union_size"] <= metrics["k_sum"] and metrics["kp_size_gap"] >= 0


def test_tiny_recipe_lowers_heldout_loss(tmp_path):
    """The tiny recipe (4 sites, 2 of its 3 rounds) lowers the held-out loss through both phases every round."""
    # Prepare
    flat = cfgmod.load_recipe(ROOT / "recipes" / "deft" / "tiny-4c.toml", ["num_rounds=2"])
    cfg = cfgmod.from_run_config(flat)
    clear_cache()
    rows = []

    # Execute
    summary = inproc.run(cfg, 4, run_dir=tmp_path / "tiny-deft", on_row=rows.append)

    # Assert
    assert summary["rounds_completed"] == cfg.num_rounds
    assert summary["heldout_loss_last"] < summary["heldout_loss_first"] - 0.3
    assert all(not r.get("rejected") and r["num_accepted"] == 4 for r in rows[1:])
    assert all(math.isclose(r["union_over_k"], 1.0, abs_tol=0.05) for r in rows[1:])
