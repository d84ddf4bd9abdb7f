"""Peak memory of loading a model: straight into the requested dtype vs fp32 first.

Usage (from the repository root, or any directory with edgetune installed)::

    python -m benchmarks.model_load [--model smollm2|tiny|PATH|ORG/NAME] [--out benchmarks/results/model_load.json]

Each variant loads the model in a fresh subprocess (peak RSS is a process-lifetime maximum), then runs
one forward pass, so every weight has been read (safetensors maps files lazily: a load alone touches
only part of them). It reports the process's peak resident memory (``VmHWM`` on Linux, see
``spsa_step.peak_rss_mib``) after its imports, after the load and after the forward pass:

``fp32``
    ``model.dtype = "float32"``: edgetune's load (``models/load.py``).
``bf16``
    ``model.dtype = "bfloat16"``: loaded straight in bf16. For SmolLM2 that reads the bf16 copy of the
    converted folder (made once, like the GGUF conversion, and not measured), as a hub checkpoint
    stored in bf16 would be read.
``bf16-from-fp32-file``
    ``model.dtype = "bfloat16"`` from a folder stored in fp32 (the fp32 SmolLM2 folder given as a path):
    transformers maps the fp32 file while it builds the bf16 weights.
``bf16-via-fp32``
    What edgetune did before: load in fp32, then ``model.to(bfloat16)``.

Bytes, not seconds: a shared CPU does not change them. Goal: ``bf16`` peak below ``fp32`` peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = ("fp32", "bf16", "bf16-from-fp32-file", "bf16-via-fp32")

CHILD = r"""
import json, sys
from benchmarks.spsa_step import peak_rss_mib
import torch, transformers  # the imports every variant pays, measured before the load
from edgetune.config import ModelSection
from edgetune.models.folders import model_folder
from edgetune.models.load import load_model
model_path, variant = sys.argv[1], sys.argv[2]
dtype = {"fp32": "float32", "bf16": "bfloat16", "bf16-from-fp32-file": "bfloat16", "bf16-via-fp32": "float32"}[variant]
if variant == "bf16-from-fp32-file":
    model_path = str(model_folder(ModelSection(path=model_path)))
folder = model_folder(ModelSection(path=model_path, dtype=dtype))  # made by PREPARE: no conversion here
before, metric = peak_rss_mib()
model, tok = load_model(ModelSection(path=model_path, dtype=dtype, device="cpu", trainable="all"))
if variant == "bf16-via-fp32":
    model = model.to(torch.bfloat16)
loaded, _ = peak_rss_mib()
with torch.no_grad():
    model(**tok(["The press shows alarm E-4217."], return_tensors="pt"))
after, _ = peak_rss_mib()
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"variant": variant, "import_peak_mib": before, "load_peak_mib": loaded, "peak_mib": after,
                  "load_mib": after - before, "weights_mib": weights, "metric": metric,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "folder": folder.name if folder is not None else "(in memory)"}))
"""


PREPARE = r"""
import sys
from edgetune.config import ModelSection
from edgetune.models.folders import model_folder
for dtype in ("float32", "bfloat16"):  # one-time conversions (GGUF -> fp32, fp32 -> bf16), not part of a load
    model_folder(ModelSection(path=sys.argv[1], dtype=dtype))
"""


def prepare(model: str) -> None:
    """Make the cached folders every variant reads, in a process of their own (their peak is not a load's)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", PREPARE, model], capture_output=True, text=True, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"preparing {model}: {out.stderr[-2000:]}")


def measure(model: str, variant: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, variant], capture_output=True, text=True, cwd=root, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{variant}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model_load.json"))
    args = parser.parse_args(argv)
    # the in-memory tiny model has no file to read in another dtype
    variants = [v for v in VARIANTS if not (args.model == "tiny" and v == "bf16-from-fp32-file")]
    prepare(args.model)
    rows = [{"model": args.model, **measure(args.model, v)} for v in variants]
    fp32 = next(r for r in rows if r["variant"] == "fp32")
    print(
        f"{'variant':<20} {'dtype':<9} {'after load':>10} {'peak MiB':>9} {'model MiB':>10} {'weights MiB':>12}"
        f" {'peak / fp32':>12}"
    )
    for r in rows:
        r["peak_vs_fp32"] = r["peak_mib"] / fp32["peak_mib"]
        r["load_vs_fp32"] = r["load_mib"] / fp32["load_mib"]
        print(
            f"{r['variant']:<20} {r['dtype']:<9} {r['load_peak_mib']:>10.0f} {r['peak_mib']:>9.0f} "
            f"{r['load_mib']:>10.0f} {r['weights_mib']:>12.0f} {r['peak_vs_fp32']:>12.3f}"
        )
    print("(peak: VmHWM after imports, load and one forward pass; model: peak minus the imports' peak)")
    bf16 = next(r for r in rows if r["variant"] == "bf16")
    print(f"bf16 peak below fp32 peak: {bf16['peak_mib'] < fp32['peak_mib']} ({bf16['peak_vs_fp32']:.3f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if bf16["peak_mib"] < fp32["peak_mib"] else 1


if __name__ == "__main__":
    sys.exit(main())
