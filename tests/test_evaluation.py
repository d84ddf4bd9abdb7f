"""`edgetune eval` checks a checkpoint against the state hash its run recorded and names a broken file."""

from __future__ import annotations

import pytest
from conftest import tiny_flat
from safetensors.torch import load_file, save_file

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.evaluation import evaluate_checkpoint


def _checkpoint(tmp_path, **extra):
    flat = tiny_flat(**{"num_rounds": 1, "data.demo_facts": 2, "eval.num_examples": 2, **extra})
    summary = inproc.run(cfgmod.from_run_config(flat), 2, run_dir=tmp_path / "run")
    return tmp_path / "run" / "checkpoints" / "round-0001", summary


@pytest.mark.parametrize("algorithm", ["spsa", "lowrank"])
def test_weights_changed_after_the_run_are_refused(tmp_path, algorithm):
    """The untouched checkpoint (full model or peft adapter) evaluates and reports its hash verified; the
    same checkpoint with one weight changed is refused, naming the folder."""
    extra = {}
    if algorithm == "lowrank":
        extra = {"algorithm": "lowrank", "model.trainable": "lora", "kavg.lr": 1e-2, "kavg.local_steps": 1}
    ckpt, summary = _checkpoint(tmp_path, **extra)
    result = evaluate_checkpoint(ckpt, accuracy=False)
    assert result["state_hash"] == "verified"
    assert abs(result["heldout_loss"] - summary["heldout_loss_last"]) < 1e-6

    weights = next(ckpt.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(k for k in tensors if ("lora_" in k if algorithm == "lowrank" else "q_proj" in k))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{ckpt}: the weights hash to .* changed after the run"):
        evaluate_checkpoint(ckpt, accuracy=False)
    assert "state_hash" not in evaluate_checkpoint(ckpt, accuracy=False, verify=False)


def test_a_truncated_safetensors_file_is_named_not_a_traceback(tmp_path):
    """A checkpoint whose weights file was cut short fails with a ValueError naming that file."""
    ckpt, _ = _checkpoint(tmp_path)
    weights = next(ckpt.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        evaluate_checkpoint(ckpt, accuracy=False)
    weights.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=str(weights)):
        evaluate_checkpoint(ckpt, accuracy=False)
