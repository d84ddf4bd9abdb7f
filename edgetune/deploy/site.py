"""``edgetune site``: one factory's SuperNode, supervised.

Checks the operator's options, starts what the site's link needs (a byte-counting link meter,
``edgetune/linkmeter.py``; the thin-link gateway, ``edgetune/flower/linkgate.py``) and the site host
that keeps the model loaded (``edgetune/sitehost.py``), then runs ``flower-supernode`` in its own
process group with its log passed through, restarting it while the SuperLink refuses activation,
and stops everything it started when the SuperNode exits or the operator stops the site.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetune.deploy.commands import DeployError, flower_env, is_loopback, split_address, supernode_command
from edgetune.flower.presence import LeaveWatch
from edgetune.io import private_dir
from edgetune.live import console

ACTIVATION_REFUSED = "Failed to activate SuperNode"
"""What flower-supernode prints (exit code 305; its process status is 1) when the SuperLink refuses
to activate the node."""
ACTIVATION_RETRY_S = 15.0
LEAVE_CHECK_S = 1.0


def run_site(
    kit: Path,
    superlink: str,
    *,
    data: str,
    demo_index: int,
    num_sites: int,
    device: str,
    devices: str,
    model: str,
    quantize: str,
    port: int,
    state: Path,
    insecure: bool,
    activation_wait: float,
    keep_loaded: bool,
    link: str,
    count_bytes: bool,
    leave_after_run: bool | None = None,
    leave_after_idle: float = 0.0,
) -> int:
    """Run this site until its SuperNode exits or the operator stops it; return the exit code.

    Checks the options first (``DeployError`` naming the wrong one), starts the link meter, the thin-link
    gateway and the site host as asked, then the SuperNode in its own process group, retrying while the
    SuperLink refuses to activate the node for up to ``activation_wait`` seconds.

    ``leave_after_run`` (default: on for ``link="thin"``, off otherwise): stop the site, exit code 0,
    when the server says the run is over; ``leave_after_idle`` > 0: when no message was handled for that
    many seconds. Either way nothing is connected between runs (``flower/presence.py``).
    """
    kit, state = kit.resolve(), state.resolve()
    if not (kit / "site.json").is_file():
        raise DeployError(f"{kit} is not a site kit (no site.json)")
    if data and not Path(data).exists():
        raise DeployError(f"--data {data} does not exist")
    if quantize and quantize not in {"none", "4bit", "8bit"}:
        raise DeployError(f"--quantize must be none, 4bit or 8bit, got {quantize!r}")
    if not data and demo_index < 0:
        raise DeployError("give --data PATH (this site's JSONL) or --demo-index N (demo data)")
    host, _ = split_address(superlink)
    if insecure:
        if not is_loopback(host):
            raise DeployError("--insecure is for loopback tests only; use the kit's TLS and node key")
        console.print("[bold red]WARNING: --insecure: no TLS, no node authentication. Loopback tests only.[/]")
    if device and devices:
        raise DeployError("give --device or --devices, not both")
    if devices:
        from edgetune.config import device_list

        try:
            device = ",".join(device_list(devices))
        except ValueError as err:
            raise DeployError(f"--devices: {err}") from err
        if quantize not in ("", "none"):
            raise DeployError(f"--quantize {quantize} with --devices: quantised base weights train on one device")
    if leave_after_idle < 0:
        raise DeployError(f"--leave-after-idle must be >= 0 seconds, got {leave_after_idle:g}")
    state.mkdir(parents=True, exist_ok=True)
    watch = LeaveWatch(
        state, after_run=link == "thin" if leave_after_run is None else leave_after_run, idle_s=leave_after_idle
    )
    socket_path = site_host_socket(state) if keep_loaded else None
    try:
        node_superlink, local_ca, link_stop = site_link(kit, superlink, state, link=link, count_bytes=count_bytes)
        cmd = supernode_command(
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
            extra_node_config=watch.node_config(),
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise DeployError(str(err)) from err
    env = flower_env(state)
    host_proc = None
    try:
        if socket_path:
            host_proc = start_site_host(socket_path)
        console.print(f"site {kit.name} -> {superlink}; logs below (Ctrl+C stops the site)")
        if watch.after_run:
            console.print("this site leaves when the run ends (start it again for the next run; --stay keeps it)")
        return supervise_supernode(cmd, env, activation_wait, watch if watch.active else None)
    finally:
        for stop in link_stop:
            stop()
        if host_proc is not None:
            host_proc.terminate()
            try:
                host_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                host_proc.kill()


def supervise_supernode(
    cmd: list[str], env: dict[str, str], activation_wait: float, watch: LeaveWatch | None = None
) -> int:
    """Run ``flower-supernode`` with its log passed through; stop its whole process group (SuperExec,
    ClientApps) on Ctrl+C or SIGTERM, even when started in the background (where SIGINT is ignored by
    default); restart it while the SuperLink refuses activation, for up to ``activation_wait`` seconds.
    With a ``watch``, stop it (SIGTERM: Flower deactivates the node at the SuperLink) and return 0 once
    the watch says the site may leave.
    """

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_retrying(cmd, env, activation_wait, watch)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_or_leave(proc: subprocess.Popen, watch: LeaveWatch | None) -> int | None:
    """The SuperNode's exit code, or None when the watch says the site may leave first."""
    while True:
        try:
            return proc.wait(timeout=LEAVE_CHECK_S if watch else None)
        except subprocess.TimeoutExpired:
            assert watch is not None
            reason = watch.reason()
            if reason:
                console.print(f"leaving: {reason}")
                return None


def _run_retrying(cmd: list[str], env: dict[str, str], activation_wait: float, watch: LeaveWatch | None) -> int:
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
            code = _wait_or_leave(proc, watch)
            if code is None:  # the run is over: stop as on Ctrl+C, and say all went well
                _stop_group(proc)
                return 0
        except KeyboardInterrupt:
            console.print("stopping the site")
            return _stop_group(proc)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            reader.join(timeout=5)
        # The SuperLink refused to activate this node: its key is not registered, or a previous
        # session of this site (killed without saying goodbye) has not timed out yet (Flower waits
        # for two missed 30 s heartbeats). Retry for a while in the second case.
        if not refused.is_set() or time.time() - started + ACTIVATION_RETRY_S > activation_wait:
            if refused.is_set():
                console.print(
                    "[bold red]the SuperLink refuses this node: is its node.pub registered "
                    "(`edgetune server` registers every kit in the key folder)?[/]"
                )
            return code
        console.print("SuperLink refused activation (an earlier session may still be open); retrying in 15 s")
        time.sleep(ACTIVATION_RETRY_S)


def _stop_group(proc: subprocess.Popen) -> int:
    """SIGTERM the SuperNode's process group (it deactivates its node at the SuperLink); its exit code."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return 130


def site_link(
    kit: Path, superlink: str, state: Path, *, link: str, count_bytes: bool
) -> tuple[str, Path | None, list[Callable[[], None]]]:
    """Where the SuperNode connects (the SuperLink, a link meter or the thin-link gateway), the CA of
    the thin-link gateway's loopback certificate, and what to stop when the site stops.
    """
    from edgetune import linkmeter

    address, stops, local_ca = superlink, [], None
    meter_at = None
    if count_bytes:
        site_id = json.loads((kit / "site.json").read_text())["site_id"]
        log = state / "link-bytes.jsonl"
        meter = linkmeter.LinkMeter(split_address(superlink), log, site=site_id).start()
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


def site_host_socket(state: Path) -> Path:
    """Where the site host listens: in the site's state folder, or a private temp folder when that
    path is too long for a Unix socket (about 100 bytes).
    """
    private_dir(state)  # the socket's key file lives next to it
    path = state / "site-host.sock"
    if len(str(path)) > 100:
        path = Path(tempfile.mkdtemp(prefix="edgetune-site-")) / "host.sock"  # mode 0700
    return path


def start_site_host(socket_path: Path) -> subprocess.Popen:
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
            raise DeployError(f"the site host did not start (exit {proc.poll()}); run with --no-keep-loaded to skip it")
        time.sleep(0.2)
    console.print(f"site host (model kept loaded between rounds): pid {proc.pid}, {socket_path}")
    return proc
