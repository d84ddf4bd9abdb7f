"""Score a saved checkpoint: held-out loss and accuracy (``edgetune eval``), flatness (``edgetune imv``).

A checkpoint folder holds either a full model (``config.json`` + safetensors, loadable with
``AutoModelForCausalLM.from_pretrained``) or a peft adapter (``adapter_config.json``), plus the
tokenizer and ``edgetune.json`` (round, state hash). The held-out set is rebuilt from the run's
``config.toml`` (two folders up), or from a recipe.

Before evaluating, the weights are checked against the state hash the run recorded next to them
(sha256 of the trainable tensors in manifest order, fp32, as the server computes it): weights changed
after the run are refused, not evaluated. A safetensors file that does not load is named.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from edgetune import config as cfgmod
from edgetune.data.sources import heldout_examples
from edgetune.metrics.eval import evaluate
from edgetune.metrics.imv import imv_examples, model_imv
from edgetune.models.folders import model_folder
from edgetune.models.load import resolve_device
from edgetune.models.params import model_sha256, select_trainable


def checkpoint_config(checkpoint: Path, recipe: Path | None) -> cfgmod.RunConfig:
    """The configuration a checkpoint was trained with: ``recipe`` when given, else its run's ``config.toml``
    (two folders up); ``ValueError`` when the checkpoint is not inside a run folder and no recipe is given.
    """
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
    model: Any
    if cfg.model.trainable.strip() == "label-head":
        return _load_label_head_checkpoint(checkpoint, cfg)
    if cfg.model.trainable.strip() == "token-bias":
        return _load_token_bias_checkpoint(checkpoint, cfg)
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


def _load_label_head_checkpoint(checkpoint: Path, cfg: cfgmod.RunConfig) -> tuple[Any, Any]:
    """A label-head run's checkpoint as the label-head model: the base model plus the checkpoint's delta
    (``label_head.safetensors``), so the state hash covers the delta as the server computed it. The plain
    output layer saved for ``from_pretrained`` must be exactly that model's merged head, else refused.
    """
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from edgetune.models.labelhead import load_label_head, merged_head
    from edgetune.models.load import load_model

    model, tokenizer = load_model(cfgmod.ModelSection(**{**cfg.model.__dict__, "quantize": "none"}), seed=cfg.run.seed)
    load_label_head(checkpoint, model)
    saved = None
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if "lm_head.weight" in f.keys():
                saved = f.get_tensor("lm_head.weight")
    with merged_head(model) as plain, torch.no_grad():
        merged = plain.get_output_embeddings().weight.detach().cpu()
        if saved is None or saved.shape != merged.shape or not torch.equal(saved.to(merged.dtype), merged):
            raise ValueError(
                f"{checkpoint}: its output layer (lm_head.weight) is not the base model's plus its label_head delta: "
                "the checkpoint changed after the run, or the base model differs; refusing to evaluate it"
            )
    if (checkpoint / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _load_token_bias_checkpoint(checkpoint: Path, cfg: cfgmod.RunConfig) -> tuple[Any, Any]:
    """A token-bias run's checkpoint: the recipe's base model plus ``token_bias.safetensors``. The frozen
    weights saved next to it must be that base model's (its output layer is compared), else refused.
    """
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from edgetune.models.load import load_model
    from edgetune.models.tokenbias import load_token_bias, token_bias_of

    model, tokenizer = load_model(cfgmod.ModelSection(**{**cfg.model.__dict__, "quantize": "none"}), seed=cfg.run.seed)
    load_token_bias(checkpoint, model)
    head = token_bias_of(model)
    assert head is not None
    names = ("lm_head.weight", "model.embed_tokens.weight")
    saved = None
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if saved is None and name in f.keys():
                    saved = f.get_tensor(name)
    own = head.weight.detach().cpu()
    if saved is None or saved.shape != own.shape or not torch.equal(saved.to(own.dtype), own):
        raise ValueError(
            f"{checkpoint}: its output layer is not the recipe's base model's (model.path = {cfg.model.path!r}): "
            "a token bias only applies to the model it was trained on; refusing to evaluate it"
        )
    if (checkpoint / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _check_files(checkpoint: Path) -> None:
    """Open every safetensors file's header and index; ``ValueError`` naming the first that does not."""
    from safetensors import safe_open

    for path in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError / ValueError
            raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def _info(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "edgetune.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return info


def verify_state_hash(model: Any, cfg: cfgmod.RunConfig, recorded: str, checkpoint: Path) -> str:
    """Compare the trainable weights with the run's recorded state hash; returns what was checked.

    The hash covers the fp32 master weights; a checkpoint written in another dtype (bfloat16 work
    weights) cannot be compared and is reported as not checked.
    """
    from edgetune.models.params import sha256_tensors, trainable_tensors

    manifest = select_trainable(model, cfg.model.trainable_patterns)
    tensors = trainable_tensors(model, manifest)
    if cfg.model.dtype != "float32":
        return f"not checked: the run's weights are {cfg.model.dtype}, the recorded hash covers fp32 masters"
    got = sha256_tensors(tensors)
    if got != recorded:
        raise ValueError(
            f"{checkpoint}: the weights hash to {got[:16]}..., edgetune.json records {recorded[:16]}... for this "
            "round: the checkpoint changed after the run (tampered or corrupted); refusing to evaluate it"
        )
    return "verified"


def evaluate_checkpoint(
    checkpoint: Path | str,
    *,
    recipe: Path | None = None,
    num_sites: int = 0,
    num_examples: int = 0,
    accuracy: bool = True,
    verify: bool = True,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Held-out loss (and accuracy) of ``checkpoint`` on the run's held-out questions
    (``show_progress``: a progress bar over the scored examples).

    ``checkpoint`` is a checkpoint folder, or a delta file of a run-scope spsa pool
    (``edgetune export --delta``), which is rebuilt from its base model and checked against its
    recorded state hash first. With ``verify`` (the default) a checkpoint folder's weights must match
    the state hash recorded in its ``edgetune.json``.
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
        cfg = checkpoint_config(checkpoint, recipe)
        model, tokenizer = None, None
    else:
        raise ValueError(f"no checkpoint folder or delta file at {checkpoint}")
    if num_examples:
        cfg = cfgmod.from_run_config({**cfgmod.flatten(cfg), "eval.num_examples": num_examples})
    sites = num_sites or cfg.run.num_sites or 4
    if model is None:
        info = _info(checkpoint)
        _check_files(checkpoint)
        try:
            model, tokenizer = load_checkpoint(checkpoint, cfg)
        except ValueError:
            raise
        except Exception as err:  # transformers/peft/safetensors raise many types for a broken folder
            raise ValueError(f"{checkpoint}: the checkpoint does not load ({type(err).__name__}: {err})") from None
        if "round" in info:
            result["round"] = info["round"]
        if verify and isinstance(info.get("state_hash"), str):
            result["state_hash"] = verify_state_hash(model, cfg, info["state_hash"], checkpoint)
        elif verify:
            result["state_hash"] = "not checked: edgetune.json records no state hash"
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


def checkpoint_imv(
    checkpoint: Path | str,
    *,
    recipe: Path | None = None,
    num_sites: int = 0,
    overrides: Mapping[str, Any] | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Valley probe of a saved checkpoint (``edgetune imv CHECKPOINT``), as a JSON-ready dict.

    Parameters
    ----------
    checkpoint
        A checkpoint folder (``runs/<run>/checkpoints/round-NNNN``).
    recipe
        Recipe to read the configuration from, when the checkpoint is not inside a run folder.
    num_sites
        Sites of the run, for the demo held-out set (0: ``run.num_sites`` or 4), as ``edgetune eval``.
    overrides
        Dotted config keys replacing the run's (``{"imv.num_directions": 8, "imv.delta": 0.05}``).
    show_progress
        Show a progress bar over the probe's loss evaluations (``edgetune/progress.py``).

    Returns
    -------
    dict
        ``imv``, ``mean_radius``, ``radii``, ``base_loss``, the probe settings, ``num_loss_evals``,
        ``num_capped``, ``numel``, ``round`` and ``weights_sha256`` (unchanged by the probe).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"no checkpoint folder at {checkpoint}")
    cfg = checkpoint_config(checkpoint, recipe)
    if overrides:
        cfg = cfgmod.from_run_config({**cfgmod.flatten(cfg), **dict(overrides)})
    model, tokenizer = load_checkpoint(checkpoint, cfg)
    # Probe the run's trainable tensors (a loaded checkpoint comes back all-trainable or, as a peft
    # adapter, all-frozen), so the probe moves what training moved.
    select_trainable(model, cfg.model.trainable_patterns)
    examples = imv_examples(cfg, num_sites or cfg.run.num_sites or 4)
    if show_progress:
        from edgetune import progress

        bound = 1 + cfg.imv.num_directions * (11 + cfg.imv.bisect_steps)
        with progress.task("valley probe (loss evaluations, at most)", total=bound) as bar:
            result = model_imv(model, tokenizer, examples, cfg, on_loss_eval=bar.advance)
    else:
        result = model_imv(model, tokenizer, examples, cfg)
    out: dict[str, Any] = {"checkpoint": str(checkpoint)}
    info = checkpoint / "edgetune.json"
    if info.is_file():
        out["round"] = json.loads(info.read_text()).get("round")
    out.update(
        {
            "imv": result.imv,
            "mean_radius": result.mean_radius,
            "radii": result.radii,
            "base_loss": result.base_loss,
            "num_directions": cfg.imv.num_directions,
            "delta": cfg.imv.delta,
            "max_radius": cfg.imv.radius_limit,
            "normalize": cfg.imv.normalize,
            "bisect_steps": cfg.imv.bisect_steps,
            "num_examples": len(examples),
            "num_loss_evals": result.num_loss_evals,
            "num_capped": result.num_capped,
            "numel": result.numel,
            "weights_sha256": model_sha256(model),
        }
    )
    return out
