"""The local-training lr across rounds (kavg.lr_schedule, kavg.warmup_rounds) for kavg-family sites."""

from __future__ import annotations

import pytest
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.comm import wire
from edgetune.federation import run_round


def _plans_lr(tmp_path, algorithm, num_rounds, **overrides):
    flat = {"algorithm": algorithm, "num_rounds": num_rounds, "kavg.lr": 0.1, "kavg.local_steps": 1, **overrides}
    if algorithm == "lowrank":
        flat["model.trainable"] = "lora"
    cfg = cfgmod.from_run_config(tiny_flat(**flat))
    server, transport, recorder, *_ = inproc.build(cfg, 2, run_dir=tmp_path / algorithm)
    lrs = []
    for r in range(1, num_rounds + 1):
        payloads = server.configure(r, "train", transport.sites())
        plans = {wire.decode(p["plan"], max_bytes=4096)["lr"] for p in payloads.values()}
        assert len(plans) == 1
        lrs.append(plans.pop())
        run_round(cfg, server, transport, recorder, r)
    return lrs


@pytest.mark.parametrize("algorithm", ["kavg", "lowrank"])
def test_cosine_with_warmup_reaches_the_sites_round_by_round(tmp_path, algorithm):
    """With cosine to a floor of 0.1x over 4 rounds and 1 warm-up round the plans carry 0.05, 0.0775,
    0.0325, 0.01 (by hand: 0.1 x (0.1 + 0.9 x (1, 0.75, 0.25, 0)); round 1 halved by the warm-up). A
    schedule that reaches lr 0 is refused at config time."""
    lrs = _plans_lr(tmp_path, algorithm, 4, **{"kavg.lr_schedule": "cosine:0.1", "kavg.warmup_rounds": 1})
    assert lrs == pytest.approx([0.05, 0.0775, 0.0325, 0.01], abs=1e-12)
    with pytest.raises(ValueError, match="gives lr 0 in round 4"):
        cfgmod.from_run_config(tiny_flat(**{"algorithm": "kavg", "num_rounds": 4, "kavg.lr_schedule": "cosine"}))


def test_constant_is_todays_behaviour_and_bad_spellings_are_refused(tmp_path):
    """The default keeps kavg.lr every round; an unknown schedule names the key."""
    assert _plans_lr(tmp_path, "kavg", 2) == [0.1, 0.1]
    with pytest.raises(ValueError, match="kavg.lr_schedule = 'cosin'"):
        cfgmod.from_run_config(tiny_flat(**{"algorithm": "kavg", "kavg.lr_schedule": "cosin"}))
