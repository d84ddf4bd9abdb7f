"""Multi-node simulation: `edgetune simulate --ray-address` on a Ray cluster of two nodes on this machine.

A second Ray node (``ray.cluster_utils.Cluster``, its own raylet and object store) stands in for a second
host. Each node gives its workers another ``EDGETUNE_CACHE`` and ``TMPDIR``, and sites are told no path
on the server's disk, so a site that read its kit or its state from a shared disk would fail or diverge:
the runs must finish with the state hash of the in-process engine (every replica bitwise the same), with
site actors on both nodes and no site state under any node's cache (``flower/portable.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITES = 3  # more sites than the cluster's two single-CPU actors: sites move between actors and nodes
ROUNDS = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    tmp = tmp_path_factory.mktemp("ray")
    nodes = {}
    for name in ("node-a", "node-b"):
        (tmp / name / "tmp").mkdir(parents=True)
        nodes[name] = {"EDGETUNE_CACHE": str(tmp / name / "cache"), "TMPDIR": str(tmp / name / "tmp")}
    small = {"num_cpus": 1, "object_store_memory": 100 << 20}
    c = cluster_utils.Cluster(
        initialize_head=True, head_node_args={**small, "include_dashboard": False, "env_vars": nodes["node-a"]}
    )
    c.add_node(**small, env_vars=nodes["node-b"])
    c.wait_for_nodes()
    yield c.address, tmp
    c.shutdown()


def _overrides(tmp: Path, algorithm: str) -> list[str]:
    return [
        f"run.dir={tmp / 'runs' / algorithm}",
        f"run.name=cluster-{algorithm}",  # the run id keys the streams: the same name, the same run
        f"run.min_sites={SITES}",
        "crypto.deterministic_secrets=true",
        f"num_rounds={ROUNDS}",
    ]


def _run(module: str, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repository root, output captured."""
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _last(run_root: Path) -> dict:
    (metrics,) = run_root.glob("*/metrics.jsonl")
    return json.loads(metrics.read_text().splitlines()[-1])


@pytest.mark.parametrize("recipe", ["recipes/spsa/tiny-4c.toml", "recipes/dppf/tiny-4c.toml"])
def test_sites_on_two_nodes_reach_the_in_process_state(cluster, recipe, tmp_path):
    address, nodes = cluster
    algorithm = recipe.split("/")[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDGETUNE_CACHE": str(tmp_path / "server"), "COLUMNS": "160"}
    env.pop("RAY_ADDRESS", None)
    sets = [a for o in _overrides(tmp_path / "ray", algorithm) for a in ("--set", o)]
    out = _run("edgetune.cli", ["simulate", recipe, "--sites", str(SITES), "--ray-address", address, *sets], env, 1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "sites get their kits and keep their state through the run" in out.stdout
    ref = _run(
        "edgetune.inproc", [recipe, *_overrides(tmp_path / "inproc", algorithm), "--sites", str(SITES)], env, 600
    )
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    got, want = _last(tmp_path / "ray" / "runs" / algorithm), _last(tmp_path / "inproc" / "runs" / algorithm)
    assert got["round"] == want["round"] == ROUNDS and got["num_accepted"] == SITES
    assert got["state_hash"] == want["state_hash"]
    for node in ("node-a", "node-b"):
        cache = nodes / node / "cache"
        assert (cache / "work").is_dir(), f"no site actor ran on {node}"
        assert not (cache / "sites").exists(), f"site state was kept on {node}'s disk"


def test_a_cluster_without_portable_sites_is_refused(cluster, tmp_path):
    address, _ = cluster
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDGETUNE_CACHE": str(tmp_path / "server")}
    args = ["simulate", "recipes/spsa/tiny-4c.toml", "--sites", "3", "--ray-address", address]
    out = _run(
        "edgetune.cli", [*args, "--set", "run.portable_sites=false", "--set", f"run.dir={tmp_path / 'runs'}"], env, 300
    )
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 1 and "run.portable_sites" in text and address in text
    assert not any((tmp_path / "runs").glob("*/metrics.jsonl"))
