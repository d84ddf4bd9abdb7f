"""One site's memory between rounds: a folder per run and algorithm, files written atomically.

A site's rounds may run in different processes (Flower starts a ClientApp per message in some
deployments, and a site restarts after a crash), so what a site keeps between rounds or phases
lives on disk, not in the client object: dppf's own copy x_i, deft's accumulator and residual,
spsa's replica of theta. Every algorithm finds its folder the same way::

    <root>/<run id hex>/<algorithm>/<kind>-<round>.safetensors     (RoundFiles)
    <root>/<run id hex>/<algorithm>/...                             (spsa's replica: its own files)

``root`` is ``ClientContext.state_dir`` (``<cache>/sites/<site>``, outlives the process) or, without
one, a folder in the process workdir (enough within one process). Opening a run's folder removes
the folders of this site's older runs (``io.prune_sibling_runs``: the two most recent stay), so
every run does not leave its copy of the weights behind. Files are written through
``io.atomic_write_bytes`` (temp file, fsync, rename): a kill leaves the old file or the new one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from edgetune.io import RUN_FOLDER, atomic_write_bytes, prune_sibling_runs


@dataclass(frozen=True)
class SiteStore:
    """The per-site store on ``ClientContext.store``."""

    root: Path
    persistent: bool
    """True when ``root`` outlives the process (a ``state_dir``), False for the workdir fallback."""

    def run_folder(self, run: str, algorithm: str) -> Path:
        """``<root>/<run>/<algorithm>``, created; older runs' folders of this site are pruned.

        Raises ``ValueError`` unless ``run`` is a hex run id (it names a folder and comes from a message).
        """
        if not isinstance(run, str) or not RUN_FOLDER.fullmatch(run) or len(run) > 64:
            raise ValueError(f"run id {run!r} is not a hex string of 16 to 64 digits")
        folder = Path(self.root) / run / algorithm
        folder.mkdir(parents=True, exist_ok=True)
        prune_sibling_runs(folder.parent)
        return folder

    def round_files(self, run: str, algorithm: str) -> RoundFiles:
        """The numbered tensor files of ``algorithm`` in run ``run``."""
        return RoundFiles(self.run_folder(run, algorithm))


class RoundFiles:
    """Tensor files numbered by round (``<kind>-<round:06d>.safetensors``) in one run folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, kind: str, round_idx: int) -> Path:
        return self.folder / f"{kind}-{round_idx:06d}.safetensors"

    def rounds(self, kind: str) -> list[int]:
        """Rounds with a ``kind`` file, ascending."""
        if not self.folder.is_dir():
            return []
        found = (re.fullmatch(rf"{re.escape(kind)}-(\d+)\.safetensors", p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def newest_before(self, kind: str, round_idx: int) -> int | None:
        """The newest round below ``round_idx`` with a ``kind`` file (None: none)."""
        return max((r for r in self.rounds(kind) if r < round_idx), default=None)

    def write(
        self, kind: str, round_idx: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None
    ) -> None:
        """Store float32 copies of ``tensors`` (and string ``meta``) atomically."""
        named = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in tensors.items()}
        atomic_write_bytes(self.path(kind, round_idx), safetensors_bytes(named, metadata=dict(meta or {})))

    def metadata(self, kind: str, round_idx: int) -> dict[str, str]:
        """The string metadata a ``write`` stored with the file ({} when it has none)."""
        with safe_open(str(self.path(kind, round_idx)), framework="pt") as f:
            return dict(f.metadata() or {})

    def shapes(self, kind: str, round_idx: int) -> dict[str, tuple[int, ...]]:
        """The stored tensors' shapes, without reading them."""
        with safe_open(str(self.path(kind, round_idx)), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}

    def read(
        self, kind: str, round_idx: int, shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, str] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The tensors of a ``write`` (None: no such file), checked against ``shapes`` and ``meta``.

        Raises ``ValueError`` naming the file when a tensor is missing, has another shape or dtype, or
        a metadata value differs (a file of another model or layout).
        """
        path = self.path(kind, round_idx)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            for key, want in (meta or {}).items():
                if stored.get(key) != want:
                    raise ValueError(f"{path}: stored for another trainable {key}; delete it to start afresh")
            out = {}
            for name, shape in shapes.items():
                if name not in f.keys():
                    raise ValueError(f"{path}: has no tensor {name}")
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(shape) or t.dtype != torch.float32:
                    raise ValueError(f"{path}: {name} is {t.dtype} {tuple(t.shape)}, expected float32 {tuple(shape)}")
                out[name] = t
        return out

    def drop(self, kind: str, keep: Callable[[int], bool] = lambda r: False) -> None:
        """Delete the ``kind`` files of every round ``keep`` does not accept."""
        for r in self.rounds(kind):
            if not keep(r):
                self.path(kind, r).unlink(missing_ok=True)
