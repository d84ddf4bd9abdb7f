"""The round loop without Flower: every site's client half is called in this process.

For tests, debugging and reading. ``python -m edgetune.inproc RECIPE [key=value ...] --sites N``
runs a recipe end to end; Flower's engine (``edgetune simulate``) runs the same loop
(``federation.py``) with real messages.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

from edgetune import config as cfgmod
from edgetune.algorithms import ALGORITHMS
from edgetune.algorithms.base import ClientHalf
from edgetune.build import build_client, build_server, keys_dir_for, process_workdir, site_name
from edgetune.comm import wire
from edgetune.config import RunConfig
from edgetune.crypto.keys import site_kit_dir
from edgetune.federation import Failure, run_federation
from edgetune.runs import RunRecorder, new_run_name


class InProcTransport:
    """Calls ``client.step`` directly; a site's exception becomes a ``Failure``."""

    def __init__(self, clients: dict[str, ClientHalf], *, max_down_bytes: int = 1 << 30) -> None:
        self.clients = clients
        self.states: dict[str, dict[str, Any]] = {s: {} for s in clients}
        self.max_down_bytes = max_down_bytes
        self.offline: set[str] = set()
        """Sites that do not answer (tests of dropouts)."""

    def sites(self) -> list[str]:
        return sorted(self.clients)

    def drain_stale(self) -> dict[str, str]:
        return {}  # every call returns before its exchange closes: nothing arrives late

    def exchange(
        self, round_idx: int, phase: str, blobs: dict[str, bytes], *, timeout_s: float
    ) -> dict[str, bytes | Failure]:
        out: dict[str, bytes | Failure] = {}
        for site, blob in blobs.items():
            if site in self.offline:
                out[site] = Failure("no reply (offline)")
                continue
            try:
                msg = wire.decode(blob, max_bytes=self.max_down_bytes)
                reply, self.states[site] = self.clients[site].step(phase, msg, self.states[site])
                out[site] = wire.encode(reply)
            except ValueError as err:
                out[site] = wire.encode({"error": f"{type(err).__name__}: {err}"})
            except Exception as err:  # a crashing site must not stop the round
                out[site] = Failure(f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")
        return out


def build(
    cfg: RunConfig,
    num_sites: int,
    *,
    run_dir: Path | None = None,
    separate_replicas: bool = False,
    on_row: Any = None,
) -> tuple[Any, InProcTransport, RunRecorder, Any, Any]:
    """Build server half, transport with ``num_sites`` client halves, recorder, evaluator, tokenizer.

    ``separate_replicas`` gives every site its own model copy, so each site replays the log
    itself (as in Flower, where sites are separate processes); by default all halves in this
    process share one model, as Flower's simulation actors do.
    """
    # A run starts from the base weights: forget models and replicas earlier runs in this process
    # trained (Flower starts fresh processes per run; in-process runs must behave the same).
    from edgetune.models.load import clear_cache

    if cfg.run.min_sites > num_sites:
        raise ValueError(
            f"run.min_sites = {cfg.run.min_sites} is more than the {num_sites} sites simulated here: no round could "
            f"reach its quorum; set run.min_sites to {num_sites} or fewer, or simulate more sites"
        )
    clear_cache()
    for spec in ALGORITHMS.values():
        spec.forget_process_state()
    run_dir = Path(run_dir) if run_dir else Path(cfg.run.dir) / new_run_name(cfg)
    site_ids = [site_name(i) for i in range(num_sites)]
    server, tokenizer, evaluate = build_server(cfg, run_dir, site_ids)
    keys_dir = keys_dir_for(cfg, run_dir)
    workdir = process_workdir(cfg)
    clients = {
        s: build_client(
            cfg, s, i, num_sites, site_kit_dir(keys_dir, s), workdir=workdir, namespace=s if separate_replicas else ""
        )
        for i, s in enumerate(site_ids)
    }
    recorder = RunRecorder(cfg, run_dir, on_row=on_row)
    return server, InProcTransport(clients), recorder, evaluate, tokenizer


def run(
    cfg: RunConfig, num_sites: int, *, run_dir: Path | None = None, separate_replicas: bool = False, on_row: Any = None
) -> dict[str, Any]:
    """Run a whole federation in this process; return the summary."""
    server, transport, recorder, evaluate, tokenizer = build(
        cfg, num_sites, run_dir=run_dir, separate_replicas=separate_replicas, on_row=on_row
    )
    return run_federation(cfg, server, transport, recorder, evaluate, tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetune.inproc", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. num_rounds=5 spsa.lr=1e-5")
    parser.add_argument("--sites", type=int, default=4)
    args = parser.parse_args(argv)
    from edgetune.runs import format_row

    # the sites this run builds, before the quorum is checked against them
    flat = cfgmod.load_recipe(args.recipe, args.overrides, {"run.num_sites": args.sites})
    cfg = cfgmod.from_run_config(flat)
    summary = run(cfg, args.sites, on_row=lambda row: print(format_row(row), flush=True))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
