"""Golden numerics: a refactor leaves the final state hash of a fixed short recipe bitwise unchanged.

Every registered algorithm (and a few variants whose code paths a refactor is likely to move: codecs,
LoRA re-splitting, the two-phase DEFT protocol, spsa's run-scope pool and per-site replicas) runs the
recipe below in-process (``inproc.run``: 3 sites, 2 rounds, the in-memory tiny Llama, deterministic
secrets) and must end on the sha256 recorded in ``GOLDEN`` on the code before issue 17's refactor.

Bitwise float results depend on the CPU kernels torch dispatches to and on torch's own kernels, so the
hashes are recorded with the CPU capability and torch version they were computed on; on other hardware
or another torch the test is skipped, saying why (on the recording setup it must match exactly). The
hashes do not depend on the number of torch threads (checked with 1 and 2 when recorded).

A change that is meant to move the numbers (new math, a changed default of one of these sections)
re-records them: ``python tests/test_golden.py`` prints the table, and the commit says why they moved.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import ALGORITHMS

RECORDED_ON = {"cpu_capability": "AVX512", "torch": "2.13"}
"""Where ``GOLDEN`` was computed (``torch.backends.cpu.get_cpu_capability()``, torch major.minor)."""

GOLDEN = {
    "deft": "f759362ddafb5030e0882dd13f477c3d6d8d3db24cbd5050160d3872a972b443",
    "deft/applied-topk": "1d3abb563c87c365637d0c5af95d72d211a4247ebf3786adb39a87d2569fafa0",
    "dppf": "c8e4f3589fc5575502929e448239dcf5799ef4ec9f846d4eee1ba3e166385aac",
    "kavg": "a3138ecf3acc3b7441f636249012ef164293451fa45a03b31666e51120e1945c",
    "kavg/adamw-int8": "419eb38002703e0e0d229d419d0f1b02dd543c6a25675cae1e615b4a054bbc62",
    "lowrank": "7a79f3282887b1758124136c99d6402b473612e2b36ecc78307c496eadedc43b",
    "lowrank/ab-groups": "f8087bef0859e2eaa0d23aadc21d92460d3f75b12e52ef30c3cdb62c75887ac4",
    "spsa": "c39da92fc5a848a71cc0ae7f6b2f7dc7bdb4272d2bd4d6bc6b488bc04c48cdae",
    "spsa/run-pool-separate-replicas": "a9696e13b80f5a9975a3707ccc44113a29fb26b30c7d2e21aa6df6c44884b764",
}
"""Recipe name -> final state hash (``summary["final_state_hash"]``) on the pre-refactor code."""

NUM_SITES = 3
"""Three sites, so kavg's outlier screen (which needs at least three) takes part."""

COMMON: dict[str, Any] = {
    "num_rounds": 2,
    "run.min_sites": 2,
    "run.seed": 0,
    "model.path": "tiny",
    "model.trainable": "all",
    "crypto.deterministic_secrets": True,
    "data.demo_facts": 4,
    "data.batch_size": 4,
    "data.max_length": 64,
    "eval.num_examples": 4,
    "eval.batch_size": 4,
    "eval.max_new_tokens": 2,
}

_LORA = {"model.trainable": "lora", "model.lora_rank": 4, "model.lora_alpha": 8.0, "kavg.optimizer": "adamw"}

RECIPES: dict[str, dict[str, Any]] = {
    "spsa": {"algorithm": "spsa", "spsa.lr": 1e-3, "spsa.num_steps": 2},
    "spsa/run-pool-separate-replicas": {
        "algorithm": "spsa",
        "spsa.lr": 1e-2,
        "spsa.num_steps": 2,
        "spsa.num_probes": 4,
        "spsa.difference": "forward",
        "spsa.seed_pool": 16,
        "spsa.pool_scope": "run",
        "spsa.optimizer": "momentum",
    },
    "kavg": {"algorithm": "kavg", "kavg.lr": 0.05, "kavg.local_steps": 2},
    "kavg/adamw-int8": {
        "algorithm": "kavg",
        "kavg.optimizer": "adamw",
        "kavg.lr": 1e-3,
        "kavg.local_steps": 2,
        "kavg.up_codec": "int8-row",
        "kavg.down_codec": "fp16",
    },
    "lowrank": {**_LORA, "algorithm": "lowrank", "kavg.lr": 1e-2, "kavg.local_steps": 2, "lowrank.mode": "exact"},
    "lowrank/ab-groups": {
        **_LORA,
        "algorithm": "lowrank",
        "kavg.lr": 1e-2,
        "kavg.local_steps": 2,
        "lowrank.mode": "ab-groups",
        "lowrank.refactor_every": 2,
        "lowrank.rebound_rounds": 1,
    },
    "deft": {"algorithm": "deft", "kavg.lr": 0.1, "kavg.local_steps": 2, "deft.density": 0.05},
    "deft/applied-topk": {
        "algorithm": "deft",
        "kavg.lr": 0.1,
        "kavg.local_steps": 1,
        "deft.density": 0.05,
        "deft.selector": "topk",
        "deft.value_codec": "fp16",
        "deft.allocation": "applied",
    },
    "dppf": {"algorithm": "dppf", "kavg.lr": 0.05, "kavg.local_steps": 2, "dppf.alpha": 0.5, "dppf.lam": 0.05},
}

SEPARATE_REPLICAS = {"spsa/run-pool-separate-replicas"}
"""Recipes whose sites each keep their own model copy (each replays the log itself, as in Flower)."""


def _setup() -> dict[str, str]:
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": ".".join(torch.__version__.split(".")[:2]),
    }


def final_hash(name: str, workdir: Path) -> str:
    """Run recipe ``name`` in-process under ``workdir`` (its own model cache and site state) and return the
    final state hash."""
    cfg = cfgmod.from_run_config({**COMMON, **RECIPES[name]})
    # A fresh cache folder: converted models, site state (dppf's copies, deft's residuals, spsa's
    # replicas) of no other run can leak in. The run folder's name keys every stream: keep it fixed.
    os.environ["EDGETUNE_CACHE"] = str(workdir / "cache")
    summary = inproc.run(cfg, NUM_SITES, run_dir=workdir / "golden", separate_replicas=name in SEPARATE_REPLICAS)
    assert summary["rounds_completed"] == COMMON["num_rounds"]
    return str(summary["final_state_hash"])


def test_every_registered_algorithm_has_a_golden_hash():
    """A new algorithm cannot be forgotten: the pinned recipes cover exactly the registry."""
    assert set(RECIPES) == set(GOLDEN)
    assert {name.split("/")[0] for name in GOLDEN} == set(ALGORITHMS)
    assert all(len(h) == 64 for h in GOLDEN.values())


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_final_state_hash_is_bitwise_unchanged(name, tmp_path, monkeypatch):
    """The recipe ends on exactly the recorded hash (on the CPU kernels and torch it was recorded with)."""
    # Prepare
    if _setup() != RECORDED_ON:
        pytest.skip(f"golden hashes were recorded on {RECORDED_ON}; this machine is {_setup()}")
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))  # restored after the test

    # Execute
    got = final_hash(name, tmp_path)

    # Assert
    assert got == GOLDEN[name], f"{name}: the final state hash moved (recorded {GOLDEN[name]}, now {got})"


if __name__ == "__main__":  # re-record: python tests/test_golden.py
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"RECORDED_ON = {_setup()}")
    for recipe in sorted(RECIPES):
        with tempfile.TemporaryDirectory() as d:
            print(f'    "{recipe}": "{final_hash(recipe, Path(d))}",', flush=True)
