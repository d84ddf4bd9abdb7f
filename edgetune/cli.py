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

This module only wires options to the code that does the work: ``simulate.py`` (simulation driver),
``deploy/`` (server, site supervision, key kits), ``evaluation.py`` (eval, imv), ``report/``,
``project.py`` (new, bench); ``live.py`` shows a run as it goes. Their errors (``ValueError``,
``DeployError``, ...) are printed as ``error: <message>`` with exit code 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from edgetune import config as cfgmod
from edgetune import project
from edgetune.live import RoundTable, console, follow, print_summary
from edgetune.simulate import federation_config

__all__ = ["RoundTable", "app", "federation_config", "follow", "main"]  # the last three read by tests and scripts

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning over thin links.")


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=1)


@contextmanager
def _failing(*errors: type[Exception]) -> Iterator[None]:
    """Report ``errors`` (default: ``ValueError``, a bad input) as ``error: <message>`` and exit 1."""
    caught = errors or (ValueError,)
    try:
        yield
    except caught as err:
        raise _fail(str(err)) from err


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

    with _failing():
        flat = cfgmod.load_recipe(recipe, sets, extra)
        flat = project.absolute_paths(flat, Path.cwd())
        cfg = cfgmod.from_run_config(flat)
        tracking.check_available(cfg)
        return flat, cfg


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
    with _failing():
        made = project.new_project(folder, from_recipe=from_, algorithm=algorithm, model=model, data=data, sites=sites)
    console.print(f"created {made}: pyproject.toml (the Flower app), recipe.toml, README.md")
    console.print(f"  cd {folder} && edgetune simulate recipe.toml        # or: flwr run .")


@app.command()
def fingerprint(
    model: Annotated[str, typer.Argument(help="smollm2, tiny, a model folder or a model id in your HF cache")],
    revision: Annotated[str, typer.Option(help="For a model id: the cached revision (default main)")] = "",
) -> None:
    """The base-model fingerprint that model.sha256 pins (compare a site's copy with the server's)."""
    from edgetune.models.fingerprint import model_fingerprint

    with _failing():
        console.print(model_fingerprint(cfgmod.ModelSection(path=model, revision=revision)))


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
    ray_address: Annotated[str, typer.Option(help="Ray cluster host:port for the sites (default: $RAY_ADDRESS)")] = "",
) -> None:
    """Simulate N sites with Flower's simulation engine (offline), on this machine or a Ray cluster."""
    from edgetune import simulate as sim

    extra: dict[str, Any] = {"num_rounds": rounds} if rounds else {}
    extra.update({"run.num_sites": sites} if sites else {})  # checked with the quorum: a quorum of --sites is valid
    if gpus_per_site != -1.0:
        with _failing():
            extra["run.gpus_per_site"] = cfgmod.check_gpus_per_site(gpus_per_site, "--gpus-per-site")
    flat, cfg = _load(recipe, set_ or [], extra)
    with _failing():
        flat, cfg, run_dir = sim.prepare(flat, cfg, sites)
    if engine == Engine.flower:
        with _failing(ValueError, sim.SimulationError):
            code = sim.simulate_flower(
                flat, cfg, cfg.run.num_sites, cpus_per_site, run_dir, ray_address=sim.ray_cluster(ray_address)
            )
    else:
        code = sim.simulate_inproc(cfg, cfg.run.num_sites, run_dir)
    print_summary(run_dir)
    raise typer.Exit(code=code)


@app.command()
def keys(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the key material")],
    sites: Annotated[str, typer.Option(help="Comma-separated site ids, e.g. plant-a,plant-b")],
    add: Annotated[bool, typer.Option(help="Add site kits to an existing folder")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing key material")] = False,
) -> None:
    """Generate the server signing key and one key kit per site (hand sites/<id>/ to each site)."""
    from edgetune.deploy import DeployError, kits

    with _failing(DeployError):
        kits.make_keys(out_dir, sites, add=add, overwrite=overwrite)


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

    with _failing():
        result = evaluate_checkpoint(
            checkpoint,
            recipe=recipe,
            num_sites=sites,
            num_examples=examples,
            accuracy=accuracy,
            verify=verify,
            show_progress=True,
        )
    for key, value in result.items():
        console.print(f"{key:>14}: {value}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run folder (runs/<id>) of an spsa run with a run-scope seed pool")],
    delta: Annotated[Path, typer.Option("--delta", help="Where to write the delta file (S coefficients + metadata)")],
) -> None:
    """Export a run's model as a delta file: its seed-pool coefficients, rebuilt from the base model."""
    from edgetune.algorithms.spsa.delta import export_run_delta

    with _failing():
        summary = export_run_delta(run, delta)
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
    from edgetune.evaluation import checkpoint_imv
    from edgetune.io import atomic_write_json

    with _failing():
        overrides = dict(cfgmod.parse_override(o) for o in (set_ or []))
        report = checkpoint_imv(checkpoint, recipe=recipe, num_sites=sites, overrides=overrides, show_progress=True)
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
    from edgetune.deploy import DeployError, kits

    with _failing(DeployError):
        kits.make_certs(keys_dir, hosts, overwrite=overwrite)


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
    from edgetune.deploy import DeployError
    from edgetune.deploy.server import registered_sites, run_server

    keys, state = keys.resolve(), state.resolve()
    with _failing(DeployError):
        registered = registered_sites(keys)
    extra: dict[str, Any] = {"crypto.keys_dir": str(keys), "run.num_sites": sites or len(registered)}
    if rounds:
        extra["num_rounds"] = rounds
    flat, cfg = _load(recipe, set_ or [], extra)
    with _failing(DeployError):
        run_server(flat, cfg, keys, address=address, connect=connect, state=state, insecure=insecure, gateway=gateway)


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
        str, typer.Option(help="Devices of this site, e.g. cuda:0,cuda:1: probes or batches split across them")
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
            help="standard, or thin: HTTP/2 to the server's --gateway, held polls, 300 s heartbeats, "
            "leave after the run (docs/site-operator.md: what it saves and costs)"
        ),
    ] = Link.standard,
    count_bytes: Annotated[
        bool, typer.Option(help="Count the real bytes on this site's link (log: STATE/link-bytes.jsonl)")
    ] = False,
    leave_after_run: Annotated[
        bool | None,
        typer.Option(
            "--leave-after-run/--stay",
            help="Disconnect when the server ends the run (default: on with --link thin), or stay connected",
            show_default=False,
        ),
    ] = None,
    leave_after_idle: Annotated[
        float, typer.Option(help="Disconnect after this many seconds without a message (0: never)")
    ] = 0.0,
) -> None:
    """Run this factory's site: a Flower SuperNode with its kit, data and device."""
    from edgetune.deploy import DeployError
    from edgetune.deploy.site import run_site

    with _failing(DeployError):
        code = run_site(
            kit, superlink, data=data, demo_index=demo_index, num_sites=num_sites, device=device, devices=devices,
            model=model, quantize=quantize, port=port, state=state, insecure=insecure, activation_wait=activation_wait,
            keep_loaded=keep_loaded, link=link.value, count_bytes=count_bytes, leave_after_run=leave_after_run,
            leave_after_idle=leave_after_idle,
        )  # fmt: skip
    raise typer.Exit(code=code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option(help="Tiny model, smallest settings: a smoke run of every benchmark")] = False,
) -> None:
    """Run the CPU benchmarks (benchmarks/run_all.py): JSON rows and plots in benchmarks/results/.

    Extra options go to ``python -m benchmarks.run_all`` (``--only``, ``--skip``, ``--sim-sites``,
    ``--results-dir``). About 20 minutes on 2 idle cores; ``--quick`` a few minutes.
    """
    with _failing(FileNotFoundError):
        code = project.run_bench(list(ctx.args), quick=quick)
    raise typer.Exit(code=code)


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

    with _failing():
        if link_log:
            totals = linkmeter.merge_into_run(run_dir, link_log)
            console.print(
                f"merged {len(link_log)} link-meter log(s): {totals.get('link_uplink_bytes_total', 0):,} B up"
            )
        path = reportmod.write_report(run_dir, out=out, fmt=format_.value if format_ is not None else None)
    console.print(f"report: {path}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (runs/<run-id> ...)")],
    out: Annotated[Path, typer.Option(help="The plot (PNG)")] = Path("compare.png"),
) -> None:
    """Several runs on one plot: held-out loss (and accuracy) against cumulative uplink bytes."""
    from edgetune import report as reportmod

    with _failing():
        rows = reportmod.compare(run_dirs, out)
    console.print(reportmod.format_compare_table(rows), markup=False, highlight=False, soft_wrap=True, end="")
    console.print(f"plot: {out}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
