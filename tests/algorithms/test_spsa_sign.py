"""spsa with one bit per scalar (``spsa.scalar_codec = "sign"``): the bytes a site sends are the codec's length
plus the fixed framing, a lying site is bounded as with byte codes (clip, norm bound) and cannot push the clip,
a malformed sign blob is rejected without losing the round, and every replica stays bitwise with the server."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RewriteCodes, tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import spsa
from edgetune.algorithms.spsa import log as spsalog
from edgetune.comm import wire
from edgetune.comm.codecs import codec_for
from edgetune.federation import run_round


def _build(tmp_path, name, num_sites=4, **overrides):
    cfg = cfgmod.from_run_config(tiny_flat(**overrides))
    return cfg, *inproc.build(cfg, num_sites, run_dir=tmp_path / name, separate_replicas=True)[:3]


@pytest.mark.parametrize(("spec", "k_steps", "n_probes"), [("sign:1", 1, 1), ("sign:2", 5, 3), ("sign", 40, 8)])
def test_uplink_is_the_codecs_length_plus_the_same_framing(tmp_path, spec, k_steps, n_probes):
    """Counted where the reply is encoded: ceil(K / B) magnitude bytes + ceil(K P / 8) sign bytes + framing,
    e.g. 3 + 40 = 43 bytes for 320 scalars (320 with a one-byte codec)."""
    # Prepare
    cfg, server, transport, recorder = _build(
        tmp_path, spec.replace(":", ""), 2,
        **{"spsa.scalar_codec": spec, "spsa.num_steps": k_steps, "spsa.num_probes": n_probes, "num_rounds": 1},
    )  # fmt: skip
    size = codec_for(spec).blob_len(k_steps, n_probes)

    # Execute
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)

    # Assert
    assert not rejected and metrics["num_accepted"] == 2
    expected = {"site-0": size + spsa.reply_overhead_bytes(size), "site-1": size + spsa.reply_overhead_bytes(size)}
    assert recorder.ledger.per_site(round_idx=1, direction="up") == expected
    assert size == {"sign:1": 2, "sign:2": 3 + 2, "sign": 3 + 40}[spec]


def _max_sign(codes: bytes) -> bytes:
    """Magnitude 255 (the clip) on every block and every sign negative (K = 4, B = 2: two magnitude bytes)."""
    return b"\xff\xff" + b"\xff" * (len(codes) - 2)


def test_a_site_at_the_clip_on_every_scalar_is_norm_bounded_and_cannot_push_the_clip(tmp_path):
    """One of four sites sends the largest magnitude and one sign on everything, for five rounds: the norm bound
    scales it, the clip stays within what the honest sites' magnitudes set, and each site's own replica equals the
    server's state bitwise every round."""
    # Prepare
    over = {"spsa.scalar_codec": "sign:2", "spsa.num_steps": 4, "spsa.num_probes": 4, "num_rounds": 5}
    cfg, server, transport, recorder = _build(tmp_path, "liar", **over)
    transport.clients["site-3"] = RewriteCodes(transport.clients["site-3"], _max_sign)
    scaled = 0

    # Execute / Assert
    for r in range(1, 6):
        before, clip = server.state_hash(), server.scale
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, r)
        assert not rejected and metrics["num_accepted"] == 4
        decoded = server.log[r].decoded()
        assert np.all(np.abs(decoded["site-3"]) == clip)
        honest = [float(np.abs(decoded[s]).max()) for s in ("site-0", "site-1", "site-2")]
        assert server.scale <= max(2 * max(honest), clip / 4)  # the clip follows the honest magnitudes
        scaled += spsalog.site_norm_factors(decoded)["site-3"] < 1.0
        for c in transport.clients.values():
            rep = spsa.replica_for(
                c.ctx.model, server.run_id, c.ctx.workdir, "auto", c.ctx.replica_namespace, server.space
            )
            assert (rep.applied, rep.hash) == (r - 1, before)
    assert scaled >= 4


@pytest.mark.parametrize(
    ("name", "rewrite", "why"),
    [
        ("padding", lambda c: c[:-1] + bytes([c[-1] | 0x80]), "unused bits"),
        ("short", lambda c: c[:-1], "expected"),
        ("long", lambda c: c + b"\x00", "exceeds the limit"),  # the size cap comes first
    ],
)
def test_a_malformed_sign_blob_is_rejected_naming_why_and_the_round_commits_without_it(tmp_path, name, rewrite, why):
    """K P = 12 scalars leave 4 padding bits: a set padding bit, or a blob of the wrong length, rejects that site's
    reply with the reason; the other three commit the round."""
    # Prepare
    over = {"spsa.scalar_codec": "sign:2", "spsa.num_steps": 3, "spsa.num_probes": 4, "run.min_sites": 3}
    cfg, server, transport, recorder = _build(tmp_path, name, **over)
    transport.clients["site-1"] = RewriteCodes(transport.clients["site-1"], rewrite)

    # Execute
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)

    # Assert
    assert set(rejected) == {"site-1"} and why in rejected["site-1"]
    assert metrics["num_accepted"] == 3 and server.log[1].sites == ("site-0", "site-2", "site-3")


def test_a_log_entry_with_sign_codes_of_the_wrong_length_is_refused():
    """A replay log entry's codes must be sites x the codec's length (a site replaying a tampered log stops)."""
    # Prepare
    entry = spsa.LogEntry(1, ("a", "b"), bytes(2 * 5), 0.5, 2.0, 5, 3, "per-site", 0, "sign:2", "mean", 0.0)
    payload = entry.to_payload()

    # Execute / Assert
    assert spsa.LogEntry.from_payload(payload) == entry
    with pytest.raises(wire.WireError, match="codes length"):
        spsa.LogEntry.from_payload({**payload, "codes": bytes(2 * 15)})  # one byte per scalar
