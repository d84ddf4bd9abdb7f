"""Export per-round metrics to the trackers people already use: TensorBoard and Weights & Biases.

Off by default (``run.track = ""``). With ``run.track = "tensorboard"`` every metrics row becomes
scalars at step = round in ``<run>/tensorboard/`` (``tensorboard --logdir runs``); with ``"wandb"``
a W&B run (``WANDB_MODE`` decides online or offline; offline when it is unset, so nothing leaves the
machine unless asked) gets the same rows and the resolved config. ``metrics.jsonl`` stays the record;
a tracker that fails to log never stops the run (the error is printed once).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any

from edgetune.config import RunConfig, flatten

INSTALL_HINT = {
    "tensorboard": "pip install 'edgetune[tensorboard]' (or tensorboard)",
    "wandb": "pip install wandb",
}


def trackers_of(cfg: RunConfig) -> list[str]:
    return [t.strip() for t in cfg.run.track.split(",") if t.strip()]


def check_available(cfg: RunConfig) -> None:
    """Raise ``ValueError`` when ``run.track`` names a tracker whose package is not installed."""
    for name in trackers_of(cfg):
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"run.track = {cfg.run.track!r} needs the {name} package: {INSTALL_HINT[name]}")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (bools, strings, dicts and the round itself left out)."""
    out = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


class Trackers:
    """The trackers ``run.track`` names, for one run folder."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        check_available(cfg)
        self._tb: Any = None
        self._wandb: Any = None
        self._failed: set[str] = set()
        names = trackers_of(cfg)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "edgetune"),
                name=Path(run_dir).name,
                id=Path(run_dir).name,
                resume="allow",
                dir=str(run_dir),
                mode=os.environ.get("WANDB_MODE", "offline"),
                config=flatten(cfg),
            )

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row at step = its round."""
        values = scalars(row)
        step = int(row["round"])
        if self._tb is not None:
            self._guard("tensorboard", lambda: self._log_tb(values, step))
        if self._wandb is not None:
            self._guard("wandb", lambda: self._wandb.log(values, step=step))

    def _log_tb(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self._tb.add_scalar(key, value, global_step=step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._guard("tensorboard", self._tb.close)
        if self._wandb is not None:
            self._guard("wandb", self._wandb.finish)

    def _guard(self, name: str, fn: Any) -> None:
        try:
            fn()
        except Exception as err:  # a tracker must never fail a run; metrics.jsonl has every row
            if name not in self._failed:
                self._failed.add(name)
                print(
                    f"[edgetune] {name} export failed ({type(err).__name__}: {err}); metrics.jsonl is unaffected",
                    file=sys.stderr,
                    flush=True,
                )
