"""Assemble a run's pieces from a ``RunConfig``: keys, server half, client halves, evaluator.

Shared by ``inproc.py`` and the Flower apps so both build exactly the same objects.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgetune.algorithms import ALGORITHMS
from edgetune.algorithms.base import ClientContext, ClientHalf, ServerContext, ServerHalf
from edgetune.config import RunConfig
from edgetune.crypto import keys as keymod
from edgetune.data.prompts import TokenizedSet
from edgetune.data.sources import Partitioner, heldout_examples, site_examples
from edgetune.io import private_dir
from edgetune.metrics.eval import evaluate as eval_model
from edgetune.models.fingerprint import check_fingerprint
from edgetune.models.folders import cache_root
from edgetune.models.load import cached_model


def site_name(index: int) -> str:
    """Site id of simulated site ``index`` (matches the demo data's site ids)."""
    return f"site-{index}"


def run_id_for(run_name: str) -> bytes:
    """16-byte run id bound into every envelope and reply (stable across server restarts)."""
    return hashlib.sha256(b"edgetune-run|" + run_name.encode()).digest()[:16]


def keys_dir_for(cfg: RunConfig, run_dir: Path) -> Path:
    """``crypto.keys_dir`` or, when empty (simulation), ``<run_dir>/keys``."""
    return Path(cfg.crypto.keys_dir).expanduser() if cfg.crypto.keys_dir else Path(run_dir) / "keys"


def ensure_sim_keys(cfg: RunConfig, run_dir: Path, site_ids: list[str]) -> Path:
    """Simulation convenience: generate server and site keys into the run folder when no
    ``crypto.keys_dir`` is given (deployments bring keys made by ``edgetune keys``).
    """
    folder = keys_dir_for(cfg, run_dir)
    if cfg.crypto.keys_dir:
        registry = keymod.load_registry(folder)
        missing = sorted(set(site_ids) - set(registry.sites))
        if missing:
            raise ValueError(f"sites {missing} have no keys in {folder}; run `edgetune keys {folder} --add ...`")
        return folder
    if not (folder / "registry.json").exists():
        keymod.generate(folder, site_ids)
    else:
        registry = keymod.load_registry(folder)
        new = sorted(set(site_ids) - set(registry.sites))
        if new:
            keymod.add_sites(folder, new)
    return folder


def build_server(cfg: RunConfig, run_dir: Path, site_ids: list[str]) -> tuple[ServerHalf, Any, Callable]:
    """The server half, the tokenizer, and the held-out evaluator."""
    keys_dir = ensure_sim_keys(cfg, run_dir, site_ids)
    # The server only evaluates and checkpoints: it keeps an unquantised copy whatever sites train on.
    server_model = dataclasses.replace(cfg.model, quantize="none")
    check_fingerprint(server_model, seed=cfg.run.seed, who="the server")
    model, tokenizer = cached_model(server_model, seed=cfg.run.seed)
    ctx = ServerContext(
        run_id=run_id_for(Path(run_dir).name),
        model=model,
        tokenizer=tokenizer,
        workdir=process_workdir(cfg),
        server_keys=keymod.load_server(keys_dir),
        registry=keymod.load_registry(keys_dir),
    )
    server = ALGORITHMS[cfg.algorithm].server_cls(cfg, ctx)
    examples = heldout_examples(cfg, len(site_ids))

    def evaluate(m: Any, accuracy: bool) -> dict[str, float]:
        return eval_model(
            m,
            tokenizer,
            examples,
            batch_size=cfg.eval.batch_size,
            max_length=cfg.data.max_length,
            max_new_tokens=cfg.eval.max_new_tokens,
            accuracy=accuracy,
        )

    return server, tokenizer, evaluate


def process_workdir(cfg: RunConfig) -> Path:
    """Scratch folder of this process (master-weight files of its model replicas).

    Removed when the process exits; folders left by processes that died are removed by the next
    process that asks for one.
    """
    root = cache_root(cfg.model) / "work"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("p*-*"):
        pid = stale.name[1:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"p{os.getpid()}-", dir=root))
    atexit.register(shutil.rmtree, path, True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def flower_partitioner(
    rows: Sequence[Mapping[str, Any]], num_partitions: int, *, method: str, by: str, alpha: float, seed: int
) -> list[list[dict[str, Any]]]:
    """The partitioner simulated sites split a data file with: flwr-datasets' (``edgetune/flower/partition.py``),
    imported on first use, so only a run that splits a data file pays for importing them.
    """
    from edgetune.flower.partition import partition

    return partition(rows, num_partitions, method=method, by=by, alpha=alpha, seed=seed)


def site_state_dir(cfg: RunConfig, site_id: str) -> Path:
    """Persistent folder of one site (``<cache>/sites/<site-id>``)."""
    # private: it holds the site's replica of the model, its replay guard and its residuals
    return private_dir(cache_root(cfg.model) / "sites" / site_id)


def build_client(
    cfg: RunConfig,
    site_id: str,
    site_index: int,
    num_sites: int,
    site_kit: Path,
    *,
    workdir: Path,
    data_path: str = "",
    namespace: str = "",
    partitioner: Partitioner = flower_partitioner,
    state_dir: Path | None = None,
) -> ClientHalf:
    """One site's client half (model shared per process, unless ``namespace`` separates it).

    ``state_dir``: where the site keeps its state between rounds (default ``site_state_dir``;
    portable simulated sites use a folder their Context refills, ``flower/portable.py``).

    ``partitioner`` splits ``data.path`` across simulated sites (``edgetune/data/sources.py``).

    With ``model.sha256`` set, the site's own copy of the base model must have that fingerprint.
    """
    check_fingerprint(cfg.model, seed=cfg.run.seed, who=f"site {site_id}")
    model, tokenizer = cached_model(cfg.model, seed=cfg.run.seed, namespace=namespace)
    examples = site_examples(cfg, site_index, num_sites, data_path, partitioner=partitioner)
    ctx = ClientContext(
        site_id=site_id,
        model=model,
        tokenizer=tokenizer,
        train_set=TokenizedSet(tokenizer, examples, cfg.data.max_length),
        workdir=workdir,
        site_keys=keymod.load_site(site_kit),
        replica_namespace=namespace,
        state_dir=site_state_dir(cfg, site_id) if state_dir is None else state_dir,
    )
    return ALGORITHMS[cfg.algorithm].client_cls(cfg, ctx)
