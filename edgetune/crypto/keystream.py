"""Portable Rademacher perturbations: ChaCha20 keystream bits -> z in {-1, +1}.

Element ``e`` of manifest tensor ``j`` under probe key ``k`` is bit ``e % 8`` (LSB first) of
byte ``e // 8`` of ``ChaCha20(k, nonce=j)``; bit 1 means z = +1. Only integer operations and
exact {0,1} -> {-1.0, +1.0} lookups are involved, so z is bitwise identical on every CPU ISA,
thread count and GPU (``torch.randn`` is not: it depends on the ISA, the GPU's SM count and
the tensor size). Any chunk can be produced alone (seekable per 512 elements), which is what
lets replay walk tensor by tensor.

``w.add_(z, alpha=a)`` with z = +-1 computes w +- a with one rounding, fused multiply-add or
not, so updates are portable too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from edgetune.crypto.schedule import keystream

CHUNK_ELEMS = 1 << 20
"""Elements per generated chunk (a multiple of 512, the 64-byte ChaCha20 block in bits)."""

_LUTS: dict[tuple[str, torch.dtype], torch.Tensor] = {}
_SCRATCH = threading.local()
"""Per thread: {(device, dtype, chunk): (index buffer, z buffer)}. Per thread, because an spsa site
with several devices (``local.Lane``) perturbs its replicas from several threads at once; shared
buffers on one device (``cpu,cpu``) would be overwritten mid-use."""


def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (str(device), dtype)
    if key not in _LUTS:
        table = [[1.0 if (b >> j) & 1 else -1.0 for j in range(8)] for b in range(256)]
        _LUTS[key] = torch.tensor(table, dtype=dtype, device=device)
    return _LUTS[key]


def bits(key: bytes, index: int, start: int, count: int) -> np.ndarray:
    """Packed bits (uint8, ceil(count / 8) bytes) for elements [start, start + count).

    ``start`` must be a multiple of 512 (one ChaCha20 block of bits).
    """
    if start % 512:
        raise ValueError(f"keystream chunks start at multiples of 512 elements, got {start}")
    n_bytes = (count + 7) // 8
    return np.frombuffer(keystream(key, n_bytes, nonce=index, block=start // 512), dtype=np.uint8)


def tensor_bits(key: bytes, index: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """All packed bits of one tensor as a uint8 tensor on ``device`` (1 bit per element)."""
    packed = bits(key, index, 0, numel)
    return torch.from_numpy(packed.copy()).to(device)


def expand(packed: torch.Tensor, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed bits -> a flat tensor of ``count`` values +-1 (on the bits' device)."""
    lut = _lut(packed.device, dtype)
    return lut.index_select(0, packed.to(torch.int32)).view(-1)[:count]


def rademacher(
    key: bytes, index: int, numel: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The whole z of tensor ``index`` (flat, ``numel`` values +-1)."""
    return expand(tensor_bits(key, index, numel, device), numel, dtype)


def _expand_chunk(packed: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Like ``expand`` but into reused scratch buffers (no allocation per chunk)."""
    n8 = packed.numel()
    key = (str(packed.device), dtype, CHUNK_ELEMS)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    if key not in buffers:
        buffers[key] = (
            torch.empty(CHUNK_ELEMS // 8, dtype=torch.int32, device=packed.device),
            torch.empty(CHUNK_ELEMS // 8, 8, dtype=dtype, device=packed.device),
        )
    idx_buf, z_buf = buffers[key]
    idx = idx_buf[:n8]
    idx.copy_(packed)
    z = z_buf[:n8]
    torch.index_select(_lut(packed.device, dtype), 0, idx, out=z)
    return z.view(-1)[:count]


def add_(
    param: torch.Tensor,
    key: bytes,
    index: int,
    alpha: float,
    packed: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> None:
    """In place: ``param += alpha * z`` for the z of (key, tensor ``index``).

    Works chunk by chunk so the expanded z never exceeds ``CHUNK_ELEMS`` values. ``packed``
    (from ``tensor_bits``) skips keystream generation when the same z is applied again.
    ``mask`` (same shape as ``param``, 0/1 or bool) zeroes z outside it (sparse perturbations);
    z * mask is still in {-1, 0, +1}, so every update keeps its single rounding.
    """
    flat = param.view(-1)
    flat_mask = None if mask is None else mask.view(-1)
    numel = flat.numel()
    for start in range(0, numel, CHUNK_ELEMS):
        stop = min(start + CHUNK_ELEMS, numel)
        if packed is None:
            chunk_bits = torch.from_numpy(bits(key, index, start, stop - start).copy()).to(param.device)
        else:
            chunk_bits = packed[start // 8 : (stop + 7) // 8]
        z = _expand_chunk(chunk_bits, stop - start, param.dtype)
        if flat_mask is not None:
            z = z * flat_mask[start:stop]
        flat[start:stop].add_(z, alpha=alpha)


def add_many_(
    param: torch.Tensor, index: int, terms: list[tuple[bytes, float]], mask: torch.Tensor | None = None
) -> None:
    """In place, in order: ``param -= c * z_key`` ... for each (key, c) in ``terms``.

    The canonical replay kernel: one tensor, every probe of a round in canonical order, each
    applied with its own rounding (``w = fl(w - c)`` or ``fl(w + c)`` per element). ``mask`` as
    in ``add_``.
    """
    flat = param.view(-1)
    flat_mask = None if mask is None else mask.view(-1)
    numel = flat.numel()
    for start in range(0, numel, CHUNK_ELEMS):
        stop = min(start + CHUNK_ELEMS, numel)
        view = flat[start:stop]
        for key, coeff in terms:
            chunk_bits = torch.from_numpy(bits(key, index, start, stop - start).copy()).to(param.device)
            z = _expand_chunk(chunk_bits, stop - start, param.dtype)
            if flat_mask is not None:
                z = z * flat_mask[start:stop]
            view.add_(z, alpha=-coeff)


@dataclass(frozen=True)
class Directions:
    """One probe's packed bits for a list of tensors, back to back in one uint8 tensor: tensor ``i``'s
    ``ceil(numels[i] / 8)`` bytes start at byte ``offsets[i]``. One host-to-device copy per probe
    instead of one per tensor, and what ``add_directions_`` applies across tensors chunk by chunk.
    """

    flat: torch.Tensor
    numels: tuple[int, ...]
    offsets: tuple[int, ...]

    def tensor(self, i: int) -> torch.Tensor:
        """Tensor ``i``'s packed bits (what ``tensor_bits`` gives for it)."""
        return self.flat[self.offsets[i] : self.offsets[i] + (self.numels[i] + 7) // 8]


def directions(key: bytes, numels: Sequence[int], device: torch.device | str = "cpu") -> Directions:
    """The packed bits of tensors 0..n-1 (sizes ``numels``) under ``key``, on ``device``."""
    parts = [bits(key, i, 0, n) for i, n in enumerate(numels)]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in parts])]).astype(np.int64)
    host = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    flat = torch.from_numpy(host).to(device)
    return Directions(flat, tuple(int(n) for n in numels), tuple(int(o) for o in offsets[:-1]))


@lru_cache(maxsize=64)
def _layout(
    numels: tuple[int, ...], offsets: tuple[int, ...], chunk: int
) -> tuple[tuple[int, tuple[tuple[int, int, int, int], ...]], ...]:
    """Per chunk of ``chunk`` bit positions of the concatenated bytes that holds any: its index and the
    pieces of tensors in it, each (tensor, first element, element count, first position inside the chunk).
    """
    chunks: dict[int, list[tuple[int, int, int, int]]] = {}
    for i, (n, off) in enumerate(zip(numels, offsets)):
        pos, done = off * 8, 0  # tensor i's element e sits at bit position off * 8 + e
        while done < n:
            c, inside = divmod(pos + done, chunk)
            take = min(n - done, chunk - inside)
            chunks.setdefault(c, []).append((i, done, take, inside))
            done += take
    return tuple((c, tuple(chunks[c])) for c in sorted(chunks))


def add_directions_(
    params: Sequence[torch.Tensor],
    dirs: Directions,
    alpha: float,
    masks: Sequence[torch.Tensor] | None = None,
    grouped: bool | None = None,
) -> None:
    """In place, for every i: ``params[i] += alpha * z_i``, bitwise what ``add_`` does tensor by tensor
    (the same single-rounding ``w + alpha * z`` per element).

    ``grouped`` (default: on CUDA) expands one chunk of the concatenated bits at a time and adds it
    with one multi-tensor call per chunk: a few kernel launches per chunk instead of three per tensor,
    which is what a small batch on a GPU waits for (on an H200, SmolLM2's attention: a step of 72.8 ms
    became 52.1 ms). On the CPU the per-tensor loop is faster (a pass of 18 against 25-31 ms,
    ``benchmarks/spsa_step.py``), so it stays there. Tensors of several dtypes or devices are applied
    one by one.
    """
    if len(params) != len(dirs.numels) or any(p.numel() != n for p, n in zip(params, dirs.numels)):
        raise ValueError("add_directions_: the tensors do not match the directions' sizes")
    if not params:
        return
    first = params[0]
    if grouped is None:
        grouped = first.device.type == "cuda"
    if not grouped or any(p.dtype != first.dtype or p.device != first.device for p in params):
        for i, w in enumerate(params):
            add_(w, b"", i, alpha, packed=dirs.tensor(i), mask=None if masks is None else masks[i])
        return
    flats = [p.view(-1) for p in params]
    flat_masks = None if masks is None else [m.view(-1) for m in masks]
    n_bytes = dirs.flat.numel()
    for c, pieces in _layout(dirs.numels, dirs.offsets, CHUNK_ELEMS):
        start = c * CHUNK_ELEMS // 8
        stop = min(start + CHUNK_ELEMS // 8, n_bytes)
        z = _expand_chunk(dirs.flat[start:stop], (stop - start) * 8, first.dtype)
        targets = [flats[i][e : e + n] for i, e, n, _ in pieces]
        sources = [z[at : at + n] for _, _, n, at in pieces]
        if flat_masks is not None:
            sources = [src * flat_masks[i][e : e + n] for src, (i, e, n, _) in zip(sources, pieces)]
        torch._foreach_add_(targets, sources, alpha=alpha)
