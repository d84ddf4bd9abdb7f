"""GPUs in simulation: fractional ``num-gpus`` reaches Flower's backend config; each simulated
site uses the GPU Flower's backend assigned to it, and the CPU when it was given none."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from flwr.cli.config_utils import parse_config_args
from flwr.simulation.app import _run_simulation_settings
from flwr.supercore.utils import simulation_config_from_json

from edgetune import config as cfgmod
from edgetune.cli import federation_config
from edgetune.flower.client_handler import _run_config
from edgetune.models.load import simulated_site_device


def _backend_config(text: str) -> tuple[int, dict]:
    """What Flower's simulation engine makes of ``--federation-config text`` (its own parsers)."""
    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([text]).items()}
    num, _backend, backend_config, _verbose, _ = _run_simulation_settings(simulation_config_from_json(parsed))
    return num, backend_config


@pytest.mark.parametrize("gpus", [0.25, 0.5, 1.0, 2.0])
def test_fractional_gpus_reach_flowers_backend_config(gpus):
    num, backend = _backend_config(federation_config(8, 1, gpus))
    assert num == 8
    assert backend["client_resources"]["num_cpus"] == 1
    assert math.isclose(backend["client_resources"]["num_gpus"], gpus, rel_tol=1e-6)


def test_no_gpus_requested_leaves_flowers_default():
    _, backend = _backend_config(federation_config(4, 2, 0.0))
    assert "num_gpus" not in backend["client_resources"]
    assert backend["client_resources"]["num_cpus"] == 2


@pytest.mark.parametrize("gpus", [-0.5, 1.5, float("nan"), float("inf")])
def test_bad_gpus_per_site_is_refused_by_name(gpus):
    with pytest.raises(ValueError, match="gpus-per-site"):
        federation_config(4, 1, gpus)
    with pytest.raises(ValueError, match="run.gpus_per_site"):
        cfgmod.from_run_config({"run.gpus_per_site": gpus})


def test_fractional_cpus_are_refused_not_truncated():
    """Flower's num-cpus is an unsigned integer: 0.5 would fail inside flwr run with a vague error."""
    with pytest.raises(ValueError, match="cpus-per-site"):
        federation_config(4, 0.5, 0.25)


def test_recipe_key_round_trips():
    cfg = cfgmod.from_run_config({"run.gpus_per_site": 0.25})
    assert cfg.run.gpus_per_site == 0.25
    assert cfgmod.flatten(cfg)["run.gpus_per_site"] == 0.25


@pytest.mark.parametrize(
    ("spec", "gpus", "cuda", "expected"),
    [
        ("auto", 0.0, False, "cpu"),  # a CPU machine: as before
        ("auto", 0.0, True, "cpu"),  # no GPU reserved: not everyone on cuda:0 by accident
        ("cuda:1", 0.0, True, "cuda:1"),  # an explicit device is the user's choice
        ("auto", 0.25, True, "cuda:0"),  # Ray's CUDA_VISIBLE_DEVICES: the assigned GPU is cuda:0
        ("cuda", 0.5, True, "cuda:0"),
    ],
)
def test_simulated_site_device(spec, gpus, cuda, expected):
    assert simulated_site_device(spec, gpus, cuda) == expected


def test_gpus_reserved_but_no_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="gpus_per_site = 0.25 but this simulated site sees no CUDA"):
        simulated_site_device("auto", 0.25, False)
    with pytest.raises(ValueError, match="must be auto or cuda"):
        simulated_site_device("cpu", 0.5, True)


def test_node_picks_its_device_from_the_run_config():
    sim = SimpleNamespace(
        node_config={"partition-id": 3, "num-partitions": 8},
        run_config={"model.device": "auto", "run.gpus_per_site": 0.25},
    )
    assert _run_config(sim, cuda_visible=True)["model.device"] == "cuda:0"
    sim.run_config = {"model.device": "auto", "run.gpus_per_site": 0.0}
    assert _run_config(sim, cuda_visible=True)["model.device"] == "cpu"
    deployed = SimpleNamespace(
        node_config={"site-id": "plant-a", "kit-dir": "/k", "device": "cuda:0,cuda:1"},
        run_config={"model.device": "auto", "run.gpus_per_site": 0.25},
    )
    assert _run_config(deployed, cuda_visible=True)["model.device"] == "cuda:0,cuda:1"


def test_simulated_site_without_the_servers_disk_is_refused(tmp_path):
    """A site actor on another Ray node would not find its kit under the server's run folder."""
    from edgetune.flower.client_handler import require_local_kit

    (tmp_path / "site-0").mkdir()
    require_local_kit({"site": "site-0", "kit": str(tmp_path / "site-0")})  # present: accepted
    with pytest.raises(ValueError, match="not on this machine.*Ray cluster"):
        require_local_kit({"site": "site-1", "kit": str(tmp_path / "site-1")})
