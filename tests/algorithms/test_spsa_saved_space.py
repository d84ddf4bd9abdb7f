"""A site's saved spsa state is continued only under the perturbation space it was saved in.

Two runs with one run id but other spsa settings (dense, then a run-scope pool; another sparse mask or
optimizer) must not continue each other's saved replica: before this check the pool run's site loaded the
dense run's masters and failed every round ("payload exceeds the limit").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetune.algorithms import spsa
from edgetune.algorithms.spsa import pool as poolmod
from edgetune.algorithms.spsa.replica import Replica, SpaceSpec
from edgetune.models.tiny import tiny_model_and_tokenizer

RUN = bytes(range(16))
SPACES = {
    "dense": SpaceSpec(),
    "sparse": SpaceSpec(sparse_frac=0.5),
    "pool": SpaceSpec(pool_size=8, pool_key=b"k" * 32),
    "pool-momentum": SpaceSpec(pool_size=8, pool_key=b"k" * 32, optimizer=poolmod.OptimizerSpec(kind="momentum")),
    "pool-other-key": SpaceSpec(pool_size=8, pool_key=b"j" * 32),
}


def _saved(tmp_path: Path, space: SpaceSpec) -> Path:
    model, _ = tiny_model_and_tokenizer(seed=0)
    rep = spsa.Replica(model, tmp_path / "work-a", "disk")
    rep.start_run(RUN, space)
    folder = tmp_path / "site"
    rep.save(folder)
    return folder


@pytest.mark.parametrize("saved_in", sorted(SPACES))
def test_saved_state_is_found_only_under_its_own_space(tmp_path, saved_in):
    """Prepare: a replica saved under one space. Assert: saved_round finds it (round 0) under that space
    and reports none (-1) under each other space; load refuses another space naming it."""
    folder = _saved(tmp_path, SPACES[saved_in])
    for name, space in SPACES.items():
        found = Replica.saved_round(folder, RUN, space)
        assert found == (0 if name == saved_in else -1), (saved_in, name)
    other = next(n for n in SPACES if n != saved_in)
    model, _ = tiny_model_and_tokenizer(seed=0)
    rep = spsa.Replica(model, tmp_path / "work-b", "disk")
    rep.start_run(RUN, SPACES[other])
    with pytest.raises(ValueError, match="another perturbation space"):
        rep.load(folder, RUN)


def test_same_space_loads_and_another_run_id_is_not_found(tmp_path):
    """The same space continues (hash checked by load); another run id is never found."""
    folder = _saved(tmp_path, SPACES["dense"])
    model, _ = tiny_model_and_tokenizer(seed=0)
    rep = spsa.Replica(model, tmp_path / "work-b", "disk")
    rep.start_run(RUN, SPACES["dense"])
    rep.load(folder, RUN)
    assert rep.applied == 0 and rep.hash
    assert Replica.saved_round(folder, bytes(16), SPACES["dense"]) == -1


def test_saved_state_of_another_parameter_layout_is_not_found(tmp_path):
    """A run of the same id (a reused run name) that trained other tensors saved this state: saved_round
    reports none (-1) for this replica's layout, and load still refuses it by name."""
    folder = _saved(tmp_path, SPACES["dense"])  # the tiny model with every parameter trainable
    model, _ = tiny_model_and_tokenizer(seed=0)
    for name, param in model.named_parameters():
        param.requires_grad_("layers.1." in name)
    rep = spsa.Replica(model, tmp_path / "work-b", "disk")
    rep.start_run(RUN, SPACES["dense"])
    assert Replica.saved_round(folder, RUN, SPACES["dense"]) == 0  # (without a manifest: found)
    assert Replica.saved_round(folder, RUN, SPACES["dense"], rep.manifest) == -1
    with pytest.raises(ValueError, match="another parameter layout"):
        rep.load(folder, RUN)


def test_reusing_a_run_name_with_another_trainable_set_catches_up_instead_of_failing(tmp_path):
    """Two runs named alike (same run id) on the same site cache, the second training other tensors: the
    second's sites do not load the first's saved replica (every round used to fail with "saved state has
    another parameter layout"); they catch up from the log and every round commits."""
    from conftest import tiny_flat

    from edgetune import config as cfgmod
    from edgetune import inproc

    for i, trainable in enumerate(("all", "layers.1.")):
        cfg = cfgmod.from_run_config(tiny_flat(**{"model.trainable": trainable, "num_rounds": 3}))
        summary = inproc.run(cfg, 2, run_dir=tmp_path / str(i) / "same-name", separate_replicas=True)
        assert summary["rounds_completed"] == 3, trainable
