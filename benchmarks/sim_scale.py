"""Simulation scale: wall time per round and peak memory with 16, 64 and 200 simulated sites.

Usage (from the repository root)::

    python -m benchmarks.sim_scale [--sites 16,64,200] [--rounds 2] [--engine flower|inproc]
        [--recipe recipes/spsa/tiny-4c.toml] [--cpus-per-site 1] [--timeout 1200]
        [--out benchmarks/results/sim_scale.json]

For every site count, one fresh ``edgetune simulate RECIPE --sites N --rounds R`` runs as a subprocess
(Flower's simulation engine: ``flwr run`` against a private local SuperLink; ``--engine inproc`` runs
the same round loop in one process without Flower, as a fallback), with ``run.min_sites = N`` so that
every round waits for all N sites (``--recipe-quorum`` keeps the recipe's quorum). Reported per run:

wall time per round
    ``wall_s`` of every round row of the run's ``metrics.jsonl`` (the round's exchange, aggregation and
    held-out evaluation); round 0 (the evaluation before training) is reported apart, and so is the
    time outside rounds (imports, Flower start-up, model loads in the simulation actors, shutdown).
peak memory of the process tree
    Every ``--interval`` seconds (0.5 by default) the sampler lists the processes of the run: the
    descendants of the ``edgetune simulate`` process (by parent pid in ``/proc/<pid>/stat``) plus every
    process whose environment carries this benchmark's tag variable. The tag is needed because
    ``flwr run`` starts its local SuperLink detached (a new session, re-parented to init once
    ``flwr run`` exits), and the SuperLink starts the simulation process and Ray's processes; all of
    them inherit the environment, so the tag finds them. For each sample the benchmark sums VmRSS
    (``/proc/<pid>/status``) and PSS (``/proc/<pid>/smaps_rollup``) over those processes; the peak is
    the largest sum over the run. RSS counts a shared page (the torch libraries, copy-on-write model
    pages) once in every process that maps it, so the RSS sum overstates physical memory; PSS divides
    each shared page among the processes that map it and adds up to the physical footprint. A spike
    shorter than the interval can be missed.

After each run the benchmark waits for the tagged processes to exit (the CLI stops its SuperLink) and
terminates any that remain, by pid, reporting how many there were; it also removes the state the run's
sites saved under ``<cache>/sites/site-<i>/`` (spsa replica saves, dppf copies, deft residuals).

Output: a table on stdout and a JSON list in ``--out``, one row per site count.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks") / "results" / "sim_scale.json"
DEFAULT_RECIPE = Path("recipes") / "spsa" / "tiny-4c.toml"
TAG_VAR = "EDGETUNE_BENCH_TAG"
METHOD = (
    "peak memory = max over samples (every {interval:g} s) of the sum over the run's processes: descendants of "
    "the `edgetune simulate` process plus every process whose environment carries this run's tag (Flower's "
    "local SuperLink is started detached, so it and the simulation/Ray processes it spawns are found by the tag). "
    "RSS sums count shared pages once per process (an overstatement); PSS splits shared pages among the "
    "processes that map them."
)


# --------------------------------------------------------------------------------------------
# /proc sampling
# --------------------------------------------------------------------------------------------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, comm, start time in clock ticks) of ``pid``."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    text = raw.decode(errors="replace")
    lp, rp = text.find("("), text.rfind(")")
    fields = text[rp + 2 :].split()
    return int(fields[1]), text[lp + 1 : rp], int(fields[19])


def _kib(raw: bytes | None, key: bytes) -> int:
    if raw is None:
        return 0
    for line in raw.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree (descendants of ``root`` or processes tagged ``tag``)."""

    def __init__(self, root: int, tag: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.needle = f"{TAG_VAR}={tag}".encode()
        self.interval = interval
        self.stop_event = threading.Event()
        self._tagged: dict[tuple[int, int], bool] = {}
        self.samples = 0
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_processes = 0
        self.peak_breakdown: list[dict[str, Any]] = []
        self.me = os.getpid()

    def members(self) -> dict[int, str]:
        """pid -> command name of every process of the run now alive."""
        info: dict[int, tuple[int, str, int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _stat(int(name))
                if st is not None:
                    info[int(name)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in info.items():
            children.setdefault(ppid, []).append(pid)
        found = set()
        stack = [self.root]
        while stack:
            pid = stack.pop()
            if pid in info and pid not in found:
                found.add(pid)
                stack.extend(children.get(pid, []))
        for pid, (_, _, start) in info.items():
            if pid in found or pid == self.me:
                continue
            key = (pid, start)
            if key not in self._tagged:
                env = _read(f"/proc/{pid}/environ")
                self._tagged[key] = env is not None and self.needle in env.split(b"\0")
            if self._tagged[key]:
                found.add(pid)
        return {pid: info[pid][1] for pid in found}

    def sample(self) -> None:
        procs: list[dict[str, Any]] = []
        for pid, comm in self.members().items():
            rss = _kib(_read(f"/proc/{pid}/status"), b"VmRSS:")
            pss = _kib(_read(f"/proc/{pid}/smaps_rollup"), b"Pss:")
            cmd = (_read(f"/proc/{pid}/cmdline") or b"").split(b"\0")
            label = " ".join(c.decode(errors="replace") for c in cmd[:3] if c)[:80] or comm
            procs.append({"pid": pid, "name": comm, "cmd": label, "rss_kib": rss, "pss_kib": pss})
        self.samples += 1
        rss_sum = sum(p["rss_kib"] for p in procs)
        self.peak_pss_kib = max(self.peak_pss_kib, sum(p["pss_kib"] for p in procs))
        self.peak_processes = max(self.peak_processes, len(procs))
        if rss_sum > self.peak_rss_kib:
            self.peak_rss_kib = rss_sum
            self.peak_breakdown = sorted(procs, key=lambda p: -p["rss_kib"])[:10]

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.sample()
            except Exception as err:  # a vanished process between listing and reading
                print(f"sampler: {err}", file=sys.stderr)
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def tagged_pids(tag: str) -> list[int]:
    """Processes (other than this one) whose environment carries ``tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            env = _read(f"/proc/{name}/environ")
            if env is not None and needle in env.split(b"\0"):
                out.append(int(name))
    return out


def reap(tag: str, wait_s: float = 20.0) -> int:
    """Wait for the run's tagged processes to exit; terminate (then kill) any left. Returns how many were left."""
    deadline = time.time() + wait_s
    while time.time() < deadline and tagged_pids(tag):
        time.sleep(0.5)
    left = tagged_pids(tag)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tagged_pids(tag):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2.0)
    return len(left)


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def cleanup_site_state(recipe: Path, run_name: str, sites: int) -> None:
    """Remove what the run's sites saved in the persistent site folders (``<cache>/sites/site-<i>``)."""
    import shutil

    from edgetune.build import run_id_for
    from edgetune.config import ModelSection, load_recipe
    from edgetune.models.folders import cache_root

    flat = load_recipe(ROOT / recipe if not recipe.is_absolute() else recipe)
    root = cache_root(ModelSection(cache_dir=str(flat.get("model.cache_dir", "")))) / "sites"
    run_hex = run_id_for(run_name).hex()
    for i in range(sites):
        shutil.rmtree(root / f"site-{i}" / run_hex, ignore_errors=True)
        shutil.rmtree(root / f"site-{i}" / "spsa" / run_hex, ignore_errors=True)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _resolved(config_toml: Path, section: str, key: str) -> Any:
    """A value of the run's resolved configuration (``config.toml`` in its folder), None when absent."""
    try:
        return tomllib.loads(config_toml.read_text()).get(section, {}).get(key)
    except (OSError, tomllib.TOMLDecodeError):
        return None


def simulate(
    sites: int,
    *,
    rounds: int,
    engine: str,
    recipe: Path,
    cpus_per_site: float,
    timeout_s: float,
    interval: float,
    workdir: Path,
    extra_sets: Sequence[str] = (),
    all_sites: bool = True,
) -> dict[str, Any]:
    """One ``edgetune simulate`` run with ``sites`` sites; returns its row.

    ``all_sites`` sets ``run.min_sites = sites``, so a round waits for every site (with the recipe's
    smaller quorum, a round may close after a grace period without the slowest sites, and the time
    per round would no longer be the time of ``sites`` sites).
    """
    tag = uuid.uuid4().hex
    name = f"sim-scale-{engine}-{sites}-{tag[:8]}"
    cmd = [sys.executable, "-m", "edgetune.cli", "simulate", str(recipe), "--sites", str(sites)]
    cmd += ["--rounds", str(rounds), "--engine", engine, "--cpus-per-site", f"{cpus_per_site:g}"]
    quorum = [f"run.min_sites={sites}"] if all_sites else []
    for s in (f"run.dir={workdir}", f"run.name={name}", *quorum, *extra_sets):
        cmd += ["--set", s]
    env = dict(os.environ, **{TAG_VAR: tag, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log_path = workdir / f"{name}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid, tag, interval)
        sampler.start()
        timed_out = False
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=30)
        finally:
            sampler.stop()
    total_s = time.time() - t0
    leftover = reap(tag)
    cleanup_site_state(recipe, name, sites)
    run_dir = workdir / name
    rows = read_rows(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["round"] > 0]
    round_walls = [r["wall_s"] for r in train]
    evals = [r for r in rows if r.get("heldout_loss") is not None]
    row: dict[str, Any] = {
        "benchmark": "sim_scale",
        "run_name": name,
        "sites": sites,
        "engine": engine,
        "recipe": str(recipe),
        "rounds": rounds,
        "rounds_completed": len(train),
        "exit_code": code,
        "timed_out": timed_out,
        "ok": code == 0 and len(train) == rounds and not timed_out,
        "total_wall_s": total_s,
        "round0_eval_s": rows[0]["wall_s"] if rows else None,
        "round_wall_s": round_walls,
        "mean_round_wall_s": sum(round_walls) / len(round_walls) if round_walls else None,
        "outside_rounds_s": total_s - sum(r["wall_s"] for r in rows) if rows else None,
        "peak_rss_mib": sampler.peak_rss_kib / 1024,
        "peak_pss_mib": sampler.peak_pss_kib / 1024,
        "peak_processes": sampler.peak_processes,
        "peak_breakdown": [
            {"cmd": p["cmd"], "rss_mib": round(p["rss_kib"] / 1024, 1), "pss_mib": round(p["pss_kib"] / 1024, 1)}
            for p in sampler.peak_breakdown
        ],
        "samples": sampler.samples,
        "sample_interval_s": interval,
        "leftover_processes": leftover,
        "heldout_loss_first": evals[0]["heldout_loss"] if evals else None,
        "heldout_loss_last": evals[-1]["heldout_loss"] if evals else None,
        "uplink_bytes_per_round": [r.get("uplink_bytes") for r in train],
        "uplink_flower_bytes_per_round": [r.get("uplink_flower_bytes") for r in train],
        "accepted_per_round": [r.get("num_accepted") for r in train],
        "cpus_per_site": cpus_per_site,
        "min_sites": sites if all_sites else "recipe",
        "extra_sets": list(extra_sets),
        "in_flight": _resolved(run_dir / "config.toml", "run", "in_flight"),
        "method": METHOD.format(interval=interval),
    }
    if not row["ok"]:
        row["log_tail"] = log_path.read_text()[-3000:]
    return row


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    r0 = rows[0]
    lines = [
        f"Simulation scale: {r0['recipe']}, engine {r0['engine']}, {r0['rounds']} rounds, "
        f"{r0['cpus_per_site']:g} CPU per site reserved, {r0['cpu_count']} CPUs, quorum {r0['min_sites']}",
        "",
        f"{'sites':>6} {'ok':>4} {'s/round (each)':>22} {'mean s/round':>13} {'round 0 s':>10} {'outside s':>10} "
        f"{'total s':>8} {'peak RSS MiB':>13} {'peak PSS MiB':>13} {'procs':>6} {'left':>5}",
    ]
    for r in rows:
        each = ",".join(f"{w:.1f}" for w in r["round_wall_s"]) or "-"
        mean = f"{r['mean_round_wall_s']:.2f}" if r["mean_round_wall_s"] is not None else "-"
        r0s = f"{r['round0_eval_s']:.1f}" if r["round0_eval_s"] is not None else "-"
        out = f"{r['outside_rounds_s']:.1f}" if r["outside_rounds_s"] is not None else "-"
        lines.append(
            f"{r['sites']:>6} {'yes' if r['ok'] else 'NO':>4} {each:>22} {mean:>13} {r0s:>10} {out:>10} "
            f"{r['total_wall_s']:>8.1f} {r['peak_rss_mib']:>13.0f} {r['peak_pss_mib']:>13.0f} "
            f"{r['peak_processes']:>6} {r['leftover_processes']:>5}"
        )
    lines += ["", "method: " + r0["method"]]
    for r in rows:
        if r["peak_breakdown"]:
            top = "; ".join(f"{p['cmd']} {p['rss_mib']:.0f}/{p['pss_mib']:.0f}" for p in r["peak_breakdown"][:6])
            lines.append(f"largest processes at the RSS peak, {r['sites']} sites (RSS/PSS MiB): {top}")
        if not r["ok"]:
            lines.append(f"{r['sites']} sites FAILED (exit {r['exit_code']}, timed out {r['timed_out']}):")
            lines.append(r.get("log_tail", ""))
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(rows), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="16,64,200", help="comma-separated site counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engine", default="flower", choices=("flower", "inproc"))
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--cpus-per-site", type=float, default=1.0, help="Flower's client-resources-num-cpus")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run before it is stopped")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling interval (s)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra key=value for every run")
    parser.add_argument(
        "--recipe-quorum",
        action="store_true",
        help="keep the recipe's run.min_sites (default: every site must answer, run.min_sites = N)",
    )
    parser.add_argument("--keep-runs", type=Path, default=None, help="keep run folders here (default: temporary)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sites = [int(s) for s in args.sites.split(",") if s.strip()]
    if not sites or min(sites) < 1 or args.rounds < 1:
        parser.error("--sites must name counts >= 1 and --rounds must be >= 1")
    if not Path("/proc/self/status").exists():
        parser.error("sim_scale samples memory from /proc (Linux only)")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetune-sim-scale-") as tmp:
        workdir = (args.keep_runs or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        for n in sites:
            print(f"simulating {n} sites ({args.engine}) ...", file=sys.stderr, flush=True)
            row = simulate(
                n,
                rounds=args.rounds,
                engine=args.engine,
                recipe=args.recipe,
                cpus_per_site=args.cpus_per_site,
                timeout_s=args.timeout,
                interval=args.interval,
                workdir=workdir,
                extra_sets=args.sets,
                all_sites=not args.recipe_quorum,
            )
            row["cpu_count"] = cpus
            rows.append(row)
            print(
                f"  {n} sites: ok={row['ok']} total {row['total_wall_s']:.0f} s, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
            write_rows(rows, args.out)
    print(format_table(rows))
    print(f"\n{len(rows)} rows written to {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
