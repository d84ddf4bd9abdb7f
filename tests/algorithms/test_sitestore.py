"""One per-site store for every algorithm that remembers something between rounds (sitestore.py).

dppf's own copy, deft's residual and spsa's replica are found through ``ClientContext.store``:
one folder lookup (``<state_dir>/<run>/<algorithm>``, refusing anything but a hex run id), one
atomic write path, one pruning of older runs.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms.base import ClientContext
from edgetune.algorithms.sitestore import RoundFiles, SiteStore
from edgetune.io import StorageError

RUN = "ab" * 16


@pytest.mark.parametrize("bad", ["", "ab", "../" + "a" * 16, "A" * 16, "g" * 16, "a" * 65, b"ab" * 8])
def test_store_refuses_a_run_id_that_is_not_hex(tmp_path, bad):
    """A run id comes from a message and names a folder: only 16 to 64 lower-case hex digits pass."""
    store = SiteStore(tmp_path, persistent=True)
    with pytest.raises(ValueError, match="run id"):
        store.run_folder(bad, "dppf")
    assert list(tmp_path.iterdir()) == []


def test_round_files_round_trip_and_refuse_other_layouts(tmp_path):
    """write -> read gives the float32 tensors back; a file of another shape or manifest is refused
    naming the file; a missing round reads as None."""
    # Prepare
    files = SiteStore(tmp_path, persistent=True).round_files(RUN, "deft")
    vec = torch.arange(6, dtype=torch.float64)

    # Execute
    files.write("res", 3, {"v": vec}, {"manifest": "m1"})

    # Assert
    got = files.read("res", 3, {"v": (6,)}, {"manifest": "m1"})
    assert got is not None and got["v"].dtype == torch.float32 and torch.equal(got["v"], vec.float())
    assert files.read("res", 4, {"v": (6,)}) is None
    assert files.rounds("res") == [3] and files.newest_before("res", 4) == 3 and files.newest_before("res", 3) is None
    with pytest.raises(ValueError, match="res-000003.safetensors.*expected float32 \\(7,\\)"):
        files.read("res", 3, {"v": (7,)})
    with pytest.raises(ValueError, match="another trainable manifest"):
        files.read("res", 3, {"v": (6,)}, {"manifest": "m2"})
    assert files.folder == tmp_path / RUN / "deft"


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    """Writes are atomic: when the rename fails (a full disk, a kill), the old round file is intact."""
    # Prepare
    files = RoundFiles(tmp_path / "f")
    files.write("x", 1, {"t": torch.ones(3)})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)

    # Execute
    with pytest.raises(StorageError):
        files.write("x", 1, {"t": torch.zeros(3)})
    monkeypatch.undo()

    # Assert
    got = files.read("x", 1, {"t": (3,)})
    assert got is not None and torch.equal(got["t"], torch.ones(3))
    assert sorted(p.name for p in files.folder.iterdir()) == ["x-000001.safetensors"]


def test_opening_a_run_prunes_older_runs_but_nothing_else(tmp_path):
    """Each site keeps the state of its two most recent runs; other folders (the replay guard) stay."""
    # Prepare
    store = SiteStore(tmp_path, persistent=True)
    (tmp_path / "replay-guard").mkdir()
    runs = [f"{i:02x}" * 16 for i in range(3)]
    for i, run in enumerate(runs[:2]):
        store.run_folder(run, "spsa")
        os.utime(tmp_path / run, (1000 + i, 1000 + i))

    # Execute
    store.run_folder(runs[2], "dppf")

    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*runs[1:], "replay-guard"])


def test_context_store_is_the_state_dir_or_a_process_folder(tmp_path):
    """ClientContext.store: the persistent state_dir when there is one, else the process workdir."""
    ctx = ClientContext("site-0", torch.nn.Linear(1, 1), None, None, tmp_path / "work", state_dir=tmp_path / "st")
    assert ctx.store == SiteStore(tmp_path / "st", persistent=True)
    bare = ClientContext("site-0", torch.nn.Linear(1, 1), None, None, tmp_path / "work")
    assert bare.store == SiteStore(tmp_path / "work" / "sites" / "site-0", persistent=False)


@pytest.mark.parametrize(
    ("algorithm", "overrides", "expected"),
    [
        ("dppf", {"dppf.lam": 0.01}, {"x-000001.safetensors", "x-000002.safetensors"}),
        (
            "deft",
            {"deft.density": 0.05, "model.trainable": "lora"},
            {"res-000001.safetensors", "res-000002.safetensors"},
        ),
        ("spsa", {}, {"replica.json", "master-000001.safetensors"}),
    ],
)
def test_every_stateful_algorithm_keeps_its_site_state_in_the_one_store(tmp_path, algorithm, overrides, expected):
    """After two rounds, each site's per-run state of dppf, deft and spsa lies in
    <state_dir>/<run id>/<algorithm>/ and nowhere else under the site's folder."""
    # Prepare
    flat = {"algorithm": algorithm, "num_rounds": 2, "kavg.lr": 0.05, "kavg.local_steps": 1, **overrides}
    cfg = cfgmod.from_run_config(tiny_flat(**flat))
    server, transport, recorder, evaluate, tokenizer = inproc.build(cfg, 2, run_dir=tmp_path / f"store-{algorithm}")
    from edgetune.federation import run_federation

    # Execute
    run_federation(cfg, server, transport, recorder, evaluate, tokenizer)

    # Assert
    run = server.ctx.run_id.hex()
    for client in transport.clients.values():
        root = client.ctx.state_dir
        held = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        mine = {p for p in held if p.startswith(f"{run}/")}
        assert {p.removeprefix(f"{run}/{algorithm}/") for p in mine} == expected
        assert not any(p.startswith(f"{run}/") and not p.startswith(f"{run}/{algorithm}/") for p in held)
