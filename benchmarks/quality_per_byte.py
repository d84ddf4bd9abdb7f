"""Quality per byte: held-out loss and accuracy against uplink bytes, for every algorithm on the same data.

Usage (from the repository root)::

    python -m benchmarks.quality_per_byte [--model tiny|smollm2] [--rounds 5] [--sites 4] [--seeds 0]
        [--algorithms spsa,kavg,...] [--accuracy-every 1] [--timeout 1800] [--keep-runs DIR]
        [--out benchmarks/results/quality_per_byte.json] [--plot benchmarks/results/quality_per_byte.png]

Every (algorithm, seed) runs in a fresh subprocess, ``python -m edgetune.inproc RECIPE key=value ...
--sites N`` with its own ``run.dir``/``run.name``, so runs cannot share a model cache, a replica or
RNG state. Recipes come from ``recipes/`` where one exists for the model (``tiny-4c`` or
``smollm2-135m-4c``), otherwise from a sibling recipe plus overrides:

=================== ============================================= =========================
algorithm           tiny                                          smollm2
=================== ============================================= =========================
spsa                spsa/tiny-4c                                  spsa/smollm2-135m-4c
kavg                dppf/tiny-4c + algorithm=kavg                 dppf/... + algorithm=kavg
lowrank-fedavg      lowrank/tiny-4c-exact + lowrank.mode=fedavg   lowrank/...-fedavg
lowrank-exact       lowrank/tiny-4c-exact                         lowrank/...-exact
lowrank-ab-groups   lowrank/tiny-4c-exact + mode=ab-groups        lowrank/...-ab-groups
deft                deft/tiny-4c                                  deft/smollm2-135m-4c
dppf                dppf/tiny-4c                                  dppf/smollm2-135m-4c
=================== ============================================= =========================

(``kavg`` has no recipe of its own; the dppf recipe's kavg section is what dppf's docs compare with.)
Each algorithm keeps its recipe's own trainable subset and learning rates; everything that defines
"the same data and the same budget" is forced equal for all runs: ``num_rounds``, ``run.seed``,
``run.num_sites = run.min_sites = --sites``, deterministic secrets, and every ``data.*`` and
``eval.*`` key of the model's spsa recipe (demo facts, batch size, held-out examples), with held-out
loss every round and exact-match accuracy every ``--accuracy-every`` rounds (0: first and last only).

From each run's ``metrics.jsonl``: held-out loss and accuracy in round 0 and after the last round,
total uplink and downlink payload bytes (all sites, all rounds), and loss drop per MB of uplink
((first - last) / (uplink bytes / 1e6)). The plot has held-out loss (left) and accuracy (right)
against cumulative uplink bytes (log x; round 0, with 0 bytes, is drawn at 1 byte), one line per
algorithm and seed.

Output: a table on stdout, a JSON list in ``--out`` (one row per algorithm and seed, with its curve),
and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
DEFAULT_OUT = Path("benchmarks") / "results" / "quality_per_byte.json"
DEFAULT_PLOT = Path("benchmarks") / "results" / "quality_per_byte.png"
ALGORITHMS = ("spsa", "kavg", "lowrank-fedavg", "lowrank-exact", "lowrank-ab-groups", "deft", "dppf")
MODEL_PREFIX = {"tiny": "tiny-4c", "smollm2": "smollm2-135m-4c"}


def recipe_for(algorithm: str, model: str) -> tuple[Path, list[str]]:
    """The recipe file and the overrides that turn it into ``algorithm`` (see the module docstring)."""
    prefix = MODEL_PREFIX[model]
    if algorithm.startswith("lowrank-"):
        mode = algorithm.split("-", 1)[1]
        own = RECIPES / "lowrank" / f"{prefix}-{mode}.toml"
        if own.is_file():
            return own, [f"lowrank.mode={mode}"]
        siblings = sorted((RECIPES / "lowrank").glob(f"{prefix}-*.toml"))
        if not siblings:
            raise ValueError(f"no lowrank recipe for model {model}")
        return siblings[0], [f"lowrank.mode={mode}"]
    if algorithm == "kavg":
        own = RECIPES / "kavg" / f"{prefix}.toml"
        if own.is_file():
            return own, []
        return RECIPES / "dppf" / f"{prefix}.toml", ["algorithm=kavg"]
    path = RECIPES / algorithm / f"{prefix}.toml"
    if not path.is_file():
        raise ValueError(f"no recipe {path} for {algorithm} on {model}")
    return path, []


def _value(v: Any) -> str:
    """A Python value as a TOML literal for a ``key=value`` override."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def common_overrides(model: str, rounds: int, sites: int, seed: int, accuracy_every: int) -> list[str]:
    """Overrides every run gets: same rounds, seed, sites, data and evaluation."""
    from edgetune.config import load_recipe

    spsa_recipe, _ = recipe_for("spsa", model)
    flat = load_recipe(spsa_recipe)
    same = {k: v for k, v in flat.items() if k.startswith(("data.", "eval."))}
    same.update(
        {
            "num_rounds": rounds,
            "run.seed": seed,
            "run.num_sites": sites,
            "run.min_sites": sites,
            "crypto.deterministic_secrets": True,
            "eval.every_rounds": 1,
            "eval.accuracy_every_rounds": accuracy_every,
            "imv.every_rounds": 0,
        }
    )
    return [f"{k}={_value(v)}" for k, v in same.items()]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(algorithm: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """First/last loss and accuracy, byte totals, loss drop per MB, and the curve, from metrics rows."""
    evals = [r for r in rows if r.get("heldout_loss") is not None]
    accs = [r for r in rows if r.get("accuracy") is not None]
    train = [r for r in rows if r["round"] > 0]
    up = sum(r["uplink_bytes"] for r in train)
    down = sum(r["downlink_bytes"] for r in train)
    first = evals[0]["heldout_loss"] if evals else None
    last = evals[-1]["heldout_loss"] if evals else None
    drop = (first - last) if first is not None and last is not None else None
    return {
        "algorithm": algorithm,
        "rounds_completed": len(train),
        "heldout_loss_first": first,
        "heldout_loss_last": last,
        "accuracy_first": accs[0]["accuracy"] if accs else None,
        "accuracy_last": accs[-1]["accuracy"] if accs else None,
        "uplink_bytes_total": up,
        "downlink_bytes_total": down,
        "loss_drop": drop,
        "loss_drop_per_mb_uplink": drop / (up / 1e6) if drop is not None and up > 0 else None,
        "curve": [
            {
                "round": r["round"],
                "cum_uplink_bytes": r["cum_uplink_bytes"],
                "cum_downlink_bytes": r["cum_downlink_bytes"],
                "heldout_loss": r.get("heldout_loss"),
                "accuracy": r.get("accuracy"),
            }
            for r in rows
        ],
    }


def run_one(
    algorithm: str,
    model: str,
    *,
    rounds: int,
    sites: int,
    seed: int,
    accuracy_every: int,
    runs_dir: Path,
    timeout_s: float,
    keep: bool,
) -> dict[str, Any]:
    """One (algorithm, seed) run in a fresh subprocess; returns its row."""
    recipe, own = recipe_for(algorithm, model)
    name = f"qpb-{algorithm}-s{seed}-{uuid.uuid4().hex[:8]}"
    overrides = own + common_overrides(model, rounds, sites, seed, accuracy_every)
    overrides += [f"run.dir={_value(str(runs_dir))}", f"run.name={_value(name)}"]
    cmd = [sys.executable, "-m", "edgetune.inproc", str(recipe), *overrides, "--sites", str(sites)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log_path = runs_dir / f"{name}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            code, timed_out = proc.returncode, False
        except subprocess.TimeoutExpired:
            code, timed_out = -1, True
    wall = time.time() - t0
    run_dir = runs_dir / name
    row = summarise(algorithm, read_rows(run_dir / "metrics.jsonl"))
    row.update(
        {
            "benchmark": "quality_per_byte",
            "model": model,
            "seed": seed,
            "sites": sites,
            "rounds": rounds,
            "recipe": str(recipe.relative_to(ROOT)),
            "overrides": own,
            "exit_code": code,
            "timed_out": timed_out,
            "ok": code == 0 and row["rounds_completed"] == rounds,
            "wall_s": wall,
            "command": " ".join(cmd[1:]),
        }
    )
    if not row["ok"]:
        row["log_tail"] = log_path.read_text()[-3000:]
    if not keep:
        _cleanup(run_dir, model, sites)
    return row


def _cleanup(run_dir: Path, model: str, sites: int) -> None:
    """Remove the run's checkpoints and the per-site state it left in the edgetune cache."""
    from edgetune.build import run_id_for
    from edgetune.config import ModelSection
    from edgetune.models.load import cache_root

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    run_hex = run_id_for(run_dir.name).hex()
    root = cache_root(ModelSection(path=model)) / "sites"
    for i in range(sites):
        shutil.rmtree(root / f"site-{i}" / run_hex, ignore_errors=True)
        shutil.rmtree(root / f"site-{i}" / "spsa" / run_hex, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.mean(v) if v else None


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per algorithm (means over seeds)."""
    r0 = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"Quality per byte: model {r0['model']}, {r0['sites']} sites, {r0['rounds']} rounds, seeds {seeds} "
        "(means over seeds); bytes are encoded payloads summed over all sites and rounds",
        "",
        f"{'algorithm':<19} {'ok':>3} {'loss first':>10} {'loss last':>10} {'acc first':>9} {'acc last':>9} "
        f"{'uplink B':>14} {'downlink B':>14} {'drop/MB up':>11} {'wall s':>7}  recipe",
    ]
    by_algo: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_algo.setdefault(r["algorithm"], []).append(r)
    for algo, rs in by_algo.items():
        ok = all(r["ok"] for r in rs)
        up, down = _mean([r["uplink_bytes_total"] for r in rs]), _mean([r["downlink_bytes_total"] for r in rs])
        recipe = rs[0]["recipe"] + (" " + " ".join(rs[0]["overrides"]) if rs[0]["overrides"] else "")
        lines.append(
            f"{algo:<19} {'yes' if ok else 'NO':>3} {_f(_mean([r['heldout_loss_first'] for r in rs]), '.4f'):>10} "
            f"{_f(_mean([r['heldout_loss_last'] for r in rs]), '.4f'):>10} "
            f"{_f(_mean([r['accuracy_first'] for r in rs]), '.3f'):>9} "
            f"{_f(_mean([r['accuracy_last'] for r in rs]), '.3f'):>9} "
            f"{_f(up, ',.0f'):>14} {_f(down, ',.0f'):>14} "
            f"{_f(_mean([r['loss_drop_per_mb_uplink'] for r in rs]), '.4g'):>11} "
            f"{_f(_mean([r['wall_s'] for r in rs]), '.0f'):>7}  {recipe}"
        )
    for r in rows:
        if not r["ok"]:
            lines += ["", f"{r['algorithm']} seed {r['seed']} FAILED (exit {r['exit_code']}):", r.get("log_tail", "")]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Held-out loss and accuracy against cumulative uplink bytes (log x), one line per algorithm and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12.0, 4.6), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    algos = list(dict.fromkeys(r["algorithm"] for r in rows))
    for r in rows:
        color = colors[algos.index(r["algorithm"]) % len(colors)]
        label = r["algorithm"] if r is next(x for x in rows if x["algorithm"] == r["algorithm"]) else None
        pts = [p for p in r["curve"] if p["heldout_loss"] is not None]
        ax_loss.plot(
            [max(p["cum_uplink_bytes"], 1) for p in pts],
            [p["heldout_loss"] for p in pts],
            "o-",
            color=color,
            label=label,
            markersize=3,
        )
        pts = [p for p in r["curve"] if p["accuracy"] is not None]
        ax_acc.plot(
            [max(p["cum_uplink_bytes"], 1) for p in pts],
            [p["accuracy"] for p in pts],
            "o-",
            color=color,
            label=label,
            markersize=3,
        )
    r0 = rows[0]
    for ax, ylabel in ((ax_loss, "held-out loss (answer tokens)"), (ax_acc, "held-out exact-match accuracy")):
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bytes, all sites (encoded payloads; round 0 at 1 B)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.suptitle(f"quality per byte: {r0['model']}, {r0['sites']} sites, {r0['rounds']} rounds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_rows(rows: Sequence[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(rows), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_per_byte", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(MODEL_PREFIX))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--accuracy-every", type=int, default=1, help="accuracy every N rounds (0: first/last)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--keep-runs", type=Path, default=None, help="keep run folders here (default: temporary)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parser.parse_args(argv)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = set(algorithms) - set(ALGORITHMS)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if unknown or not algorithms or not seeds or args.rounds < 1 or args.sites < 1 or args.accuracy_every < 0:
        parser.error(f"unknown algorithms {sorted(unknown)}, or bad --rounds/--sites/--seeds/--accuracy-every")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetune-quality-") as tmp:
        runs_dir = (args.keep_runs or Path(tmp)).resolve()
        runs_dir.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            for algo in algorithms:
                row = run_one(
                    algo,
                    args.model,
                    rounds=args.rounds,
                    sites=args.sites,
                    seed=seed,
                    accuracy_every=args.accuracy_every,
                    runs_dir=runs_dir,
                    timeout_s=args.timeout,
                    keep=args.keep_runs is not None,
                )
                rows.append(row)
                print(
                    f"{algo} seed {seed}: ok={row['ok']} loss {_f(row['heldout_loss_first'], '.4f')} -> "
                    f"{_f(row['heldout_loss_last'], '.4f')}, uplink {row['uplink_bytes_total']:,} B, "
                    f"{row['wall_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                write_rows(rows, args.out)
    if any(r["curve"] for r in rows):
        plot([r for r in rows if r["curve"]], args.plot)
    print(format_table(rows))
    print(f"\n{len(rows)} rows written to {args.out}; plot {args.plot}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
