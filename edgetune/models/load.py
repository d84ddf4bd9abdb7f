"""Load a causal LM and its tokenizer: on the configured device and dtype, with LoRA, QLoRA, checkpointing.

``models/folders.py`` finds the files ``model.path`` names (local only: the embedded SmolLM2, a
folder, a Hugging Face cache id; ``tiny`` is built in memory). Weights load directly in
``model.dtype`` (transformers 5 always materialises them from the meta device, what
``low_cpu_mem_usage=True`` did in 4.x): a bf16 load never holds an fp32 copy. LoRA adapters are
added on top in fp32 (peft's adapter autocast), so trainable factors keep full precision over a
bf16 base. One model per process is kept in ``_CACHE`` because Flower's simulation actors are
long-lived processes that serve many rounds and sites.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import nn

from edgetune.config import ModelSection, device_list
from edgetune.crypto import schedule
from edgetune.models.folders import model_folder
from edgetune.models.params import select_trainable

_CACHE: dict[tuple[Any, ...], tuple[nn.Module, Any]] = {}


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise ``torch.device(spec)``. Of a device
    list (``cuda:0,cuda:1``) the first: the device the model loads on.
    """
    return resolve_devices(spec)[0]


def resolve_devices(spec: str) -> list[torch.device]:
    """Every device ``model.device`` names (one, or a comma-separated list), checked."""
    out = []
    for item in device_list(spec):
        if item == "auto":
            out.append(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            continue
        try:
            dev = torch.device(item)
        except RuntimeError as err:
            raise ValueError(f"model.device: {item!r} is not a device ({err})") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"model.device = {spec!r} but CUDA is not available on this machine")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"model.device: {item} but this machine has {torch.cuda.device_count()} CUDA devices")
        out.append(dev)
    return out


def simulated_site_device(spec: str, gpus_per_site: float, cuda_visible: bool) -> str:
    """The device a simulated site uses, given the GPUs Flower's backend reserved for it.

    Ray gives an actor with ``num_gpus > 0`` its own ``CUDA_VISIBLE_DEVICES``, so inside that
    actor the assigned GPU is ``cuda:0``. With no GPU reserved, ``auto`` means the CPU: otherwise
    every simulated site would land on ``cuda:0`` by accident. An explicit device is kept when no
    GPU is reserved (the user asked for it); with GPUs reserved it must be a GPU.
    """
    devices = device_list(spec)
    if gpus_per_site <= 0:
        return "cpu" if devices == ("auto",) else spec
    if not cuda_visible:
        raise ValueError(
            f"run.gpus_per_site = {gpus_per_site:g} but this simulated site sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); "
            "install a CUDA build of torch or set run.gpus_per_site = 0"
        )
    if any(d not in {"auto", "cuda"} for d in devices):
        raise ValueError(
            f"run.gpus_per_site = {gpus_per_site:g}: a simulated site uses the GPU Flower's backend assigned "
            f"to it, so model.device must be auto or cuda, got {spec!r}"
        )
    return "cuda:0"


def _add_lora(model: nn.Module, cfg: ModelSection, seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; a float alpha works
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_module_list),
        task_type="CAUSAL_LM",
        layers_to_transform=list(cfg.lora_layer_list) if cfg.lora_layer_list else None,
    )
    # peft draws its init from torch's global generator; fork it so the caller's global state is
    # untouched, then overwrite A from the keyed ``init`` stream (B stays zero, as in LoRA).
    # autocast_adapter_dtype keeps the factors fp32 over a bf16/fp16 base (as QLoRA and FlowerTune do).
    with torch.random.fork_rng(devices=[]):
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)
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


def _quantization_config(cfg: ModelSection, device: torch.device) -> Any:
    """The bitsandbytes config for ``model.quantize`` (4-bit NF4 with double quantisation, as QLoRA)."""
    if device.type != "cuda":
        raise ValueError(
            f"model.quantize = {cfg.quantize!r} needs a CUDA device (bitsandbytes); this site runs on {device}: "
            "set model.quantize = 'none' for CPU sites (one site alone: edgetune site --quantize none)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"model.quantize = {cfg.quantize!r} needs bitsandbytes: pip install 'edgetune[gpu]' (or bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if cfg.dtype in {"bfloat16", "auto"} else torch.float16
    if cfg.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def _torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(cfg: ModelSection, *, seed: int = 0) -> tuple[nn.Module, Any]:
    """Load a fresh (model, tokenizer) on ``cfg.device`` in ``cfg.dtype``, eval mode.

    LoRA adapters are added when ``cfg.trainable`` is ``lora`` or ``lora-b``, a label head
    (``models/labelhead.py``) when it is ``label-head``, a logits bias (``models/tokenbias.py``) when it
    is ``token-bias``; only the parameters
    ``cfg.trainable`` names keep ``requires_grad`` (the trainable manifest).
    ``cfg.quantize`` loads 4/8-bit base weights (bitsandbytes, CUDA), ``cfg.gradient_checkpointing``
    turns on activation recomputation for training.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(cfg.device)
    folder = model_folder(cfg)
    model: Any  # a transformers model or peft's wrapper of one: methods the nn.Module stubs do not know
    tokenizer: Any
    if folder is None:
        from edgetune.models.tiny import tiny_model_and_tokenizer

        if cfg.quantize != "none":
            raise ValueError("model.quantize needs a model from files (the in-memory tiny model cannot be quantised)")
        model, tokenizer = tiny_model_and_tokenizer(seed=seed)
        if cfg.dtype not in {"float32", "auto"}:
            model = model.to(dtype=getattr(torch, cfg.dtype))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": _torch_dtype(cfg.dtype)}
        if cfg.quantize != "none":
            kwargs["quantization_config"] = _quantization_config(cfg, device)
            kwargs["device_map"] = {"": device.index if device.index is not None else 0}
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"could not load {folder} as a causal LM: {type(err).__name__}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.quantize != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"model.gradient_checkpointing: {type(model).__name__} does not support it")
        # non-reentrant checkpointing works with frozen inputs (LoRA: the embeddings do not train);
        # transformers 5.x renamed gradient_checkpointing_enable (a deprecated alias now)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.trainable.strip() in {"lora", "lora-b"}:
        model = _add_lora(model, cfg, seed)
    elif cfg.trainable.strip() == "label-head":
        from edgetune.models.labelhead import add_label_head, label_token_ids

        if not cfg.head_labels:
            raise ValueError("model.trainable = 'label-head' needs model.head_labels (the task's labels)")
        add_label_head(model, label_token_ids(tokenizer, cfg.head_label_list, cfg.head_prefix))
    elif cfg.trainable.strip() == "token-bias":
        from edgetune.models.tokenbias import add_token_bias

        add_token_bias(model)
    select_trainable(model, cfg.trainable_patterns)
    if cfg.quantize == "none":
        model = model.to(device=device)
    model.eval()
    return model, tokenizer


def cached_model(cfg: ModelSection, *, seed: int = 0, namespace: str = "") -> tuple[nn.Module, Any]:
    """One (model, tokenizer) per process and (model config, seed, namespace).

    Callers that mutate the weights (SPSA) keep them in a known state themselves
    (``algorithms/spsa/replica.py`` tracks round and hash); ``namespace`` gives a caller its own copy.
    """
    key = (
        cfg.path,
        cfg.revision,
        cfg.dtype,
        cfg.device,
        cfg.trainable,
        cfg.target_modules,
        cfg.lora_rank,
        cfg.lora_alpha,
        cfg.lora_dropout,
        cfg.quantize,
        cfg.gradient_checkpointing,
        cfg.lora_layers,
        cfg.head_labels,
        cfg.head_prefix,
        seed,
        namespace,
    )
    if key not in _CACHE:
        _CACHE[key] = load_model(cfg, seed=seed)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget cached models (tests)."""
    _CACHE.clear()
