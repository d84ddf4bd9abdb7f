"""Centralised references on pooled data: first-order LoRA (AdamW) and MeZO, no federation, no bytes.

Usage (from the repository root)::

    python -m benchmarks.central_refs --kind lora|mezo [--recipe recipes/spsa/smollm2-135m-4c.toml]
        [--sites 4] [--steps 60] [--eval-every 10] [--out FILE]

Both train on the union of the sites' training examples of a recipe's data (the same examples the
federation's sites hold) and evaluate with the recipe's held-out set and metrics, so they are the
"what if all the data were in one place" lines of ``benchmarks/quality_per_byte.py``:

lora
    LoRA (the recipe's rank on ``q_proj,v_proj``), AdamW lr 1e-3, batch ``data.batch_size``, one
    optimizer step per batch. Cost per step: one forward and one backward pass, counted as 3
    forward-pass equivalents (the usual backward = 2 forwards).
mezo
    MeZO (Malladi et al. 2023) as its paper runs it: every parameter perturbed, central differences,
    one probe per step, eps 1e-3, lr 1e-6, batch ``data.batch_size``; 2 forward passes per step. The
    perturbations come from edgetune's keyed stream (``crypto/keystream.py``), not a global RNG.

Each evaluation records (step, forward-pass equivalents so far, wall seconds of training so far,
held-out loss, accuracy). Output: one JSON row with the curve.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edgetune import config as cfgmod
from edgetune.build import flower_partitioner
from edgetune.crypto import keystream, schedule
from edgetune.data.prompts import TokenizedSet, batch_indices
from edgetune.data.sources import heldout_examples, site_examples
from edgetune.metrics.eval import evaluate
from edgetune.models.load import load_model
from edgetune.models.loss import answer_loss
from edgetune.models.params import manifest_of, trainable_tensors

KINDS = ("lora", "mezo")
MEZO_EPS = 1e-3
MEZO_LR = 1e-6
LORA_LR = 1e-3


def _cfg(recipe: Path, overrides: Sequence[str]) -> cfgmod.RunConfig:
    return cfgmod.from_run_config(cfgmod.load_recipe(recipe, list(overrides)))


def run_central(
    kind: str, recipe: Path, *, sites: int, steps: int, eval_every: int, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Train centrally on the pooled site data; return a row with the curve."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = _cfg(recipe, overrides)
    # LoRA: the usual targets with A and B trained (the recipe may name another space for spsa);
    # MeZO: every parameter
    space = {"trainable": "lora", "target_modules": "q_proj,v_proj"} if kind == "lora" else {"trainable": "all"}
    model_cfg = cfgmod.ModelSection(**{**cfg.model.__dict__, **space, "lora_layers": ""})
    model, tok = load_model(model_cfg, seed=cfg.run.seed)
    pooled = [ex for i in range(sites) for ex in site_examples(cfg, i, sites, partitioner=flower_partitioner)]
    train = TokenizedSet(tok, pooled, cfg.data.max_length)
    held = heldout_examples(cfg, sites)
    work = trainable_tensors(model, manifest_of(model))
    params = [p for p in model.parameters() if p.requires_grad]  # the optimizer needs the Parameters
    opt = torch.optim.AdamW(params, lr=LORA_LR, weight_decay=0.0) if kind == "lora" else None
    key = schedule.derive(schedule.run_key(cfg.run.seed), "data", "central-reference", kind)
    pert = schedule.derive(schedule.run_key(cfg.run.seed), "test", "central-mezo")
    curve: list[dict[str, Any]] = []
    forwards, train_s = 0.0, 0.0

    def record(step: int) -> None:
        ev = evaluate(
            model,
            tok,
            held,
            batch_size=cfg.eval.batch_size,
            max_length=cfg.data.max_length,
            max_new_tokens=cfg.eval.max_new_tokens,
            accuracy=True,
        )
        curve.append({"step": step, "forwards": forwards, "train_s": train_s, **ev})
        print(f"{kind} step {step}: {ev} ({forwards:.0f} forwards, {train_s:.0f} s)", flush=True)

    record(0)
    for step in range(1, steps + 1):
        batch = train.batch(batch_indices(len(train), cfg.data.batch_size, schedule.derive(key, "data", step)))
        t0 = time.perf_counter()
        if kind == "lora":
            model.train()
            loss = answer_loss(model, batch)
            loss.backward()
            assert opt is not None
            opt.step()
            opt.zero_grad()
            model.eval()
            forwards += 3
        else:
            z_key = schedule.derive(pert, "test", step)
            with torch.no_grad():
                for i, w in enumerate(work):
                    keystream.add_(w, z_key, i, MEZO_EPS)
                plus = float(answer_loss(model, batch))
                for i, w in enumerate(work):
                    keystream.add_(w, z_key, i, -2 * MEZO_EPS)
                minus = float(answer_loss(model, batch))
                g = (plus - minus) / (2 * MEZO_EPS)
                for i, w in enumerate(work):
                    keystream.add_(w, z_key, i, MEZO_EPS - MEZO_LR * g)
            forwards += 2
        train_s += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            record(step)
    return {
        "benchmark": "central_refs",
        "algorithm": f"central-{kind}",
        "recipe": str(recipe),
        "overrides": list(overrides),
        "sites_pooled": sites,
        "steps": steps,
        "examples": len(pooled),
        "curve": curve,
        "ok": True,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.central_refs", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/spsa/smollm2-135m-4c.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    row = run_central(
        args.kind, args.recipe, sites=args.sites, steps=args.steps, eval_every=args.eval_every, overrides=args.overrides
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
