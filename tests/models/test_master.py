"""Master stores: host and disk copies of the round-start state agree bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from edgetune.crypto import schedule
from edgetune.io import StorageError
from edgetune.models import master
from edgetune.models.params import Entry, Manifest, sha256_tensors


def _state():
    manifest = Manifest((Entry(0, "a", (3, 700)), Entry(1, "b", (33,))))
    tensors = [torch.linspace(-1, 1, 2100).reshape(3, 700), torch.arange(33, dtype=torch.float32) / 7]
    return manifest, tensors


def _terms(n=4):
    return [(schedule.derive(schedule.run_key(1), "test", i), (i + 1) * 1.25e-3) for i in range(n)]


def test_disk_and_host_replay_agree(tmp_path):
    """Replaying the same terms through a DiskStore and a HostStore gives the same hash and weights."""
    manifest, tensors = _state()
    work_d = [t.clone() for t in tensors]
    work_h = [t.clone() for t in tensors]
    disk = master.DiskStore(tmp_path / "m.safetensors", manifest, work_d)
    host = master.HostStore(work_h)
    h_disk = master.replay(disk, work_d, _terms())
    h_host = master.replay(host, work_h, _terms())
    assert h_disk == h_host == sha256_tensors(work_d)
    assert all(torch.equal(a, b) for a, b in zip(work_d, work_h))
    assert master.state_hash(disk, manifest) == h_disk


def test_disk_store_is_a_valid_safetensors_file(tmp_path):
    """The master file loads with safetensors and holds exactly the master values."""
    from safetensors.torch import load_file

    manifest, tensors = _state()
    master.DiskStore(tmp_path / "m.safetensors", manifest, tensors)
    loaded = load_file(tmp_path / "m.safetensors")
    assert torch.equal(loaded["a"], tensors[0]) and torch.equal(loaded["b"], tensors[1])


def test_reset_undoes_local_perturbation(tmp_path):
    """After arbitrary in-place edits of the work copy, reset restores the master exactly."""
    manifest, tensors = _state()
    work = [t.clone() for t in tensors]
    store = master.DiskStore(tmp_path / "m.safetensors", manifest, work)
    for w in work:
        w.add_(0.123).mul_(1.0001)
    master.reset(store, work)
    assert all(torch.equal(a, b) for a, b in zip(work, tensors))


def test_failed_commit_keeps_previous_master(tmp_path, monkeypatch):
    """A replay whose commit fails (disk full) leaves the previous master file loadable and unchanged."""
    manifest, tensors = _state()
    work = [t.clone() for t in tensors]
    store = master.DiskStore(tmp_path / "m.safetensors", manifest, work)
    before = (tmp_path / "m.safetensors").read_bytes()

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StorageError, match="m.safetensors"):
        master.replay(store, work, _terms())
    monkeypatch.undo()
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
