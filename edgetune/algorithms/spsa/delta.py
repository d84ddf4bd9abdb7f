"""Model delivery by coefficients: a run-scope pool's fine-tuned model as a delta file.

``edgetune export RUN --delta FILE`` writes a safetensors file with one int64 tensor ``n`` (the S
coefficients) and string metadata: the run id, round, the pool secret, the sparse fraction, the
resolved run configuration (which names the public base model), the full state hash and the
coefficients' own sha256 (a change of one coefficient by one quantum can round away in fp32
weights, so the state hash alone would not see it). Loading it (``load_delta``, ``edgetune eval
FILE``) checks the coefficients' digest, rebuilds theta = theta_0 - q * sum_s n_s z_s from the
base model and refuses the result unless its sha256 equals the recorded one, so the receiver
holds bitwise the server's weights.

The file contains the pool secret: anyone who has it can rebuild the fine-tuned model, exactly
as with a checkpoint. It is written 0600.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune import config as cfgmod
from edgetune.algorithms.spsa import pool as poolmod
from edgetune.algorithms.spsa.replica import Replica, SpaceSpec

FORMAT = "edgetune-spsa-delta-v1"


def write_delta(path: Path, *, cfg: cfgmod.RunConfig, run_id: bytes, replica: Replica, pool_key: bytes) -> int:
    """Write the delta file of ``replica`` (a run-scope pool); return its size in bytes."""
    from safetensors.torch import save_file

    if replica.pool is None:
        raise ValueError("export --delta needs a run-scope seed pool (spsa.pool_scope = 'run', spsa.seed_pool > 0)")
    metadata = {
        "format": FORMAT,
        "run_id": run_id.hex(),
        "round": str(replica.applied),
        "state_sha256": replica.hash,
        "coefficients_sha256": coefficients_sha256(replica.pool.n),
        "manifest": replica.manifest.digest(),
        "pool_key": pool_key.hex(),
        "pool_size": str(replica.pool.size),
        "sparse_frac": repr(replica.space.sparse_frac),
        "quantum": repr(poolmod.POOL_QUANTUM),
        "config": cfgmod.to_toml(cfgmod.flatten(cfg)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        save_file({"n": torch.from_numpy(replica.pool.n.copy())}, str(tmp_path), metadata=metadata)
        tmp_path.chmod(0o600)
        tmp_path.replace(path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path.stat().st_size


def coefficients_sha256(n: np.ndarray) -> str:
    """sha256 of the coefficient vector (little-endian int64)."""
    return hashlib.sha256(np.ascontiguousarray(n, dtype="<i8").tobytes()).hexdigest()


def read_delta(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """The coefficients and metadata of a delta file (``ValueError`` naming the file if it is not one)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            n = f.get_tensor("n")
    except Exception as err:  # safetensors raises several types for a bad file
        raise ValueError(f"{path} is not a readable delta file: {err}") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an edgetune delta file (format {metadata.get('format')!r})")
    if n.dtype != torch.int64 or n.dim() != 1 or n.numel() != int(metadata["pool_size"]):
        raise ValueError(f"{path}: coefficient tensor does not match pool_size")
    if float(metadata["quantum"]) != poolmod.POOL_QUANTUM:
        raise ValueError(f"{path}: written with another coefficient quantum")
    coef = n.numpy().astype(np.int64)
    recorded = metadata.get("coefficients_sha256")
    if recorded is None:
        raise ValueError(f"{path}: records no coefficients_sha256 (an older edgetune wrote it): export it again")
    if coefficients_sha256(coef) != recorded:
        raise ValueError(
            f"{path}: its coefficients hash to {coefficients_sha256(coef)[:16]}, the file records {recorded[:16]} "
            "(a damaged or altered file)"
        )
    return coef, metadata


def load_delta(path: Path, *, workdir: Path | None = None) -> tuple[Any, Any, cfgmod.RunConfig, dict[str, Any]]:
    """Rebuild the fine-tuned model of a delta file from its public base model.

    Returns
    -------
    model, tokenizer, cfg, info
        The model (eval mode, on ``model.device``), its tokenizer, the run's configuration, and
        ``{"round", "state_sha256", "pool_size", "bytes"}``. ``ValueError`` if the rebuilt weights do
        not hash to the recorded state.
    """
    from edgetune.models.load import load_model

    path = Path(path)
    n, meta = read_delta(path)
    cfg = cfgmod.from_run_config(cfgmod.flatten_toml(_toml(meta["config"])))
    model, tokenizer = load_model(cfg.model, seed=cfg.run.seed)
    replica = Replica(model, Path(workdir or tempfile.mkdtemp(prefix="edgetune-delta-")), "host")
    if replica.manifest.digest() != meta["manifest"]:
        raise ValueError(f"{path}: the base model's trainable layout differs from the run's")
    space = SpaceSpec(
        sparse_frac=float(meta["sparse_frac"]),
        pool_size=int(meta["pool_size"]),
        pool_key=bytes.fromhex(meta["pool_key"]),
    )
    run_id = bytes.fromhex(meta["run_id"])
    replica.start_run(run_id, space)
    state = poolmod.PoolState(space.pool_size, int(meta["round"]), n.copy())
    replica.load_pool(state)
    if replica.hash != meta["state_sha256"]:
        raise ValueError(
            f"{path}: rebuilt weights hash to {replica.hash[:16]}, the file records {meta['state_sha256'][:16]} "
            "(another base model, or a damaged file)"
        )
    info = {
        "round": int(meta["round"]),
        "state_sha256": replica.hash,
        "pool_size": space.pool_size,
        "bytes": path.stat().st_size,
    }
    return model, tokenizer, cfg, info


def _toml(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)


def delta_summary(path: Path) -> dict[str, Any]:
    """What a delta file holds, without loading any model (for ``edgetune export`` output)."""
    n, meta = read_delta(path)
    return {
        "round": int(meta["round"]),
        "pool_size": int(meta["pool_size"]),
        "nonzero": int(np.count_nonzero(n)),
        "state_sha256": meta["state_sha256"],
        "bytes": Path(path).stat().st_size,
    }


def export_run_delta(run_dir: Path, out: Path) -> dict[str, Any]:
    """Write the delta file of the last committed round of a run folder (``edgetune export --delta``)."""
    from edgetune.algorithms.spsa.server import space_spec
    from edgetune.build import run_id_for
    from edgetune.federation import committed_state_folder
    from edgetune.io import read_state_json
    from edgetune.models.load import load_model

    run_dir = Path(run_dir)
    config = run_dir / "config.toml"
    if not config.is_file():
        raise ValueError(f"{run_dir} is not a run folder (no config.toml)")
    cfg = cfgmod.from_run_config(cfgmod.load_recipe(config))
    if cfg.algorithm != "spsa" or cfg.spsa.pool_scope != "run":
        raise ValueError(f"{run_dir}: export --delta needs an spsa run with spsa.pool_scope = 'run'")
    state_dir = committed_state_folder(run_dir)  # the state the journal names (its last committed round)
    state_file = state_dir / "spsa.json"
    if not state_file.is_file():
        raise ValueError(f"{run_dir} has no committed server state ({state_file})")
    pool_key = bytes.fromhex(read_state_json(state_file)["pool_key"])
    model, _ = load_model(cfg.model, seed=cfg.run.seed)
    with tempfile.TemporaryDirectory(prefix="edgetune-export-") as tmp:
        replica = Replica(model, Path(tmp), "host")
        run_id = run_id_for(run_dir.name)
        replica.start_run(run_id, space_spec(cfg.spsa, pool_key))
        replica.load(state_dir / "replica", run_id)
        write_delta(out, cfg=cfg, run_id=run_id, replica=replica, pool_key=pool_key)
    return delta_summary(out)
