"""Flower's deployment commands, driven: ``flower-superlink``, ``flower-supernode``, ``flwr``.

Builds their command lines (TLS, SuperNode authentication, a persistent database, a site's node
config), runs them as process groups (``Managed``) and reads their answers. Nothing here opens a
socket of its own. Commands verified against flwr 1.41/1.42 are in notes/flower_conventions.md
section 3.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

CONNECTION = "edgetune"


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and why."""


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's commands: offline, no telemetry, this venv's binaries first."""
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    return env


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), with a clear error."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DeployError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


class Managed:
    """A child process in its own process group, stopped with its whole group (Flower's
    SuperExec and ClientApp processes included) when the ``with`` block ends.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.env, self.log = cmd, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Managed:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # SuperExec children outlive a SIGTERM of their parent
        except ProcessLookupError:
            pass

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_healthy(url: str, ca: Path | None, timeout_s: float, proc: Managed | None = None) -> None:
    """Poll ``url`` (a /health endpoint) until it answers 200."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        if proc is not None and not proc.alive():
            raise DeployError(f"{proc.cmd[0]} exited; see {proc.log}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:  # noqa: S310 (our own endpoint)
                if resp.status == 200:
                    return
        except OSError as err:
            last = str(err)
        time.sleep(0.5)
    raise DeployError(f"{url} did not become healthy in {timeout_s:.0f} s ({last})")


def superlink_command(keys_dir: Path, host: str, port: int, state_dir: Path, *, insecure: bool) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and a persistent database."""
    cmd = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(state_dir / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        return [*cmd, "--insecure"]
    tls = keys_dir / "tls"
    for name in ("ca.crt", "superlink.crt", "superlink.key"):
        if not (tls / name).is_file():
            raise DeployError(f"missing {tls / name}: run `edgetune certs {keys_dir} --hosts ...` first")
    return [
        *cmd,
        "--ssl-ca-certfile",
        str(tls / "ca.crt"),
        "--ssl-certfile",
        str(tls / "superlink.crt"),
        "--ssl-keyfile",
        str(tls / "superlink.key"),
        "--enable-supernode-auth",
    ]


def write_cli_config(flwr_home: Path, address: str, ca: Path | None) -> None:
    """The ``flwr`` CLI's connection to our SuperLink (``[superlink.edgetune]``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{ca}"' if ca else "insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr(args: list[str], env: dict[str, str], *, cwd: Path | None = None, timeout: float = 120) -> str:
    """Run one ``flwr`` command; raise with its output when it fails."""
    out = subprocess.run(["flwr", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise DeployError(f"flwr {' '.join(args[:2])} failed: {(out.stdout + out.stderr)[-1500:]}")
    return out.stdout


def register_sites(keys_dir: Path, env: dict[str, str]) -> list[str]:
    """Register every site kit's node key with the SuperLink (already registered keys are fine)."""
    registry = json.loads((keys_dir / "registry.json").read_text())
    done = []
    for site in sorted(registry["sites"]):
        pub = keys_dir / "sites" / site / "node.pub"
        if not pub.is_file():
            raise DeployError(f"{pub} is missing: run `edgetune certs {keys_dir} --hosts ...`")
        out = subprocess.run(
            ["flwr", "supernode", "register", str(pub), CONNECTION, "--name", site],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,  # a busy machine: the flwr CLI alone takes seconds to start
        )
        text = out.stdout + out.stderr
        if out.returncode != 0 and "already" not in text.lower():
            raise DeployError(f"registering {site} failed: {text[-800:]}")
        done.append(site)
    return done


def submit_run(app_dir: Path, run_config: Path, env: dict[str, str]) -> int:
    """``flwr run`` against our connection; returns the Flower run id."""
    text = flwr(
        ["run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--format", "json"],
        env,
        cwd=app_dir,
        timeout=300,
    )
    try:
        return int(json.loads(text)["run-id"])
    except (ValueError, KeyError) as err:
        raise DeployError(f"flwr run did not return a run id: {text[-800:]}") from err


def run_status(run_id: int, env: dict[str, str]) -> str:
    """Flower's status of a run (``running``, ``finished:completed``, ``finished:failed``, ...)."""
    try:
        out = subprocess.run(
            ["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "unknown"  # a busy machine: the flwr CLI alone can take a minute; ask again next poll
    try:
        return str(json.loads(out.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return "unknown"


def supernode_command(
    kit: Path,
    superlink: str,
    *,
    port: int,
    data_path: str,
    device: str,
    insecure: bool,
    site_index: int | None,
    num_sites: int | None,
    site_host: str = "",
    model_path: str = "",
    quantize: str = "",
    via_gateway: Path | None = None,
    extra_node_config: dict[str, str] | None = None,
) -> list[str]:
    """``flower-supernode`` for one site: its kit, its data, its device, its own copy of the base model
    (checked against the run's ``model.sha256``) and its site host's socket.

    ``via_gateway``: ``superlink`` is the site's thin-link gateway on loopback, whose throwaway CA
    certificate this names (the gateway checks the SuperLink's certificate over the link).
    """
    site = json.loads((kit / "site.json").read_text())["site_id"]
    node_config: dict[str, Any] = {"site-id": site, "kit-dir": str(kit.resolve())}
    if site_host:
        node_config["site-host"] = site_host
    if data_path:
        node_config["data-path"] = str(Path(data_path).resolve())
    if device:
        node_config["device"] = device
    if model_path:
        local = Path(model_path).expanduser()
        node_config["model-path"] = str(local.resolve()) if local.exists() else model_path
    if quantize:
        node_config["quantize"] = quantize
    if site_index is not None:
        node_config["site-index"] = site_index
        node_config["num-sites"] = num_sites or site_index + 1
    node_config.update(extra_node_config or {})
    items = " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items())
    cmd = ["flower-supernode", "--superlink", superlink, "--port", str(port), "--node-config", items]
    if insecure:
        return [*cmd, "--insecure"]
    for name in ("ca.crt", "node.key"):
        if not (kit / name).is_file():
            raise DeployError(f"site kit {kit} lacks {name}: ask the server team for a kit made with `edgetune certs`")
    ca = via_gateway or kit / "ca.crt"
    return [*cmd, "--root-certificates", str(ca), "--auth-supernode-private-key", str(kit / "node.key")]
