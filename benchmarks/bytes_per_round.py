"""Uplink and downlink bytes per site per round, measured on real payloads, for every algorithm and codec.

Usage (from the repository root)::

    python -m benchmarks.bytes_per_round [--model tiny|smollm2] [--sites 2] [--batch-size 1]
        [--only NAME,NAME] [--out benchmarks/results/bytes_per_round.json]

Method. Every edgetune configuration runs real federated rounds in this process (``inproc.build`` +
``federation.run_round``: server half, ``num_sites`` client halves, real training on demo data, real
encoding), and the numbers are read back from the run's ``ByteLedger``. Nothing is estimated from
``numel * 4``. Two sizes per message:

payload
    The edgetune payload (``comm/wire.py``) as the ledger records it: the bytes an algorithm actually
    encoded, framing of its own fields included.
Flower
    The same payload wrapped the way ``edgetune/flower/server_loop.py`` ships it (``messages.to_content``
    inside a Flower ``Message``; replies built with ``reply_to``) and measured with
    ``messages.flower_bytes``: the serialized size of every object Flower pushes or pulls (message,
    metadata, records, array chunks). A benchmark-side transport adds these rows to the same ledger
    (``kind = "flower"``), exactly as the Flower transport does in a real run.

The measured round is the last round run: round 2 for ``spsa`` (its downlink carries the replay log
of the previous round, which round 1 lacks; the per-site downlink grows with the number of sites by
K*P bytes per site) and for ``lowrank ab-groups`` (round 1 is a re-factorisation round where every
site sends both factors; round 2 splits the sites into an A-group and a B-group); round 1 for the
others, whose sizes do not change between rounds. ``deft``/``topk`` rounds have two phases
(indices, then values); their bytes are the sum of both.

Two reference rows are built, not trained, as Flower messages with Flower's own records:

flowertune-lora
    FlowerTune's FedAvg exchange: the peft LoRA state dict (``get_peft_model_state_dict``) of the same
    model, same adapter settings as the lowrank rows (``model.target_modules``, ``model.lora_rank``
    defaults), as fp32 arrays in an ``ArrayRecord``, both ways: down ``{"arrays", "config":
    {"server-round"}}`` (FedAvg.configure_train's content; FlowerTune also puts its whole run config in
    that ConfigRecord, about 1 kB more), up ``{"arrays", "metrics": {"train_loss", "num-examples"}}``.
fedavg-full
    The same exchange with every parameter of the model (fp32; tied weights counted once).

Their "payload" is the ``Array`` data Flower carries (``np.save`` bytes per tensor). Flower stores
message objects by content id, so identical arrays would be counted once; the reference tensors
get a distinct offset each (as trained tensors would differ), so LoRA's all-zero B factors at
initialisation do not shrink the measurement.

The ratio columns compare Flower-message bytes (what the wire carries, framing included on both
sides): ``up/spsa4`` is this row's uplink divided by spsa's (K*P = 4) and ``up/FT`` and
``down/FT`` divide by FlowerTune-style LoRA. The JSON rows also carry the payload-basis ratios.

Bytes do not depend on the batch size or on the learning rate, so the runs use a small batch, K=1
local step for the gradient methods, and no evaluation (``run_round`` only): a whole
``--model smollm2`` run is meant to take a few minutes on 2 CPU cores.

Output: a table on stdout and a JSON list in ``--out``, one row per configuration (ab-groups gives
two rows: A-group and B-group sites).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import lowrank
from edgetune.algorithms.spsa import reply_overhead_bytes
from edgetune.build import run_id_for, site_state_dir
from edgetune.comm.ledger import ByteLedger
from edgetune.config import ModelSection
from edgetune.federation import Failure, run_round
from edgetune.models.params import manifest_of

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
DEFAULT_OUT = Path("benchmarks") / "results" / "bytes_per_round.json"
SPSA_REFERENCE = "spsa-kp4"
FT_REFERENCE = "flowertune-lora"
CODECS = ("fp32", "fp16", "bf16", "int8-row")


@dataclass(frozen=True)
class ByteConfig:
    """One configuration: an edgetune algorithm with overrides, or a Flower reference exchange."""

    name: str
    algorithm: str
    overrides: dict[str, Any] = field(default_factory=dict)
    rounds: int = 1
    trainable: str = ATTENTION
    codec: str = "fp32"
    note: str = ""


def all_configs() -> list[ByteConfig]:
    """Every configuration the benchmark measures, in table order."""
    out = [
        ByteConfig(
            "spsa-kp4",
            "spsa",
            {"spsa.num_steps": 4, "spsa.num_probes": 1},
            rounds=2,
            codec="int8-sr",
            note="K=4, P=1",
        ),
        ByteConfig(
            "spsa-kp16",
            "spsa",
            {"spsa.num_steps": 4, "spsa.num_probes": 4},
            rounds=2,
            codec="int8-sr",
            note="K=4, P=4",
        ),
    ]
    for trainable, tag in ((ATTENTION, "attn"), ("lora", "lora")):
        for codec in CODECS:
            out.append(
                ByteConfig(
                    f"kavg-{codec}-{tag}",
                    "kavg",
                    {"kavg.up_codec": codec, "kavg.down_codec": codec},
                    trainable=trainable,
                    codec=codec,
                )
            )
    for mode in ("fedavg", "exact", "ab-groups", "only-b"):
        out.append(
            ByteConfig(
                f"lowrank-{mode}",
                "lowrank",
                {"lowrank.mode": mode},
                rounds=2 if mode == "ab-groups" else 1,
                trainable="lora",
            )
        )
    for selector in ("deft", "topk"):
        out.append(
            ByteConfig(
                selector,
                "deft",
                {"deft.selector": selector, "deft.density": 0.01},
                note="density 0.01",
            )
        )
    out.append(ByteConfig("dppf", "dppf"))
    out.append(ByteConfig(FT_REFERENCE, "reference", trainable="lora", note="peft LoRA state dict, Flower FedAvg"))
    out.append(ByteConfig("fedavg-full", "reference", trainable="all", note="all parameters, Flower FedAvg"))
    return out


def flat_config(c: ByteConfig, model: str, num_sites: int, batch_size: int, run_dir: Path) -> dict[str, Any]:
    """The flat run configuration of one edgetune configuration."""
    flat: dict[str, Any] = {
        "algorithm": c.algorithm,
        "num_rounds": c.rounds,
        "model.path": model,
        "model.trainable": c.trainable,
        "run.num_sites": num_sites,
        "run.min_sites": num_sites,
        "run.seed": 0,
        "run.dir": str(run_dir.parent),
        "run.name": run_dir.name,
        "crypto.deterministic_secrets": True,
        "data.batch_size": batch_size,
        "kavg.local_steps": 1,
        "eval.num_examples": 1,
        "eval.max_new_tokens": 1,
    }
    flat.update(c.overrides)
    return flat


# --------------------------------------------------------------------------------------------
# Flower framing
# --------------------------------------------------------------------------------------------


def _flower() -> Any:
    """Flower's message helpers, with a task identity so Messages can be built outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        TaskIdentity.run_id  # noqa: B018 (raises when unset)
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    from edgetune.flower import messages

    return messages


class FlowerFramedTransport:
    """Wraps the in-process transport; records the Flower-serialized size of every message.

    Messages are built as ``edgetune/flower/server_loop.py`` builds them (``to_content``, the
    ``train[.phase]`` message type, ``group_id = round-<r>``, replies with ``reply_to``), and measured
    with ``messages.flower_bytes``; the rows go to the ledger with ``kind = "flower"``.
    """

    def __init__(self, inner: inproc.InProcTransport, ledger: ByteLedger) -> None:
        self.inner = inner
        self.ledger = ledger
        self.node_of = {s: i + 1 for i, s in enumerate(inner.sites())}

    def sites(self) -> list[str]:
        return self.inner.sites()

    def drain_stale(self) -> dict[str, str]:
        return self.inner.drain_stale()

    def exchange(
        self, round_idx: int, phase: str, blobs: dict[str, bytes], *, timeout_s: float
    ) -> dict[str, bytes | Failure]:
        from flwr.app import Message

        from edgetune.flower.server_loop import message_type

        msgs = _flower()
        down = {}
        for site, blob in blobs.items():
            down[site] = Message(
                msgs.to_content(blob),
                dst_node_id=self.node_of[site],
                message_type=message_type(phase),
                group_id=f"round-{round_idx}",
            )
            self.ledger.add(round_idx, phase, site, "down", msgs.flower_bytes(down[site]), kind="flower")
        raw = self.inner.exchange(round_idx, phase, blobs, timeout_s=timeout_s)
        for site, got in raw.items():
            if isinstance(got, bytes):
                reply = Message(msgs.to_content(got), reply_to=down[site])
                self.ledger.add(round_idx, phase, site, "up", msgs.flower_bytes(reply), kind="flower")
        return raw


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def _site_bytes(ledger: ByteLedger, round_idx: int, direction: str, kind: str) -> dict[str, int]:
    return ledger.per_site(round_idx=round_idx, direction=direction, kind=kind)


def _phase_bytes(ledger: ByteLedger, round_idx: int) -> dict[str, dict[str, float]]:
    """Mean bytes per site of each phase of a round (payload), per direction."""
    out: dict[str, dict[str, list[int]]] = {}
    for r in ledger.rows:
        if r.round_idx == round_idx and r.kind == "payload":
            out.setdefault(r.phase, {}).setdefault(r.direction, []).append(r.num_bytes)
    return {p: {d: statistics.mean(v) for d, v in dirs.items()} for p, dirs in out.items()}


def _summarise(values: dict[str, int]) -> dict[str, float]:
    v = list(values.values())
    return {"mean": statistics.mean(v), "min": min(v), "max": max(v)}


def measure_edgetune(c: ByteConfig, model: str, num_sites: int, batch_size: int, workdir: Path) -> list[dict[str, Any]]:
    """Run ``c.rounds`` real rounds of one configuration and read the last round's bytes.

    Returns one row, or two for ``lowrank ab-groups`` (A-group and B-group sites).
    """
    run_dir = workdir / f"bytes-{c.name}"
    flat = flat_config(c, model, num_sites, batch_size, run_dir)
    cfg = cfgmod.from_run_config(flat)
    t0 = time.perf_counter()
    server, transport, recorder, _evaluate, _tok = inproc.build(cfg, num_sites, run_dir=run_dir)
    framed = FlowerFramedTransport(transport, recorder.ledger)
    try:
        for r in range(1, c.rounds + 1):
            metrics, rejected, _attempts = run_round(cfg, server, framed, recorder, r)
            if rejected:
                raise RuntimeError(f"{c.name}: round {r} rejected sites: {rejected}")
        seconds = time.perf_counter() - t0
        r = c.rounds
        led = recorder.ledger
        sites = framed.sites()
        groups: dict[str, list[str]] = {"": sites}
        if c.algorithm == "lowrank" and c.overrides.get("lowrank.mode") == "ab-groups":
            groups = {}
            for pos, s in enumerate(sorted(sites)):
                sel = lowrank.ab_group(r, pos)
                groups.setdefault("A-group" if sel == "lora_A" else "B-group", []).append(s)
        manifest = manifest_of(server.global_model())
        rows = []
        for group, members in sorted(groups.items()):
            per = {
                (d, k): {s: v for s, v in _site_bytes(led, r, d, k).items() if s in members}
                for d in ("up", "down")
                for k in ("payload", "flower")
            }
            row: dict[str, Any] = {
                "config": c.name + (f" ({group})" if group else ""),
                "algorithm": c.algorithm,
                "group": group,
                "codec": c.codec,
                "trainable": c.trainable,
                "trainable_numel": manifest.numel,
                "note": c.note,
                "measured_round": r,
                "rounds_run": c.rounds,
                "group_sites": len(members),
            }
            for (d, k), vals in per.items():
                summary = _summarise(vals)
                row[f"{d}_{k}_bytes"] = summary["mean"]
                row[f"{d}_{k}_min"] = summary["min"]
                row[f"{d}_{k}_max"] = summary["max"]
            row["phases"] = _phase_bytes(led, r)
            if c.algorithm == "spsa":
                kp = int(c.overrides["spsa.num_steps"]) * int(c.overrides["spsa.num_probes"])
                row["spsa_kp"] = kp
                row["spsa_reply_overhead"] = reply_overhead_bytes(kp)
                row["down_payload_round1"] = statistics.mean(_site_bytes(led, 1, "down", "payload").values())
            row["seconds"] = seconds
            row["train_loss"] = metrics.get("train_loss")
            rows.append(row)
        return rows
    finally:
        # per-site state this run left in the persistent site folders (dppf copies, deft residuals, spsa saves)
        run_hex = run_id_for(run_dir.name).hex()
        for s in transport.sites():
            base = site_state_dir(cfg, s)
            shutil.rmtree(base / run_hex, ignore_errors=True)


def reference_tensors(c: ByteConfig, model: str) -> dict[str, torch.Tensor]:
    """fp32 tensors a Flower FedAvg round ships: the peft LoRA state dict, or every parameter."""
    from edgetune.models.load import load_model

    if c.trainable == "lora":
        from peft import get_peft_model_state_dict

        m, _ = load_model(ModelSection(path=model, trainable="lora", device="cpu"))
        sd = get_peft_model_state_dict(m)
    else:
        m, _ = load_model(ModelSection(path=model, trainable="all", device="cpu"))
        sd = dict(m.named_parameters())  # tied weights appear once
    # Flower stores objects by content id, so identical arrays (LoRA B = 0 at initialisation, RMSNorm
    # weights = 1 in every layer) would be counted once. After training they all differ: give each
    # tensor its own offset so the measured size is the size of a trained adapter or model.
    return {
        k: (v.detach().to("cpu", torch.float32) + (i + 1) * 2.0**-20).contiguous()
        for i, (k, v) in enumerate(sd.items())
    }


def measure_reference(c: ByteConfig, model: str, num_sites: int) -> list[dict[str, Any]]:
    """Build FedAvg's train instruction and a site's reply as Flower messages; measure them."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    msgs = _flower()
    t0 = time.perf_counter()
    tensors = reference_tensors(c, model)
    arrays = ArrayRecord(tensors)
    payload = sum(len(a.data) for a in arrays.values())
    down = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type="train",
    )
    down_flower = msgs.flower_bytes(down)
    up = Message(
        RecordDict({"arrays": arrays, "metrics": MetricRecord({"train_loss": 0.0, "num-examples": 8})}),
        reply_to=down,
    )
    up_flower = msgs.flower_bytes(up)
    numel = sum(t.numel() for t in tensors.values())
    row: dict[str, Any] = {
        "config": c.name,
        "algorithm": "reference",
        "group": "",
        "codec": "fp32",
        "trainable": c.trainable,
        "trainable_numel": numel,
        "note": c.note,
        "measured_round": 1,
        "rounds_run": 0,
        "group_sites": num_sites,
        "phases": {},
        "tensors": len(tensors),
        "seconds": time.perf_counter() - t0,
        "train_loss": None,
    }
    for d, fl in (("up", up_flower), ("down", down_flower)):
        for k, v in (("payload", payload), ("flower", fl)):
            row[f"{d}_{k}_bytes"] = v
            row[f"{d}_{k}_min"] = v
            row[f"{d}_{k}_max"] = v
    return [row]


def measure(c: ByteConfig, model: str, num_sites: int, batch_size: int, workdir: Path) -> list[dict[str, Any]]:
    """Rows of one configuration."""
    if c.algorithm == "reference":
        return measure_reference(c, model, num_sites)
    return measure_edgetune(c, model, num_sites, batch_size, workdir)


def add_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Ratios to spsa K*P=4 and to FlowerTune-style LoRA, on Flower-message and payload bases."""
    ref = {r["config"]: r for r in rows}
    spsa, ft = ref.get(SPSA_REFERENCE), ref.get(FT_REFERENCE)
    for r in rows:
        for basis in ("flower", "payload"):
            if spsa:
                r[f"up_vs_spsa4_{basis}"] = r[f"up_{basis}_bytes"] / spsa[f"up_{basis}_bytes"]
            if ft:
                r[f"up_vs_flowertune_{basis}"] = r[f"up_{basis}_bytes"] / ft[f"up_{basis}_bytes"]
                r[f"down_vs_flowertune_{basis}"] = r[f"down_{basis}_bytes"] / ft[f"down_{basis}_bytes"]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _b(x: float) -> str:
    return f"{x:,.0f}"


def _ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _trainable_label(t: str) -> str:
    return {ATTENTION: "attn", "lora": "lora", "all": "all"}.get(t, t)


def format_table(rows: Sequence[dict[str, Any]], *, model: str, num_sites: int) -> str:
    """The rows as a text table (bytes per site per round)."""
    head = (
        f"Bytes per site per round, model {model}, {num_sites} sites, measured on encoded messages "
        "(payload: edgetune wire payload; Flower: the serialized Flower Message that carries it).\n"
        "Ratios use Flower-message bytes: up/spsa4 = uplink / spsa(K*P=4) uplink; up/FT, down/FT = "
        "this / FlowerTune-style LoRA FedAvg message."
    )
    cols = [
        ("config", 28, lambda r: r["config"]),
        ("train", 5, lambda r: _trainable_label(r["trainable"])),
        ("params", 11, lambda r: f"{r['trainable_numel']:,}"),
        ("up payload", 13, lambda r: _b(r["up_payload_bytes"])),
        ("up Flower", 13, lambda r: _b(r["up_flower_bytes"])),
        ("down payload", 13, lambda r: _b(r["down_payload_bytes"])),
        ("down Flower", 13, lambda r: _b(r["down_flower_bytes"])),
        ("up/spsa4", 9, lambda r: _ratio(r.get("up_vs_spsa4_flower"))),
        ("up/FT", 9, lambda r: _ratio(r.get("up_vs_flowertune_flower"))),
        ("down/FT", 9, lambda r: _ratio(r.get("down_vs_flowertune_flower"))),
    ]
    lines = [head, ""]
    lines.append("  ".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w, _) in enumerate(cols)))
    for r in rows:
        lines.append("  ".join(f"{fn(r):<{w}}" if i == 0 else f"{fn(r):>{w}}" for i, (_, w, fn) in enumerate(cols)))
    notes = []
    for r in rows:
        if r["algorithm"] == "spsa":
            notes.append(
                f"{r['config']}: uplink payload = K*P ({r['spsa_kp']}) + {r['spsa_reply_overhead']} B framing; "
                f"downlink round 1 (no replay log) {_b(r['down_payload_round1'])} B, round {r['measured_round']} "
                f"{_b(r['down_payload_bytes'])} B (grows by K*P = {r['spsa_kp']} B per site in the federation)"
            )
        if len(r.get("phases", {})) > 1:
            parts = ", ".join(
                f"{p}: up {_b(v.get('up', 0))} / down {_b(v.get('down', 0))}" for p, v in r["phases"].items()
            )
            notes.append(f"{r['config']}: per phase (payload, mean per site) {parts}")
        if r["up_payload_min"] != r["up_payload_max"]:
            notes.append(
                f"{r['config']}: uplink payload varies by site, {_b(r['up_payload_min'])}..{_b(r['up_payload_max'])} B"
            )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(rows), indent=2) + "\n")


def run(
    model: str,
    *,
    num_sites: int = 2,
    batch_size: int = 1,
    only: Sequence[str] = (),
    workdir: Path | None = None,
    log: Any = None,
) -> list[dict[str, Any]]:
    """Measure every configuration (or those named in ``only``); return rows with ratios and machine info."""
    from benchmarks.spsa_step import machine_info
    from edgetune.models.load import resolve_device

    configs = [c for c in all_configs() if not only or c.name in only]
    unknown = set(only) - {c.name for c in all_configs()}
    if unknown:
        raise ValueError(f"unknown configuration(s) {sorted(unknown)}; known: {[c.name for c in all_configs()]}")
    info = machine_info(resolve_device("auto"))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgetune-bytes-", dir=workdir) as tmp:
        for c in configs:
            t0 = time.perf_counter()
            got = measure(c, model, num_sites, batch_size, Path(tmp))
            for row in got:
                row.update({"benchmark": "bytes_per_round", "model": model, "num_sites": num_sites, **info})
            rows.extend(got)
            if log is not None:
                print(f"measured {c.name} in {time.perf_counter() - t0:.1f} s", file=log, flush=True)
    add_ratios(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bytes_per_round", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2 (or a local HF folder)")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="examples per local step (bytes do not depend on it)")
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.sites < 2 or args.batch_size < 1:
        parser.error("--sites must be >= 2 and --batch-size >= 1")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    t0 = time.perf_counter()
    rows = run(args.model, num_sites=args.sites, batch_size=args.batch_size, only=only, log=sys.stderr)
    total = time.perf_counter() - t0
    for r in rows:
        r["total_seconds"] = total
    write_rows(rows, args.out)
    print(format_table(rows, model=args.model, num_sites=args.sites))
    print(f"\n{len(rows)} rows in {total:.0f} s, written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
