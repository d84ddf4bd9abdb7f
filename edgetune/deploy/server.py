"""``edgetune server``: a SuperLink for the sites, the run submitted to it, followed to the end.

Starts (or connects to) a SuperLink with TLS, SuperNode authentication and a persistent database,
optionally the thin-link gateway in front of it, registers every site kit's node key, pins the base
model's fingerprint (``model.sha256``) so a site with a different copy is refused, submits the run
with ``flwr run`` and follows its ``metrics.jsonl`` until Flower says it finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgetune import config as cfgmod
from edgetune import project
from edgetune.deploy.commands import (
    DeployError,
    Managed,
    flower_env,
    is_loopback,
    register_sites,
    run_status,
    split_address,
    submit_run,
    superlink_command,
    wait_healthy,
    write_cli_config,
)
from edgetune.live import RoundTable, console, follow, print_summary
from edgetune.runs import new_run_name


def registered_sites(keys: Path) -> list[str]:
    """The site ids of the key folder's ``registry.json`` (``DeployError`` naming the file)."""
    try:
        return sorted(json.loads((keys / "registry.json").read_text())["sites"])
    except (OSError, ValueError, KeyError) as err:
        raise DeployError(f"{keys / 'registry.json'}: {err}") from err


def run_server(
    flat: dict[str, Any],
    cfg: cfgmod.RunConfig,
    keys: Path,
    *,
    address: str,
    connect: str,
    state: Path,
    insecure: bool,
    gateway: str,
) -> None:
    """Serve one run of the validated recipe ``flat``/``cfg`` to the sites of ``keys``.

    Returns when the run finished and completed; ``DeployError`` (the message says which step and
    where its log is) otherwise. The SuperLink and the gateway this started are stopped either way.
    """
    from edgetune import linkmeter

    name = new_run_name(cfg)
    run_dir = (Path(cfg.run.dir).expanduser() / name).resolve()
    flat = {**flat, "run.name": name, "run.dir": str(run_dir.parent)}
    if not cfg.model.sha256:
        # pin the base model: a site whose own copy (node config model-path) differs is refused
        from edgetune.models.fingerprint import model_fingerprint

        try:
            flat["model.sha256"] = model_fingerprint(cfg.model, seed=cfg.run.seed)
            console.print(f"base model {cfg.model.path}: fingerprint {flat['model.sha256'][:16]}... (model.sha256)")
        except ValueError as err:
            if not connect:
                raise DeployError(str(err)) from err
            console.print(f"[yellow]base model not found here ({err}); sites' copies are not checked[/]")
    cfg = cfgmod.from_run_config(flat)
    host, port = split_address(connect or address)
    if insecure:
        if not is_loopback(host):
            raise DeployError("--insecure is for loopback tests only (127.0.0.1); real sites need TLS")
        console.print("[bold red]WARNING: --insecure: no TLS, no node authentication. Loopback tests only.[/]")
    ca = None if insecure else keys / "tls" / "ca.crt"
    link_home, cli_home = state / "superlink", state / "cli"
    env_link, env = flower_env(link_home), flower_env(cli_home)
    client_host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host
    write_cli_config(cli_home, f"{client_host}:{port}", ca)
    run_cfg = state / "run-config.toml"
    state.mkdir(parents=True, exist_ok=True)
    run_cfg.write_text(cfgmod.to_toml(flat))
    link = gate = None
    try:
        if gateway:
            gate = start_server_gateway(gateway, keys, f"{client_host}:{port}", insecure)
        if not connect:
            cmd = superlink_command(keys, host, port, link_home, insecure=insecure)
            link = Managed(cmd, env_link, state / "superlink.log").__enter__()
            scheme = "http" if insecure else "https"
            wait_healthy(f"{scheme}://{client_host}:{port}/health", ca, 60, link)
            console.print(f"SuperLink on {host}:{port} (log {state / 'superlink.log'}, database {link_home})")
        if gate is not None:
            console.print(f"thin-link gateway on {gateway} (HTTP/2) -> SuperLink {client_host}:{port}")
        if not insecure:
            done = register_sites(keys, env)
            console.print(f"registered node keys of {', '.join(done)}")
        linkmeter.mark_timeline(run_dir, "submitted")  # opens the run's setup window for link meters
        run_id = submit_run(project.write_app_folder(state / "app", cfg), run_cfg, env)
        console.print(f"run {run_id} submitted: {run_dir}")
        table = RoundTable(f"edgetune server · {name} · {cfg.algorithm}", cfg.num_rounds)
        status = follow(table, run_dir, lambda: run_status(run_id, env), poll_s=3.0)
    finally:
        if link is not None:
            link.stop()
        if gate is not None:
            gate.stop()
    print_summary(run_dir)
    if status != "finished:completed":
        raise DeployError(f"run {run_id} ended with status {status}; see {state / 'superlink.log'}")


def start_server_gateway(address: str, keys: Path, superlink: str, insecure: bool) -> Any:
    """The thin-link gateway (``edgetune/flower/linkgate.py``) in front of the SuperLink, started."""
    from edgetune.flower.linkgate_server import ServerGateway

    if insecure:
        raise DeployError("--gateway needs TLS (thin-link sites verify the SuperLink certificate); drop --insecure")
    tls = keys / "tls"
    return ServerGateway(
        superlink, tls / "superlink.crt", tls / "superlink.key", tls / "ca.crt", listen=split_address(address)
    ).start()
