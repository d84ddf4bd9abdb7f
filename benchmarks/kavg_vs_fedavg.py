"""Cross-check: edgetune's ``kavg`` aggregation against Flower's built-in ``FedAvg`` on the same site results.

Usage (from the repository root)::

    python -m benchmarks.kavg_vs_fedavg [--model tiny|smollm2] [--sites 3] [--rounds 2] [--local-steps 2]
        [--trainable all] [--tol 1e-6] [--out benchmarks/results/kavg_vs_fedavg.json]

Method. edgetune ``kavg`` runs ``--rounds`` real rounds in this process (``inproc.build`` +
``federation.run_round``; demo data, batches from the keyed ``data`` stream, so the data are fixed by
``run.seed``). A benchmark-side transport runs the sites one at a time and, right after each site's
step, copies its local model y_i = theta_r after K optimizer steps (the tensors a Flower client
would send). After the round:

* edgetune's result is the server's new global tensors theta_{r+1} = theta_r + fp32(sum_i w_i Delta_i / W),
  Delta_i = fl(y_i - theta_r) as the site encoded it (fp32 codec), w_i = K x batch size as the server
  assigned it;
* Flower's result is ``flwr.serverapp.strategy.FedAvg().aggregate_train(r, replies)``, where every
  reply is a real Flower ``Message`` (``reply_to`` the round's train instruction built as FedAvg's
  ``configure_train`` builds it) carrying ``ArrayRecord`` {name: y_i} and ``MetricRecord``
  {"num-examples": w_i, "train_loss": ...}: FedAvg's weighted mean of the site models;
* an exact reference, sum_i w_i y_i / W in float64.

Reported per round: max |edgetune - Flower| (also in float32 ulps of the largest magnitude involved:
theta_r, the y_i, the two results), and each one's max deviation from the float64 reference. Expected:
float32 summation order, a few ulps, about 1e-7 where |w| ~ 1 (e.g. RMSNorm weights). The benchmark
fails (exit code 1) when max |edgetune - Flower| exceeds ``--tol``.

The server assigns every site the same weight here (same K and batch size), so an extra check feeds
the same site models with unequal weights (1, 2, 3, ...) to ``kavg.aggregate_tensors`` (edgetune's
aggregation function, on the deltas) and to FedAvg (on the models, as "num-examples").

Output: a table on stdout and a JSON list in ``--out`` with one row per round plus one row for the
unequal-weights check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms.weights import aggregate_tensors
from edgetune.build import run_id_for, site_state_dir
from edgetune.federation import Failure, run_round
from edgetune.models.params import manifest_of, trainable_tensors

DEFAULT_OUT = Path("benchmarks") / "results" / "kavg_vs_fedavg.json"
DEFAULT_TOL = 1e-5
"""Largest acceptable max |edgetune - Flower|: far above float32 summation differences (a few ulps of the
parameters: ~1e-7 at |w| ~ 1), far below what a wrong weighting or a missing site changes (the size
of an update, ~1e-3 to 1e-2 here)."""


def _flower_ready() -> None:
    """Messages can be built outside a Flower run once a task identity is set (flower_conventions §1.3)."""
    import logging

    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every aggregate_train at INFO
    try:
        TaskIdentity.run_id  # noqa: B018 (raises when unset)
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class CapturingTransport:
    """Runs the sites one by one and keeps a copy of each site's local model after its step."""

    def __init__(self, inner: inproc.InProcTransport) -> None:
        self.inner = inner
        self.local_models: dict[str, list[torch.Tensor]] = {}
        self.losses: dict[str, float] = {}

    def sites(self) -> list[str]:
        return self.inner.sites()

    def drain_stale(self) -> dict[str, str]:
        return self.inner.drain_stale()

    def exchange(
        self, round_idx: int, phase: str, blobs: dict[str, bytes], *, timeout_s: float
    ) -> dict[str, bytes | Failure]:
        from edgetune.comm import wire

        self.local_models = {}
        out: dict[str, bytes | Failure] = {}
        for site, blob in blobs.items():
            out.update(self.inner.exchange(round_idx, phase, {site: blob}, timeout_s=timeout_s))
            client = self.inner.clients[site]
            model = cast(Any, client).ctx.model  # the in-process client keeps its context
            self.local_models[site] = [
                t.detach().to("cpu", torch.float32).clone() for t in trainable_tensors(model, manifest_of(model))
            ]
            reply = out[site]
            if isinstance(reply, bytes):
                self.losses[site] = float(wire.decode(reply, max_bytes=len(reply))["loss"])
        return out


def flower_fedavg(
    names: Sequence[str],
    global_before: Sequence[torch.Tensor],
    local_models: dict[str, list[torch.Tensor]],
    weights: dict[str, float],
    losses: dict[str, float],
    round_idx: int,
) -> list[torch.Tensor]:
    """Flower's FedAvg.aggregate_train on real reply Messages; returns the aggregated tensors."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    _flower_ready()
    strategy = FedAvg()
    arrays = ArrayRecord({n: Array(t.numpy()) for n, t in zip(names, global_before)})
    config = ConfigRecord({"server-round": round_idx})
    replies = []
    for node, site in enumerate(sorted(local_models), start=1):
        instruction = Message(
            RecordDict({strategy.arrayrecord_key: arrays, strategy.configrecord_key: config}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord({n: Array(t.numpy()) for n, t in zip(names, local_models[site])}),
                "metrics": MetricRecord(
                    {strategy.weighted_by_key: float(weights[site]), "train_loss": float(losses.get(site, 0.0))}
                ),
            }
        )
        replies.append(Message(content, reply_to=instruction))
    agg, _metrics = strategy.aggregate_train(round_idx, replies)
    if agg is None:
        raise RuntimeError("FedAvg.aggregate_train returned no arrays")
    by_name = agg.to_numpy_ndarrays()
    keys = list(agg.keys())
    return [torch.from_numpy(np.asarray(by_name[keys.index(n)], dtype=np.float32)) for n in names]


def exact_mean(local_models: dict[str, list[torch.Tensor]], weights: dict[str, float]) -> list[torch.Tensor]:
    """sum_i w_i y_i / W in float64."""
    sites = sorted(local_models)
    total = sum(weights[s] for s in sites)
    out = []
    for parts in zip(*(local_models[s] for s in sites)):
        acc = sum(weights[s] * p.double() for s, p in zip(sites, parts))
        out.append(acc / total)
    return out


def max_abs(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def max_ulps(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], inputs: dict[str, list[torch.Tensor]]) -> float:
    """Largest elementwise |a - b| in float32 ulps of the largest magnitude involved (``inputs``, |a|, |b|).

    Scale-free: a mean of values that cancel is near zero, but its rounding error follows the
    magnitude of what was summed, so ulps of the result itself would overstate it.
    """
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        mag = torch.maximum(x.abs(), y.abs())
        for parts in inputs.values():
            mag = torch.maximum(mag, parts[i].abs())
        ulp = np.spacing(mag.to(torch.float32).numpy())
        diff = (x.double() - y.double()).abs().numpy()
        worst = max(worst, float(np.max(diff / ulp)))
    return worst


def compare(
    model: str = "tiny",
    *,
    num_sites: int = 3,
    rounds: int = 2,
    local_steps: int = 2,
    trainable: str = "all",
    batch_size: int = 4,
    seed: int = 0,
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """Run kavg and compare every round's aggregate with Flower's FedAvg; returns the rows."""
    with tempfile.TemporaryDirectory(prefix="edgetune-kavg-fedavg-", dir=workdir) as tmp:
        run_dir = Path(tmp) / "kavg-vs-fedavg"
        flat = {
            "algorithm": "kavg",
            "num_rounds": rounds,
            "model.path": model,
            "model.trainable": trainable,
            "run.num_sites": num_sites,
            "run.min_sites": num_sites,
            "run.seed": seed,
            "run.dir": str(run_dir.parent),
            "run.name": run_dir.name,
            "data.demo_facts": 6,
            "data.batch_size": batch_size,
            "eval.num_examples": 1,
            "kavg.local_steps": local_steps,
            "kavg.lr": 0.1 if model == "tiny" else 0.05,
            "kavg.up_codec": "fp32",
            "kavg.down_codec": "fp32",
            "kavg.outlier_mult": 0.0,
        }
        cfg = cfgmod.from_run_config(flat)
        server, transport, recorder, _ev, _tok = inproc.build(cfg, num_sites, run_dir=run_dir)
        capture = CapturingTransport(transport)
        names = list(server.manifest.names)
        rows = []
        try:
            for r in range(1, rounds + 1):
                before = [p.clone() for p in server.params]
                t0 = time.perf_counter()
                metrics, rejected, _ = run_round(cfg, server, capture, recorder, r)
                seconds = time.perf_counter() - t0
                if rejected or metrics.get("num_accepted") != num_sites:
                    raise RuntimeError(f"round {r}: not every site was accepted ({rejected})")
                plans = server._plans  # the weights the server assigned this round (K x batch size)
                weights = {s: float(plans[s]["K"] * plans[s]["bs"]) for s in capture.local_models}
                edgetune_new = [p.clone() for p in server.params]
                flower_new = flower_fedavg(names, before, capture.local_models, weights, capture.losses, r)
                exact = exact_mean(capture.local_models, weights)
                update = max(float((n.double() - b.double()).abs().max()) for n, b in zip(edgetune_new, before))
                rows.append(
                    {
                        "check": f"round {r}",
                        "round": r,
                        "weights": [weights[s] for s in sorted(weights)],
                        "max_abs_diff": max_abs(edgetune_new, flower_new),
                        "max_ulps": max_ulps(edgetune_new, flower_new, {"theta_r": before, **capture.local_models}),
                        "edgetune_vs_exact": max_abs(edgetune_new, exact),
                        "flower_vs_exact": max_abs(flower_new, exact),
                        "max_abs_update": update,
                        "max_abs_param": max(float(p.abs().max()) for p in edgetune_new),
                        "train_loss": metrics["train_loss"],
                        "round_s": seconds,
                    }
                )
            # Unequal weights: edgetune's aggregation function on the deltas vs FedAvg on the models.
            sites = sorted(capture.local_models)
            uneq = {s: float(i + 1) for i, s in enumerate(sites)}
            deltas = [[y - b for y, b in zip(capture.local_models[s], before)] for s in sites]
            mean = aggregate_tensors(deltas, [uneq[s] for s in sites], "mean", 0.0)
            edge = [b + d for b, d in zip(before, mean)]
            flower = flower_fedavg(names, before, capture.local_models, uneq, capture.losses, rounds)
            exact = exact_mean(capture.local_models, uneq)
            rows.append(
                {
                    "check": "unequal weights (aggregation functions only)",
                    "round": rounds,
                    "weights": [uneq[s] for s in sites],
                    "max_abs_diff": max_abs(edge, flower),
                    "max_ulps": max_ulps(edge, flower, {"theta_r": before, **capture.local_models}),
                    "edgetune_vs_exact": max_abs(edge, exact),
                    "flower_vs_exact": max_abs(flower, exact),
                    "max_abs_update": max(float(d.abs().max()) for d in mean),
                    "max_abs_param": max(float(p.abs().max()) for p in edge),
                    "train_loss": None,
                    "round_s": None,
                }
            )
        finally:
            run_hex = run_id_for(run_dir.name).hex()
            for s in transport.sites():
                shutil.rmtree(site_state_dir(cfg, s) / run_hex, ignore_errors=True)
    numel = sum(p.numel() for p in server.params)
    for row in rows:
        row.update(
            {
                "benchmark": "kavg_vs_fedavg",
                "model": model,
                "trainable": trainable,
                "trainable_numel": numel,
                "num_sites": num_sites,
                "local_steps": local_steps,
                "batch_size": batch_size,
                "seed": seed,
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]], tol: float) -> str:
    r0 = rows[0]
    lines = [
        f"edgetune kavg vs Flower FedAvg.aggregate_train: model {r0['model']} ({r0['trainable']}, "
        f"{r0['trainable_numel']:,} trainable), {r0['num_sites']} sites, K={r0['local_steps']}, "
        f"batch {r0['batch_size']}, seed {r0['seed']}; tolerance {tol:g}",
        "",
        f"{'check':<46} {'weights':<10} {'|edgetune-Flower|':>18} {'ulps':>5} {'edgetune-exact':>15} "
        f"{'Flower-exact':>13} {'max |update|':>13} {'verdict':>8}",
    ]
    for r in rows:
        w = ",".join(f"{x:g}" for x in r["weights"])
        verdict = "PASS" if r["max_abs_diff"] <= tol else "FAIL"
        lines.append(
            f"{r['check']:<46} {w:<10} {r['max_abs_diff']:>18.3e} {r['max_ulps']:>5.0f} "
            f"{r['edgetune_vs_exact']:>15.3e} {r['flower_vs_exact']:>13.3e} {r['max_abs_update']:>13.3e} {verdict:>8}"
        )
    lines.append(
        "\nexact = sum_i w_i y_i / W in float64; both implementations round in float32 (Flower sums "
        "w_i/W * y_i in float32; edgetune adds the float64 mean of fp32 deltas, cast once, to theta)."
    )
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(rows), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kavg_vs_fedavg", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2 (or a local HF folder)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--trainable", default="all", help="trainable subset as model.trainable spells it")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="largest acceptable max |edgetune - Flower|")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.sites < 2 or args.rounds < 1 or args.local_steps < 1:
        parser.error("--sites must be >= 2, --rounds and --local-steps >= 1")
    from benchmarks.spsa_step import machine_info
    from edgetune.models.load import resolve_device

    rows = compare(
        args.model,
        num_sites=args.sites,
        rounds=args.rounds,
        local_steps=args.local_steps,
        trainable=args.trainable,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    info = machine_info(resolve_device("auto"))
    ok = all(r["max_abs_diff"] <= args.tol for r in rows)
    for r in rows:
        r.update({"tolerance": args.tol, "pass": r["max_abs_diff"] <= args.tol, **info})
    write_rows(rows, args.out)
    print(format_table(rows, args.tol))
    print(f"\n{'PASS' if ok else 'FAIL'}: {len(rows)} rows written to {args.out}")
    if not ok:
        print("edgetune kavg and Flower FedAvg disagree beyond the tolerance", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
