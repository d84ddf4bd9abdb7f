"""spsa's defaults from a sweep: one factor at a time around the demo recipe, the same data and seed.

Usage (from the repository root)::

    python -m benchmarks.spsa_sweep [--recipe recipes/spsa/smollm2-135m-4c.toml] [--rounds 8]
        [--eval-every 4] [--accuracy-every N] [--judge accuracy|loss] [--sites 4]
        [--factors lr,num_probes,seed_pool,eps,batch_size] [--timeout 3600]
        [--out benchmarks/results/spsa_sweep.json] [--plot benchmarks/results/spsa_sweep.png]
        [--threads 0] [--append]

Every run is ``python -m edgetune.inproc RECIPE key=value ... --sites N`` in a fresh subprocess (as in
``quality_per_byte``), with deterministic secrets, the recipe's data and held-out set, held-out loss and
accuracy every ``--eval-every`` rounds (and after round 0 and the last round), and exactly one factor
changed from the recipe:

========== =========================================================
factor     values (x: the recipe's value)
========== =========================================================
lr         x/4, x/2, x, 2x, 4x
eps        2^-9, 2^-7, 2^-5
num_probes 8, 16, 32, 64      (lr scaled with P / P_recipe: same step per probe)
batch_size x/2, x, 2x      (4, 8, 16 for the demo recipe)
seed_pool  0 (fresh directions), 64, 256, 1024, x (run scope; the recipe's optimizer)
========== =========================================================

From each run's ``metrics.jsonl``: held-out loss and accuracy after round 0 and the last round, the best
accuracy over the evaluated rounds, the held-out choice loss (the right label's cross-entropy among the
row's candidates: a graded score that moves before accuracy does; triage data only), uplink payload
bytes per site per round, and the run's wall time. The table says which value of each factor reached
the best final accuracy (ties: lower held-out loss; with ``--judge loss`` the lowest final held-out loss,
for a task whose accuracy says nothing, such as ``data.source = "docs"``, where it is the exact match of a
passage's continuation: run that with ``--judge loss --accuracy-every 0``) and which the lowest final choice
loss; one held-out
report is 1.04 points of accuracy on the triage demo, and two runs that differ only in their probe
directions have ended 7 points apart, so differences of a few points are noise. The recipe's comment
cites the rows it was set from. Factors run in the order given (the most telling first), and the JSON is
rewritten after every run, so a sweep cut short keeps what it finished; ``--append`` reads it back, keeps
the finished runs of the same recipe, rounds and sites, and runs only the missing ones. Wall times are comparable only
within one invocation on a quiet machine; the JSON records the load average and, per run, the code version
(``code``: ``benchmarks.code_version``); ``--append`` says which kept runs came from other code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import code_version, other_code, results_list
from benchmarks.quality_per_byte import _value  # one TOML-literal spelling for key=value overrides

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "spsa" / "smollm2-135m-4c.toml"
DEFAULT_OUT = Path("benchmarks") / "results" / "spsa_sweep.json"
DEFAULT_PLOT = Path("benchmarks") / "results" / "spsa_sweep.png"
FACTORS = ("lr", "num_probes", "seed_pool", "eps", "batch_size")


def variations(flat: dict[str, Any], factor: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, overrides) for every value of ``factor`` around the recipe ``flat``."""
    from edgetune.config import from_run_config

    cfg = from_run_config(flat)
    s = cfg.spsa
    if factor == "lr":
        return [(f"lr={s.lr * m:.3g}", {"spsa.lr": s.lr * m}) for m in (0.25, 0.5, 1.0, 2.0, 4.0)]
    if factor == "eps":
        return [(f"eps=2^{e}", {"spsa.eps": 2.0**e}) for e in (-9, -7, -5)]
    if factor == "num_probes":
        return [(f"P={p}", {"spsa.num_probes": p, "spsa.lr": s.lr * p / s.num_probes}) for p in (8, 16, 32, 64)]
    if factor == "batch_size":
        b = cfg.data.batch_size
        return [(f"batch={n}", {"data.batch_size": n}) for n in sorted({max(1, b // 2), b, 2 * b})]
    if factor == "seed_pool":
        out = [("fresh", {"spsa.seed_pool": 0, "spsa.pool_scope": "round", "spsa.optimizer": "sgd"})]
        optimizer = s.optimizer if s.pool_scope == "run" else "sgd"
        out += [
            (f"S={n}", {"spsa.seed_pool": n, "spsa.pool_scope": "run", "spsa.optimizer": optimizer})
            for n in sorted({64, 256, 1024} | ({s.seed_pool} if s.pool_scope == "run" and s.seed_pool else set()))
        ]
        return out
    raise ValueError(f"unknown factor {factor!r}; one of {FACTORS}")


def run_key(flat: dict[str, Any], overrides: dict[str, Any]) -> str:
    """What a run changes from the recipe: values equal to the recipe's are dropped, so every factor's
    "x" (lr x1, P 16 with lr x1, the recipe's eps, batch and pool) is one run."""
    return json.dumps({k: v for k, v in overrides.items() if flat.get(k) != v}, sort_keys=True)


def previous_runs(out: Path, flat: dict[str, Any], recipe: Path, rounds: int, sites: int) -> dict[str, dict[str, Any]]:
    """``--append``: the finished runs in ``out`` by ``run_key``, only those of the same recipe, rounds and
    sites (anything else would not be comparable); a file that is not a sweep's result list is an error."""
    if not out.is_file():
        return {}
    rows = results_list(out, "spsa_sweep", "overrides")
    same = [
        r
        for r in rows
        if r.get("ok")
        and r.get("rounds") == rounds
        and r.get("sites") == sites
        and Path(str(r.get("recipe", ""))).resolve() == recipe.resolve()
    ]
    return {run_key(flat, r["overrides"]): r for r in same}


def run_one(
    recipe: Path,
    label: str,
    overrides: dict[str, Any],
    *,
    rounds: int,
    sites: int,
    runs_dir: Path,
    timeout_s: float,
    eval_every: int = 1,
    accuracy_every: int | None = None,
    threads: int = 0,
    version: str | None = None,
) -> dict[str, Any]:
    """One sweep run in a subprocess: its row (``version``, the code it runs, is recorded as ``code``).
    Held-out loss every ``eval_every`` rounds, accuracy every ``accuracy_every`` (default: the same; 0: round 0
    and the last round only).
    """
    name = f"sweep-{uuid.uuid4().hex[:8]}"
    fixed = {
        "num_rounds": rounds,
        "run.num_sites": sites,
        "run.min_sites": sites,
        "crypto.deterministic_secrets": True,
        "eval.every_rounds": eval_every,
        "eval.accuracy_every_rounds": eval_every if accuracy_every is None else accuracy_every,
        "run.dir": str(runs_dir),
        "run.name": name,
    }
    sets = [f"{k}={_value(v)}" for k, v in {**overrides, **fixed}.items()]
    cmd = [sys.executable, "-m", "edgetune.inproc", str(recipe), *sets, "--sites", str(sites)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0, load0 = time.time(), os.getloadavg()[0]
    log_path = runs_dir / f"{name}.log"
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    rows = []
    metrics = runs_dir / name / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    trained = [r for r in rows if r["round"] > 0]
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    losses = [r["heldout_loss"] for r in rows if r.get("heldout_loss") is not None]
    choice = [r["choice_loss"] for r in rows if r.get("choice_loss") is not None]
    return {
        "benchmark": "spsa_sweep",
        "label": label,
        "overrides": overrides,
        "ok": code == 0 and len(trained) == rounds,
        "exit_code": code,
        "rounds": rounds,
        "sites": sites,
        "heldout_loss_first": losses[0] if losses else None,
        "heldout_loss_last": losses[-1] if losses else None,
        "accuracy_first": accs[0] if accs else None,
        "accuracy_last": accs[-1] if accs else None,
        "accuracy_best": max(accs) if accs else None,
        "choice_loss_first": choice[0] if choice else None,
        "choice_loss_last": choice[-1] if choice else None,
        "uplink_bytes_per_site_round": (
            sum(r["uplink_bytes"] for r in trained) / (sites * len(trained)) if trained else None
        ),
        "wall_s": time.time() - t0,
        "load_avg_1m": [load0, os.getloadavg()[0]],
        "code": version,
        "curve": [
            {
                "round": r["round"],
                "heldout_loss": r.get("heldout_loss"),
                "accuracy": r.get("accuracy"),
                "choice_loss": r.get("choice_loss"),
            }
            for r in rows
            if r.get("heldout_loss") is not None
        ],
        "log_tail": "" if code == 0 else log_path.read_text()[-2000:],
    }


def _or_inf(x: float | None) -> float:
    return math.inf if x is None or math.isnan(x) else x


def format_table(rows: Sequence[dict[str, Any]], judge: str = "accuracy") -> str:
    """The runs' table and each factor's verdict: the best final accuracy (``judge="accuracy"``, ties to the
    lower held-out loss) or the lowest final held-out loss (``judge="loss"``, or when a run has no accuracy).
    """
    lines = [
        f"{'factor':<11} {'value':<14} {'ok':>3} {'loss 0':>7} {'loss R':>7} {'acc 0':>6} {'acc R':>6} "
        f"{'acc best':>8} {'choice R':>8} {'up B/site/rnd':>13} {'wall s':>7}"
    ]
    for r in rows:

        def f(x: Any, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        losses = f"{f(r['heldout_loss_first'], '.4f'):>7} {f(r['heldout_loss_last'], '.4f'):>7}"
        accs = f"{f(r['accuracy_first'], '.3f'):>6} {f(r['accuracy_last'], '.3f'):>6} {f(r['accuracy_best'], '.3f'):>8}"
        accs += f" {f(r.get('choice_loss_last'), '.4f'):>8}"
        lines.append(
            f"{r['factor']:<11} {r['label']:<14} {'yes' if r['ok'] else 'NO':>3} {losses} {accs} "
            f"{f(r['uplink_bytes_per_site_round'], '.0f'):>13} {r['wall_s']:>7.0f}"
        )
    for factor in dict.fromkeys(r["factor"] for r in rows):
        ok = [r for r in rows if r["factor"] == factor and r["ok"]]
        if ok and judge == "accuracy" and all(r["accuracy_last"] is not None for r in ok):
            best = max(ok, key=lambda r: (r["accuracy_last"], -r["heldout_loss_last"]))
            acc, loss = best["accuracy_last"], best["heldout_loss_last"]
            lines.append(f"best {factor}: {best['label']} (accuracy {acc:.3f}, loss {loss:.4f})")
        elif ok:  # judged by held-out loss (a diverged run's NaN never wins)
            best = min(ok, key=lambda r: _or_inf(r["heldout_loss_last"]))
            lines.append(f"best {factor}: {best['label']} (held-out loss {best['heldout_loss_last']:.4f})")
        if ok:
            graded = [r for r in ok if r.get("choice_loss_last") is not None]
            if graded:
                low = min(graded, key=lambda r: r["choice_loss_last"])
                lines.append(f"lowest choice loss, {factor}: {low['label']} ({low['choice_loss_last']:.4f})")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, judge: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = list(dict.fromkeys(r["factor"] for r in rows))
    # judged by loss (docs), the plot shows held-out loss where the others show accuracy, and wall time below
    graded = judge == "accuracy" and any(r["ok"] and r.get("accuracy_last") is not None for r in rows)
    top, what = ("accuracy", "accuracy") if graded else ("heldout_loss", "held-out loss")
    fig, axes = plt.subplots(2, len(factors), figsize=(3.2 * len(factors), 6.4), dpi=120, squeeze=False)
    for col, factor in enumerate(factors):
        rs = [r for r in rows if r["factor"] == factor and r["ok"]]
        labels = [r["label"] for r in rs]
        ax = axes[0][col]
        ax.plot(labels, [r[f"{top}_last"] for r in rs], "o-", label=f"{what} (last round)")
        ax.plot(labels, [r[f"{top}_first"] for r in rs], "k:", label=f"{what} (round 0)")
        ax.set_title(factor)
        if graded:
            ax.set_ylim(0, 1)
        ax = axes[1][col]
        if graded:
            ax.plot(labels, [r.get("choice_loss_last") for r in rs], "s-", color="C1", label="choice loss (last round)")
            ax.plot(labels, [r.get("choice_loss_first") for r in rs], "k:", label="choice loss (round 0)")
        else:  # no choice loss either: what each value costs
            ax.plot(labels, [r["wall_s"] for r in rs], "s-", color="C1", label="wall time of the run")
        for a in axes[:, col]:
            a.tick_params(axis="x", rotation=45, labelsize=7)
            a.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out label accuracy" if graded else "held-out loss (nats)")
    axes[1][0].set_ylabel("held-out choice loss (nats)" if graded else "run wall time (s)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spsa_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=4, help="held-out loss and accuracy every N rounds")
    parser.add_argument(
        "--accuracy-every",
        type=int,
        default=None,
        help="accuracy every N rounds (default: --eval-every; 0: first and last only)",
    )
    parser.add_argument(
        "--judge", choices=("accuracy", "loss"), default="accuracy", help="what picks each factor's best value"
    )
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--factors", default=",".join(FACTORS))
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--keep-runs", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--threads", type=int, default=0, help="OMP/MKL threads per run (0: torch's default)")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep --out's finished runs of the same recipe, rounds and sites; run only what is missing",
    )
    args = parser.parse_args(argv)
    from edgetune.config import load_recipe

    flat = load_recipe(args.recipe)
    factors = [f.strip() for f in args.factors.split(",") if f.strip()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgetune-sweep-") as tmp:
        runs_dir = (args.keep_runs or Path(tmp)).resolve()
        runs_dir.mkdir(parents=True, exist_ok=True)
        done = previous_runs(args.out, flat, args.recipe, args.rounds, args.sites) if args.append else {}
        version = code_version(ROOT)
        other = sorted(other_code(list(done.values()), version, "label"))
        if other:  # kept rows are not re-run: say when they come from other code than this call's
            print(
                f"--append keeps {len(other)} runs not trained on this code ({version}): {', '.join(other)}",
                file=sys.stderr,
            )
        # --append keeps the earlier factors' finished runs in the table and the plot, without running theirs
        earlier = [f for f in dict.fromkeys(r["factor"] for r in done.values()) if f not in factors]
        for factor in earlier + factors:
            for label, overrides in variations(flat, factor):
                key = run_key(flat, overrides)
                if factor in earlier and key not in done:
                    continue
                row = (
                    dict(done[key])
                    if key in done
                    else run_one(
                        args.recipe,
                        label,
                        overrides,
                        rounds=args.rounds,
                        sites=args.sites,
                        runs_dir=runs_dir,
                        timeout_s=args.timeout,
                        eval_every=args.eval_every,
                        accuracy_every=args.accuracy_every,
                        threads=args.threads,
                        version=version,
                    )
                )
                done[key] = row
                row = {**row, "factor": factor, "label": label, "recipe": str(args.recipe)}
                rows.append(row)
                print(
                    f"{factor} {label}: acc {row['accuracy_first']} -> {row['accuracy_last']}, "
                    f"loss {row['heldout_loss_first']} -> {row['heldout_loss_last']} ({row['wall_s']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.plot, args.judge)
    print(format_table(rows, args.judge))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
