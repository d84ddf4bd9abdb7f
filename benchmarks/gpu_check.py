"""The GPU check: one command on a CUDA machine, under 8 minutes, one JSON file and one table.

Usage (from the repository root, on a machine with CUDA and a CUDA build of torch in .venv)::

    python -m benchmarks.gpu_check                      # cuda: SmolLM2, bf16, 8 simulated sites on one GPU
    python -m benchmarks.gpu_check --device cpu --model tiny --sim-engine inproc   # dry run of every step

Checks, in order (each row says what it measured and whether it met its goal):

stream_hash
    sha256 of the perturbation stream (packed bits and expanded +-1 values of 2^22 parameters in
    several tensors) computed on the device equals the one computed on the CPU. Goal: equal.
spsa_round, lowrank_round
    One federated round (2 sites, in-process) of spsa and of lowrank on ``--model``: every site's
    reply accepted, the state hash recorded. lowrank runs in ``--dtype``; spsa always in float32,
    because the config refuses spsa on bf16/fp16 weights (its +-eps perturbations round away there).
spsa_step_vs_forward, spsa_memory_vs_inference
    ``benchmarks.spsa_step`` on the attention projections: one spsa step (P=1, central) / one no-grad
    forward of the same batch (goal <= 2.1), and peak memory of an spsa round / of inference
    (``torch.cuda.max_memory_allocated`` on CUDA, each in its own process; goal <= 1.05).
devices_match
    A site on two devices (``cuda:0,cuda:1``; with one GPU, two copies on it) gives the state hash of
    one device after a round of spsa and of lowrank (one device with as many micro-batches). Goal:
    equal; ``repeatable`` says whether one device run twice agrees with itself.
simulate_sites
    ``edgetune simulate recipes/spsa/tiny-4c.toml --sites 8 --gpus-per-site 0.125``: Flower's
    simulation engine puts 8 sites on one GPU with fractional resources; the run must finish.

Without CUDA and without ``--device cpu`` it exits with status 2 and says so. The CPU dry run
exists so that every function here has a CPU test (``tests/test_gpu_check.py``); its numbers are
not the GPU goals' numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks") / "results" / "gpu_check.json"
STEP_GOAL = 2.1
MEMORY_GOAL = 1.05
STREAM_KEY = hashlib.sha256(b"edgetune gpu check stream").digest()
STREAM_SHAPES = (1 << 20, 3 * (1 << 19) + 7, 1 << 21, 123_457)  # odd sizes: bits that do not fill a byte


def stream_hash(device: str) -> str:
    """sha256 over the packed bits and the +-1 values of the stream for STREAM_SHAPES on ``device``."""
    from edgetune.crypto import keystream

    h = hashlib.sha256()
    for index, numel in enumerate(STREAM_SHAPES):
        bits = keystream.tensor_bits(STREAM_KEY, index, numel, device)
        h.update(bits.cpu().numpy().tobytes())
        z = keystream.expand(bits, numel).to(torch.float32)
        h.update(z.cpu().numpy().tobytes())
    return h.hexdigest()


def check_stream(device: str) -> dict[str, Any]:
    t0 = time.time()
    cpu, dev = stream_hash("cpu"), stream_hash(device)
    return {
        "check": "stream_hash",
        "device_hash": dev[:16],
        "cpu_hash": cpu[:16],
        "value": dev == cpu,
        "goal": "equal",
        "pass": dev == cpu,
        "wall_s": time.time() - t0,
    }


def one_round(
    algorithm: str,
    model: str,
    device: str,
    dtype: str,
    workdir: Path,
    extra: dict[str, Any] | None = None,
    tag: str = "round",
) -> dict[str, Any]:
    """One in-process round of ``algorithm`` with 2 sites; every reply must be accepted.
    ``extra``: further config keys; ``tag`` names the check (``<algorithm>_<tag>``) and its run folder."""
    from edgetune import config as cfgmod
    from edgetune import inproc
    from edgetune.federation import run_round

    flat: dict[str, Any] = {
        "algorithm": algorithm,
        "model.path": model,
        "model.device": device,
        "model.dtype": dtype,
        "model.trainable": "lora" if algorithm == "lowrank" else "q_proj,k_proj,v_proj,o_proj",
        "num_rounds": 1,
        "run.min_sites": 2,
        "run.dir": str(workdir),
        "model.cache_dir": os.environ.get("EDGETUNE_CACHE", ""),
        "data.batch_size": 4,
        "eval.num_examples": 8,
        "crypto.deterministic_secrets": True,
        **(extra or {}),
    }
    cfg = cfgmod.from_run_config(flat)
    t0 = time.time()
    server, transport, recorder, _evaluate, _tok = inproc.build(cfg, 2, run_dir=workdir / f"{algorithm}-{tag}")
    metrics, rejected, _ = run_round(cfg, server, transport, recorder, 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ok = not rejected and metrics.get("num_accepted", 0) == 2
    return {
        "check": f"{algorithm}_{tag}",
        "value": int(metrics.get("num_accepted", 0)),
        "goal": "2 sites accepted",
        "pass": ok,
        "state_hash": server.state_hash()[:16],
        "dtype": dtype,
        "rejected": rejected,
        "wall_s": time.time() - t0,
    }


def devices_match(model: str, device: str, dtype: str, workdir: Path) -> dict[str, Any]:
    """A site on two devices (``cuda:0,cuda:1``, or two copies on the one GPU) against one device, for
    spsa (probes spread) and lowrank (micro-batches spread; one device with as many micro-batches):
    equal state hashes after one round. Also reports whether one device repeated gives its own hash
    again (CUDA backward kernels may add in varying order; then the two-device claim cannot hold either)."""
    second = "cuda:1" if device.startswith("cuda") and torch.cuda.device_count() > 1 else device
    both = f"{device},{second}"
    hashes: dict[str, dict[str, str]] = {}
    t0 = time.time()
    for algorithm in ("spsa", "lowrank"):
        kind = "float32" if algorithm == "spsa" else dtype
        # the same run folder name under separate parents: the run id (which keys the streams) is equal
        extra = {"kavg.grad_accum_steps": 2}
        hashes[algorithm] = {
            tag: one_round(algorithm, model, dev, kind, workdir / tag, extra, "devices")["state_hash"]
            for tag, dev in (("one", device), ("again", device), ("two", both))
        }
    return {
        "check": "devices_match",
        "value": sum(h["two"] == h["one"] for h in hashes.values()),
        "goal": "2 of 2 equal",
        "pass": all(h["two"] == h["one"] for h in hashes.values()),
        "devices": both,
        "repeatable": {a: h["again"] == h["one"] for a, h in hashes.items()},
        "hashes": hashes,
        "wall_s": time.time() - t0,
    }


def spsa_ratios(model: str, device: str, repeats: int, batch_size: int) -> list[dict[str, Any]]:
    """spsa step / forward and spsa round memory / inference, from ``benchmarks.spsa_step``."""
    from benchmarks import spsa_step

    t0 = time.time()
    bench = spsa_step.load(model, device, batch_size)
    row = spsa_step.run_config(bench, spsa_step.ATTENTION, repeats=repeats)
    wall = time.time() - t0
    return [
        {
            "check": "spsa_step_vs_forward",
            "value": row["time_ratio"],
            "goal": f"<= {STEP_GOAL}",
            "pass": row["time_ratio"] <= STEP_GOAL,
            "forward_s": row["forward_s"],
            "spsa_step_s": row["spsa_step_s"],
            "wall_s": wall,
        },
        {
            "check": "spsa_memory_vs_inference",
            "value": row["memory_ratio"],
            "goal": f"<= {MEMORY_GOAL}",
            "pass": row["memory_ratio"] <= MEMORY_GOAL,
            "metric": row["memory_metric"],
            "forward_peak_mib": row["forward_peak_mib"],
            "spsa_round_peak_mib": row["spsa_round_peak_mib"],
            "wall_s": 0.0,
        },
    ]


def simulate_sites(
    sites: int, gpus_per_site: float, device: str, engine: str, workdir: Path, timeout_s: float
) -> dict[str, Any]:
    """``edgetune simulate`` of the tiny recipe with ``sites`` sites (one round); it must finish."""
    cmd = [
        sys.executable,
        "-m",
        "edgetune.cli",
        "simulate",
        str(ROOT / "recipes" / "spsa" / "tiny-4c.toml"),
        "--sites",
        str(sites),
        "--rounds",
        "1",
        "--engine",
        engine,
        "--set",
        f"run.dir={workdir}",
        "--set",
        f"run.min_sites={sites}",
    ]
    if engine == "flower":
        cmd += ["--gpus-per-site", f"{gpus_per_site:g}"]
    if device == "cpu":
        cmd += ["--set", "model.device=cpu"]
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        code, tail = out.returncode, (out.stdout + out.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        code, tail = 124, f"timed out after {timeout_s:g} s"
    return {
        "check": "simulate_sites",
        "value": code,
        "goal": "exit 0",
        "pass": code == 0,
        "sites": sites,
        "gpus_per_site": gpus_per_site if engine == "flower" else 0.0,
        "engine": engine,
        "tail": "" if code == 0 else tail,
        "wall_s": time.time() - t0,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'check':28} {'value':>22} {'goal':>18} {'pass':>5} {'s':>7}"]
    for r in rows:
        v = r["value"]
        val = f"{v:.3f}" if isinstance(v, float) else str(v)
        lines.append(f"{r['check']:28} {val:>22} {r['goal']:>18} {'yes' if r['pass'] else 'NO':>5} {r['wall_s']:7.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda[:N]; cpu runs the dry mode (no GPU goals)")
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or tiny")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sites", type=int, default=8, help="simulated sites sharing the GPU")
    parser.add_argument("--sim-engine", default="flower", choices=("flower", "inproc"))
    parser.add_argument("--sim-timeout", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Run it on a machine with a GPU and a "
            "CUDA build of torch in .venv, or pass --device cpu --model tiny for the dry run.",
            file=sys.stderr,
        )
        return 2
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (dry run)"
    result: dict[str, Any] = {}

    def record(*new: dict[str, Any], complete: bool = False) -> None:
        # written after every check, so a run cut short by a time limit keeps what it measured
        rows.extend(new)
        for r in new:
            print(f"[gpu_check] {r['check']}: {r['value']} (goal {r['goal']}, {r['wall_s']:.1f} s)", flush=True)
        result.update(
            benchmark="gpu_check",
            device=args.device,
            device_name=device_name,
            model=args.model,
            dtype=args.dtype,
            torch_version=torch.__version__,
            total_wall_s=time.time() - t0,
            complete=complete,
            all_pass=complete and all(r["pass"] for r in rows),
            rows=rows,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="edgetune-gpu-check-") as tmp:
        work = Path(tmp)
        record(check_stream(args.device))
        for algorithm in ("spsa", "lowrank"):
            dtype = "float32" if algorithm == "spsa" else args.dtype
            record(one_round(algorithm, args.model, args.device, dtype, work))
        record(devices_match(args.model, args.device, args.dtype, work))
        record(*spsa_ratios(args.model, args.device, args.repeats, args.batch_size))
        gpus = 1.0 / args.sites if args.device.startswith("cuda") else 0.0
        sim = simulate_sites(args.sites, gpus, args.device, args.sim_engine, work, args.sim_timeout)
        record(sim, complete=True)
    total = result["total_wall_s"]
    print(f"gpu_check on {device_name}, {args.model} {args.dtype}, {total:.0f} s")
    print(format_table(rows))
    print(f"\nwritten to {args.out}")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
