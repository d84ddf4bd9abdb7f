"""One plot per benchmark, drawn from the JSON rows in ``benchmarks/results/``.

Usage (from the repository root)::

    python -m benchmarks.plots [--results-dir benchmarks/results]

Writes ``<name>.png`` next to each ``<name>.json`` it knows (``quality_per_byte`` draws its own plot
while it runs and is left alone). A result file that is missing is skipped with a line saying so; a
malformed one is an error naming the file. ``run_all`` calls this after its last step.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _machine(rows: Rows) -> str:
    r = rows[0]
    return f"{r.get('model', '?')} model, {r.get('device', 'cpu')}, {r.get('cpu_count', '?')} cores"


def plot_bytes_per_round(rows: Rows, out: Path) -> None:
    """Uplink and downlink bytes per site per round (Flower messages), log scale, one bar pair per config."""
    plt = _pyplot()
    names = [r["config"] for r in rows]
    up = [float(r["up_flower_bytes"]) for r in rows]
    down = [float(r["down_flower_bytes"]) for r in rows]
    fig, ax = plt.subplots(figsize=(12.0, 5.0), dpi=110)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], up, width=0.4, label="uplink")
    ax.bar([i + 0.2 for i in x], down, width=0.4, label="downlink")
    for i, name in enumerate(names):
        if name in {"flowertune-lora", "fedavg-full"}:
            ax.axvspan(i - 0.5, i + 0.5, color="0.9", zorder=0)
    ax.set_yscale("log")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("bytes per site per round (Flower message)")
    ax.set_title(f"bytes per round, every algorithm and codec; shaded: Flower baselines ({_machine(rows)})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_stream_and_replay(rows: Rows, out: Path) -> None:
    """Left: stream throughput vs torch.randn. Right: replay time per round vs sites, with/without pool."""
    plt = _pyplot()
    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(12.0, 4.6), dpi=110)
    stream = [r for r in rows if r.get("kind") == "stream"]
    if stream:
        s = stream[0]
        labels = ["keystream bits", "bits -> +-1, add", "randn", "randn, add"]
        keys = ["keystream_bits", "bits_expand_add", "randn", "randn_add"]
        values = [float(s[f"{k}_elem_per_s"]) for k in keys]
        ax_s.bar(labels, values, color=["C0", "C0", "C1", "C1"])
        ax_s.set_yscale("log")
        ax_s.set_ylabel("elements per second")
        ax_s.set_title(f"perturbation stream vs torch.randn ({s['elements']:,} elements)")
        ax_s.tick_params(axis="x", labelsize=8)
    replay = [r for r in rows if r.get("kind") == "replay"]
    for pool in sorted({int(r["seed_pool"]) for r in replay}):
        pts = sorted((int(r["sites"]), float(r["round_s"])) for r in replay if int(r["seed_pool"]) == pool)
        label = "no seed pool" if pool == 0 else f"seed pool S={pool}"
        ax_r.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax_r.set_xlabel("sites in the round")
    ax_r.set_ylabel("replay seconds per round")
    ax_r.set_title("server/site replay of one round")
    ax_r.grid(alpha=0.3)
    if replay:
        ax_r.legend()
    fig.suptitle(_machine(replay or stream), fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_sim_scale(rows: Rows, out: Path) -> None:
    """Seconds per round and peak memory against the number of simulated sites."""
    plt = _pyplot()
    ok = sorted((r for r in rows if r.get("ok")), key=lambda r: int(r["sites"]))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=110)
    sites = [int(r["sites"]) for r in ok]
    ax_t.plot(sites, [float(r["mean_round_wall_s"]) for r in ok], marker="o")
    ax_t.set_xlabel("simulated sites")
    ax_t.set_ylabel("seconds per round")
    ax_t.set_title("Flower simulation: wall time per round")
    ax_m.plot(sites, [float(r["peak_rss_mib"]) / 1024 for r in ok], marker="o", label="peak RSS (sum)")
    ax_m.plot(sites, [float(r["peak_pss_mib"]) / 1024 for r in ok], marker="s", label="peak PSS (sum)")
    ax_m.set_xlabel("simulated sites")
    ax_m.set_ylabel("GiB")
    ax_m.set_title("peak memory of the process tree")
    ax_m.legend()
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
    failed = [int(r["sites"]) for r in rows if not r.get("ok")]
    if failed:
        fig.suptitle(f"failed runs (not plotted): {failed} sites", fontsize=9, color="C3")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_kavg_vs_fedavg(rows: Rows, out: Path) -> None:
    """Largest |edgetune kavg - Flower FedAvg| per check, against the tolerance and the update size."""
    plt = _pyplot()
    names = [str(r["check"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=110)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [float(r["max_abs_diff"]) for r in rows], width=0.4, label="max |kavg - FedAvg|")
    ax.bar([i + 0.2 for i in x], [float(r["max_abs_update"]) for r in rows], width=0.4, label="max |update|")
    ax.axhline(float(rows[0]["tolerance"]), color="C3", linestyle="--", label="tolerance")
    ax.set_yscale("log")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("absolute value")
    ax.set_title(f"kavg vs Flower's FedAvg on the same site results ({_machine(rows)})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_spsa_step(rows: Rows, out: Path) -> None:
    """SPSA step time / forward time and SPSA round memory / forward memory, per trainable subset."""
    plt = _pyplot()
    names = [f"{r['model']}\n{r['trainable'] if len(r['trainable']) < 30 else 'attention'}" for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10.0, 4.2), dpi=110)
    ax_t.bar(names, [float(r["time_ratio"]) for r in rows])
    ax_t.axhline(float(rows[0]["time_goal"]), color="C3", linestyle="--", label="goal")
    ax_t.set_ylabel("SPSA step / forward pass (time)")
    ax_m.bar(names, [float(r["memory_ratio"]) for r in rows], color="C1")
    ax_m.axhline(float(rows[0]["memory_goal"]), color="C3", linestyle="--", label="goal")
    ax_m.set_ylabel("SPSA round / forward pass (peak memory)")
    for ax in (ax_t, ax_m):
        ax.legend()
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"SPSA cost relative to inference ({rows[0]['device']}, {rows[0]['memory_metric']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


PLOTTERS: dict[str, Callable[[Rows, Path], None]] = {
    "bytes_per_round": plot_bytes_per_round,
    "stream_and_replay": plot_stream_and_replay,
    "sim_scale": plot_sim_scale,
    "kavg_vs_fedavg": plot_kavg_vs_fedavg,
    "spsa_step": plot_spsa_step,
}


def render(results: Path) -> list[Path]:
    """Draw every known plot whose JSON exists; returns the PNGs written."""
    written = []
    for name, fn in PLOTTERS.items():
        src = results / f"{name}.json"
        if not src.exists():
            print(f"plots: {src} not found, skipped")
            continue
        try:
            rows = json.loads(src.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{src}: not valid JSON ({err})") from err
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{src}: expected a non-empty JSON list of rows")
        out = results / f"{name}.png"
        try:
            fn(rows, out)
        except KeyError as err:
            raise ValueError(f"{src}: a row lacks the field {err}") from err
        written.append(out)
        print(f"plots: {out}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks") / "results")
    args = parser.parse_args(argv)
    render(args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
