"""Evaluate a saved checkpoint (``edgetune eval``): held-out loss and exact-match accuracy.

A checkpoint folder holds either a full model (``config.json`` + safetensors, loadable with
``AutoModelForCausalLM.from_pretrained``) or a peft adapter (``adapter_config.json``), plus the
tokenizer and ``edgetune.json`` (round, state hash). The held-out set is rebuilt from the run's
``config.toml`` (two folders up), or from a recipe.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from edgetune import config as cfgmod
from edgetune.data.sources import heldout_examples
from edgetune.metrics.eval import evaluate
from edgetune.models.load import model_folder, resolve_device
from edgetune.models.params import model_sha256


def _run_config(checkpoint: Path, recipe: Path | None) -> cfgmod.RunConfig:
    if recipe is not None:
        return cfgmod.from_run_config(cfgmod.load_recipe(recipe))
    run_cfg = checkpoint.parent.parent / "config.toml"
    if not run_cfg.is_file():
        raise ValueError(f"{checkpoint} is not inside a run folder (no {run_cfg}); pass --recipe")
    return cfgmod.from_run_config(cfgmod.load_recipe(run_cfg))


def load_checkpoint(checkpoint: Path, cfg: cfgmod.RunConfig) -> tuple[Any, Any]:
    """(model, tokenizer) from a checkpoint folder: a full model or a peft adapter on the base."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.model.device)
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        from edgetune.models.load import load_model

        base, tokenizer = load_model(
            cfgmod.ModelSection(**{**cfg.model.__dict__, "trainable": "all", "quantize": "none"}), seed=cfg.run.seed
        )
        model = PeftModel.from_pretrained(base, str(checkpoint), local_files_only=True)
    elif (checkpoint / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True, dtype=torch.float32)
        tokenizer = None
    else:
        raise ValueError(f"{checkpoint} is not a checkpoint (no config.json or adapter_config.json)")
    if (checkpoint / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    elif tokenizer is None:
        folder = model_folder(cfg.model)
        if folder is None:
            raise ValueError(f"{checkpoint} has no tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def evaluate_checkpoint(
    checkpoint: Path | str,
    *,
    recipe: Path | None = None,
    num_sites: int = 0,
    num_examples: int = 0,
    accuracy: bool = True,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Held-out loss (and accuracy) of ``checkpoint`` on the run's held-out questions
    (``show_progress``: a progress bar over the scored examples).

    ``checkpoint`` is a checkpoint folder, or a delta file of a run-scope spsa pool
    (``edgetune export --delta``), which is rebuilt from its base model and checked against its
    recorded state hash first.
    """
    checkpoint = Path(checkpoint)
    result: dict[str, Any] = {}
    if checkpoint.is_file():
        from edgetune.algorithms.spsa.delta import load_delta

        model, tokenizer, cfg, info = load_delta(checkpoint)
        if recipe is not None:
            cfg = cfgmod.from_run_config(cfgmod.load_recipe(recipe))
        result.update({"round": info["round"], "delta_bytes": info["bytes"], "state_sha256": info["state_sha256"]})
    elif checkpoint.is_dir():
        cfg = _run_config(checkpoint, recipe)
        model, tokenizer = None, None
    else:
        raise ValueError(f"no checkpoint folder or delta file at {checkpoint}")
    if num_examples:
        cfg = cfgmod.from_run_config({**cfgmod.flatten(cfg), "eval.num_examples": num_examples})
    sites = num_sites or cfg.run.num_sites or 4
    if model is None:
        model, tokenizer = load_checkpoint(checkpoint, cfg)
        info_file = checkpoint / "edgetune.json"
        if info_file.is_file():
            result["round"] = json.loads(info_file.read_text()).get("round")
    examples = heldout_examples(cfg, sites)
    from edgetune import progress

    passes = 1
    if accuracy:
        # label accuracy, or greedy answers plus (with mc_choices) the multiple-choice ranking
        free_form_mc = not all(ex.get("choices") for ex in examples) and all(ex.get("mc_choices") for ex in examples)
        passes += 2 if free_form_mc else 1
    total = len(examples) * passes
    with progress.task(f"evaluating {checkpoint.name}", total=total) if show_progress else nullcontext() as bar:
        result.update(
            evaluate(
                model,
                tokenizer,
                examples,
                batch_size=cfg.eval.batch_size,
                max_length=cfg.data.max_length,
                max_new_tokens=cfg.eval.max_new_tokens,
                accuracy=accuracy,
                on_batch=bar.advance if bar is not None else None,
            )
        )
    result["num_examples"] = len(examples)
    result["weights_sha256"] = model_sha256(model)
    return result
