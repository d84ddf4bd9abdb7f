"""The run folder ``runs/<run-id>/``: metrics, ledger, summary, plot and checkpoints.

runs/<run-id>/
  config.toml          the resolved configuration (a recipe that reproduces the run)
  metrics.jsonl        one row per round (round 0 = before training)
  ledger.jsonl         bytes per (round, phase, site, direction, payload|flower|link)
  timeline.jsonl       when the run was submitted and each round closed (splits link-meter logs by round)
  summary.json         first/last held-out loss and accuracy, bytes, framing, timings
  loss_vs_bytes.png    held-out loss against cumulative bytes
  checkpoints/round-NNNN/   model (safetensors + config) or peft adapter, tokenizer, edgetune.json
  tensorboard/         per-round scalars, when ``run.track`` names tensorboard (``tracking.py``)
"""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetune import config as cfgmod
from edgetune.comm.ledger import ByteLedger, LedgerRow
from edgetune.config import RunConfig
from edgetune.io import append_jsonl, atomic_folder, atomic_write_bytes, atomic_write_json, read_jsonl
from edgetune.linkmeter import mark_timeline
from edgetune.tracking import Trackers


def new_run_name(cfg: RunConfig) -> str:
    """``<algorithm>-<UTC timestamp>`` unless ``run.name`` is set."""
    if cfg.run.name:
        return cfg.run.name
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f")
    return f"{cfg.algorithm}-{stamp}"


class RunRecorder:
    """Writes everything a run leaves behind, crash-safe, as rounds complete."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, *, on_row: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ledger = ByteLedger()
        self.on_row = on_row
        self.t_start = time.time()
        self.rows: list[dict[str, Any]] = read_jsonl(self.dir / "metrics.jsonl")
        if not (self.dir / "config.toml").is_file():
            # a restarted server keeps the run's own record (journal.py refuses another run's journal)
            atomic_write_bytes(self.dir / "config.toml", cfgmod.to_toml(cfgmod.flatten(cfg)).encode())
        self.trackers = Trackers(cfg, self.dir)

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def truncate(self, last_round: int) -> None:
        """Forget rows and ledger entries after ``last_round`` (a resumed run redoes them)."""
        kept = [r for r in self.rows if r["round"] <= last_round]
        if len(kept) != len(self.rows):
            self.rows = kept
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
            atomic_write_bytes(self.metrics_path, text.encode(), mode=0o644)
        ledger = read_jsonl(self.dir / "ledger.jsonl")
        self.ledger.rows = [LedgerRow(**r) for r in ledger if r["round_idx"] <= last_round]

    def round_done(self, row: dict[str, Any]) -> None:
        """Append one round's row (bytes filled in from the ledger) and print it."""
        r = row["round"]
        row.setdefault("uplink_bytes", self.ledger.total(direction="up", round_idx=r))
        row.setdefault("downlink_bytes", self.ledger.total(direction="down", round_idx=r))
        row.setdefault("uplink_flower_bytes", self.ledger.total(direction="up", kind="flower", round_idx=r))
        row.setdefault("downlink_flower_bytes", self.ledger.total(direction="down", kind="flower", round_idx=r))
        prev = self.rows[-1] if self.rows else {}
        row["cum_uplink_bytes"] = prev.get("cum_uplink_bytes", 0) + row["uplink_bytes"]
        row["cum_downlink_bytes"] = prev.get("cum_downlink_bytes", 0) + row["downlink_bytes"]
        row["elapsed_s"] = round(time.time() - self.t_start, 3)
        self.rows.append(row)
        append_jsonl(self.metrics_path, row)
        mark_timeline(self.dir, "round", round=r)  # when the round closed: splits a link meter's bytes by round
        self.ledger.write_jsonl(self.dir / "ledger.jsonl")
        self.trackers.log(row)
        if self.on_row is not None:
            self.on_row(row)

    def checkpoint(self, model: Any, tokenizer: Any, round_idx: int, extra: dict[str, Any]) -> Path:
        """Write ``checkpoints/round-NNNN`` atomically; keep the newest ``run.keep_checkpoints``."""
        from edgetune.models.labelhead import label_head_of, merged_head, save_label_head  # (imports torch)
        from edgetune.models.tokenbias import plain_head, save_token_bias, token_bias_of

        def fill(tmp: Path) -> None:
            # a label head is saved as a plain output layer; a token bias (which no plain layer holds) as a
            # file of its own next to the frozen weights
            with merged_head(model) as merged, plain_head(merged) as plain:
                plain.save_pretrained(tmp, safe_serialization=True)
            if label_head_of(model) is not None:
                save_label_head(tmp, model)  # and as itself: edgetune eval rebuilds and checks the plain weights
            if token_bias_of(model) is not None:
                save_token_bias(tmp, model)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            info = {"round": round_idx, "algorithm": self.cfg.algorithm, **extra}
            (tmp / "edgetune.json").write_text(json.dumps(info, indent=2, sort_keys=True))

        final = self.dir / "checkpoints" / f"round-{round_idx:04d}"
        return atomic_folder(final, fill, keep=self.cfg.run.keep_checkpoints)

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` and the plot; return the summary."""
        evals = [r for r in self.rows if r.get("heldout_loss") is not None]
        accs = [r for r in self.rows if r.get("accuracy") is not None]
        choices = [r for r in self.rows if r.get("choice_loss") is not None]
        train_rows = [r for r in self.rows if r["round"] > 0]
        summary: dict[str, Any] = {
            "algorithm": self.cfg.algorithm,
            "num_rounds": self.cfg.num_rounds,
            "rounds_completed": max((r["round"] for r in self.rows), default=0),
            "heldout_loss_first": evals[0]["heldout_loss"] if evals else None,
            "heldout_loss_last": evals[-1]["heldout_loss"] if evals else None,
            "accuracy_first": accs[0]["accuracy"] if accs else None,
            "accuracy_last": accs[-1]["accuracy"] if accs else None,
            "choice_loss_first": choices[0]["choice_loss"] if choices else None,
            "choice_loss_last": choices[-1]["choice_loss"] if choices else None,
            "uplink_bytes_total": sum(r["uplink_bytes"] for r in train_rows),
            "downlink_bytes_total": sum(r["downlink_bytes"] for r in train_rows),
            "wall_s": round(time.time() - self.t_start, 1),
            "final_state_hash": self.rows[-1].get("state_hash") if self.rows else None,
            **extra,
        }
        try:
            plot_loss_vs_bytes(self.rows, self.dir / "loss_vs_bytes.png", title=self.dir.name)
            if any(r.get("imv") is not None or r.get("worker_imv") is not None for r in self.rows):
                plot_imv(self.rows, self.dir / "imv.png", title=self.dir.name)
        except Exception as err:  # a plot must never fail a finished run; the summary says what went wrong
            summary["plot_error"] = f"{type(err).__name__}: {err}"
        atomic_write_json(self.dir / "summary.json", summary)
        self.trackers.close()
        return summary


def format_row(row: dict[str, Any]) -> str:
    """One line per round for consoles and logs."""
    parts = [f"round {row['round']:>3}"]
    for key, fmt in (("train_loss", ".4f"), ("heldout_loss", ".4f"), ("accuracy", ".3f")):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:{fmt}}")
    for key, label in (("worker_mv", "MV"), ("imv", "IMV")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.4g}")
    parts.append(f"up {row.get('uplink_bytes', 0):,} B")
    parts.append(f"down {row.get('downlink_bytes', 0):,} B")
    if row.get("num_accepted") is not None:
        parts.append(f"sites {int(row['num_accepted'])}")
    if row.get("rejected"):
        parts.append(f"rejected {row['rejected']}")
    if row.get("wall_s") is not None:
        parts.append(f"{row['wall_s']:.1f} s")
    if row.get("state_hash"):
        parts.append(f"hash {row['state_hash'][:12]}")
    return "  ".join(parts)


def plot_loss_vs_bytes(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Held-out loss against cumulative uplink and total bytes (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("heldout_loss") is not None]
    if not pts:
        return
    up = [max(r["cum_uplink_bytes"], 1) for r in pts]
    total = [max(r["cum_uplink_bytes"] + r["cum_downlink_bytes"], 1) for r in pts]
    loss = [r["heldout_loss"] for r in pts]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(up, loss, "o-", label="uplink (sites → server)")
    ax.plot(total, loss, "s--", alpha=0.7, label="uplink + downlink")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes (encoded payloads)")
    ax.set_ylabel("held-out loss (answer tokens)")
    ax.set_title(title or "held-out loss vs bytes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()  # in memory: a temp file at a guessable name could be a planted symlink
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), mode=0o644)


def plot_imv(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Checkpoint IMV (valley probe) and worker IMV (dppf spread) against rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for key, label, style in (
        ("imv", "checkpoint IMV (1 / valley radius)", "o-"),
        ("worker_imv", "worker IMV (1 / mean spread, dppf)", "s--"),
    ):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("IMV (higher: sharper)")
    ax.set_title(title or "flatness")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()  # in memory: a temp file at a guessable name could be a planted symlink
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), mode=0o644)
