"""``edgetune simulate``: many sites on this machine, on Flower's simulation engine or in-process.

The Flower engine runs ``flwr run`` against a private local SuperLink (offline, in a throwaway
``FLWR_HOME``) with a generated app folder (``edgetune/project.py``), streams Flower's log into the
run folder and follows the run's ``metrics.jsonl`` in a live table (``edgetune/live.py``). ``flwr run``
exits 0 even when the app failed, so the verdict is the run's status from ``flwr ls``. The in-process
engine runs the same loop without Flower (``edgetune/inproc.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.live import Live

from edgetune import config as cfgmod
from edgetune import project
from edgetune.live import RoundTable, console, follow
from edgetune.runs import new_run_name

LOCAL_LINK_SLOW = "Failed to start local SuperLink"
"""What ``flwr run`` says when the local SuperLink it spawned did not answer within its 15 s."""


class SimulationError(RuntimeError):
    """Flower did not start the simulated run; the message says what to look at."""


def prepare(flat: dict[str, Any], cfg: cfgmod.RunConfig, sites: int) -> tuple[dict[str, Any], cfgmod.RunConfig, Path]:
    """Name the run and fix its folder and site count (``sites``, else ``run.num_sites``, else 4) in the config."""
    num_sites = sites or cfg.run.num_sites or 4
    name = new_run_name(cfg)
    run_dir = (Path(cfg.run.dir).expanduser() / name).resolve()
    flat = {**flat, "run.name": name, "run.dir": str(run_dir.parent), "run.num_sites": num_sites}
    return flat, cfgmod.from_run_config(flat), run_dir


def federation_config(sites: int, cpus: float, gpus: float) -> str:
    """``flwr run --federation-config`` for ``sites`` simulated sites with Flower's client resources.

    ``gpus``: Flower's fractional ``num-gpus`` per site (Ray then gives each site's actor its own
    ``CUDA_VISIBLE_DEVICES``); cpus: whole cores (Flower's field is an unsigned integer).
    """
    if sites < 1:
        raise ValueError(f"--sites must be >= 1, got {sites}")
    if not (math.isfinite(cpus) and cpus >= 1 and float(cpus).is_integer()):
        raise ValueError(f"--cpus-per-site must be a whole number of cores >= 1 (Flower's num-cpus), got {cpus:g}")
    gpus = cfgmod.check_gpus_per_site(gpus, "--gpus-per-site / run.gpus_per_site")
    text = f"num-supernodes={sites} client-resources-num-cpus={int(cpus)}"
    if gpus > 0:
        text += f" client-resources-num-gpus={gpus:g}"
    return text


def sim_in_flight(cpus: float, cpu_count: int | None = None) -> int:
    """``run.in_flight`` for Flower's simulation engine: 4 x the sites that run at once (whole
    ``cpus``-core actors on this machine), at least 8. Enough to keep every actor busy while the
    next messages wait with the server, few enough that Flower's link state, which scans every
    stored message for every node several times a second, stays small (docs/many-machines.md).
    """
    actors = max(1, int((cpu_count or os.cpu_count() or 1) // cpus))
    return max(8, 4 * actors)


def with_sim_in_flight(flat: dict[str, Any], cpus: float) -> dict[str, Any]:
    """``flat`` with ``run.in_flight`` set to ``sim_in_flight(cpus)`` unless the recipe or ``--set`` gave one."""
    return flat if "run.in_flight" in flat else {**flat, "run.in_flight": sim_in_flight(cpus)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NOT_PORTABLE = (
    "a Ray cluster ({addr!r}) runs simulated sites on other machines, where neither the server's run folder "
    "(site kits) nor this machine's cache (site state) exists: that needs run.portable_sites = true, which "
    "this run sets to false (docs/many-machines.md)"
)


def ray_cluster(address: str = "") -> str:
    """The Ray cluster a simulation runs on: ``address``, else ``RAY_ADDRESS``; "" (or ``local``) for none."""
    addr = address or os.environ.get("RAY_ADDRESS", "")
    return "" if addr in ("", "local") else addr


def with_cluster(flat: dict[str, Any], address: str) -> dict[str, Any]:
    """``flat`` for a simulation on the Ray cluster ``address`` ("": on this machine): portable sites
    (``run.portable_sites``: kits and site state travel with the run, ``flower/portable.py``), unless the
    recipe or ``--set`` turned them off, which is refused (``ValueError``).
    """
    if not address:
        return flat
    if flat.get("run.portable_sites") is False:
        raise ValueError(NOT_PORTABLE.format(addr=address))
    return {**flat, "run.portable_sites": True}


def flwr_env(flwr_home: Path, ray_address: str = "") -> dict[str, str]:
    """Environment for a simulated run: a private Flower home, offline, free ports for the local SuperLink.

    Flower's Ray backend calls ``ray.init()`` without an address, which attaches to a Ray cluster started
    on this machine (``ray start``) or named by ``RAY_ADDRESS``. A simulation runs on the cluster
    ``ray_address`` when one is given (with portable sites, ``with_cluster``) and otherwise always starts
    its own local Ray (``RAY_ADDRESS=local``), whatever the caller's environment says.
    """
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        RAY_ADDRESS=ray_address or "local",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
    )
    return env


def wait_local_superlink(env: dict[str, str], timeout_s: float) -> bool:
    """Poll the local SuperLink's health endpoint (``flwr run`` leaves it starting) until it answers."""
    import urllib.request

    url = f"http://127.0.0.1:{env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}/health"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (our own loopback endpoint)
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False


def stop_local_superlink(flwr_home: Path) -> None:
    """The local SuperLink that ``flwr run`` spawns keeps running after the run; stop ours."""
    log = flwr_home / "local-superlink" / "superlink.log"
    out = subprocess.run(["pgrep", "-f", "--", f"--log-file {log}"], capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


def sim_status(run_id: int, env: dict[str, str], root: Path) -> str:
    """Flower's status of a simulated run (``flwr ls``), ``unknown`` when it does not answer in JSON."""
    ls = subprocess.run(
        ["flwr", "ls", "--run-id", str(run_id), "--format", "json"], env=env, capture_output=True, text=True, cwd=root
    )
    try:
        return str(json.loads(ls.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return "unknown"


def simulate_flower(
    flat: dict[str, Any], cfg: cfgmod.RunConfig, sites: int, cpus: float, run_dir: Path, ray_address: str = ""
) -> int:
    """Run ``flwr run`` on Flower's simulation engine and follow the run; return an exit code.

    ``ray_address``: a Ray cluster to run the sites on (``ray_cluster``; "": a private local Ray).
    ``ValueError``: bad resources or config; ``SimulationError``: Flower did not start the run (its output printed).
    """
    fed_config = federation_config(sites, cpus, cfg.run.gpus_per_site)
    if ray_address:
        flat = with_cluster(flat, ray_address)
        cfg = cfgmod.from_run_config(flat)
        console.print(f"Ray cluster {ray_address}: sites get their kits and keep their state through the run")
    flwr_home = Path(tempfile.mkdtemp(prefix="edgetune-flwr-"))
    root = project.write_app_folder(flwr_home / "app", cfg)
    env = flwr_env(flwr_home, ray_address)
    run_cfg = flwr_home / "run-config.toml"
    run_cfg.write_text(cfgmod.to_toml(with_sim_in_flight(flat, cpus)))
    table = RoundTable(f"edgetune simulate · {run_dir.name} · {cfg.algorithm} · {sites} sites", cfg.num_rounds)
    run_dir.mkdir(parents=True, exist_ok=True)
    flower_log = open(run_dir / "flower.log", "w")  # noqa: SIM115 (kept open while the run streams)
    streamer = None
    code = 1
    try:
        cmd = ["flwr", "run", str(root), "--run-config", str(run_cfg), "--format", "json"]
        cmd += ["--federation-config", fed_config]
        start = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
        if LOCAL_LINK_SLOW in start.stdout + start.stderr and wait_local_superlink(env, 120.0):
            # flwr gives its local SuperLink 15 s; on a busy machine it comes up later: submit again
            start = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
        try:
            run_id = int(json.loads(start.stdout)["run-id"])
        except (ValueError, KeyError):
            console.print(start.stdout[-3000:], start.stderr[-3000:])
            raise SimulationError("flwr run did not start the run (output above)") from None
        streamer = subprocess.Popen(
            ["flwr", "log", str(run_id), "--stream"], env=env, stdout=flower_log, stderr=subprocess.STDOUT, cwd=root
        )
        status = follow(table, run_dir, lambda: sim_status(run_id, env, root))
        # `flwr run` exits 0 even when the app failed: the run's status is the verdict.
        if status != "finished:completed":
            time.sleep(1.0)
            tail = (run_dir / "flower.log").read_text()[-4000:]
            console.print(tail)
            console.print(f"[bold red]run {run_id} ended with status {status}[/] (log: {run_dir / 'flower.log'})")
            return 1
        code = 0
    finally:
        if streamer is not None:
            streamer.terminate()
        flower_log.close()
        stop_local_superlink(flwr_home)
        shutil.rmtree(flwr_home, ignore_errors=True)
    return code


def simulate_inproc(cfg: cfgmod.RunConfig, sites: int, run_dir: Path) -> int:
    """Run the federation in this process (``edgetune/inproc.py``) with the live table; return 0."""
    from edgetune import inproc

    title = f"edgetune simulate (in-process) · {run_dir.name} · {cfg.algorithm} · {sites} sites"
    table = RoundTable(title, cfg.num_rounds)
    with Live(table.render(), console=console, refresh_per_second=2) as live:

        def on_row(row: dict[str, Any]) -> None:
            table.add(row)
            live.update(table.render())

        table.status = "running"
        inproc.run(cfg, sites, run_dir=run_dir, on_row=on_row)
        table.status = "finished"
        live.update(table.render())
    return 0
