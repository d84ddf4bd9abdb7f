"""Many simulated sites on one box: seconds per round and peak memory at 16, 64, 200 (and 1000) sites.

Usage (from the repository root; run it niced on a shared machine)::

    python -m benchmarks.many_sites [--sites 16,64,200,1000] [--rounds 2] [--engine flower|inproc]
        [--set run.sites_per_round=0.1] [--out benchmarks/results/many_sites.json]
    python -m benchmarks.many_sites --profile 200 [--engine inproc]   # cProfile of one in-process run

Each site count runs ``edgetune simulate recipes/spsa/tiny-4c.toml --sites N --rounds R`` in a fresh
subprocess through ``benchmarks.sim_scale.simulate`` (the same process-tree memory sampler: peak of
the summed RSS and PSS of every process of the run, Flower's detached SuperLink and Ray's workers
included), with ``run.min_sites = N`` so every round waits for all N sites. Written: the JSON rows
(``sim_scale``'s row plus ``s_per_site_round`` = seconds per round / sites, and the ratio of that to
the smallest count's) and a PNG with time and memory against the number of sites (log-log, with the
linear extrapolation from the smallest count dashed). ``--profile N`` runs the in-process engine
under cProfile and writes the 25 most expensive functions (cumulative) to ``many_sites_profile.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import sim_scale

DEFAULT_OUT = Path("benchmarks") / "results" / "many_sites.json"


def add_linearity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seconds per site-round for every ok row, and its ratio to the smallest site count's."""
    ok = sorted((r for r in rows if r.get("ok") and r.get("mean_round_wall_s")), key=lambda r: r["sites"])
    base = ok[0]["mean_round_wall_s"] / ok[0]["sites"] if ok else None
    for r in ok:
        r["s_per_site_round"] = r["mean_round_wall_s"] / r["sites"]
        r["per_site_vs_smallest"] = r["s_per_site_round"] / base if base else None
    return rows


def plot(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """Time per round and peak memory against sites (log-log; dashed: linear from the smallest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in rows if r.get("ok")), key=lambda r: int(r["sites"]))
    if not ok:
        return
    sites = [int(r["sites"]) for r in ok]
    secs = [float(r["mean_round_wall_s"]) for r in ok]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=110)
    ax_t.loglog(sites, secs, marker="o", label="measured")
    ax_t.loglog(sites, [secs[0] * n / sites[0] for n in sites], ls="--", color="grey", label="linear from smallest")
    ax_t.set_xlabel("simulated sites")
    ax_t.set_ylabel("seconds per round")
    ax_t.set_title(f"time per round ({ok[0]['engine']}, shared CPU)")
    ax_t.legend()
    ax_m.semilogx(sites, [float(r["peak_rss_mib"]) / 1024 for r in ok], marker="o", label="peak RSS (sum)")
    ax_m.semilogx(sites, [float(r["peak_pss_mib"]) / 1024 for r in ok], marker="s", label="peak PSS (sum)")
    ax_m.set_xlabel("simulated sites")
    ax_m.set_ylabel("GiB, whole process tree")
    ax_m.set_ylim(bottom=0)
    ax_m.set_title("peak memory")
    ax_m.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def profile_inproc(sites: int, rounds: int, sets: Sequence[str], top: int = 25) -> str:
    """cProfile of one in-process run of the tiny recipe with ``sites`` sites; the top functions."""
    from edgetune import config as cfgmod
    from edgetune import inproc

    recipe = sim_scale.ROOT / sim_scale.DEFAULT_RECIPE
    flat = cfgmod.load_recipe(recipe, [f"run.min_sites={sites}", *sets], {"run.num_sites": sites})
    flat["num_rounds"] = rounds
    with tempfile.TemporaryDirectory(prefix="edgetune-many-sites-") as tmp:
        flat["run.dir"] = tmp
        cfg = cfgmod.from_run_config(flat)
        prof = cProfile.Profile()
        prof.enable()
        inproc.run(cfg, sites, run_dir=Path(tmp) / "run")
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.many_sites", description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="16,64,200,1000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engine", default="flower", choices=("flower", "inproc"))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is stopped")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--profile", type=int, default=0, help="cProfile an in-process run with N sites instead")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.profile:
        text = profile_inproc(args.profile, args.rounds, args.sets)
        path = args.out.with_name("many_sites_profile.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(text)
        print(f"profile written to {path}")
        return 0
    counts = [int(s) for s in args.sites.split(",") if s.strip()]
    if not counts or min(counts) < 1:
        parser.error("--sites must name counts >= 1")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgetune-many-sites-") as tmp:
        for n in counts:
            print(f"simulating {n} sites ({args.engine}) ...", file=sys.stderr, flush=True)
            row = sim_scale.simulate(
                n,
                rounds=args.rounds,
                engine=args.engine,
                recipe=sim_scale.DEFAULT_RECIPE,
                cpus_per_site=1.0,
                timeout_s=args.timeout,
                interval=0.5,
                workdir=Path(tmp),
                extra_sets=args.sets,
            )
            row["benchmark"] = "many_sites"
            row["cpu_count"] = len(os.sched_getaffinity(0))
            row["load_avg_1m"] = os.getloadavg()[0]
            rows.append(row)
            add_linearity(rows)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=2) + "\n")
            print(
                f"  {n} sites: ok={row['ok']} {row.get('mean_round_wall_s')} s/round, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB, PSS {row['peak_pss_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    plot(rows, args.out.with_suffix(".png"))
    print(f"{'sites':>6} {'s/round':>9} {'s/site-round':>13} {'vs smallest':>12} {'RSS MiB':>9} {'PSS MiB':>9}")
    for r in rows:
        if r.get("ok"):
            print(
                f"{r['sites']:>6} {r['mean_round_wall_s']:9.2f} {r['s_per_site_round']:13.4f} "
                f"{r['per_site_vs_smallest']:12.2f} {r['peak_rss_mib']:9.0f} {r['peak_pss_mib']:9.0f}"
            )
        else:
            print(f"{r['sites']:>6} failed (exit {r['exit_code']}, timed out {r['timed_out']})")
    print(f"\nrows written to {args.out}, plot {args.out.with_suffix('.png')}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
