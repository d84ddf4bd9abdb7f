"""A checkpoint write that hits a full disk leaves the previous checkpoint loadable and says so."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune.io import StorageError
from edgetune.models.load import load_model
from edgetune.models.params import model_sha256
from edgetune.runs import RunRecorder


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """Round 2's checkpoint fails with ENOSPC half-way: StorageError names the folder, round 1's
    checkpoint still loads bit for bit with AutoModelForCausalLM, and no temp folder is left."""
    from transformers import AutoModelForCausalLM

    cfg = cfgmod.from_run_config(tiny_flat(**{"run.keep_checkpoints": 1}))
    model, tok = load_model(cfg.model)
    recorder = RunRecorder(cfg, tmp_path / "run")
    first = recorder.checkpoint(model, tok, 1, {"state_hash": "h1"})
    before = model_sha256(AutoModelForCausalLM.from_pretrained(first, local_files_only=True, dtype=torch.float32))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    import transformers.modeling_utils as mu

    def failing_save(tensors, filename, metadata=None):
        # safetensors writes natively and reports a full disk as RuntimeError; leave a partial file
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise RuntimeError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", failing_save)
    with pytest.raises(StorageError, match="round-0002"):
        recorder.checkpoint(model, tok, 2, {"state_hash": "h2"})
    monkeypatch.undo()

    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["round-0001"]  # nothing half-written, nothing pruned
    again = AutoModelForCausalLM.from_pretrained(first, local_files_only=True, dtype=torch.float32)
    assert model_sha256(again) == before
