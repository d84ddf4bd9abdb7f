"""The bytes that really cross each site's link, before and after the thin-link profile.

Usage (from the repository root; about 15 minutes, mostly waiting, run it niced)::

    python -m benchmarks.wire_bytes [--rounds 3] [--delay 55] [--idle-s 120 --thin-idle-s 500]

A loopback deployment as in ``tests/integration/test_deployment.py``: TLS, node authentication, a tiny
in-memory model, 3 sites started with ``edgetune site --count-bytes`` (a byte-counting TCP proxy in front
of each site, ``edgetune/linkmeter.py``). Each site pauses ``--delay`` seconds before replying, so a round
lasts about a minute as on a real site that computes. Per profile (``standard``: Flower's SuperNode talking
straight to the SuperLink; ``thin``: ``--link thin`` through the HTTP/2 gateways of
``edgetune/flower/linkgate.py``) it measures, per site:

* connect: from starting the site until the SuperLink lists it;
* idle: connected, no run, for ``--idle-s`` (``--thin-idle-s`` for thin: its heartbeats and held polls
  come minutes apart), scaled to an hour and a day;
* setup: from submitting the run to the close of round 0 (hello, run info, the app bundle);
* per round (60 s): up and down, and the payload (edgetune's ledger) as a share of the real uplink;
* a 100-round run of such rounds: setup + 100 x per round.

spsa, then lowrank (which sends LoRA factors) for comparison. Rows go to ``benchmarks/results/
wire_bytes.json``, a Markdown table to ``wire_bytes.md`` and a plot to ``wire_bytes.png``. Bytes are TCP
payload bytes (TLS records and all, not TCP/IP headers); they do not depend on CPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SITES = ("site-0", "site-1", "site-2")
RECIPES = {"spsa": "recipes/spsa/tiny-4c.toml", "lowrank": "recipes/lowrank/tiny-4c-exact.toml"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


def _rows(path: Path) -> list[dict[str, Any]]:
    from edgetune.io import read_jsonl

    return read_jsonl(path) if path.exists() else []


def _bytes_between(logs: list[Path], t0: float, t1: float) -> dict[str, dict[str, int]]:
    out = {s: {"up": 0, "down": 0} for s in SITES}
    for log in logs:
        for r in _rows(log):
            if t0 < r["t"] <= t1 and r["site"] in out:
                out[r["site"]]["up"] += int(r.get("up", 0))
                out[r["site"]]["down"] += int(r.get("down", 0))
    return out


def _mean(per_site: dict[str, dict[str, int]], direction: str) -> float:
    return sum(v[direction] for v in per_site.values()) / len(per_site)


def run_profile(algorithm: str, profile: str, work: Path, *, rounds: int, delay: float, idle_s: float) -> dict:
    """One deployment: connect, idle, one run; returns the per-site numbers."""
    from edgetune import deploy
    from edgetune.crypto import certs, keys

    fed = work / "fed"
    keys.generate(fed, list(SITES))
    certs.generate_tls(fed, ["127.0.0.1", "localhost"])
    certs.generate_node_keys(fed, list(SITES))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDGETUNE_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    port, gw_port = _port(), _port()
    link_home, cli_home = work / "server" / "superlink", work / "server" / "cli"
    link = deploy.Managed(
        deploy.superlink_command(fed, "127.0.0.1", port, link_home, insecure=False),
        deploy.flower_env(link_home),
        work / "superlink.log",
    ).__enter__()
    procs: list[subprocess.Popen] = []
    gate = None
    try:
        deploy.wait_healthy(f"https://127.0.0.1:{port}/health", fed / "tls" / "ca.crt", 300, link)
        deploy.write_cli_config(cli_home, f"127.0.0.1:{port}", fed / "tls" / "ca.crt")
        deploy.register_sites(fed, deploy.flower_env(cli_home))
        target = f"127.0.0.1:{port}"
        if profile == "thin":
            from edgetune.flower.linkgate_server import ServerGateway

            tls = fed / "tls"
            gate = ServerGateway(
                target, tls / "superlink.crt", tls / "superlink.key", tls / "ca.crt", listen=("127.0.0.1", gw_port)
            ).start()
            target = f"127.0.0.1:{gw_port}"
        t_start = time.time()
        logs = []
        for i, site in enumerate(SITES):
            state = work / f"state-{site}"
            logs.append(state / "link-bytes.jsonl")
            cmd = [sys.executable, "-m", "edgetune.cli", "site", "--kit", str(fed / "sites" / site)]
            cmd += ["--superlink", target, "--demo-index", str(i), "--num-sites", str(len(SITES))]
            cmd += ["--port", str(_port()), "--state", str(state), "--count-bytes", "--link", profile]
            out = open(work / f"{site}.out", "w")  # noqa: SIM115 (the child keeps it)
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env={**env, "EDGETUNE_FAULT": f"site-before-reply:*:{delay:g}"},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        def online() -> int:  # the SuperNode logs its id once the SuperLink activated it
            return sum("SuperNode ID" in (work / f"{site}.out").read_text() for site in SITES)

        _wait(lambda: online() >= len(SITES), 1200, "sites online")  # a busy 2-core box: torch imports
        time.sleep(2.0)  # the first poll after activation
        t_connected = time.time()
        time.sleep(idle_s)
        t_idle_end = time.time()
        runs = work / "runs"
        server = subprocess.run(
            [sys.executable, "-m", "edgetune.cli", "server", RECIPES[algorithm], "--keys", str(fed)]
            + ["--connect", f"127.0.0.1:{port}", "--state", str(work / "server"), "--rounds", str(rounds)]
            + ["--set", f"run.dir={runs}", "--set", "run.min_sites=3", "--set", "run.num_sites=3"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=rounds * (delay + 120) + 3600,  # a busy machine starts the ServerApp slowly
        )
        (work / "server.out").write_text(server.stdout + server.stderr)
        if server.returncode != 0:
            raise RuntimeError(f"{algorithm}/{profile} run failed:\n{server.stdout[-3000:]}{server.stderr[-3000:]}")
        time.sleep(1.0)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if gate is not None:
            gate.stop()
        link.stop()

    from edgetune import linkmeter

    run_dir = next(runs.iterdir())
    totals = linkmeter.merge_into_run(run_dir, logs)
    connect = _bytes_between(logs, t_start - 1, t_connected)
    idle = _bytes_between(logs, t_connected, t_idle_end)
    idle_span = t_idle_end - t_connected
    summary = json.loads((run_dir / "summary.json").read_text())
    per_round_up = totals["link_uplink_bytes_per_site_round"]
    per_round_down = totals["link_downlink_bytes_per_site_round"]
    setup_up, setup_down = totals["link_setup_uplink_bytes_per_site"], totals["link_setup_downlink_bytes_per_site"]
    metrics = _rows(run_dir / "metrics.jsonl")
    walls = [r["wall_s"] for r in metrics if r["round"] > 0 and r.get("wall_s")]
    return {
        "algorithm": algorithm,
        "profile": profile,
        "rounds": rounds,
        "round_wall_s": round(sum(walls) / len(walls), 1) if walls else None,
        "connect_up_B": round(_mean(connect, "up")),
        "connect_down_B": round(_mean(connect, "down")),
        "idle_window_s": round(idle_span, 1),
        "idle_B_per_hour": round((_mean(idle, "up") + _mean(idle, "down")) * 3600 / idle_span),
        "idle_B_per_day": round((_mean(idle, "up") + _mean(idle, "down")) * 86400 / idle_span),
        "setup_up_B": setup_up,
        "setup_down_B": setup_down,
        "round_up_B": per_round_up,
        "round_down_B": per_round_down,
        "payload_up_B_per_site_round": round(summary["uplink_bytes_total"] / (len(SITES) * rounds)),
        "payload_share_of_real_up": totals["payload_share_of_link_uplink"],
        "run_100_rounds_B": setup_up + setup_down + 100 * (per_round_up + per_round_down),
        "connections_during_run": totals.get("link_connections"),
        "accepted_last_round": metrics[-1].get("num_accepted"),
    }


def share_idle(rows: list[dict]) -> list[dict]:
    """Idle (connected, no run) does not depend on the algorithm, so only the first algorithm of a profile
    waits out the long idle window; the others' short window (often no heartbeat at all) is replaced by it,
    marked ``idle_from``, instead of reporting a meaningless 0."""
    longest: dict[str, dict] = {}
    for r in rows:
        best = longest.get(r["profile"])
        if best is None or r.get("idle_window_s", 0) > best.get("idle_window_s", 0):
            longest[r["profile"]] = r
    out = []
    for r in rows:
        ref = longest[r["profile"]]
        if ref is not r and r.get("idle_window_s", 0) < ref.get("idle_window_s", 0):
            r = {**r, "idle_B_per_hour": ref["idle_B_per_hour"], "idle_B_per_day": ref["idle_B_per_day"]}
            r["idle_from"] = f"{ref['algorithm']} {ref['profile']} ({ref['idle_window_s']:.0f} s window)"
        out.append(r)
    return out


GOALS = {"round_up_B": 5000, "setup_down_B": 40000, "idle_B_per_day": 1_000_000, "run_100_rounds_B": 1_000_000}


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, with the thin-link goals."""
    cols = [
        ("algorithm", "algorithm"),
        ("profile", "profile"),
        ("round_up_B", "round up B"),
        ("round_down_B", "round down B"),
        ("payload_up_B_per_site_round", "payload up B"),
        ("payload_share_of_real_up", "payload / real up"),
        ("setup_down_B", "setup down B"),
        ("setup_up_B", "setup up B"),
        ("connect_up_B", "connect up B"),
        ("connect_down_B", "connect down B"),
        ("idle_B_per_day", "idle B/day"),
        ("run_100_rounds_B", "100 rounds B"),
        ("round_wall_s", "round s"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            if k == "payload_share_of_real_up" and v is not None:
                cells.append(f"{100 * v:.1f}%")
            elif k == "idle_B_per_day" and r.get("idle_from"):
                cells.append(f"{v:,.0f} (as {r['idle_from'].split(' (')[0]})")
            elif isinstance(v, int | float) and not isinstance(v, bool):
                cells.append(f"{v:,.0f}" if k != "round_wall_s" else f"{v:.1f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    goals = ", ".join(f"{k} <= {v:,}" for k, v in GOALS.items())
    return "\n".join(lines) + f"\n\nPer site. Thin-link goals: {goals}.\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bars: per-site bytes of a 60 s round (up, down), setup, idle day, 100-round run; log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("round_up_B", "round up"),
        ("round_down_B", "round down"),
        ("setup_down_B", "setup down"),
        ("idle_B_per_day", "idle / day"),
        ("run_100_rounds_B", "100-round run"),
    ]
    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=120)
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [max(1, r.get(k) or 1) for k, _ in metrics], width, label=f"{r['algorithm']} {r['profile']}")
    for j, (k, _) in enumerate(metrics):
        if k in GOALS:
            ax.hlines(GOALS[k], j - 0.1, j + 0.8, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], [m for _, m in metrics])
    ax.set_yscale("log")
    ax.set_ylabel("bytes per site (TCP payload)")
    ax.set_title("Real bytes on a site's link (dashed: thin-link goals)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay", type=float, default=55.0, help="site-side pause before each reply (s)")
    ap.add_argument("--idle-s", type=float, default=120.0)
    ap.add_argument("--thin-idle-s", type=float, default=500.0)
    ap.add_argument("--algorithms", default="spsa,lowrank")
    ap.add_argument("--profiles", default="standard,thin")
    ap.add_argument("--out", type=Path, default=RESULTS / "wire_bytes.json")
    ap.add_argument("--plot", type=Path, default=None, help="the plot (default: --out with .png)")
    ap.add_argument("--work", type=Path, default=None, help="keep the deployments' files here (logs)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="only merge these result files into --out")
    ns = ap.parse_args(argv)
    rows: list[dict] = []
    if ns.merge:  # profiles measured in separate processes (in parallel: a run is mostly waiting)
        for path in ns.merge:
            rows += json.loads(path.read_text())
        ns.algorithms = ""
    for algorithm in filter(None, ns.algorithms.split(",")):
        for profile in ns.profiles.split(","):
            idle = ns.thin_idle_s if profile == "thin" else ns.idle_s
            if algorithm != ns.algorithms.split(",")[0]:
                idle = min(idle, 30.0)  # idle does not depend on the algorithm: measured once at length
            with TemporaryDirectory(prefix=f"wire-{algorithm}-{profile}-") as tmp:
                work = ns.work / f"{algorithm}-{profile}" if ns.work else Path(tmp)
                work.mkdir(parents=True, exist_ok=True)
                row = run_profile(algorithm, profile, work, rounds=ns.rounds, delay=ns.delay, idle_s=idle)
            print(json.dumps(row), flush=True)
            rows.append(row)
    rows = share_idle(rows)
    meta = {"host": platform.node(), "delay_s": ns.delay}
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps([{**meta, **r} for r in rows], indent=2) + "\n")
    ns.out.with_suffix(".md").write_text(table(rows))
    plot(rows, ns.plot or ns.out.with_suffix(".png"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
