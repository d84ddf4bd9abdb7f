"""What one SPSA step and one SPSA round cost next to plain inference, on one fixed batch.

Usage (from the repository root)::

    python -m benchmarks.spsa_step [--model smollm2|tiny] [--trainable SUBSET ...] [--batch-size 8]
        [--repeats 3] [--device auto|cpu|cuda] [--out benchmarks/results/spsa_step.json]

For every trainable subset (default: the attention projections ``q_proj,k_proj,v_proj,o_proj``, then
``all``), on the same batch of ``--batch-size`` demo examples tokenised with the model's own tokenizer
(``TokenizedSet``, max_length 96):

time ratio
    One SPSA step with P=1 probe (``+eps z``, forward, ``-2 eps z``, forward), i.e.
    ``spsa.local_steps`` with K=1 on the replica's work tensors, divided by one no-grad forward pass
    (``spsa.batch_loss``, the forward an SPSA step runs twice). One warm-up each, then ``--repeats``
    alternating timings (forward, step, forward, step, ...) so that a change in background load hits
    both; the ratio is median / median. Goal: <= 2.5.
per-probe ratios
    One step of P probes divided by P forward passes: central differences with P=1 (goal <= 2.2) and
    forward differences with P=8 sharing one base pass (goal <= 1.2), measured the same way.
memory ratio
    Peak memory of an SPSA round (load, K=4 steps, the reset from the round-start store, one replay of a
    round with 4 sites' coefficients: ``replica_for(..., "disk")``, ``Replica.local``, ``local_steps``,
    ``replay_terms``, ``Replica.apply``) divided by the peak memory of loading the model and running one
    forward pass. The round-start copy lives in the disk master store (``round_start = "disk"``), so it
    is read back from a file, not held in RAM. Each side runs in its own fresh subprocess, because the
    CPU metric, peak RSS, is a process-lifetime maximum: ``VmHWM`` on Linux (see ``peak_rss_mib`` for
    why not ``ru_maxrss`` there), ``ru_maxrss`` elsewhere; on CUDA the metric is
    ``torch.cuda.max_memory_allocated``. Goal: <= 1.2.

Perturbation keys come from ``spsa.probe_key`` (``crypto.schedule.derive``, label ``pert``) under a
round secret derived from a fixed seed; nothing draws from a global RNG.

Output: a table on stdout and, in ``--out``, a JSON list with one row per subset. Row keys:

- ``model``, ``trainable``, ``device``, ``device_name``, ``torch_version``, ``python_version``,
  ``memory_metric`` (``VmHWM``, ``ru_maxrss`` or ``cuda_max_memory_allocated``), ``round_start`` (``disk``),
  ``time_pass``, ``memory_pass`` (bool), ``memory_isolated`` (bool: separate subprocesses),
  ``forward_samples_s``, ``spsa_step_samples_s`` (lists), ``load_avg_1m`` (before, after);
- positive numbers (``NUMERIC_KEYS``): ``trainable_numel``, ``model_numel``, ``trainable_tensors``,
  ``cpu_count``, ``torch_threads``, ``batch_size``, ``max_length``, ``batch_tokens`` (padded width),
  ``repeats``, ``forward_s``, ``spsa_step_s``, ``time_ratio``, ``time_goal``, ``keystream_bits_s``
  (ChaCha20 bits for all trainable tensors, once per probe), ``perturb_pass_s`` (one in-place
  ``w += a z`` pass over them; a step makes three), ``reset_s`` (work copy <- master store),
  ``forward_peak_mib``, ``spsa_round_peak_mib``, ``memory_ratio``, ``memory_goal``,
  ``import_rss_mib`` (RSS of the round subprocess before loading the model), ``round_steps_s``,
  ``round_reset_s``, ``round_replay_s`` (the round subprocess's phases), ``replay_terms`` (16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetune.algorithms import spsa
from edgetune.config import ModelSection, SpsaSection
from edgetune.crypto import keystream, schedule
from edgetune.data.demo import demo_sites
from edgetune.data.prompts import TokenizedSet
from edgetune.models import master
from edgetune.models.load import load_model, resolve_device
from edgetune.models.params import Manifest, select_trainable

TIME_GOAL = 2.5
"""Largest acceptable (SPSA step) / (forward pass) time ratio."""
MEMORY_GOAL = 1.2
"""Largest acceptable (SPSA round) / (load + forward) peak-memory ratio."""
CENTRAL_PER_PROBE_GOAL = 2.2
"""Largest acceptable step time / (P x forward) with central differences."""
FORWARD_PER_PROBE_GOAL = 1.2
"""Largest acceptable step time / (P x forward) with forward differences and P = 8 probes."""
MAX_LENGTH = 96
ATTENTION = "q_proj,k_proj,v_proj,o_proj"
SUBSETS = (ATTENTION, "all")
ROUND_STEPS = 4
"""K of the measured round."""
ROUND_SITES = ("site-0", "site-1", "site-2", "site-3")
"""Sites whose coefficients the measured replay applies (site-0's are real, the rest keyed synthetic)."""
ROUND_START = "disk"
RUN_ID = b"edgetune-benchmark-spsa-step"
SITE = ROUND_SITES[0]
SEED = 0
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks") / "results" / "spsa_step.json"

NUMERIC_KEYS = (
    "trainable_numel",
    "model_numel",
    "trainable_tensors",
    "cpu_count",
    "torch_threads",
    "batch_size",
    "max_length",
    "batch_tokens",
    "repeats",
    "forward_s",
    "spsa_step_s",
    "time_ratio",
    "time_goal",
    "keystream_bits_s",
    "perturb_pass_s",
    "reset_s",
    "forward_peak_mib",
    "spsa_round_peak_mib",
    "memory_ratio",
    "memory_goal",
    "import_rss_mib",
    "round_steps_s",
    "round_reset_s",
    "round_replay_s",
    "replay_terms",
    "central_p1_per_probe",
    "central_p1_per_probe_goal",
    "forward_p8_per_probe",
    "forward_p8_per_probe_goal",
)
"""Row keys whose values are positive finite numbers."""
ROW_KEYS = NUMERIC_KEYS + (
    "model",
    "trainable",
    "device",
    "device_name",
    "torch_version",
    "python_version",
    "memory_metric",
    "round_start",
    "time_pass",
    "memory_pass",
    "memory_isolated",
    "forward_samples_s",
    "spsa_step_samples_s",
    "load_avg_1m",
    "central_p1_per_probe_pass",
    "forward_p8_per_probe_pass",
)
"""Every key of a JSON row."""


# --------------------------------------------------------------------------------------------
# Setup: model, batch, keys
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """A loaded model, its tokenizer and the one batch every measurement uses."""

    model_path: str
    model: nn.Module
    tokenizer: Any
    batch: dict[str, torch.Tensor]
    device: torch.device


def demo_batch(tokenizer: Any, batch_size: int, max_length: int = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` training examples of the demo sites, tokenised and right-padded."""
    per_site = len(demo_sites(1, seed=SEED)[0].train)
    sites = demo_sites(-(-batch_size // per_site), seed=SEED)
    examples = [ex for site in sites for ex in site.train][:batch_size]
    return TokenizedSet(tokenizer, examples, max_length).batch(list(range(batch_size)))


def load(model_path: str, device: str, batch_size: int) -> Bench:
    """Load ``model_path`` (``smollm2``, ``tiny`` or a folder) with edgetune's loader, and the batch."""
    cfg = ModelSection(path=model_path, device=device)
    model, tokenizer = load_model(cfg, seed=SEED)
    return Bench(model_path, model, tokenizer, demo_batch(tokenizer, batch_size), resolve_device(device))


def select(bench: Bench, trainable: str) -> Manifest:
    """Mark the ``trainable`` subset (as ``model.trainable`` spells it) and return its manifest."""
    return select_trainable(bench.model, ModelSection(path=bench.model_path, trainable=trainable).trainable_patterns)


def step_inputs(round_idx: int, num_steps: int, num_probes: int = 1) -> tuple[bytes, list[list[bytes]], np.ndarray]:
    """Round secret, probe keys and stochastic-rounding uniforms of SITE, as ``SpsaClient`` derives them."""
    secret = schedule.derive(schedule.run_key(SEED), "secret", RUN_ID, round_idx)
    keys = [
        [spsa.probe_key(secret, RUN_ID, round_idx, SITE, k, p, "per-site", 0) for p in range(num_probes)]
        for k in range(num_steps)
    ]
    uniforms = np.concatenate(
        [
            schedule.uniform(schedule.derive(secret, "quant", RUN_ID, round_idx, SITE, k, p), 1)
            for k in range(num_steps)
            for p in range(num_probes)
        ]
    )
    return secret, keys, uniforms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def run_steps(
    bench: Bench,
    work: Sequence[torch.Tensor],
    round_idx: int,
    num_steps: int,
    scfg: SpsaSection,
    *,
    num_probes: int = 1,
    difference: str = "central",
) -> tuple[bytes, bytes, float]:
    """``num_steps`` SPSA steps of ``num_probes`` probes of SITE on ``work``, all on the benchmark batch.

    Returns the codes, the round secret and the mean train loss.
    """
    secret, keys, uniforms = step_inputs(round_idx, num_steps, num_probes)
    codes, _raw, loss = spsa.local_steps(
        bench.model,
        work,
        [bench.batch] * num_steps,
        keys,
        uniforms,
        eps=scfg.eps,
        lr=scfg.lr,
        scale=scfg.scale,
        codec=scfg.scalar_codec,
        difference=difference,
    )
    return codes, secret, loss


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


def time_step_vs_forward(bench: Bench, replica: spsa.Replica, repeats: int, scfg: SpsaSection) -> dict[str, Any]:
    """Median forward and SPSA-step times (one warm-up each, then alternating), plus the step's parts."""
    dev = bench.device
    fwd: list[float] = []
    step: list[float] = []
    with torch.no_grad():
        spsa.batch_loss(bench.model, bench.batch)
        with replica.local() as work:
            run_steps(bench, work, 0, 1, scfg)
        for r in range(1, repeats + 1):
            fwd.append(_timed(lambda: spsa.batch_loss(bench.model, bench.batch), dev)[0])
            with replica.local() as work:
                step.append(_timed(partial(run_steps, bench, work, r, 1, scfg), dev)[0])
        # The step's non-forward parts: keystream bits (once per probe) and one +-eps pass (three per
        # step, with P=1), the same calls local_steps makes; and the reset that follows local work.
        _, keys, _ = step_inputs(0, 1)
        numels = [w.numel() for w in replica.work]
        bits_s, pass_s, reset_s = [], [], []
        for _ in range(repeats):
            with replica.local() as work:
                t_bits, packed = _timed(lambda: keystream.directions(keys[0][0], numels, dev), dev)
                t_pass, _ = _timed(partial(keystream.add_directions_, work, packed, scfg.eps), dev)
                bits_s.append(t_bits)
                pass_s.append(t_pass)
            reset_s.append(_timed(lambda: master.reset(replica.store, replica.work), dev)[0])
    forward_s, step_s = statistics.median(fwd), statistics.median(step)
    return {
        "forward_s": forward_s,
        "spsa_step_s": step_s,
        "time_ratio": step_s / forward_s,
        "forward_samples_s": fwd,
        "spsa_step_samples_s": step,
        "keystream_bits_s": statistics.median(bits_s),
        "perturb_pass_s": statistics.median(pass_s),
        "reset_s": statistics.median(reset_s),
    }


PER_PROBE = (("central", 1, CENTRAL_PER_PROBE_GOAL), ("forward", 8, FORWARD_PER_PROBE_GOAL))


def time_per_probe(bench: Bench, replica: spsa.Replica, repeats: int, scfg: SpsaSection) -> dict[str, Any]:
    """One step of P probes (central P=1, forward P=8) / (P x one no-grad forward), median of ``repeats``.

    Forward and step timings alternate, as in ``time_step_vs_forward``.
    """
    dev = bench.device
    out: dict[str, Any] = {}
    with torch.no_grad():
        for difference, num_probes, goal in PER_PROBE:
            fwd: list[float] = []
            step: list[float] = []
            with replica.local() as work:
                run_steps(bench, work, 0, 1, scfg, num_probes=num_probes, difference=difference)
            for r in range(1, repeats + 1):
                fwd.append(_timed(lambda: spsa.batch_loss(bench.model, bench.batch), dev)[0])
                with replica.local() as work:
                    step.append(
                        _timed(
                            partial(run_steps, bench, work, r, 1, scfg, num_probes=num_probes, difference=difference),
                            dev,
                        )[0]
                    )
            ratio = statistics.median(step) / (num_probes * statistics.median(fwd))
            tag = f"{difference}_p{num_probes}"
            out[f"{tag}_per_probe"] = ratio
            out[f"{tag}_per_probe_goal"] = goal
            out[f"{tag}_per_probe_pass"] = ratio <= goal
    return out


# --------------------------------------------------------------------------------------------
# Memory (each phase meant to run in a fresh process)
# --------------------------------------------------------------------------------------------


def peak_rss_mib() -> tuple[float, str]:
    """This process's peak resident set size so far, in MiB, and the metric's name.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` of a freshly exec'd
    process starts at its *parent's* peak RSS (the kernel carries the old address space's high
    water mark across exec), so a subprocess of a process that holds a model would report the
    parent's footprint. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "VmHWM"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak / 2**20 if sys.platform == "darwin" else peak / 1024), "ru_maxrss"


def spsa_round(bench: Bench, workdir: Path, scfg: SpsaSection) -> dict[str, float]:
    """One SPSA round as a site and the server run it, on the disk master store.

    K=4 local steps in ``Replica.local`` (which resets the work copy from the round-start file on
    exit), then ``Replica.apply`` of the round's canonical terms with 4 sites' codes: SITE's real
    ones and keyed synthetic codes for the other three.
    """
    dev = bench.device
    replica = spsa.replica_for(bench.model, RUN_ID, workdir, ROUND_START, namespace=f"benchmark-round:{workdir}")
    assert replica.store_kind == "disk"
    round_idx = replica.applied + 1
    with torch.no_grad():
        t0 = time.perf_counter()
        with replica.local() as work:
            codes, secret, _loss = run_steps(bench, work, round_idx, ROUND_STEPS, scfg)
            _sync(dev)
            t1 = time.perf_counter()
        _sync(dev)
        t2 = time.perf_counter()
        n_other = (len(ROUND_SITES) - 1) * ROUND_STEPS
        synthetic = schedule.integers(schedule.derive(secret, "test", "benchmark-codes"), n_other, 255) - 127
        entry = spsa.LogEntry(
            round_idx,
            ROUND_SITES,
            codes + synthetic.astype(np.int8).tobytes(),
            scfg.lr,
            scfg.scale,
            ROUND_STEPS,
            1,
            "per-site",
            0,
            scfg.scalar_codec,
            "mean",
            scfg.trim_frac,
        )
        terms = spsa.replay_terms(entry, secret, RUN_ID)
        replica.apply_terms(round_idx, terms)
        _sync(dev)
        t3 = time.perf_counter()
    return {"round_steps_s": t1 - t0, "round_reset_s": t2 - t1, "round_replay_s": t3 - t2, "replay_terms": len(terms)}


def measure_memory(phase: str, model_path: str, trainable: str, device: str, batch_size: int) -> dict[str, Any]:
    """Load the model and run ``phase`` (``forward``: one forward pass; ``round``: ``spsa_round``).

    Returns the peak memory in MiB under this device's metric, with the RSS before loading.
    """
    import_rss, _ = peak_rss_mib()
    bench = load(model_path, device, batch_size)
    select(bench, trainable)
    info: dict[str, Any] = {}
    if phase == "forward":
        with torch.no_grad():
            spsa.batch_loss(bench.model, bench.batch)
    elif phase == "round":
        with tempfile.TemporaryDirectory(prefix="edgetune-bench-") as tmp:
            info = spsa_round(bench, Path(tmp), SpsaSection())
    else:
        raise ValueError(f"unknown phase {phase!r}")
    if bench.device.type == "cuda":
        peak, metric = torch.cuda.max_memory_allocated(bench.device) / 2**20, "cuda_max_memory_allocated"
    else:
        peak, metric = peak_rss_mib()
    return {"phase": phase, "peak_mib": peak, "metric": metric, "import_rss_mib": import_rss, **info}


def memory_in_subprocess(phase: str, model_path: str, trainable: str, device: str, batch_size: int) -> dict[str, Any]:
    """``measure_memory`` in a fresh Python process (this module's ``--phase`` mode)."""
    cmd = [sys.executable, "-m", "benchmarks.spsa_step", "--phase", phase, "--model", model_path]
    cmd += ["--trainable", trainable, "--device", device, "--batch-size", str(batch_size)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess {phase} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# One configuration -> one row
# --------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": name,
        "cpu_count": cpus,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


def run_config(
    bench: Bench, trainable: str, *, repeats: int, isolate: bool = True, workdir: Path | None = None
) -> dict[str, Any]:
    """Measure one trainable subset; returns its JSON row.

    ``isolate=False`` runs the two memory phases in this process, one after the other: only for
    smoke tests (a lifetime peak RSS cannot separate them), and the row says so.
    """
    load_before = os.getloadavg()[0]
    manifest = select(bench, trainable)
    scfg = SpsaSection()
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-", dir=workdir) as tmp:
        # A namespace per call: a cached replica would point at a deleted store file.
        replica = spsa.replica_for(bench.model, RUN_ID, Path(tmp), ROUND_START, namespace=f"benchmark:{tmp}")
        timing = time_step_vs_forward(bench, replica, repeats, scfg)
        timing.update(time_per_probe(bench, replica, repeats, scfg))
    dev = str(bench.device)
    bs = int(bench.batch["input_ids"].shape[0])
    measure = memory_in_subprocess if isolate else measure_memory
    fwd_mem = measure("forward", bench.model_path, trainable, dev, bs)
    round_mem = measure("round", bench.model_path, trainable, dev, bs)
    memory_ratio = round_mem["peak_mib"] / fwd_mem["peak_mib"]
    row: dict[str, Any] = {
        "model": bench.model_path,
        "trainable": trainable,
        "trainable_numel": manifest.numel,
        "model_numel": sum(p.numel() for p in bench.model.parameters()),
        "trainable_tensors": len(manifest),
        **machine_info(bench.device),
        "batch_size": bs,
        "max_length": MAX_LENGTH,
        "batch_tokens": int(bench.batch["input_ids"].shape[1]),
        "repeats": repeats,
        **timing,
        "time_goal": TIME_GOAL,
        "time_pass": timing["time_ratio"] <= TIME_GOAL,
        "memory_metric": round_mem["metric"],
        "round_start": ROUND_START,
        "forward_peak_mib": fwd_mem["peak_mib"],
        "spsa_round_peak_mib": round_mem["peak_mib"],
        "memory_ratio": memory_ratio,
        "memory_goal": MEMORY_GOAL,
        "memory_pass": memory_ratio <= MEMORY_GOAL,
        "memory_isolated": isolate,
        "import_rss_mib": round_mem["import_rss_mib"],
        "round_steps_s": round_mem["round_steps_s"],
        "round_reset_s": round_mem["round_reset_s"],
        "round_replay_s": round_mem["round_replay_s"],
        "replay_terms": round_mem["replay_terms"],
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }
    return row


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _label(trainable: str) -> str:
    return "attention q,k,v,o" if trainable == ATTENTION else trainable


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 10**5 else f"{n / 1e3:.1f} k"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _per_probe_cell(tag: str, r: dict[str, Any]) -> str:
    return f"{r[tag + '_per_probe']:.2f} {_verdict(r[tag + '_per_probe_pass'])}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a text table: one column per trainable subset."""
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    head = (
        f"SPSA step vs inference: model {r0['model']}, device {r0['device']} ({r0['device_name']}), "
        f"{r0['cpu_count']} CPUs, {r0['torch_threads']} torch threads, torch {r0['torch_version']}\n"
        f"batch {r0['batch_size']} demo examples x {r0['batch_tokens']} tokens (max_length {r0['max_length']}), "
        f"median of {r0['repeats']} after 1 warm-up; memory: {r0['memory_metric']}, "
        f"{'separate fresh subprocesses' if r0['memory_isolated'] else 'IN-PROCESS (smoke test only)'}, "
        f"round start in the {r0['round_start']} store"
    )

    def row(name: str, fn: Callable[[dict[str, Any]], str]) -> str:
        return f"{name:<40}" + "".join(f"{fn(r):>24}" for r in rows)

    lines = [
        head,
        "",
        row("trainable subset", lambda r: _label(r["trainable"])),
        row("trainable params", lambda r: f"{_count(r['trainable_numel'])} of {_count(r['model_numel'])}"),
        row("forward pass (s)", lambda r: f"{r['forward_s']:.4f}"),
        row("SPSA step, P=1 (s)", lambda r: f"{r['spsa_step_s']:.4f}"),
        row("  keystream bits, once per probe (s)", lambda r: f"{r['keystream_bits_s']:.4f}"),
        row("  one +-eps pass, 3 per step (s)", lambda r: f"{r['perturb_pass_s']:.4f}"),
        row(
            "  2 forwards + bits + 3 passes (s)",
            lambda r: f"{2 * r['forward_s'] + r['keystream_bits_s'] + 3 * r['perturb_pass_s']:.4f}",
        ),
        row(
            f"TIME ratio step/forward (goal <= {TIME_GOAL:g})",
            lambda r: f"{r['time_ratio']:.2f} {_verdict(r['time_pass'])}",
        ),
        *(
            row(
                f"PER PROBE {d} P={n} (goal <= {g:g})",
                partial(_per_probe_cell, f"{d}_p{n}"),
            )
            for d, n, g in PER_PROBE
        ),
        row("load + forward peak (MiB)", lambda r: f"{r['forward_peak_mib']:.0f}"),
        row("SPSA round peak (MiB)", lambda r: f"{r['spsa_round_peak_mib']:.0f}"),
        row("  RSS after imports, before load (MiB)", lambda r: f"{r['import_rss_mib']:.0f}"),
        row(
            f"MEMORY ratio round/forward (goal <= {MEMORY_GOAL:g})",
            lambda r: f"{r['memory_ratio']:.2f} {_verdict(r['memory_pass'])}",
        ),
        row(
            "round: 4 steps / reset / replay (s)",
            lambda r: f"{r['round_steps_s']:.2f}/{r['round_reset_s']:.2f}/{r['round_replay_s']:.2f}",
        ),
        row("load average 1 min (start, end)", lambda r: "{:.2f}, {:.2f}".format(*r["load_avg_1m"])),
    ]
    spread = [
        (max(s) - min(s)) / statistics.median(s)
        for r in rows
        for s in (r["forward_samples_s"], r["spsa_step_samples_s"])
        if len(s) > 1
    ]
    busy = max(r["load_avg_1m"][0] for r in rows)
    if busy > 0.5 or (spread and max(spread) > 0.15):
        lines.append(
            f"\nnote: timings may be noisy (load average {busy:.2f} at start"
            + (f", largest sample spread {100 * max(spread):.0f}% of the median" if spread else "")
            + "): another process may be using the CPU."
        )
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(rows), indent=2) + "\n")


def _check_finite(rows: Sequence[dict[str, Any]]) -> None:
    for r in rows:
        bad = [k for k in NUMERIC_KEYS if not (math.isfinite(r[k]) and r[k] > 0)]
        if bad:
            raise RuntimeError(f"benchmark row for {r['trainable']!r} has non-positive or non-finite {bad}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spsa_step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or a local HF folder")
    parser.add_argument(
        "--trainable", nargs="+", default=list(SUBSETS), help="subsets as model.trainable spells them (several ok)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--phase", choices=("forward", "round"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be >= 1")
    if args.phase:  # a memory subprocess: print one JSON line
        result = measure_memory(args.phase, args.model, args.trainable[0], args.device, args.batch_size)
        print(json.dumps(result))
        return 0
    device = str(resolve_device(args.device))
    bench = load(args.model, device, args.batch_size)
    rows = []
    for trainable in args.trainable:
        rows.append(run_config(bench, trainable, repeats=args.repeats))
        print(f"measured {args.model} / {_label(trainable)}", file=sys.stderr, flush=True)
    _check_finite(rows)
    write_rows(rows, args.out)
    print(format_table(rows))
    print(f"\nrows written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
