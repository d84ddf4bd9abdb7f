"""The ``edgetune`` command line.

    edgetune new DIR [--from RECIPE] [--model M] [--algorithm A] [--data PATH] [--sites N]
    edgetune simulate RECIPE --sites N [--rounds R] [--set key=value ...] [--engine flower|inproc]
    edgetune keys OUT_DIR --sites site-0,site-1 [--add] [--overwrite]
    edgetune eval CHECKPOINT [--examples N] [--no-accuracy]
    edgetune imv CHECKPOINT [--set imv.num_directions=8]
    edgetune certs KEYS --hosts link.example.org,10.0.0.5
    edgetune server RECIPE --keys KEYS [--address 0.0.0.0:9091]
    edgetune site --kit KEYS/sites/<id> --superlink HOST:PORT --data site.jsonl [--device cuda] [--model PATH]
    edgetune fingerprint MODEL
    edgetune bench [--quick] [--only NAME,...]
    edgetune report RUN_DIR [--out PATH] [--format html|md]
    edgetune compare RUN_DIR... [--out compare.png]
    edgetune --version

``simulate`` runs Flower's simulation engine (``flwr run`` against a private local SuperLink,
offline) and follows the run's ``metrics.jsonl`` in a live table; ``--engine inproc`` runs the
same loop without Flower. Nothing here needs the source checkout: the Flower apps are modules of
the package and the app folder ``flwr run`` submits is generated (``edgetune/project.py``).
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
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgetune import config as cfgmod
from edgetune import project
from edgetune.io import private_dir, read_jsonl
from edgetune.runs import new_run_name

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning over thin links.")
console = Console(stderr=False)


ACTIVATION_REFUSED = "Failed to activate SuperNode"
"""What flower-supernode prints (exit code 305; its process status is 1) when the SuperLink refuses
to activate the node."""


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=1)


def app_dir(folder: Path, cfg: cfgmod.RunConfig | None = None) -> Path:
    """A Flower app folder for ``flwr run``: a generated pyproject.toml naming edgetune's installed
    ServerApp and ClientApp (no source checkout needed; the bundle Flower ships is that one file).
    """
    return project.write_app_folder(folder, cfg)


class Engine(StrEnum):
    """``edgetune simulate --engine``."""

    flower = "flower"
    inproc = "inproc"


class Link(StrEnum):
    """``edgetune site --link``."""

    standard = "standard"
    thin = "thin"


class ReportFormat(StrEnum):
    """``edgetune report --format``."""

    html = "html"
    md = "md"


def _version(value: bool) -> None:
    if value:
        console.print(f"edgetune {project.version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Federated fine-tuning over thin links."""


def _load(recipe: Path, sets: list[str], extra: dict[str, Any]) -> tuple[dict[str, Any], cfgmod.RunConfig]:
    """Read and validate a recipe; relative paths in it are taken from the current directory."""
    from edgetune import tracking

    try:
        flat = cfgmod.load_recipe(recipe, sets)
        flat.update(extra)
        flat = project.absolute_paths(flat, Path.cwd())
        cfg = cfgmod.from_run_config(flat)
        tracking.check_available(cfg)
        return flat, cfg
    except ValueError as err:
        raise _fail(str(err)) from err


class RoundTable:
    """A live table of rounds with the run's progress in the caption."""

    COLUMNS = (
        ("round", "round", "{}"),
        ("train_loss", "train loss", "{:.4f}"),
        ("heldout_loss", "held-out loss", "{:.4f}"),
        ("accuracy", "accuracy", "{:.3f}"),
        ("uplink_bytes", "uplink B", "{:,}"),
        ("downlink_bytes", "downlink B", "{:,}"),
        ("num_accepted", "sites", "{:.0f}"),
        ("wall_s", "wall s", "{:.1f}"),
        ("state_hash", "state hash", "{:.12}"),
    )

    def __init__(self, title: str, num_rounds: int) -> None:
        self.title = title
        self.num_rounds = num_rounds
        self.rows: list[dict[str, Any]] = []
        self.status = "starting"
        self.t0 = time.time()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def render(self) -> Table:
        done = max((r["round"] for r in self.rows), default=0)
        bar_width = 30
        filled = int(bar_width * done / max(1, self.num_rounds))
        caption = (
            f"[{'█' * filled}{'░' * (bar_width - filled)}] round {done}/{self.num_rounds}  "
            f"{time.time() - self.t0:.0f} s  {self.status}"
        )
        table = Table(title=self.title, caption=caption, caption_justify="left")
        for _, header, _ in self.COLUMNS:
            table.add_column(header, justify="right")
        for row in self.rows:
            cells = []
            for key, _, fmt in self.COLUMNS:
                value = row.get(key)
                cells.append("" if value is None else fmt.format(value))
            table.add_row(*cells)
            if row.get("rejected"):
                table.add_row(f"[yellow]rejected: {row['rejected']}", *[""] * (len(self.COLUMNS) - 1))
        return table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flwr_env(flwr_home: Path) -> dict[str, str]:
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
    )
    return env


LOCAL_LINK_SLOW = "Failed to start local SuperLink"
"""What ``flwr run`` says when the local SuperLink it spawned did not answer within its 15 s."""


def _wait_local_superlink(env: dict[str, str], timeout_s: float) -> bool:
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


def _stop_local_superlink(flwr_home: Path) -> None:
    """The local SuperLink that ``flwr run`` spawns keeps running after the run; stop ours."""
    log = flwr_home / "local-superlink" / "superlink.log"
    out = subprocess.run(["pgrep", "-f", "--", f"--log-file {log}"], capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


def _sim_status(run_id: int, env: dict[str, str], root: Path) -> str:
    ls = subprocess.run(
        ["flwr", "ls", "--run-id", str(run_id), "--format", "json"], env=env, capture_output=True, text=True, cwd=root
    )
    try:
        return str(json.loads(ls.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return "unknown"


def follow(
    table: RoundTable, run_dir: Path, status_fn: Any, *, poll_s: float = 2.0, status_every_s: float = 15.0
) -> str:
    """Show the run's metrics.jsonl rows live until ``status_fn()`` says the run finished.

    The rows are read every ``poll_s``; Flower is asked for the run's status (a ``flwr ls``: a new
    Python process, about a CPU-second) only every ``status_every_s`` and as soon as the run writes
    its summary, so following a run does not take CPU from the sites it simulates.
    """
    status = ""
    asked = -math.inf
    with Live(table.render(), console=console, refresh_per_second=2) as live:
        while True:
            for row in read_jsonl(run_dir / "metrics.jsonl")[len(table.rows) :]:
                table.add(row)
            if time.monotonic() - asked >= status_every_s or (run_dir / "summary.json").exists():
                status = status_fn()
                asked = time.monotonic()
                table.status = status
            live.update(table.render())
            if status.startswith("finished"):
                break
            time.sleep(poll_s)
        for row in read_jsonl(run_dir / "metrics.jsonl")[len(table.rows) :]:
            table.add(row)
        live.update(table.render())
    return status


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


def simulate_flower(flat: dict[str, Any], cfg: cfgmod.RunConfig, sites: int, cpus: float, run_dir: Path) -> int:
    """Run ``flwr run`` on Flower's simulation engine and follow the run; return an exit code."""
    try:
        fed_config = federation_config(sites, cpus, cfg.run.gpus_per_site)
    except ValueError as err:
        raise _fail(str(err)) from err
    flwr_home = Path(tempfile.mkdtemp(prefix="edgetune-flwr-"))
    root = app_dir(flwr_home / "app", cfg)
    env = _flwr_env(flwr_home)
    run_cfg = flwr_home / "run-config.toml"
    run_cfg.write_text(cfgmod.to_toml(flat))
    table = RoundTable(f"edgetune simulate · {run_dir.name} · {cfg.algorithm} · {sites} sites", cfg.num_rounds)
    run_dir.mkdir(parents=True, exist_ok=True)
    flower_log = open(run_dir / "flower.log", "w")  # noqa: SIM115 (kept open while the run streams)
    streamer = None
    code = 1
    try:
        cmd = [
            "flwr",
            "run",
            str(root),
            "--run-config",
            str(run_cfg),
            "--format",
            "json",
            "--federation-config",
            fed_config,
        ]
        start = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
        if LOCAL_LINK_SLOW in start.stdout + start.stderr and _wait_local_superlink(env, 120.0):
            # flwr gives its local SuperLink 15 s; on a busy machine it comes up later: submit again
            start = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
        try:
            run_id = int(json.loads(start.stdout)["run-id"])
        except (ValueError, KeyError):
            console.print(start.stdout[-3000:], start.stderr[-3000:])
            raise _fail("flwr run did not start the run (output above)") from None
        streamer = subprocess.Popen(
            ["flwr", "log", str(run_id), "--stream"], env=env, stdout=flower_log, stderr=subprocess.STDOUT, cwd=root
        )
        status = follow(table, run_dir, lambda: _sim_status(run_id, env, root))
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
        _stop_local_superlink(flwr_home)
        shutil.rmtree(flwr_home, ignore_errors=True)
    return code


def _print_summary(run_dir: Path) -> None:
    path = run_dir / "summary.json"
    if not path.exists():
        return
    s = json.loads(path.read_text())
    console.print(
        f"[bold]held-out loss[/] {s['heldout_loss_first']:.4f} → {s['heldout_loss_last']:.4f}   "
        f"[bold]accuracy[/] {s['accuracy_first']:.3f} → {s['accuracy_last']:.3f}   "
        f"[bold]uplink[/] {s['uplink_bytes_total']:,} B   [bold]downlink[/] {s['downlink_bytes_total']:,} B   "
        f"{s['wall_s']:.0f} s"
    )
    console.print(f"run folder: {run_dir}   checkpoint: {s.get('checkpoint')}")


@app.command()
def new(
    folder: Annotated[Path, typer.Argument(help="The project folder to create (must not exist or be empty)")],
    from_: Annotated[
        str, typer.Option("--from", help="Start from a recipe file or a shipped one, e.g. spsa/tiny-4c")
    ] = "",
    algorithm: Annotated[str | None, typer.Option(help="spsa, kavg, lowrank, deft or dppf (default: spsa)")] = None,
    model: Annotated[
        str | None, typer.Option(help="smollm2, tiny, a model folder or a model id in your HF cache")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Your data file or save_to_disk folder (default: the demo data)")
    ] = None,
    sites: Annotated[int | None, typer.Option(help="Simulated sites (default: 2, Flower's own default)")] = None,
) -> None:
    """Start a federation project: a Flower app folder with a recipe (flwr run . / edgetune simulate)."""
    if algorithm is not None and algorithm not in cfgmod.ALGORITHM_NAMES:
        raise _fail(f"--algorithm must be one of {', '.join(cfgmod.ALGORITHM_NAMES)}, got {algorithm!r}")
    try:
        made = project.new_project(folder, from_recipe=from_, algorithm=algorithm, model=model, data=data, sites=sites)
    except ValueError as err:
        raise _fail(str(err)) from err
    console.print(f"created {made}: pyproject.toml (the Flower app), recipe.toml, README.md")
    console.print(f"  cd {folder} && edgetune simulate recipe.toml        # or: flwr run .")


@app.command()
def fingerprint(
    model: Annotated[str, typer.Argument(help="smollm2, tiny, a model folder or a model id in your HF cache")],
    revision: Annotated[str, typer.Option(help="For a model id: the cached revision (default main)")] = "",
) -> None:
    """The base-model fingerprint that model.sha256 pins (compare a site's copy with the server's)."""
    from edgetune.models.fingerprint import model_fingerprint

    try:
        console.print(model_fingerprint(cfgmod.ModelSection(path=model, revision=revision)))
    except ValueError as err:
        raise _fail(str(err)) from err


@app.command()
def simulate(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML, e.g. recipes/spsa/smollm2-135m-4c.toml")],
    sites: Annotated[int, typer.Option(help="Number of simulated sites (0: the recipe's run.num_sites)")] = 0,
    rounds: Annotated[int, typer.Option(help="Override num_rounds")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override (repeatable)")] = None,
    engine: Annotated[Engine, typer.Option(help="flower (Flower's simulation engine) or inproc")] = Engine.flower,
    cpus_per_site: Annotated[float, typer.Option(help="CPU cores Flower reserves per simulated site")] = 1.0,
    gpus_per_site: Annotated[
        float,
        typer.Option(
            help="GPUs Flower reserves per simulated site, e.g. 0.25 (default: the recipe's run.gpus_per_site)"
        ),
    ] = -1.0,
) -> None:
    """Simulate N sites on this machine with Flower's simulation engine (offline)."""
    extra: dict[str, Any] = {}
    if rounds:
        extra["num_rounds"] = rounds
    if gpus_per_site != -1.0:
        try:
            extra["run.gpus_per_site"] = cfgmod.check_gpus_per_site(gpus_per_site, "--gpus-per-site")
        except ValueError as err:
            raise _fail(str(err)) from err
    flat, cfg = _load(recipe, set_ or [], extra)
    num_sites = sites or cfg.run.num_sites or 4
    name = new_run_name(cfg)
    run_dir = (Path(cfg.run.dir).expanduser() / name).resolve()
    flat.update({"run.name": name, "run.dir": str(run_dir.parent), "run.num_sites": num_sites})
    cfg = cfgmod.from_run_config(flat)
    if engine == Engine.flower:
        code = simulate_flower(flat, cfg, num_sites, cpus_per_site, run_dir)
    else:
        from edgetune import inproc

        table = RoundTable(
            f"edgetune simulate (in-process) · {name} · {cfg.algorithm} · {num_sites} sites", cfg.num_rounds
        )
        with Live(table.render(), console=console, refresh_per_second=2) as live:

            def on_row(row: dict[str, Any]) -> None:
                table.add(row)
                live.update(table.render())

            table.status = "running"
            inproc.run(cfg, num_sites, run_dir=run_dir, on_row=on_row)
            table.status = "finished"
            live.update(table.render())
        code = 0
    _print_summary(run_dir)
    raise typer.Exit(code=code)


@app.command()
def keys(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the key material")],
    sites: Annotated[str, typer.Option(help="Comma-separated site ids, e.g. plant-a,plant-b")],
    add: Annotated[bool, typer.Option(help="Add site kits to an existing folder")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing key material")] = False,
) -> None:
    """Generate the server signing key and one key kit per site (hand sites/<id>/ to each site)."""
    from edgetune.crypto import keys as keymod

    site_ids = [s.strip() for s in sites.split(",") if s.strip()]
    if not site_ids:
        raise _fail("--sites names no site")
    try:
        if add:
            keymod.add_sites(out_dir, site_ids)
        else:
            keymod.generate(out_dir, site_ids, overwrite=overwrite)
    except ValueError as err:
        raise _fail(str(err)) from err
    console.print(f"server key:   {out_dir / 'server'} (keep private)")
    console.print(f"registry:     {out_dir / 'registry.json'} (site public keys, for the server)")
    for s in site_ids:
        console.print(f"site kit:     {keymod.site_kit_dir(out_dir, s)} (give to {s})")


@app.command("eval")
def eval_(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint folder (runs/<id>/checkpoints/round-NNNN) or a delta file")
    ],
    recipe: Annotated[Path | None, typer.Option(help="Config for the held-out data (default: the run's)")] = None,
    sites: Annotated[int, typer.Option(help="Sites whose held-out questions to use (default: the run's)")] = 0,
    examples: Annotated[int, typer.Option(help="Held-out examples (default: the run's eval.num_examples)")] = 0,
    accuracy: Annotated[bool, typer.Option(help="Also accuracy (label ranking or greedy exact match)")] = True,
    verify: Annotated[
        bool, typer.Option(help="Refuse weights that do not match the state hash the run recorded")
    ] = True,
) -> None:
    """Held-out loss and accuracy of a saved checkpoint (its weights checked against the run) or a delta file."""
    from edgetune.evaluation import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(
            checkpoint,
            recipe=recipe,
            num_sites=sites,
            num_examples=examples,
            accuracy=accuracy,
            verify=verify,
            show_progress=True,
        )
    except ValueError as err:
        raise _fail(str(err)) from err
    for key, value in result.items():
        console.print(f"{key:>14}: {value}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run folder (runs/<id>) of an spsa run with a run-scope seed pool")],
    delta: Annotated[Path, typer.Option("--delta", help="Where to write the delta file (S coefficients + metadata)")],
) -> None:
    """Export a run's model as a delta file: its seed-pool coefficients, rebuilt from the base model."""
    from edgetune.algorithms.spsa.delta import export_run_delta

    try:
        summary = export_run_delta(run, delta)
    except ValueError as err:
        raise _fail(str(err)) from err
    for key, value in summary.items():
        console.print(f"{key:>14}: {value}")
    console.print(f"written to {delta} (0600: it rebuilds the fine-tuned model; `edgetune eval {delta}` checks it)")


@app.command()
def imv(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder (runs/<id>/checkpoints/round-NNNN)")],
    recipe: Annotated[Path | None, typer.Option(help="Config for the held-out data (default: the run's)")] = None,
    sites: Annotated[int, typer.Option(help="Sites whose held-out questions to use (default: the run's)")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="imv.key=value override, e.g. imv.delta=0.05")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the JSON report (default: CHECKPOINT/imv.json)")
    ] = None,
) -> None:
    """Checkpoint flatness: the forward-only valley probe (IMV = 1 / mean radius) of a saved checkpoint."""
    from edgetune.io import atomic_write_json
    from edgetune.metrics.imv import checkpoint_imv

    try:
        overrides = dict(cfgmod.parse_override(o) for o in (set_ or []))
        report = checkpoint_imv(checkpoint, recipe=recipe, num_sites=sites, overrides=overrides, show_progress=True)
    except ValueError as err:
        raise _fail(str(err)) from err
    for key, value in report.items():
        console.print(f"{key:>16}: {value}")
    target = out or Path(checkpoint) / "imv.json"
    atomic_write_json(target, report)
    console.print(f"written to {target}")


@app.command()
def certs(
    keys_dir: Annotated[Path, typer.Argument(help="The folder made by `edgetune keys`")],
    hosts: Annotated[str, typer.Option(help="SuperLink DNS names / IPs for its certificate, comma-separated")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing CA and every node key")] = False,
) -> None:
    """TLS (a private CA + the SuperLink certificate) and Flower node-auth keys for every site kit.

    Run again after `edgetune keys --add`: an existing CA and existing node keys are kept, and only
    the kits without a node key get one (``--overwrite`` replaces everything; every site then needs
    its kit again).
    """
    import json as _json

    from edgetune.crypto import certs as certmod
    from edgetune.crypto.keys import site_kit_dir

    if not (keys_dir / "registry.json").is_file():
        raise _fail(f"no site registry in {keys_dir}: run `edgetune keys {keys_dir} --sites ...` first")
    try:
        sites = sorted(_json.loads((keys_dir / "registry.json").read_text())["sites"])
        host_list = [h.strip() for h in hosts.split(",") if h.strip()]
        ca_kept = (certmod.tls_dir(keys_dir) / "ca.crt").exists() and not overwrite
        if not ca_kept:
            certmod.generate_tls(keys_dir, host_list, overwrite=overwrite)
        new = [s for s in sites if overwrite or not (site_kit_dir(keys_dir, s) / "node.key").exists()]
        certmod.generate_node_keys(keys_dir, new, overwrite=overwrite)
    except (ValueError, OSError, KeyError) as err:
        raise _fail(str(err)) from err
    kept = " (kept; --overwrite replaces it)" if ca_kept else ""
    console.print(f"CA:         {certmod.tls_dir(keys_dir) / 'ca.crt'} (ca.key: keep offline){kept}")
    console.print(f"SuperLink:  {certmod.tls_dir(keys_dir) / 'superlink.crt'}{kept or f' for {hosts}'}")
    for site in sites:
        what = "new node key" if site in new else "node key kept"
        console.print(f"site kit:   {keys_dir / 'sites' / site} ({what}; node.key, node.pub, ca.crt)")


@app.command()
def server(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML")],
    keys: Annotated[Path, typer.Option(help="Key folder from `edgetune keys` + `edgetune certs`")],
    address: Annotated[str, typer.Option(help="Where the SuperLink listens (host:port)")] = "0.0.0.0:9091",
    connect: Annotated[str, typer.Option(help="Use a running SuperLink at host:port instead of starting one")] = "",
    state: Annotated[Path, typer.Option(help="SuperLink database and Flower CLI home")] = Path(".edgetune/server"),
    sites: Annotated[int, typer.Option(help="Sites to wait for (0: every registered site)")] = 0,
    rounds: Annotated[int, typer.Option(help="Override num_rounds")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override (repeatable)")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node auth: loopback tests only")] = False,
    gateway: Annotated[
        str, typer.Option(help="Also serve thin-link sites (`edgetune site --link thin`) at host:port")
    ] = "",
) -> None:
    """Start (or connect to) a SuperLink with TLS + node authentication, register sites, run RECIPE."""
    import json as _json

    from edgetune import deploy, linkmeter

    keys = keys.resolve()
    state = state.resolve()
    try:
        registered = sorted(_json.loads((keys / "registry.json").read_text())["sites"])
    except (OSError, ValueError, KeyError) as err:
        raise _fail(f"{keys / 'registry.json'}: {err}") from err
    extra: dict[str, Any] = {"crypto.keys_dir": str(keys), "run.num_sites": sites or len(registered)}
    if rounds:
        extra["num_rounds"] = rounds
    flat, cfg = _load(recipe, set_ or [], extra)
    name = new_run_name(cfg)
    run_dir = (Path(cfg.run.dir).expanduser() / name).resolve()
    flat.update({"run.name": name, "run.dir": str(run_dir.parent)})
    if not cfg.model.sha256:
        # pin the base model: a site whose own copy (node config model-path) differs is refused
        from edgetune.models.fingerprint import model_fingerprint

        try:
            flat["model.sha256"] = model_fingerprint(cfg.model, seed=cfg.run.seed)
            console.print(f"base model {cfg.model.path}: fingerprint {flat['model.sha256'][:16]}... (model.sha256)")
        except ValueError as err:
            if not connect:
                raise _fail(str(err)) from err
            console.print(f"[yellow]base model not found here ({err}); sites' copies are not checked[/]")
    cfg = cfgmod.from_run_config(flat)
    host, port = deploy.split_address(connect or address)
    if insecure:
        if not deploy.is_loopback(host):
            raise _fail("--insecure is for loopback tests only (127.0.0.1); real sites need TLS")
        console.print("[bold red]WARNING: --insecure: no TLS, no node authentication. Loopback tests only.[/]")
    ca = None if insecure else keys / "tls" / "ca.crt"
    link_home, cli_home = state / "superlink", state / "cli"
    env_link, env = deploy.flower_env(link_home), deploy.flower_env(cli_home)
    client_host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host
    deploy.write_cli_config(cli_home, f"{client_host}:{port}", ca)
    run_cfg = state / "run-config.toml"
    state.mkdir(parents=True, exist_ok=True)
    run_cfg.write_text(cfgmod.to_toml(flat))
    link = gate = None
    try:
        if gateway:
            gate = _start_server_gateway(gateway, keys, f"{client_host}:{port}", insecure)
        if not connect:
            cmd = deploy.superlink_command(keys, host, port, link_home, insecure=insecure)
            link = deploy.Managed(cmd, env_link, state / "superlink.log").__enter__()
            scheme = "http" if insecure else "https"
            deploy.wait_healthy(f"{scheme}://{client_host}:{port}/health", ca, 60, link)
            console.print(f"SuperLink on {host}:{port} (log {state / 'superlink.log'}, database {link_home})")
        if gate is not None:
            console.print(f"thin-link gateway on {gateway} (HTTP/2) -> SuperLink {client_host}:{port}")
        if not insecure:
            done = deploy.register_sites(keys, env)
            console.print(f"registered node keys of {', '.join(done)}")
        linkmeter.mark_timeline(run_dir, "submitted")  # opens the run's setup window for link meters
        run_id = deploy.submit_run(app_dir(state / "app", cfg), run_cfg, env)
        console.print(f"run {run_id} submitted: {run_dir}")
        table = RoundTable(f"edgetune server · {name} · {cfg.algorithm}", cfg.num_rounds)
        status = follow(table, run_dir, lambda: deploy.run_status(run_id, env), poll_s=3.0)
    except deploy.DeployError as err:
        raise _fail(str(err)) from err
    finally:
        if link is not None:
            link.stop()
        if gate is not None:
            gate.stop()
    _print_summary(run_dir)
    if status != "finished:completed":
        raise _fail(f"run {run_id} ended with status {status}; see {state / 'superlink.log'}")


@app.command()
def site(
    kit: Annotated[Path, typer.Option(help="This site's kit folder (sites/<id> from the server team)")],
    superlink: Annotated[str, typer.Option(help="The SuperLink's host:port")],
    data: Annotated[
        str, typer.Option(help="This site's data: JSONL/JSON/parquet/CSV file or save_to_disk folder")
    ] = "",
    demo_index: Annotated[int, typer.Option(help="Use demo site N's data instead of --data (-1: off)")] = -1,
    num_sites: Annotated[int, typer.Option(help="With --demo-index: how many demo sites exist")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (default: the recipe's)")] = "",
    devices: Annotated[
        str,
        typer.Option(help="Several devices of this site, e.g. cuda:0,cuda:1: spsa spreads its probes across them"),
    ] = "",
    model: Annotated[
        str,
        typer.Option(help="This site's own copy of the base model (folder or cached model id; default: the recipe's)"),
    ] = "",
    quantize: Annotated[
        str, typer.Option(help="4bit or 8bit base weights on this GPU site, none to turn the recipe's off")
    ] = "",
    port: Annotated[int, typer.Option(help="Local port of this SuperNode's runtime API")] = 9094,
    state: Annotated[Path, typer.Option(help="This site's Flower home")] = Path(".edgetune/site"),
    insecure: Annotated[bool, typer.Option(help="No TLS, no node auth: loopback tests only")] = False,
    activation_wait: Annotated[
        float, typer.Option(help="Keep retrying for this many seconds while the SuperLink refuses to activate the node")
    ] = 180.0,
    keep_loaded: Annotated[
        bool,
        typer.Option(
            help="Keep the model loaded between rounds in a site host process (else every message reloads it)"
        ),
    ] = True,
    link: Annotated[
        Link,
        typer.Option(
            help="standard, or thin: HTTP/2 to the server's --gateway, held polls, 300 s heartbeats "
            "(docs/site-operator.md: what it saves and costs)"
        ),
    ] = Link.standard,
    count_bytes: Annotated[
        bool, typer.Option(help="Count the real bytes on this site's link (log: STATE/link-bytes.jsonl)")
    ] = False,
) -> None:
    """Run this factory's site: a Flower SuperNode with its kit, data and device."""
    from edgetune import deploy

    kit = kit.resolve()
    if not (kit / "site.json").is_file():
        raise _fail(f"{kit} is not a site kit (no site.json)")
    if data and not Path(data).exists():
        raise _fail(f"--data {data} does not exist")
    if quantize and quantize not in {"none", "4bit", "8bit"}:
        raise _fail(f"--quantize must be none, 4bit or 8bit, got {quantize!r}")
    if not data and demo_index < 0:
        raise _fail("give --data PATH (this site's JSONL) or --demo-index N (demo data)")
    host, _ = deploy.split_address(superlink)
    if insecure:
        if not deploy.is_loopback(host):
            raise _fail("--insecure is for loopback tests only; use the kit's TLS and node key")
        console.print("[bold red]WARNING: --insecure: no TLS, no node authentication. Loopback tests only.[/]")
    if device and devices:
        raise _fail("give --device or --devices, not both")
    if devices:
        try:
            device = ",".join(cfgmod.device_list(devices))
        except ValueError as err:
            raise _fail(f"--devices: {err}") from err
    socket_path = _site_host_socket(state.resolve()) if keep_loaded else None
    try:
        node_superlink, local_ca, link_stop = _site_link(
            kit, superlink, state.resolve(), link=link, count_bytes=count_bytes
        )
        cmd = deploy.supernode_command(
            kit,
            node_superlink,
            port=port,
            data_path=data,
            device=device,
            model_path=model,
            quantize=quantize,
            insecure=insecure,
            site_index=demo_index if demo_index >= 0 else None,
            num_sites=num_sites or None,
            site_host=str(socket_path) if socket_path else "",
            via_gateway=local_ca,
        )
    except (deploy.DeployError, OSError, ValueError, RuntimeError) as err:
        raise _fail(str(err)) from err
    env = deploy.flower_env(state.resolve())
    host_proc = _start_site_host(socket_path) if socket_path else None
    console.print(f"site {kit.name} -> {superlink}; logs below (Ctrl+C stops the site)")

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Stop the SuperNode's whole process group (SuperExec, ClientApps) on Ctrl+C or SIGTERM,
    # even when started in the background (where SIGINT is ignored by default).
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    started = time.time()
    while True:
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        refused = threading.Event()

        def pump(stream: Any = proc.stdout, flag: threading.Event = refused) -> None:
            # pass the SuperNode's log through, watching for a refusal; its SuperExec child may keep
            # the pipe open after the SuperNode exited, so this runs beside the wait, not before it
            for line in stream:
                sys.stdout.write(line)
                sys.stdout.flush()
                if ACTIVATION_REFUSED in line:
                    flag.set()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            console.print("stopping the site")
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = 130
            break
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            reader.join(timeout=5)
        refused_now = refused.is_set()
        # The SuperLink refused to activate this node: its key is not registered, or a previous
        # session of this site (killed without saying goodbye) has not timed out yet (Flower waits
        # for two missed 30 s heartbeats). Retry for a while in the second case.
        if not refused_now or time.time() - started + 15 > activation_wait:
            if refused_now:
                console.print(
                    "[bold red]the SuperLink refuses this node: is its node.pub registered "
                    "(`edgetune server` registers every kit in the key folder)?[/]"
                )
            break
        console.print("SuperLink refused activation (an earlier session may still be open); retrying in 15 s")
        time.sleep(15)
    for stop in link_stop:
        stop()
    if host_proc is not None:
        host_proc.terminate()
        try:
            host_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            host_proc.kill()
    raise typer.Exit(code=code)


def _site_link(
    kit: Path, superlink: str, state: Path, *, link: str, count_bytes: bool
) -> tuple[str, Path | None, list[Any]]:
    """Where the SuperNode connects (the SuperLink, a link meter or the thin-link gateway), the CA of
    the thin-link gateway's loopback certificate, and what to stop when the site stops.
    """
    from edgetune import deploy, linkmeter

    address, stops, local_ca = superlink, [], None
    meter_at = None
    if count_bytes:
        site_id = json.loads((kit / "site.json").read_text())["site_id"]
        log = state / "link-bytes.jsonl"
        meter = linkmeter.LinkMeter(deploy.split_address(superlink), log, site=site_id).start()
        stops.append(meter.stop)
        meter_at = ("127.0.0.1", meter.port)
        address = f"127.0.0.1:{meter.port}"
        console.print(f"counting this link's bytes: {log}")
    if link == "thin":
        from edgetune.flower.linkgate import ThinLink
        from edgetune.flower.linkgate_site import SiteGateway

        gate = SiteGateway(
            superlink, kit / "ca.crt", ThinLink(), connect_to=meter_at, state_file=state / "thin-link-node-id"
        )
        local_ca = gate.local_tls(state / "thin-link")
        gate.start()
        stops.insert(0, gate.stop)
        address = f"127.0.0.1:{gate.port}"
        console.print(f"thin link: HTTP/2 gateway 127.0.0.1:{gate.port} -> {superlink}")
    return address, local_ca, stops


def _start_server_gateway(address: str, keys: Path, superlink: str, insecure: bool) -> Any:
    from edgetune import deploy
    from edgetune.flower.linkgate_server import ServerGateway

    if insecure:
        raise _fail("--gateway needs TLS (thin-link sites verify the SuperLink certificate); drop --insecure")
    tls = keys / "tls"
    return ServerGateway(
        superlink, tls / "superlink.crt", tls / "superlink.key", tls / "ca.crt", listen=deploy.split_address(address)
    ).start()


def _site_host_socket(state: Path) -> Path:
    """Where the site host listens: in the site's state folder, or a private temp folder when that
    path is too long for a Unix socket (about 100 bytes).
    """
    private_dir(state)  # the socket's key file lives next to it
    path = state / "site-host.sock"
    if len(str(path)) > 100:
        path = Path(tempfile.mkdtemp(prefix="edgetune-site-")) / "host.sock"  # mode 0700
    return path


def _start_site_host(socket_path: Path) -> subprocess.Popen:
    """Start the site host (``edgetune/sitehost.py``) and wait until it listens."""
    ready = socket_path.with_name(socket_path.name + ".ready")
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgetune.sitehost", "--socket", str(socket_path), "--ready-file", str(ready)]
    )
    deadline = time.time() + 600  # importing torch on a busy 2-core machine can take minutes
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise _fail(f"the site host did not start (exit {proc.poll()}); run with --no-keep-loaded to skip it")
        time.sleep(0.2)
    console.print(f"site host (model kept loaded between rounds): pid {proc.pid}, {socket_path}")
    return proc


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option(help="Tiny model, smallest settings: a smoke run of every benchmark")] = False,
) -> None:
    """Run the CPU benchmarks (benchmarks/run_all.py): JSON rows and plots in benchmarks/results/.

    Extra options go to ``python -m benchmarks.run_all`` (``--only``, ``--skip``, ``--sim-sites``,
    ``--results-dir``). About 20 minutes on 2 idle cores; ``--quick`` a few minutes.
    """
    root = project.bundled_root()
    if not (root / "benchmarks" / "run_all.py").is_file():
        raise _fail(f"{root / 'benchmarks'} not found: this edgetune install has no benchmarks")
    args = list(ctx.args)
    if root != Path(__file__).resolve().parent.parent and not any(a.startswith("--results-dir") for a in args):
        # an installed edgetune: results go to the current directory, not into site-packages
        args += ["--results-dir", str(Path.cwd() / "bench-results")]
    cmd = [sys.executable, "-m", "benchmarks.run_all", *(["--quick"] if quick else []), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    raise typer.Exit(code=subprocess.run(cmd, cwd=root, env=env, check=False).returncode)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<run-id>)")],
    out: Annotated[
        Path | None, typer.Option(help="Report file (default: RUN_DIR/report.html, or report.md with --format md)")
    ] = None,
    format_: Annotated[
        ReportFormat | None,
        typer.Option("--format", help="html (one self-contained file, plots embedded) or md (plots linked)"),
    ] = None,
    link_log: Annotated[
        list[Path] | None,
        typer.Option(help="A site's link-meter log (`edgetune site --count-bytes`); merged first (repeatable)"),
    ] = None,
) -> None:
    """A report of one run: config, summary, per-round table, plots, bytes per site, IMV."""
    from edgetune import linkmeter
    from edgetune import report as reportmod

    try:
        if link_log:
            totals = linkmeter.merge_into_run(run_dir, link_log)
            console.print(
                f"merged {len(link_log)} link-meter log(s): {totals.get('link_uplink_bytes_total', 0):,} B up"
            )
        path = reportmod.write_report(run_dir, out=out, fmt=format_.value if format_ is not None else None)
    except ValueError as err:
        raise _fail(str(err)) from err
    console.print(f"report: {path}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (runs/<run-id> ...)")],
    out: Annotated[Path, typer.Option(help="The plot (PNG)")] = Path("compare.png"),
) -> None:
    """Several runs on one plot: held-out loss (and accuracy) against cumulative uplink bytes."""
    from edgetune import report as reportmod

    try:
        rows = reportmod.compare(run_dirs, out)
    except ValueError as err:
        raise _fail(str(err)) from err
    console.print(reportmod.format_compare_table(rows), markup=False, highlight=False, soft_wrap=True, end="")
    console.print(f"plot: {out}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
