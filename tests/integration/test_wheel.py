"""The installable toolkit: a wheel in a fresh virtualenv, outside the checkout, runs a project made by
`edgetune new` with `edgetune simulate` and with plain `flwr run .` (tiny model, offline)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _console_scripts(dist: str, bin_dir: Path, python: Path) -> None:
    """What pip writes for a distribution's console scripts, here for the fresh venv's interpreter (the
    distribution itself is shared from the test's environment, see ``fresh_venv``)."""
    for ep in metadata.distribution(dist).entry_points:
        if ep.group != "console_scripts":
            continue
        module, _, attr = ep.value.partition(":")
        script = bin_dir / ep.name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {attr.split('.')[0]}\nsys.exit({attr}())\n")
        script.chmod(0o755)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new virtualenv outside the repository with the edgetune wheel installed into it.

    Installing torch, transformers and Flower from the registry in a test would take minutes and need
    the network, so the venv sees the test environment's third-party packages through a .pth path line
    (which, unlike a site directory, does not run that environment's own .pth files: the checkout's
    editable install stays invisible). edgetune itself comes only from the wheel; `pip check` proves
    the wheel's declared dependencies are satisfied; Flower's commands get their scripts as pip would.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("edgetune-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (purelib / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    _console_scripts("flwr", venv / "bin", python)
    home = tmp / "home"
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "EDGETUNE_CACHE": str(tmp / "cache"),
        "FLWR_HOME": str(tmp / "flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "COLUMNS": "160",
        "EDGETUNE_PROGRESS": "0",
    }
    for key in ("LANG", "LC_ALL", "TMPDIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    work = tmp / "work"
    work.mkdir()
    home.mkdir()
    return {"venv": venv, "python": python, "wheel": wheel, "env": env, "work": work, "pip_check_python": python}


def _run(args, cwd, env, timeout=600):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_carries_the_flower_apps_recipes_and_benchmarks_not_results(fresh_venv):
    """The wheel holds the ServerApp/ClientApp modules, the recipes and the benchmark scripts (no results,
    no top-level packages but edgetune), and the installed edgetune is the wheel's, not the checkout's."""
    names = zipfile.ZipFile(fresh_venv["wheel"]).namelist()
    assert "edgetune/flower/server_app.py" in names and "edgetune/flower/client_app.py" in names
    assert "edgetune/_bundled/recipes/spsa/tiny-4c.toml" in names
    assert "edgetune/_bundled/benchmarks/run_all.py" in names
    assert not [n for n in names if "/results/" in n]
    assert {n.split("/")[0] for n in names} <= {"edgetune", f"edgetune-{metadata.version('edgetune')}.dist-info"}
    where = _run(
        [fresh_venv["python"], "-c", "import edgetune; print(edgetune.__file__)"], fresh_venv["work"], fresh_venv["env"]
    )
    assert where.stdout.startswith(str(fresh_venv["venv"])), where.stdout + where.stderr
    check = _run(
        [sys.executable, "-m", "pip", "--python", str(fresh_venv["python"]), "check"],
        fresh_venv["work"],
        fresh_venv["env"],
    )
    assert "edgetune" not in check.stdout, check.stdout  # every requirement of the wheel is met
    version = _run(["edgetune", "--version"], fresh_venv["work"], fresh_venv["env"])
    assert version.returncode == 0 and version.stdout.strip() == f"edgetune {metadata.version('edgetune')}"


def test_new_project_runs_with_edgetune_simulate_and_plain_flwr_run(fresh_venv):
    """`edgetune new myfed --model tiny`, then in myfed both `edgetune simulate recipe.toml` and
    `flwr run .` finish (Flower's run status: finished:completed), each writing a run folder."""
    env, work = fresh_venv["env"], fresh_venv["work"]
    made = _run(["edgetune", "new", "myfed", "--model", "tiny"], work, env)
    assert made.returncode == 0, made.stdout + made.stderr
    proj = work / "myfed"
    assert {p.name for p in proj.iterdir()} == {"pyproject.toml", "recipe.toml", "README.md", ".gitignore"}
    from_shipped = _run(["edgetune", "new", "other", "--from", "spsa/tiny-4c"], work, env)
    assert from_shipped.returncode == 0, from_shipped.stdout + from_shipped.stderr

    sim = _run(["edgetune", "simulate", "recipe.toml", "--rounds", "1"], proj, env, timeout=900)
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    (first,) = [p for p in (proj / "runs").iterdir()]
    assert json.loads((first / "summary.json").read_text())["rounds_completed"] == 1

    link_log = Path(env["FLWR_HOME"]) / "local-superlink" / "superlink.log"
    try:
        start = _run(["flwr", "run", ".", "--run-config", "num_rounds=1", "--format", "json"], proj, env)
        assert start.returncode == 0, start.stdout + start.stderr
        run_id = json.loads(start.stdout)["run-id"]
        # `flwr ls` is a process start (about a CPU-second): ask every 3 s once the run's summary is
        # written (it ends then), and every 30 s before, in case the app fails without one
        status, deadline, asked = "", time.time() + 600, 0.0
        while time.time() < deadline:
            summary_written = any((p / "summary.json").exists() for p in (proj / "runs").iterdir() if p != first)
            if summary_written or time.time() - asked >= 30:
                asked = time.time()
                ls = _run(["flwr", "ls", "--run-id", str(run_id), "--format", "json"], proj, env, timeout=120)
                try:
                    status = json.loads(ls.stdout)["runs"][0]["status"]
                except (ValueError, KeyError, IndexError):
                    status = "unknown"
                if status.startswith("finished"):
                    break
            time.sleep(3)
    finally:
        pids = subprocess.run(["pgrep", "-f", "--", f"--log-file {link_log}"], capture_output=True, text=True)
        for pid in pids.stdout.split():
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
    log_tail = link_log.read_text()[-3000:] if link_log.exists() else ""
    assert status == "finished:completed", log_tail
    runs = sorted(p for p in (proj / "runs").iterdir() if p != first)
    assert len(runs) == 1 and json.loads((runs[0] / "summary.json").read_text())["rounds_completed"] == 1
