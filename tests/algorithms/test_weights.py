"""weights.py: the plan check reuses the config's own checks; the aggregation hooks run in order."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune.algorithms.base import ServerContext
from edgetune.algorithms.kavg import KavgServer
from edgetune.algorithms.weights import Screened, check_plan
from edgetune.comm import wire
from edgetune.comm.tensors import encode_tensors

PLAN = {"round": 1, "K": 2, "lr": 0.1, "opt": "sgd", "mom": 0.0, "wd": 0.0, "down": "fp32", "up": "fp32"}
PLAN |= {"train": "all", "seed": 0, "bs": 4, "run": "ab" * 16}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"opt": "rmsprop"}, "kavg.optimizer must be sgd or adamw"),  # KavgSection's own words
        ({"K": 0}, "kavg.local_steps must be >= 1"),
        ({"mom": 1.0}, "kavg.momentum must be in \\[0, 1\\)"),
        ({"up": "fp8"}, "kavg.up_codec must be one of"),
        ({"lr": float("inf")}, "lr=inf must be finite"),  # only a plan can carry these
        ({"wd": float("nan")}, "wd=nan must be finite"),
        ({"bs": 0}, "bs=0 must be >= 1"),
    ],
)
def test_plan_check_refuses_what_no_config_produces(change, message):
    """A site refuses a plan through KavgSection's checks (not a second copy of them), plus what only a
    plan can get wrong; a plan the config can produce passes."""
    check_plan(dict(PLAN))
    with pytest.raises(ValueError, match="round plan refused: .*" + message):
        check_plan({**PLAN, **change})


def test_aggregate_runs_decode_screen_combine_in_order(tmp_path):
    """An algorithm changes one step by overriding its hook: here ``screen`` leaves out one site, and the
    combined step is the mean of the other two updates, with the reason in ``rejected``."""
    # Prepare
    cfg = cfgmod.from_run_config(tiny_flat(algorithm="kavg"))
    ctx = ServerContext(run_id=b"\x01" * 16, model=torch.nn.Linear(3, 2), tokenizer=None, workdir=tmp_path)
    calls = []

    class Picky(KavgServer):
        def decode(self, site, payload, plan):
            calls.append(("decode", site))
            return super().decode(site, payload, plan)

        def screen(self, round_idx, updates):
            calls.append(("screen", tuple(sorted(updates))))
            screened = super().screen(round_idx, updates)
            screened.rejected["site-1"] = "picky"
            screened.drop("site-1")
            return screened

        def combine(self, round_idx, updates, plans):
            calls.append(("combine", tuple(sorted(updates))))
            return super().combine(round_idx, updates, plans)

    server = Picky(cfg, ctx)
    before = [p.clone() for p in server.params]
    sites = ["site-0", "site-1", "site-2"]
    msgs = server.configure(1, "train", sites)
    assert wire.decode(msgs["site-0"]["plan"], max_bytes=4096)["run"] == ctx.run_id.hex()
    value = {"site-0": 0.01, "site-1": 0.011, "site-2": 0.03}
    replies = {
        s: {"delta": encode_tensors([torch.full((2, 3), v), torch.full((2,), v)], "fp32"), "loss": 1.0}
        for s, v in value.items()
    }

    # Execute
    result = server.aggregate(1, "train", replies, min_sites=2)

    # Assert
    assert calls == [
        ("decode", "site-0"),
        ("decode", "site-1"),
        ("decode", "site-2"),
        ("screen", tuple(sites)),
        ("combine", ("site-0", "site-2")),
    ]
    assert result.committed and result.accepted == ("site-0", "site-2") and result.rejected == {"site-1": "picky"}
    # the default screen clipped site-2 to kavg.clip_mult (2) x the lower median update (site-1's) first
    step = (value["site-0"] + 2 * value["site-1"]) / 2
    for b, p in zip(before, server.params):
        assert torch.allclose(p - b, torch.full_like(b, step), atol=1e-7)
    assert isinstance(server.screen(1, {}), Screened)
