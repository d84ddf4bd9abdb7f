"""The replay guard outlives the process: a restarted site refuses envelopes it already used."""

from __future__ import annotations

import stat

import pytest
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.build import build_client, keys_dir_for, process_workdir
from edgetune.crypto import guardfile
from edgetune.crypto.envelope import EnvelopeError
from edgetune.crypto.guardfile import ReplayGuard
from edgetune.crypto.keys import site_kit_dir
from edgetune.federation import run_federation


class Keeping:
    """An honest site that keeps every round message it was sent."""

    def __init__(self, honest) -> None:
        self.honest, self.ctx, self.msgs = honest, honest.ctx, []

    def step(self, phase, msg, state):
        self.msgs.append(msg)
        return self.honest.step(phase, msg, state)


def test_a_restarted_site_refuses_the_envelopes_it_already_accepted(tmp_path):
    """After three rounds, site-0 restarts (a new client half, empty Flower node state, same site folder):
    the envelopes of rounds 1 and 2, replayed to it, are refused as replays, because the guard was
    persisted before each secret was used; the file holds round 3, mode 0600."""
    # Prepare
    cfg = cfgmod.from_run_config(tiny_flat(**{"num_rounds": 3, "data.demo_facts": 2, "eval.num_examples": 2}))
    run_dir = tmp_path / "run"
    server, transport, recorder, evaluate, tok = inproc.build(cfg, 2, run_dir=run_dir)
    site0 = transport.clients["site-0"] = Keeping(transport.clients["site-0"])
    run_federation(cfg, server, transport, recorder, evaluate, tok)

    # Execute: the SuperNode restarts
    kit = site_kit_dir(keys_dir_for(cfg, run_dir), "site-0")
    fresh = build_client(cfg, "site-0", 0, 2, kit, workdir=process_workdir(cfg))
    path = guardfile.guard_path(fresh.ctx.state_dir, fresh.ctx.site_keys.server_kid, server.run_id)

    # Assert
    for old in site0.msgs[:2]:
        with pytest.raises(EnvelopeError) as err:
            fresh.step("train", old, {})
        assert err.value.reason == "replay"
    assert guardfile.load(path).last_round == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_guard_file_round_trip_and_corruption(tmp_path):
    """A missing file is a fresh guard; a stored guard loads back; a flipped byte is refused naming the file;
    newest() keeps the later round."""
    path = tmp_path / "replay-guard" / "x.guard"
    assert guardfile.load(path) == ReplayGuard()
    g = ReplayGuard(7, bytes(range(32)))
    guardfile.store(path, g)
    assert guardfile.load(path) == g
    assert guardfile.newest(ReplayGuard(), g) == g and guardfile.newest(g, ReplayGuard(3, bytes(32 * [1]))) == g
    blob = bytearray(path.read_bytes())
    blob[10] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=f"{path}: replay guard: checksum mismatch"):
        guardfile.load(path)
