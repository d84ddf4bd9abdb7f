"""Per-round metrics exported to TensorBoard and W&B (edgetune/tracking.py), off by default."""

from __future__ import annotations

import json
import sys
import types

import pytest
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc, tracking


def _run(tmp_path, **overrides):
    cfg = cfgmod.from_run_config(tiny_flat(num_rounds=2, **overrides))
    inproc.run(cfg, 2, run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return tmp_path / "run", rows


def test_tensorboard_gets_every_rounds_metrics_at_step_round(tmp_path):
    """run.track = tensorboard writes event files whose scalars equal metrics.jsonl, one step per round."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, rows = _run(tmp_path, **{"run.track": "tensorboard"})
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("heldout_loss")]
    assert [s for s, _ in loss] == [0, 1, 2]
    assert [v for _, v in loss] == pytest.approx([r["heldout_loss"] for r in rows], rel=1e-6)
    assert [e.value for e in events.Scalars("uplink_bytes")] == [r["uplink_bytes"] for r in rows]
    assert "state_hash" not in events.Tags()["scalars"]


def test_wandb_gets_the_rows_and_the_config_offline(tmp_path, monkeypatch):
    """run.track = wandb starts one offline run (unless WANDB_MODE says otherwise) with the resolved config
    and logs each row's numbers at step = round, then finishes it."""
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.init = init
    fake.__spec__ = types.SimpleNamespace(name="wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("WANDB_MODE", raising=False)

    _, rows = _run(tmp_path, **{"run.track": "wandb"})

    init_kwargs = calls[0][1]
    assert init_kwargs["mode"] == "offline" and init_kwargs["config"]["run.track"] == "wandb"
    logs = [c for c in calls if c[0] == "log"]
    assert [step for _, step, _ in logs] == [0, 1, 2]
    assert [v["heldout_loss"] for _, _, v in logs] == [r["heldout_loss"] for r in rows]
    assert calls[-1] == ("finish",)


def test_off_by_default_and_a_missing_package_is_named(tmp_path, monkeypatch):
    """No tracker without run.track; a tracker whose package is missing is refused with the pip command."""
    run_dir, _ = _run(tmp_path)
    assert not (run_dir / "tensorboard").exists()
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    cfg = cfgmod.from_run_config(tiny_flat(**{"run.track": "tensorboard"}))
    with pytest.raises(ValueError, match=r"needs the tensorboard package: pip install 'edgetune\[tensorboard\]'"):
        tracking.check_available(cfg)
    with pytest.raises(ValueError, match="unknown tracker"):
        cfgmod.from_run_config(tiny_flat(**{"run.track": "mlflow"}))
