"""Small Hugging Face model folders and caches on disk, built offline from the tiny Llama."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from edgetune.models.tiny import tiny_model_and_tokenizer


def save_tiny_model(folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **save_kwargs) -> Path:
    """``save_pretrained`` of the tiny Llama and its ChatML byte tokenizer into ``folder``."""
    model, tokenizer = tiny_model_and_tokenizer(seed=seed)
    model = model.to(dtype)
    model.config.dtype = dtype
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **save_kwargs)
    tokenizer.save_pretrained(folder)
    return folder


def put_in_hf_cache(cache: Path, model_id: str, source: Path, *, ref: str = "main") -> Path:
    """Lay ``source``'s files out as huggingface_hub's cache does: blobs, refs/<ref>, snapshots/<commit>."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    commit = hashlib.sha1(f"{model_id}@{ref}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot
