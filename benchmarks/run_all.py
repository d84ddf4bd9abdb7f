"""Run the CPU benchmarks one after another, with settings meant to fit in 20 minutes on 2 cores.

Usage (from the repository root)::

    python -m benchmarks.run_all [--quick] [--only NAME,...] [--skip NAME,...]
        [--sim-sites 16,64] [--results-dir benchmarks/results]

Each benchmark runs as its own subprocess (``python -m benchmarks.<name> ...``) so that one's imports,
caches and peak memory cannot affect the next; its output streams to this console and its JSON (and
plot) go to ``--results-dir``. The plan, with the model each step uses and why, is printed first; a
summary with every step's wall time and exit status is printed last. The exit code is non-zero when
any step failed.

``--quick`` runs every step on the tiny model with the smallest settings (a smoke run of the whole
suite in a few minutes; its results are not the published numbers). After the last step,
``benchmarks.plots`` draws one PNG per result file next to its JSON.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = "q_proj,k_proj,v_proj,o_proj"
SMOLLM2_ATTENTION_NUMEL = 26_542_080
"""Trainable parameters of SmolLM2-135M's attention projections (the stream length of step (a))."""


@dataclass(frozen=True)
class Step:
    """One benchmark invocation."""

    name: str
    module: str
    args: tuple[str, ...]
    model: str
    why: str
    estimate_min: float
    outputs: tuple[str, ...]


def plan(quick: bool, sim_sites: str) -> list[Step]:
    """The steps to run, in order."""
    if quick:
        return [
            Step(
                "bytes_per_round",
                "benchmarks.bytes_per_round",
                ("--model", "tiny"),
                "tiny",
                "--quick: smoke run",
                1.5,
                ("bytes_per_round.json",),
            ),
            Step(
                "kavg_vs_fedavg",
                "benchmarks.kavg_vs_fedavg",
                ("--model", "tiny"),
                "tiny",
                "--quick: smoke run",
                0.5,
                ("kavg_vs_fedavg.json",),
            ),
            Step(
                "stream_and_replay",
                "benchmarks.stream_and_replay",
                ("--model", "tiny", "--elements", str(1 << 22), "--repeats", "2"),
                "tiny",
                "--quick: smoke run",
                0.5,
                ("stream_and_replay.json",),
            ),
            Step(
                "sim_scale",
                "benchmarks.sim_scale",
                ("--sites", sim_sites or "16"),
                "tiny",
                "--quick: smoke run",
                1.5,
                ("sim_scale.json",),
            ),
            Step(
                "quality_per_byte",
                "benchmarks.quality_per_byte",
                ("--model", "tiny", "--rounds", "2", "--sites", "2"),
                "tiny",
                "--quick: smoke run",
                2.5,
                ("quality_per_byte.json", "quality_per_byte.png"),
            ),
            Step(
                "site_reload",
                "benchmarks.site_reload",
                ("--recipe", "recipes/spsa/tiny-4c.toml"),
                "tiny",
                "--quick: smoke run",
                0.3,
                ("site_reload.json",),
            ),
            Step(
                "model_load",
                "benchmarks.model_load",
                ("--model", "tiny"),
                "tiny",
                "--quick: smoke run",
                0.3,
                ("model_load.json",),
            ),
            Step(
                "spsa_step",
                "benchmarks.spsa_step",
                ("--model", "tiny", "--repeats", "2"),
                "tiny",
                "--quick: smoke run",
                0.5,
                ("spsa_step.json",),
            ),
            Step(
                "byzantine",
                "benchmarks.byzantine",
                ("--rounds", "2", "--variants", "spsa-per-site-mean,kavg-mean", "--settings", "4:1"),
                "tiny",
                "--quick: smoke run",
                0.5,
                ("byzantine.json", "byzantine.png"),
            ),
        ]
    steps = [
        Step(
            "bytes_per_round",
            "benchmarks.bytes_per_round",
            ("--model", "smollm2"),
            "smollm2",
            "bytes depend on the real tensor shapes; one short round per configuration is affordable",
            4.0,
            ("bytes_per_round.json",),
        ),
        Step(
            "kavg_vs_fedavg",
            "benchmarks.kavg_vs_fedavg",
            ("--model", "smollm2", "--trainable", ATTENTION, "--sites", "3", "--rounds", "2", "--local-steps", "2"),
            "smollm2",
            "2 rounds x 3 sites x 2 SGD steps on the attention projections are cheap; real weights test the tolerance",
            1.5,
            ("kavg_vs_fedavg.json",),
        ),
        Step(
            "stream_and_replay",
            "benchmarks.stream_and_replay",
            (
                "--model",
                "smollm2",
                "--trainable",
                ATTENTION,
                "--elements",
                str(SMOLLM2_ATTENTION_NUMEL),
                "--repeats",
                "1",
            ),
            "smollm2",
            "replay cost scales with the trainable tensors; 26.5 M attention parameters, one repeat per point",
            3.0,
            ("stream_and_replay.json",),
        ),
        Step(
            "sim_scale",
            "benchmarks.sim_scale",
            ("--sites", sim_sites or "16,64,200"),
            "tiny",
            "the number of simulated sites is the variable; SmolLM2 at 64 sites is an hour of CPU on 2 cores",
            5.0,
            ("sim_scale.json",),
        ),
        Step(
            "quality_per_byte",
            "benchmarks.quality_per_byte",
            ("--model", "tiny", "--rounds", "5", "--sites", "4"),
            "tiny",
            "7 algorithms on SmolLM2 need several minutes each (the spsa recipe alone: 10 min for 10 rounds)",
            4.0,
            ("quality_per_byte.json", "quality_per_byte.png"),
        ),
    ]
    steps.append(
        Step(
            "site_reload",
            "benchmarks.site_reload",
            (),
            "smollm2",
            "a deployed site starts a fresh process per message: reload vs the round's local compute, real model",
            1.5,
            ("site_reload.json",),
        )
    )
    steps.append(
        Step(
            "model_load",
            "benchmarks.model_load",
            ("--model", "smollm2"),
            "smollm2",
            "peak memory of a bf16 load vs an fp32 load (and the old fp32-then-cast): bytes of the real model",
            1.0,
            ("model_load.json",),
        )
    )
    steps.append(
        Step(
            "byzantine",
            "benchmarks.byzantine",
            ("--rounds", "10"),
            "tiny",
            "8 settings x 2 federations x (clean + 4 attacks): what an attack does to the loss, not the model size",
            8.0,
            ("byzantine.json", "byzantine.png"),
        )
    )
    steps.append(
        Step(
            "spsa_step",
            "benchmarks.spsa_step",
            ("--model", "smollm2", "--trainable", ATTENTION, "--repeats", "2"),
            "smollm2",
            "the step/forward ratio is about the real model; attention subset, 2 repeats, to fit the budget",
            4.0,
            ("spsa_step.json",),
        )
    )
    return steps


OPT_IN = [
    Step(
        "many_sites",
        "benchmarks.many_sites",
        ("--sites", "16,64,200,500,1000", "--rounds", "2"),
        "tiny",
        "1000 simulated sites on Flower (6.5 min on 2 idle cores on 2026-12-03): only when named in --only",
        7.0,
        ("many_sites.json", "many_sites.png"),
    ),
    Step(
        "wire_bytes",
        "benchmarks.wire_bytes",
        ("--rounds", "2"),
        "tiny",
        "real link bytes of 60 s rounds (mostly waiting, ~16 min): runs only when named in --only",
        16.0,
        ("wire_bytes.json", "wire_bytes.png"),
    ),
    Step(
        "paper_claims",
        "benchmarks.paper_claims",
        ("--model", "tiny", "--jobs", "2", "--threads", "1"),
        "tiny",
        "the source papers' claims over 16 long runs (3 min 42 s on 2 idle cores on 2026-12-03; 1.5-3 h on heavily "
        "shared cores before): only when named in --only",
        10.0,
        ("paper_claims.json", "paper_claims.png"),
    ),
]
"""Steps outside the 20-minute plan, run only with ``--only NAME``."""


def _out_args(step: Step, results: Path) -> list[str]:
    args = ["--out", str(results / step.outputs[0])]
    if len(step.outputs) > 1 and step.outputs[1].endswith(".png"):
        args += ["--plot", str(results / step.outputs[1])]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, smallest settings (smoke run)")
    parser.add_argument("--only", default="", help="comma-separated step names to run")
    parser.add_argument("--skip", default="", help="comma-separated step names to leave out")
    parser.add_argument("--sim-sites", default="", help="site counts for sim_scale (default 16,64; quick: 16)")
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks") / "results")
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    steps = plan(args.quick, args.sim_sites) + [s for s in OPT_IN if s.name in only]
    names = {s.name for s in steps} | {s.name for s in OPT_IN}
    if (only | skip) - names:
        parser.error(f"unknown step(s) {sorted((only | skip) - names)}; steps: {sorted(names)}")
    steps = [s for s in steps if (not only or s.name in only) and s.name not in skip]
    results = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    total_est = sum(s.estimate_min for s in steps)
    print(f"benchmark plan ({len(steps)} steps, about {total_est:.0f} min on 2 idle cores):")
    for s in steps:
        print(f"  {s.name:<18} model {s.model:<8} ~{s.estimate_min:>4.1f} min  why: {s.why}")
    print(flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    done = []
    t_all = time.time()
    for s in steps:
        cmd = [sys.executable, "-m", s.module, *s.args, *_out_args(s, results)]
        print(f"==== {s.name} (model {s.model}): {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        code = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        done.append((s, code, time.time() - t0))
        print(f"==== {s.name}: exit {code} in {time.time() - t0:.0f} s\n", flush=True)
    print(f"summary ({time.time() - t_all:.0f} s in all):")
    for s, code, secs in done:
        files = ", ".join(str(results / o) for o in s.outputs)
        print(
            f"  {s.name:<18} {'ok' if code == 0 else f'FAILED ({code})':<12} {secs:>6.0f} s  model {s.model}  {files}"
        )
    from benchmarks import plots

    plots.render(results)
    return 0 if all(code == 0 for _, code, _ in done) else 1


if __name__ == "__main__":
    raise SystemExit(main())
