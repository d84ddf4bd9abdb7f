"""Several devices at one spsa site: probes spread across replicas, merged in probe order, give
the same reply bytes and the same state hash as one device (two CPU "devices" stand in for GPUs)."""

from __future__ import annotations

import pytest
from conftest import tiny_flat
from test_spsa_variants import LABEL_HEAD

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms.spsa.client import SpsaClient, probe_lanes
from edgetune.comm import wire
from edgetune.crypto import envelope
from edgetune.crypto.guardfile import ReplayGuard
from edgetune.federation import run_round
from edgetune.models.headcache import HeadRunner


def _cfg(**overrides):
    return cfgmod.from_run_config(tiny_flat(**overrides))


def _inner_reply(client, msg, blob):
    opened, _ = envelope.open_envelope(
        msg["env"], client.ctx.site_keys, run_id=msg["run"], guard=ReplayGuard(), now=0.0
    )
    return envelope.open_reply(
        opened.reply_key,
        run_id=msg["run"],
        round_idx=opened.round_idx,
        site_id=client.ctx.site_id,
        blob=blob,
        max_bytes=1 << 20,
    )


@pytest.mark.parametrize(
    ("difference", "devices", "trainable"),
    [
        ("central", "cpu,cpu", "all"),
        ("forward", "cpu,cpu", "all"),
        ("central", "cpu,cpu,cpu", "all"),  # 3 lanes, 5 probes: uneven shares
        ("forward", "cpu,cpu", "layers.1."),  # perturbed tensors in the top block: suffix runner per lane
        ("forward", "cpu,cpu", "label-head"),  # cached features per lane (models/headcache.py)
    ],
)
def test_several_devices_send_the_same_bytes_and_hash_as_one(tmp_path, difference, devices, trainable):
    over = {"spsa.difference": difference, "spsa.num_probes": 5, "spsa.num_steps": 3, "model.trainable": trainable}
    if trainable == "label-head":
        over = {**LABEL_HEAD, **over}
    one = _cfg(**over)
    many = _cfg(**over, **{"model.device": devices})
    server, transport, recorder, *_ = inproc.build(one, 2, run_dir=tmp_path / "run")
    run_round(one, server, transport, recorder, 1)  # round 2 starts from a trained state
    payloads = server.configure(2, "train", transport.sites())
    for site, client in transport.clients.items():
        msg = payloads[site]
        reply_one, _ = client.step("train", msg, {})
        reply_many, _ = SpsaClient(many, client.ctx).step("train", msg, {})
        inner_one = _inner_reply(client, msg, reply_one["blob"])
        inner_many = _inner_reply(client, msg, reply_many["blob"])
        assert inner_many == inner_one  # codes, state hash and loss: byte for byte
        assert len(wire.decode(inner_one, max_bytes=1 << 20)["codes"]) == 3 * 5
    # the server accepts the multi-device replies and its state hash is the one-device one
    replies = {}
    for site, client in transport.clients.items():
        msg = payloads[site]
        replies[site] = SpsaClient(many, client.ctx).step("train", msg, {})[0]
    result = server.aggregate(2, "train", replies, min_sites=2)
    assert result.committed and not result.rejected
    if trainable == "label-head":  # every lane scores from cached features, as the primary does
        client = next(iter(transport.clients.values()))
        rep = server.replica
        lanes = probe_lanes(rep, devices, [], client.ctx.train_set, "choices")
        assert lanes and all(isinstance(lane.runner, HeadRunner) for lane in lanes)


def test_multi_device_federation_stays_in_sync(tmp_path):
    """A whole run whose sites use two devices: every round commits with all sites accepted."""
    cfg = _cfg(**{"model.device": "cpu,cpu", "spsa.num_probes": 3})
    server, transport, recorder, *_ = inproc.build(cfg, 2, run_dir=tmp_path / "run", separate_replicas=True)
    for r in (1, 2):
        metrics, rejected, _ = run_round(cfg, server, transport, recorder, r)
        assert not rejected and metrics["num_accepted"] == 2


def test_auto_inside_a_device_list_is_refused():
    with pytest.raises(ValueError, match="'auto' cannot be part of a device list"):
        _cfg(**{"model.device": "auto,cpu"})
