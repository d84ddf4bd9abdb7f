"""Several runs side by side (``edgetune compare``): one table row per run, and held-out loss (and accuracy)
against cumulative uplink bytes on one plot.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgetune.io import atomic_write_bytes
from edgetune.report.load import Run, load_run


def cumulative_uplink(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Cumulative uplink payload bytes after each row (``cum_uplink_bytes``, else a running sum)."""
    out, total = [], 0
    for r in rows:
        total += int(r.get("uplink_bytes") or 0)
        out.append(int(r["cum_uplink_bytes"]) if r.get("cum_uplink_bytes") is not None else total)
    return out


def compare_row(run: Run) -> dict[str, Any]:
    """One run's line of the comparison table, from its metrics rows (so unfinished runs work)."""
    losses = [r["heldout_loss"] for r in run.rows if r.get("heldout_loss") is not None]
    accs = [r["accuracy"] for r in run.rows if r.get("accuracy") is not None]
    trained = [r for r in run.rows if int(r.get("round", 0)) > 0]
    return {
        "run": run.name,
        "algorithm": run.algorithm,
        "rounds": max(int(r.get("round", 0)) for r in run.rows),
        "heldout_loss_first": losses[0] if losses else None,
        "heldout_loss_last": losses[-1] if losses else None,
        "accuracy_first": accs[0] if accs else None,
        "accuracy_last": accs[-1] if accs else None,
        "uplink_bytes_total": sum(int(r.get("uplink_bytes") or 0) for r in trained),
        "downlink_bytes_total": sum(int(r.get("downlink_bytes") or 0) for r in trained),
        "dir": str(run.dir),
    }


def _arrow(first: Any, last: Any, spec: str) -> str:
    if first is None and last is None:
        return "-"
    return f"{format(first, spec)} → {format(last, spec)}"


def format_compare_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as an aligned plain-text table (one line per run)."""
    headers = ["run", "algorithm", "rounds", "held-out loss", "accuracy", "uplink B", "downlink B"]
    cells = [
        [
            r["run"],
            r["algorithm"],
            str(r["rounds"]),
            _arrow(r["heldout_loss_first"], r["heldout_loss_last"], ".4f"),
            _arrow(r["accuracy_first"], r["accuracy_last"], ".3f"),
            f"{r['uplink_bytes_total']:,}",
            f"{r['downlink_bytes_total']:,}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    right = {2, 5, 6}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(s.rstrip() for s in out) + "\n"


def plot_compare(runs: Sequence[Run], path: Path) -> None:
    """Held-out loss (left) and accuracy (right, where any run measured it) against cumulative uplink bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any(r.get("accuracy") is not None for run in runs for r in run.rows)
    ncols = 2 if has_acc else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), dpi=120, squeeze=False)
    panels = [("heldout_loss", "held-out loss (answer tokens)", axes[0][0])]
    if has_acc:
        panels.append(("accuracy", "exact-match accuracy", axes[0][1]))
    for key, ylabel, ax in panels:
        for run in runs:
            cum = cumulative_uplink(run.rows)
            pts = [(max(c, 1), r[key]) for c, r in zip(cum, run.rows) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{run.algorithm} · {run.name}")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bytes (encoded payloads; round 0 at 1 B)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle("edgetune compare")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), mode=0o644)


def compare(run_dirs: Sequence[Path | str], out: Path | str) -> list[dict[str, Any]]:
    """Plot several runs into ``out`` (PNG) and return one table row per run."""
    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give a file name for the plot (e.g. compare.png)")
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: the plot is a PNG; give a .png file name")
    runs = [load_run(d) for d in run_dirs]
    plot_compare(runs, out)
    return [compare_row(run) for run in runs]
