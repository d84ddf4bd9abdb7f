"""Byzantine sites: final held-out loss with 1 of 4 and 2 of 8 sites attacking, relative to the clean run.

Usage (from the repository root)::

    python -m benchmarks.byzantine [--rounds 10] [--variants spsa-per-site-mean,kavg-mean,...]
        [--attacks max,sign-flip,scaled,nan] [--out benchmarks/results/byzantine.json]
        [--plot benchmarks/results/byzantine.png]

Tiny model (an in-memory 2-layer Llama), every run in this process (``inproc.build``), deterministic
secrets and data, so a clean run and an attacked run differ only by what the attackers send. The
attackers are the last sites (``site-3``; ``site-6``, ``site-7``); each computes its honest reply
first (so it stays in sync with the run), then replaces it:

============ ============================================ ==============================================
attack       spsa (one-byte codes)                        weight algorithms (kavg, lowrank: deltas)
============ ============================================ ==============================================
``max``      every code +127 / -127, alternating          every value +-3e38 (near FLT_MAX), alternating
``sign-flip`` the honest codes negated                    the honest delta negated
``scaled``   the honest codes x10 (saturating at +-127)   the honest delta x1e6
``nan``      float64 NaN bytes instead of codes           NaN in every value
============ ============================================ ==============================================

Variants: spsa with per-site directions and ``mean`` (the default), shared directions with ``mean``,
``trimmed`` (trim_frac 0.34: one site of 3 or 4 and two of 6 to 8 cut from each side) and ``median``;
a run-scope seed pool of 16 seeds with the ``momentum`` and ``adam`` server-side optimizers;
kavg with ``mean`` (the default, adaptive norm clip), ``trimmed`` and ``median``; lowrank ``exact``.
``run.min_sites`` is the number of honest sites, so a round commits when the attackers' replies are
rejected (NaN) and a trimmed mean still trims at least one site per side.

Each row: the final held-out loss of the run, ``rel_loss`` = attacked / clean final held-out loss
(1.0: no effect; the goal is within 5% for the robust settings), whether the run completed, the replies
rejected over the run, and for spsa the largest scalar clip reached. The table is printed; the JSON
rows and a plot (``rel_loss`` per variant and attack, one panel per federation size) are written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks") / "results" / "byzantine.json"
DEFAULT_PLOT = Path("benchmarks") / "results" / "byzantine.png"
ATTACKS = ("max", "sign-flip", "scaled", "nan")
SETTINGS = ((4, 1), (8, 2))
"""(sites, attackers)."""

BASE = {
    "model.path": "tiny",
    "model.trainable": "all",
    "crypto.deterministic_secrets": True,
    "data.demo_facts": 4,
    "data.batch_size": 4,
    "eval.num_examples": 16,
    "eval.batch_size": 16,
    "eval.max_new_tokens": 4,
    "imv.every_rounds": 0,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "spsa-per-site-mean": {"algorithm": "spsa", "spsa.lr": 3e-3, "spsa.num_steps": 2},
    "spsa-shared-mean": {"algorithm": "spsa", "spsa.lr": 3e-3, "spsa.num_steps": 2, "spsa.directions": "shared"},
    "spsa-shared-trimmed": {
        "algorithm": "spsa",
        "spsa.lr": 3e-3,
        "spsa.num_steps": 2,
        "spsa.directions": "shared",
        "spsa.aggregator": "trimmed",
        "spsa.trim_frac": 0.34,
    },
    "spsa-shared-median": {
        "algorithm": "spsa",
        "spsa.lr": 3e-3,
        "spsa.num_steps": 2,
        "spsa.directions": "shared",
        "spsa.aggregator": "median",
    },
    # run-scope seed pool: the server-side optimizer's state is computed from the committed (clipped) codes
    "spsa-pool-momentum": {
        "algorithm": "spsa",
        "spsa.lr": 3e-4,  # momentum 0.9 takes ~10x the sgd step
        "spsa.num_steps": 2,
        "spsa.seed_pool": 16,
        "spsa.pool_scope": "run",
        "spsa.optimizer": "momentum",
    },
    "spsa-pool-adam": {
        "algorithm": "spsa",
        "spsa.lr": 1e-3,
        "spsa.num_steps": 2,
        "spsa.seed_pool": 16,
        "spsa.pool_scope": "run",
        "spsa.optimizer": "adam",
    },
    "kavg-mean": {"algorithm": "kavg", "kavg.lr": 0.1, "kavg.local_steps": 2},
    "kavg-trimmed": {
        "algorithm": "kavg",
        "kavg.lr": 0.1,
        "kavg.local_steps": 2,
        "kavg.aggregator": "trimmed",
        "kavg.trim_frac": 0.34,
    },
    "kavg-median": {"algorithm": "kavg", "kavg.lr": 0.1, "kavg.local_steps": 2, "kavg.aggregator": "median"},
    "lowrank-exact": {
        "algorithm": "lowrank",
        "model.trainable": "lora",
        "model.lora_rank": 4,
        "model.lora_alpha": 8.0,
        "kavg.optimizer": "adamw",
        "kavg.lr": 0.01,
        "kavg.local_steps": 2,
        "lowrank.mode": "exact",
    },
}


# --------------------------------------------------------------------------------------------
# Attackers: wrap an honest client half, answer honestly, then replace the reply
# --------------------------------------------------------------------------------------------


class SpsaAttacker:
    """An spsa site that computes its honest codes (staying in sync) and sends ``attack``'s instead."""

    def __init__(self, honest: Any, attack: str) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}")
        self.honest, self.ctx, self.attack = honest, honest.ctx, attack

    def step(self, phase: str, msg: dict, state: dict) -> tuple[dict, dict]:
        from edgetune.comm import wire
        from edgetune.crypto import envelope
        from edgetune.crypto.guardfile import ReplayGuard

        reply, state = self.honest.step(phase, msg, state)
        opened, _ = envelope.open_envelope(
            msg["env"], self.ctx.site_keys, run_id=msg["run"], guard=ReplayGuard(), now=time.time()
        )
        where = {"run_id": msg["run"], "round_idx": opened.round_idx, "site_id": self.ctx.site_id}
        inner = wire.decode(
            envelope.open_reply(opened.reply_key, blob=reply["blob"], max_bytes=1 << 20, **where), max_bytes=1 << 20
        )
        inner["codes"] = self.codes(inner["codes"])
        blob = envelope.seal_reply(opened.reply_key, payload=wire.encode(inner), **where)
        return {"blob": blob}, state

    def codes(self, honest: bytes) -> bytes:
        q = np.frombuffer(honest, dtype=np.int8).astype(np.int64)
        n = len(q)
        if self.attack == "max":
            return np.array([127, -127] * n, np.int8)[:n].tobytes()
        if self.attack == "sign-flip":
            return (-q).astype(np.int8).tobytes()
        if self.attack == "scaled":
            return np.clip(q * 10, -127, 127).astype(np.int8).tobytes()
        return np.full(n, np.nan).tobytes()  # nan: eight bytes of float64 per scalar


class WeightsAttacker:
    """A kavg/lowrank/dppf site that trains honestly and sends ``attack``'s delta instead."""

    def __init__(self, honest: Any, attack: str) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}")
        self.honest, self.ctx, self.attack = honest, honest.ctx, attack

    def step(self, phase: str, msg: dict, state: dict) -> tuple[dict, dict]:
        from edgetune.algorithms.weights import select
        from edgetune.comm import wire
        from edgetune.comm.tensors import decode_tensors, encode_tensors

        reply, state = self.honest.step(phase, msg, state)
        plan = wire.decode(msg["plan"], max_bytes=4096)
        shapes = [self.honest.shapes[i] for i in select(self.honest.manifest, plan["train"])]
        deltas = decode_tensors(reply["delta"], shapes, plan["up"], where="honest delta")
        reply = {**reply, "delta": encode_tensors([self.delta(d) for d in deltas], plan["up"])}
        return reply, state

    def delta(self, d: torch.Tensor) -> torch.Tensor:
        if self.attack == "max":
            sign = torch.ones(d.numel())
            sign[1::2] = -1
            return (3e38 * sign).view_as(d)
        if self.attack == "sign-flip":
            return -d
        if self.attack == "scaled":
            return d * 1e6
        return torch.full_like(d, math.nan)


def attacker(honest: Any, algorithm: str, attack: str) -> Any:
    """The attacking wrapper of ``honest`` for ``algorithm``."""
    return SpsaAttacker(honest, attack) if algorithm == "spsa" else WeightsAttacker(honest, attack)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def flat_config(variant: str, sites: int, rounds: int, attackers: int = 0) -> dict[str, Any]:
    """The run's flat config: the base, the variant, the federation size; the quorum is the honest sites."""
    flat = {
        **BASE,
        **VARIANTS[variant],
        "num_rounds": rounds,
        "run.num_sites": sites,
        "run.min_sites": sites - attackers,
    }
    flat["eval.every_rounds"] = rounds
    return flat


def run_case(
    variant: str, sites: int, attackers: int, attack: str | None, rounds: int, workdir: Path
) -> dict[str, Any]:
    """One federation; ``attack`` None is the clean run. Returns the row (without ``rel_loss``)."""
    from edgetune import config as cfgmod
    from edgetune import inproc
    from edgetune.federation import run_federation

    flat = flat_config(variant, sites, rounds, attackers)  # the clean run has the attacked run's quorum
    cfg = cfgmod.from_run_config(flat)
    name = f"{variant}-{sites}-{attack or 'clean'}"
    # the run folder's name seeds the run id (and the deterministic secrets): the same for every attack
    run_dir = workdir / name / f"{variant}-{sites}"
    server, transport, recorder, evaluate, tokenizer = inproc.build(cfg, sites, run_dir=run_dir)
    evil = sorted(transport.clients)[sites - attackers :] if attack else []
    for s in evil:
        transport.clients[s] = attacker(transport.clients[s], cfg.algorithm, attack or "")
    row: dict[str, Any] = {
        "variant": variant,
        "sites": sites,
        "attackers": len(evil),
        "attack": attack or "clean",
        "rounds": rounds,
    }
    t0 = time.time()
    try:
        summary = run_federation(cfg, server, transport, recorder, evaluate, tokenizer)
        row["completed"] = True
        row["heldout_loss_first"] = summary["heldout_loss_first"]
        row["heldout_loss_last"] = summary["heldout_loss_last"]
        row["error"] = ""
    except Exception as err:  # a run the attack stopped is a result, not a crash of the benchmark
        row["completed"] = False
        row["heldout_loss_first"] = recorder.rows[0].get("heldout_loss") if recorder.rows else None
        row["heldout_loss_last"] = None
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
    row["rejected_replies"] = sum(len(r.get("rejected", {})) for r in recorder.rows)
    row["max_scale"] = max((float(r["scale"]) for r in recorder.rows if "scale" in r), default=None)
    row["wall_s"] = round(time.time() - t0, 2)
    return row


def relative(rows: list[dict[str, Any]]) -> None:
    """Fill ``rel_loss`` (attacked / clean final held-out loss) in place."""
    clean = {(r["variant"], r["sites"]): r["heldout_loss_last"] for r in rows if r["attack"] == "clean"}
    for r in rows:
        base, last = clean.get((r["variant"], r["sites"])), r["heldout_loss_last"]
        ok = base is not None and last is not None and math.isfinite(last)
        r["rel_loss"] = float(last / base) if ok else None


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a text table: one line per (variant, federation), one column per attack."""
    attacks = ["clean", *ATTACKS]
    head = f"{'variant':<22} {'sites':>9} " + " ".join(f"{a:>10}" for a in attacks)
    lines = [
        "final held-out loss of the attacked run / the clean run (clean: the loss itself); 'stop' = run stopped",
        head,
        "-" * len(head),
    ]
    keys = sorted({(r["variant"], r["sites"], r["attackers"]) for r in rows if r["attack"] != "clean"})
    keys = keys or sorted({(r["variant"], r["sites"], 0) for r in rows})
    for variant, sites, bad in keys:
        cells = []
        for a in attacks:
            match = [r for r in rows if (r["variant"], r["sites"], r["attack"]) == (variant, sites, a)]
            if not match:
                cells.append(f"{'':>10}")
            elif not match[0]["completed"]:
                cells.append(f"{'stop':>10}")
            elif a == "clean":
                cells.append(f"{_f(match[0]['heldout_loss_last'], '.4f'):>10}")
            else:
                cells.append(f"{_f(match[0]['rel_loss'], '.4f'):>10}")
        lines.append(f"{variant:<22} {f'{bad} of {sites}':>9} " + " ".join(cells))
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """rel_loss per variant and attack; one panel per federation size; stopped runs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({(r["sites"], r["attackers"]) for r in rows if r["attack"] != "clean"})
    fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(7.0 * max(1, len(sizes)), 4.8), dpi=110, sharey=True)
    axes = np.atleast_1d(axes)
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    width = 0.8 / len(ATTACKS)
    for ax, (sites, bad) in zip(axes, sizes):
        for j, attack in enumerate(ATTACKS):
            xs, ys, stopped = [], [], []
            for i, v in enumerate(variants):
                match = [r for r in rows if (r["variant"], r["sites"], r["attack"]) == (v, sites, attack)]
                if not match:
                    continue
                x = i + (j - (len(ATTACKS) - 1) / 2) * width
                if match[0]["rel_loss"] is None:
                    stopped.append(x)
                else:
                    xs.append(x)
                    ys.append(min(match[0]["rel_loss"], 3.0))
            ax.bar(xs, ys, width=width, label=attack, color=f"C{j}")
            ax.scatter(stopped, [0.05] * len(stopped), marker="x", color=f"C{j}", s=40)
        ax.axhline(1.05, color="k", linestyle="--", linewidth=0.8)
        ax.axhline(1.0, color="k", linewidth=0.6)
        ax.set_xticks(range(len(variants)), variants, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{bad} of {sites} sites attacking")
        ax.set_ylim(0, 3.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("final held-out loss / clean run (capped at 3; x: run stopped)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Byzantine sites on the tiny model; dashed line: clean + 5%")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine() -> dict[str, Any]:
    return {
        "model": "tiny",
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.byzantine", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--settings", default="4:1,8:2", help="sites:attackers pairs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    variants = [v for v in args.variants.split(",") if v]
    attacks = [a for a in args.attacks.split(",") if a]
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",") if s]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetune-byzantine-") as tmp:
        os.environ.setdefault("EDGETUNE_CACHE", str(Path(tmp) / "cache"))
        for variant in variants:
            for sites, bad in settings:
                for attack in [None, *attacks]:
                    row = run_case(variant, sites, bad, attack, args.rounds, Path(tmp))
                    rows.append({**row, **machine()})
                    print(
                        f"{variant:<22} {bad} of {sites} {row['attack']:<9} loss {_f(row['heldout_loss_last'], '.4f')}"
                        f" {'' if row['completed'] else 'STOPPED ' + row['error'][:80]} ({row['wall_s']} s)",
                        flush=True,
                    )
    relative(rows)
    print()
    print(format_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    plot(rows, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
