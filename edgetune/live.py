"""What the entry points show while a run goes: the live round table, following a run folder, the summary.

``edgetune simulate`` and ``edgetune server`` follow a run through the files it writes (``metrics.jsonl``,
``summary.json``; ``edgetune/runs.py``) and ask Flower for the run's status now and then; the in-process
engine feeds the table row by row.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgetune.io import read_jsonl

console = Console(stderr=False)
"""Where every ``edgetune`` command prints (stdout; rich resolves it at each write, so tests can capture it)."""


class RoundTable:
    """A live table of rounds with the run's progress in the caption."""

    COLUMNS = (
        ("round", "round", "{}"),
        ("train_loss", "train loss", "{:.4f}"),
        ("heldout_loss", "held-out loss", "{:.4f}"),
        ("accuracy", "accuracy", "{:.3f}"),
        ("choice_loss", "choice loss", "{:.4f}"),
        ("uplink_bytes", "uplink B", "{:,}"),
        ("downlink_bytes", "downlink B", "{:,}"),
        ("num_accepted", "sites", "{:.0f}"),
        ("wall_s", "wall s", "{:.1f}"),
        ("state_hash", "state hash", "{:.12}"),
    )
    OPTIONAL = frozenset({"choice_loss"})

    def __init__(self, title: str, num_rounds: int) -> None:
        self.title = title
        self.num_rounds = num_rounds
        self.rows: list[dict[str, Any]] = []
        self.status = "starting"
        self.t0 = time.time()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def render(self) -> Table:
        done = max((r["round"] for r in self.rows), default=0)
        bar_width = 30
        filled = int(bar_width * done / max(1, self.num_rounds))
        caption = (
            f"[{'█' * filled}{'░' * (bar_width - filled)}] round {done}/{self.num_rounds}  "
            f"{time.time() - self.t0:.0f} s  {self.status}"
        )
        table = Table(title=self.title, caption=caption, caption_justify="left")
        # optional columns appear once a row has them (choice loss: data with candidate answers)
        columns = [c for c in self.COLUMNS if c[0] not in self.OPTIONAL or any(c[0] in r for r in self.rows)]
        for _, header, _ in columns:
            table.add_column(header, justify="right")
        for row in self.rows:
            cells = []
            for key, _, fmt in columns:
                value = row.get(key)
                cells.append("" if value is None else fmt.format(value))
            table.add_row(*cells)
            if row.get("rejected"):
                table.add_row(f"[yellow]rejected: {row['rejected']}", *[""] * (len(columns) - 1))
        return table


def follow(
    table: RoundTable,
    run_dir: Path,
    status_fn: Callable[[], str],
    *,
    poll_s: float = 2.0,
    status_every_s: float = 15.0,
) -> str:
    """Show the run's metrics.jsonl rows live until ``status_fn()`` says the run finished.

    The rows are read every ``poll_s``; Flower is asked for the run's status (a ``flwr ls``: a new
    Python process, about a CPU-second) only every ``status_every_s`` and as soon as the run writes
    its summary, so following a run does not take CPU from the sites it simulates.
    """
    status = ""
    asked = -math.inf
    with Live(table.render(), console=console, refresh_per_second=2) as live:
        while True:
            for row in read_jsonl(run_dir / "metrics.jsonl")[len(table.rows) :]:
                table.add(row)
            if time.monotonic() - asked >= status_every_s or (run_dir / "summary.json").exists():
                status = status_fn()
                asked = time.monotonic()
                table.status = status
            live.update(table.render())
            if status.startswith("finished"):
                break
            time.sleep(poll_s)
        for row in read_jsonl(run_dir / "metrics.jsonl")[len(table.rows) :]:
            table.add(row)
        live.update(table.render())
    return status


def print_summary(run_dir: Path) -> None:
    """The run's first -> last held-out loss and accuracy, bytes and time (nothing before summary.json exists)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return
    s = json.loads(path.read_text())

    def change(key: str, label: str, fmt: str) -> str:
        first, last = s.get(f"{key}_first"), s.get(f"{key}_last")
        if first is None or last is None:  # not evaluated in this run (eval.every_rounds = 0, no candidates)
            return ""
        return f"[bold]{label}[/] {first:{fmt}} → {last:{fmt}}   "

    console.print(
        change("heldout_loss", "held-out loss", ".4f")
        + change("choice_loss", "choice loss", ".4f")
        + change("accuracy", "accuracy", ".3f")
        + f"[bold]uplink[/] {s['uplink_bytes_total']:,} B   [bold]downlink[/] {s['downlink_bytes_total']:,} B   "
        f"{s['wall_s']:.0f} s"
    )
    console.print(f"run folder: {run_dir}   checkpoint: {s.get('checkpoint')}")
