"""fp32 master copies of the trainable tensors, kept off the accelerator.

SPSA perturbs the model's own weights in place during local steps (inference memory, no
second device copy). The round-start state is the source of truth and lives here: in host RAM
(``HostStore``, for GPU runs) or in a safetensors file read back tensor by tensor with plain
file reads (``DiskStore``, for CPU runs: no second in-RAM copy, and no mmap pages counted in the
process's resident memory). After local steps the work copy is reset from the store, and replay
updates the store one tensor at a time (``replay``).

The hash of a replica is sha256 over the fp32 master bytes in manifest order.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from edgetune.crypto import keystream
from edgetune.io import StorageError, create_exclusive, fsync_dir
from edgetune.models.params import Manifest, tensor_bytes


class MasterStore(Protocol):
    """fp32 tensors addressed by manifest index."""

    def read_into(self, index: int, out: torch.Tensor) -> None: ...

    def begin(self) -> None: ...

    def write(self, index: int, value: torch.Tensor) -> None: ...

    def commit(self) -> None: ...


class HostStore:
    """Master tensors in host memory (pinned when CUDA is in use)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        pin = torch.cuda.is_available()
        self.tensors = []
        for t in tensors:
            host = t.detach().to(device="cpu", dtype=torch.float32).clone()
            self.tensors.append(host.pin_memory() if pin else host)

    def read_into(self, index: int, out: torch.Tensor) -> None:
        out.copy_(self.tensors[index].view_as(out))

    def begin(self) -> None:
        pass

    def write(self, index: int, value: torch.Tensor) -> None:
        self.tensors[index].copy_(value.view_as(self.tensors[index]))

    def commit(self) -> None:
        pass


class DiskStore:
    """Master tensors in a safetensors file (F32), read and written per tensor.

    ``write`` streams the new version into a temp file; ``commit`` fsyncs and renames it, so a
    crash mid-replay leaves the previous round's file intact.
    """

    def __init__(self, path: Path, manifest: Manifest, tensors: Sequence[torch.Tensor] | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        header: dict[str, object] = {}
        offset = 0
        for e in manifest:
            size = 4 * e.numel
            header[e.name] = {"dtype": "F32", "shape": list(e.shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt", "manifest": manifest.digest()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors wants the data 8-byte aligned
        self._prefix = struct.pack("<Q", len(raw)) + raw
        self._offsets = [header[e.name]["data_offsets"][0] + len(self._prefix) for e in manifest]  # type: ignore[index]
        self._tmp: Path | None = None
        self._fd: int | None = None
        if tensors is not None:
            self.begin()
            for i, t in enumerate(tensors):
                self.write(i, t)
            self.commit()
        elif not self.path.is_file():
            raise ValueError(f"master file {self.path} does not exist")

    def read_into(self, index: int, out: torch.Tensor) -> None:
        numel = self.manifest.entries[index].numel
        if out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
            target = out
        else:
            target = torch.empty(numel, dtype=torch.float32)
        view = target.view(torch.uint8).numpy().data.cast("B")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._offsets[index])
            got = f.readinto(view)
        if got != 4 * numel:
            raise StorageError(f"{self.path}: tensor {index} truncated ({got} of {4 * numel} bytes)")
        if target is not out:
            out.copy_(target.view_as(out))

    def begin(self) -> None:
        # a random name created exclusively (never through a link planted at a guessable name)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{secrets.token_hex(8)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = create_exclusive(self._tmp, 0o600)
        os.write(self._fd, self._prefix)

    def write(self, index: int, value: torch.Tensor) -> None:
        assert self._fd is not None, "DiskStore.write outside begin/commit"
        v = value.detach()
        if v.dtype != torch.float32 or v.device.type != "cpu":
            v = v.to(device="cpu", dtype=torch.float32)
        data = tensor_bytes(v)
        os.pwrite(self._fd, data, self._offsets[index])

    def commit(self) -> None:
        assert self._fd is not None and self._tmp is not None
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as err:
            self._tmp.unlink(missing_ok=True)
            raise StorageError(f"could not write {self.path}: {err}") from err


def reset(store: MasterStore, work: Sequence[torch.Tensor]) -> None:
    """Copy the master state into the work tensors (casting to their dtype/device)."""
    for i, w in enumerate(work):
        store.read_into(i, w)


def state_hash(store: MasterStore, manifest: Manifest) -> str:
    """sha256 of the master bytes in manifest order."""
    h = hashlib.sha256()
    for i, e in enumerate(manifest):
        buf = torch.empty(e.shape, dtype=torch.float32)
        store.read_into(i, buf)
        h.update(tensor_bytes(buf))
    return h.hexdigest()


def replay(
    store: MasterStore,
    work: Sequence[torch.Tensor],
    terms: Sequence[tuple[bytes, float]],
    masks: Sequence[torch.Tensor | None] | None = None,
) -> str:
    """Apply ``w -= c * z_key`` for every (key, c) in ``terms``, in order, to the master state,
    tensor by tensor; then refresh the work tensors from it. Returns the new state hash.

    Arithmetic happens in fp32 on the work tensor's device (one fp32 tensor of scratch when the
    work copy is not fp32). Each term is one rounding per element, so the result is the same
    on any device. ``masks`` (one per tensor, or None) restrict z to sparse coordinates.
    """
    h = hashlib.sha256()
    store.begin()
    for i, w in enumerate(work):
        direct = w.dtype == torch.float32 and w.is_contiguous()
        buf = w if direct else torch.empty(w.shape, dtype=torch.float32, device=w.device)
        store.read_into(i, buf)
        if terms:
            keystream.add_many_(buf, i, list(terms), None if masks is None else masks[i])
        h.update(tensor_bytes(buf))
        store.write(i, buf)
        if not direct:
            w.copy_(buf)
    store.commit()
    return h.hexdigest()


def write_all(store: MasterStore, work: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> str:
    """Replace the master state by ``values`` (fp32, host), refresh the work tensors; return the hash."""
    h = hashlib.sha256()
    store.begin()
    for i, (w, v) in enumerate(zip(work, values, strict=True)):
        v = v.detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(tensor_bytes(v))
        store.write(i, v)
        w.copy_(v.view_as(w))
    store.commit()
    return h.hexdigest()
