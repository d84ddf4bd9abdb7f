"""A site's per-run files (dppf's own copy x_i, deft's accumulator and residual) belong to one parameter
layout. Run ids come from run names, which users reuse: a second run of the same name that trains other
tensors must start its sites afresh (as a new site does), not stop every round on the first run's files
(same class as spsa's saved replica, tests/algorithms/test_spsa_saved_space.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms.deft.client import SiteVectors
from edgetune.algorithms.dppf import SiteCopy
from edgetune.algorithms.sitestore import RoundFiles
from edgetune.models.params import manifest_of
from edgetune.models.tiny import tiny_model_and_tokenizer


@pytest.mark.parametrize("algorithm", ["dppf", "deft"])
def test_reusing_a_run_name_with_another_trainable_set_runs(tmp_path, algorithm):
    """The first run leaves every site a file of round 1; the second asks one of three sites per round,
    so the sites first asked in round 2 or later find that file before their own."""
    for i, (trainable, rounds) in enumerate((("all", 1), ("layers.1.", 4))):
        over = {"algorithm": algorithm, "model.trainable": trainable, "num_rounds": rounds}
        if i:
            over["run.sites_per_round"] = 1
        summary = inproc.run(cfgmod.from_run_config(tiny_flat(**over)), 3, run_dir=tmp_path / str(i) / "same-name")
        assert summary["rounds_completed"] == rounds, trainable


def _manifest(trainable: str):
    model, _ = tiny_model_and_tokenizer(seed=0)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable in name)
    return manifest_of(model)


def test_dppf_copy_of_another_layout_is_not_loaded_and_its_own_is(tmp_path):
    files = RoundFiles(tmp_path)
    theirs, ours = _manifest("layers.0."), _manifest("layers.1.")
    SiteCopy(files, theirs).save(3, [torch.ones(e.shape) for e in theirs])
    mine = SiteCopy(files, ours)
    assert mine.load_before(4) is None  # the other run's copy: this site has none
    mine.save(4, [torch.full(e.shape, 2.0) for e in ours])
    loaded = mine.load_before(5)
    assert loaded is not None and all(bool((t == 2.0).all()) for t in loaded)


def test_deft_vectors_of_another_layout_are_not_loaded_and_their_own_are(tmp_path):
    files = RoundFiles(tmp_path)
    SiteVectors(files, 10, layout="theirs").save("res", 2, torch.ones(10))
    assert SiteVectors(files, 10, layout="ours").residual_before(3) is None  # same size, other layout
    files.write("res", 2, {"v": torch.ones(12)})  # a file from before files named their layout, another size
    assert SiteVectors(files, 10, layout="ours").residual_before(3) is None
    files.write("res", 2, {"v": torch.full((10,), 3.0)})  # such a file of this size is still read
    got = SiteVectors(files, 10, layout="ours").residual_before(3)
    assert got is not None and bool((got == 3.0).all())
    SiteVectors(files, 10, layout="ours").save("res", 3, torch.full((10,), 2.0))
    got = SiteVectors(files, 10, layout="ours").residual_before(4)
    assert got is not None and bool((got == 2.0).all())
