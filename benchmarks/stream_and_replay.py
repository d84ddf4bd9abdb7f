"""Perturbation stream throughput, and SPSA replay time per round against the number of sites.

Usage (from the repository root)::

    python -m benchmarks.stream_and_replay [--model tiny|smollm2] [--trainable q_proj,k_proj,v_proj,o_proj]
        [--elements 16777216] [--sites 16,64,200] [--pool 64] [--repeats 3] [--device auto|cpu|cuda]
        [--store auto|host|disk] [--out benchmarks/results/stream_and_replay.json]

(a) Stream throughput (elements per second, median of ``--repeats`` after one warm-up, on one flat fp32
tensor of ``--elements`` values on ``--device``):

keystream bits
    ``keystream.tensor_bits``: ChaCha20 keystream, 1 bit per element, moved to the device.
bits + expand
    ``keystream.rademacher``: the bits expanded to a materialised +-1 tensor.
bits + expand + add_
    ``keystream.add_(w, key, index, alpha)``: the replay kernel's work for one term, chunked
    (``CHUNK_ELEMS``), bits generated per chunk: what every (key, coefficient) of a round costs.
torch.randn / torch.randn + add_
    ``torch.randn`` with a seeded ``torch.Generator`` on the same device (MeZO's and FedKSeed's way of
    regenerating z, not portable across ISAs, GPU models or CPU vs CUDA), alone and followed by
    ``w.add_(z, alpha=...)``.

The ratios divide keystream throughput by torch throughput (> 1: the portable stream is faster).

(b) Replay time per round: a synthetic committed round (``LogEntry`` with keyed random one-byte codes,
K=4 steps x P=1 probe per site, per-site directions, int8-sr) for 16, 64 and 200 sites, without and
with a FedKSeed seed pool of ``--pool`` seeds. ``replay_terms`` (key derivation, decoding, the
canonical coefficient list; with a pool, coefficients summed per seed in float64) and
``Replica.apply`` (every term regenerated and applied to the round-start master store, tensor by
tensor, then the work weights refreshed and hashed) are timed separately, on the model's trainable
subset, from a fresh ``Replica.start_run`` each time. Without a pool the number of terms is
sites x K x P; with a pool it is at most the pool size, whatever the number of sites.

Output: two tables on stdout and a JSON list in ``--out``: one ``stream`` row and one ``replay`` row
per (sites, pool).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.algorithms import spsa
from edgetune.config import ModelSection
from edgetune.crypto import keystream, schedule
from edgetune.models import master
from edgetune.models.load import load_model, resolve_device

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
DEFAULT_OUT = Path("benchmarks") / "results" / "stream_and_replay.json"
DEFAULT_SITES = (16, 64, 200)
STEPS, PROBES = 4, 1
"""K and P of every site in the replayed round (K*P = 4 scalars per site)."""
LR, SCALE = 1e-4, 8.0
BENCH_KEY = schedule.derive(schedule.run_key(0), "test", "stream-and-replay")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, LUTs, scratch buffers)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# (a) stream throughput
# --------------------------------------------------------------------------------------------


def stream_matches_rademacher(numel: int, device: torch.device | str = "cpu") -> bool:
    """The benchmarked paths produce keystream.rademacher's z exactly.

    ``tensor_bits`` + ``expand`` and the chunked ``add_`` (applied with alpha 1 to zeros) must both
    equal ``rademacher`` element for element.
    """
    dev = torch.device(device)
    z = keystream.rademacher(BENCH_KEY, 0, numel, device=dev)
    expanded = keystream.expand(keystream.tensor_bits(BENCH_KEY, 0, numel, dev), numel)
    w = torch.zeros(numel, dtype=torch.float32, device=dev)
    keystream.add_(w, BENCH_KEY, 0, 1.0)
    return bool(torch.equal(z, expanded) and torch.equal(z, w) and set(z.unique().tolist()) <= {-1.0, 1.0})


def stream_throughput(numel: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Elements per second of the keystream paths and of torch.randn (see the module docstring)."""
    w = torch.zeros(numel, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)  # a local generator: the global RNG is untouched
    alpha = 2.0**-10

    def randn() -> torch.Tensor:
        return torch.randn(numel, generator=gen, device=device, dtype=torch.float32)

    paths: dict[str, Callable[[], Any]] = {
        "keystream_bits": lambda: keystream.tensor_bits(BENCH_KEY, 0, numel, device),
        "bits_expand": lambda: keystream.rademacher(BENCH_KEY, 0, numel, device=device),
        "bits_expand_add": lambda: keystream.add_(w, BENCH_KEY, 0, alpha),
        "randn": randn,
        "randn_add": lambda: w.add_(randn(), alpha=alpha),
    }
    seconds = {name: _median_time(fn, device, repeats) for name, fn in paths.items()}
    row: dict[str, Any] = {
        "kind": "stream",
        "elements": numel,
        "repeats": repeats,
        "chunk_elems": keystream.CHUNK_ELEMS,
        "matches_rademacher": stream_matches_rademacher(min(numel, 1 << 16) + 3, device),
    }
    for name, s in seconds.items():
        row[f"{name}_s"] = s
        row[f"{name}_elem_per_s"] = numel / s
    row["ratio_add_vs_randn_add"] = row["bits_expand_add_elem_per_s"] / row["randn_add_elem_per_s"]
    row["ratio_expand_vs_randn"] = row["bits_expand_elem_per_s"] / row["randn_elem_per_s"]
    return row


# --------------------------------------------------------------------------------------------
# (b) replay
# --------------------------------------------------------------------------------------------


def synthetic_entry(num_sites: int, seed_pool: int) -> spsa.LogEntry:
    """A committed round of ``num_sites`` sites with keyed random one-byte codes (K*P each)."""
    sites = tuple(sorted(f"site-{i}" for i in range(num_sites)))
    n = num_sites * STEPS * PROBES
    codes = schedule.integers(schedule.derive(BENCH_KEY, "test", "codes", num_sites), n, 255) - 127
    return spsa.LogEntry(
        1,
        sites,
        codes.astype(np.int8).tobytes(),
        LR,
        SCALE,
        STEPS,
        PROBES,
        "per-site",
        seed_pool,
        "int8-sr",
        "mean",
        0.125,
    )


def replay_once(replica: spsa.Replica, entry: spsa.LogEntry, tag: str) -> dict[str, Any]:
    """``replay_terms`` and ``Replica.apply`` of ``entry`` from the base weights; times and counts."""
    run_id = schedule.derive(BENCH_KEY, "test", "run", tag, length=16)
    secret = schedule.derive(BENCH_KEY, "secret", tag)
    previous = replica.store
    replica.start_run(run_id)
    new_path = getattr(replica.store, "path", None)
    if isinstance(previous, master.DiskStore) and previous is not replica.base and previous.path != new_path:
        previous.path.unlink(missing_ok=True)  # one round-start file at a time
    device = replica.work[0].device
    _sync(device)
    t0 = time.perf_counter()
    terms = spsa.replay_terms(entry, secret, run_id)
    t1 = time.perf_counter()
    state = replica.apply_terms(1, terms)
    _sync(device)
    t2 = time.perf_counter()
    return {"terms": len(terms), "terms_s": t1 - t0, "apply_s": t2 - t1, "state_hash": state}


def replay_rows(
    replica: spsa.Replica, sites: Sequence[int], pool: int, repeats: int, log: Any = None
) -> list[dict[str, Any]]:
    """One row per (number of sites, pool in {0, ``pool``}): median seconds over ``repeats``."""
    rows = []
    for n in sites:
        for seed_pool in (0, pool):
            entry = synthetic_entry(n, seed_pool)
            # the same round each time (same secret and run id): the repeats must end at the same hash
            runs = [replay_once(replica, entry, f"{n}-{seed_pool}") for _ in range(repeats)]
            terms_s = statistics.median(r["terms_s"] for r in runs)
            apply_s = statistics.median(r["apply_s"] for r in runs)
            rows.append(
                {
                    "kind": "replay",
                    "sites": n,
                    "seed_pool": seed_pool,
                    "steps": STEPS,
                    "probes": PROBES,
                    "scalars": n * STEPS * PROBES,
                    "terms": runs[0]["terms"],
                    "repeats": repeats,
                    "replay_terms_s": terms_s,
                    "apply_s": apply_s,
                    "round_s": terms_s + apply_s,
                    "apply_s_per_term": apply_s / max(runs[0]["terms"], 1),
                    "state_hash": runs[0]["state_hash"],
                    "deterministic": len({r["state_hash"] for r in runs}) == 1,
                }
            )
            if log is not None:
                print(f"replayed {n} sites, pool {seed_pool}: {terms_s + apply_s:.2f} s", file=log, flush=True)
    by_key = {(r["sites"], r["seed_pool"]): r for r in rows}
    for r in rows:
        if r["seed_pool"]:
            r["ratio_pool_vs_no_pool"] = r["round_s"] / by_key[(r["sites"], 0)]["round_s"]
    return rows


def make_replica(model: str, trainable: str, device: str, store: str, workdir: Path) -> tuple[spsa.Replica, int]:
    """A replica of ``model`` with ``trainable`` selected; also returns the trainable numel."""
    m, _ = load_model(ModelSection(path=model, trainable=trainable, device=device))
    replica = spsa.Replica(m, workdir, store)
    return replica, replica.manifest.numel


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _rate(x: float) -> str:
    return f"{x / 1e6:,.1f} M/s"


def format_tables(stream: dict[str, Any] | None, replay: Sequence[dict[str, Any]], head: str) -> str:
    lines = [head]
    if stream is not None:
        lines += [
            "",
            f"(a) perturbation stream, {stream['elements']:,} fp32 elements on {stream['device']}, "
            f"median of {stream['repeats']} after a warm-up (elements per second)",
            f"  keystream bits (ChaCha20, 1 bit/elem)     {_rate(stream['keystream_bits_elem_per_s']):>14}",
            f"  bits + expand (keystream.rademacher)      {_rate(stream['bits_expand_elem_per_s']):>14}",
            f"  bits + expand + add_ (one replay term)    {_rate(stream['bits_expand_add_elem_per_s']):>14}",
            f"  torch.randn (seeded Generator)            {_rate(stream['randn_elem_per_s']):>14}",
            f"  torch.randn + add_                        {_rate(stream['randn_add_elem_per_s']):>14}",
            f"  ratio (bits+expand+add_) / (randn+add_)   {stream['ratio_add_vs_randn_add']:>14.2f}",
            f"  ratio (bits+expand) / randn               {stream['ratio_expand_vs_randn']:>14.2f}",
            f"  expansion equals keystream.rademacher     {stream['matches_rademacher']!s:>14}",
        ]
    if replay:
        r0 = replay[0]
        lines += [
            "",
            f"(b) replay of one round, K*P = {r0['steps'] * r0['probes']} scalars per site, on "
            f"{r0['trainable_numel']:,} trainable parameters ({r0['trainable']}), store {r0['store']}, "
            f"median of {r0['repeats']}",
            f"{'sites':>6} {'pool':>5} {'terms':>6} {'replay_terms s':>15} {'apply s':>9} {'round s':>9} "
            f"{'ms/term':>8} {'pool/no-pool':>13}",
        ]
        for r in replay:
            ratio = f"{r['ratio_pool_vs_no_pool']:.3f}" if "ratio_pool_vs_no_pool" in r else "-"
            lines.append(
                f"{r['sites']:>6} {r['seed_pool'] or '-':>5} {r['terms']:>6} {r['replay_terms_s']:>15.3f} "
                f"{r['apply_s']:>9.3f} {r['round_s']:>9.3f} {1e3 * r['apply_s_per_term']:>8.2f} {ratio:>13}"
            )
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(rows), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_and_replay", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2 (or a local HF folder)")
    parser.add_argument("--trainable", default=ATTENTION, help="trainable subset as model.trainable spells it")
    parser.add_argument("--elements", type=int, default=1 << 24, help="stream length for (a); 0 skips (a)")
    parser.add_argument("--sites", default=",".join(map(str, DEFAULT_SITES)), help="site counts for (b); empty skips")
    parser.add_argument("--pool", type=int, default=64, help="seed pool size S for the pooled replays")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--store", default="auto", choices=("auto", "host", "disk"), help="round-start store")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sites = [int(s) for s in args.sites.split(",") if s.strip()]
    if args.repeats < 1 or args.pool < 1 or args.elements < 0 or any(s < 1 for s in sites):
        parser.error("--repeats, --pool and --sites must be >= 1, --elements >= 0")
    from benchmarks.spsa_step import machine_info

    device = resolve_device(args.device)
    info = machine_info(device)
    rows: list[dict[str, Any]] = []
    stream = None
    if args.elements:
        stream = {**stream_throughput(args.elements, device, args.repeats), **info}
        rows.append(stream)
        print(f"stream throughput measured on {args.elements:,} elements", file=sys.stderr, flush=True)
    replay: list[dict[str, Any]] = []
    if sites:
        with tempfile.TemporaryDirectory(prefix="edgetune-replay-") as tmp:
            replica, numel = make_replica(args.model, args.trainable, str(device), args.store, Path(tmp))
            replay = replay_rows(replica, sites, args.pool, args.repeats, log=sys.stderr)
            for r in replay:
                r.update(
                    {"model": args.model, "trainable": args.trainable, "trainable_numel": numel}
                    | {"store": replica.store_kind}
                    | info
                )
        rows.extend(replay)
    for r in rows:
        r["benchmark"] = "stream_and_replay"
    write_rows(rows, args.out)
    head = (
        f"Perturbation stream and replay: model {args.model}, device {info['device']} ({info['device_name']}), "
        f"{info['cpu_count']} CPUs, {info['torch_threads']} torch threads, torch {info['torch_version']}"
    )
    print(format_tables(stream, replay, head))
    print(f"\n{len(rows)} rows written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
