"""Is a site's copy of the base model the server's? A sha256 over weights and architecture (``model.sha256``).

The fingerprint does not depend on how the files are cut (sharded or not) or where they live, so a
site checks its own copy against the run's plan before it trains (``check_fingerprint``), and
``edgetune fingerprint PATH`` prints the value to compare.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from edgetune.config import ModelSection
from edgetune.models.folders import model_folder, weight_files

_FINGERPRINT_IGNORED_CONFIG = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype"})
"""config.json keys that differ between copies of one model without changing it."""

_FINGERPRINTS: dict[tuple[Any, ...], str] = {}


def _hash_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data.cast("B"))


def folder_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's weights and architecture, independent of how the files are cut.

    Every tensor (name, stored dtype, shape, bytes) in name order, read one at a time from the
    safetensors (or ``pytorch_model*.bin``) files, plus ``config.json`` without the keys that vary
    between copies (``_name_or_path``, ``transformers_version``, ``dtype``). Two copies of one model
    agree whether sharded or not, wherever they live; a re-saved model in another dtype does not.
    """
    files = weight_files(folder)
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
