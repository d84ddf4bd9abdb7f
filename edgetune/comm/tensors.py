"""Tensor codecs: lists of tensors (weights, LoRA factors, updates) <-> one byte string.

The receiver always knows the shapes (from the trainable manifest), so the blob is just the
tensors' encodings back to back, and ``decode_tensors`` checks the total size first, then
decodes, then rejects anything non-finite or above ``max_abs``. Codecs:

* ``fp32``: exact.
* ``fp16``: half the bytes; values beyond fp16's range are refused at encoding (never sent as inf).
* ``bf16``: half the bytes, fp32's range; travels as raw uint16 (a Flower ArrayRecord cannot hold
  bfloat16, so the payload is bytes anyway).
* ``int8-row``: one fp32 scale per row (first dimension; 1-D tensors are one row) + one int8 per
  value, round to nearest: about a quarter of fp32 for matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from edgetune.comm.codecs import CodecError

FP16_MAX = 65504.0


def _rows(shape: Sequence[int]) -> tuple[int, int]:
    numel = math.prod(shape)
    if len(shape) <= 1 or numel == 0:
        return 1, numel
    return shape[0], numel // shape[0]


class TensorCodec(Protocol):
    """Encodes one tensor of a known shape."""

    name: str

    def nbytes(self, shape: Sequence[int]) -> int: ...

    def encode(self, t: torch.Tensor) -> bytes: ...

    def decode(self, blob: bytes, shape: Sequence[int]) -> torch.Tensor: ...


class Fp32:
    """Raw little-endian float32."""

    name = "fp32"

    def nbytes(self, shape: Sequence[int]) -> int:
        return 4 * math.prod(shape)

    def encode(self, t: torch.Tensor) -> bytes:
        return t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()

    def decode(self, blob: bytes, shape: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(blob, dtype="<f4").copy()).view(*shape)


class Fp16:
    """IEEE half precision; encoding refuses values outside fp16's finite range."""

    name = "fp16"

    def nbytes(self, shape: Sequence[int]) -> int:
        return 2 * math.prod(shape)

    def encode(self, t: torch.Tensor) -> bytes:
        x = t.detach().to("cpu", torch.float32)
        if x.numel() and float(x.abs().max()) > FP16_MAX:
            raise ValueError(f"value {float(x.abs().max()):.3g} exceeds fp16's range; use bf16 or fp32")
        return x.to(torch.float16).contiguous().numpy().astype("<f2", copy=False).tobytes()

    def decode(self, blob: bytes, shape: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(blob, dtype="<f2").astype(np.float32)).view(*shape)


class Bf16:
    """bfloat16 carried as its raw 16-bit patterns."""

    name = "bf16"

    def nbytes(self, shape: Sequence[int]) -> int:
        return 2 * math.prod(shape)

    def encode(self, t: torch.Tensor) -> bytes:
        bits = t.detach().to("cpu", torch.float32).to(torch.bfloat16).contiguous().view(torch.int16)
        return bits.numpy().astype("<i2", copy=False).tobytes()

    def decode(self, blob: bytes, shape: Sequence[int]) -> torch.Tensor:
        raw = torch.from_numpy(np.frombuffer(blob, dtype="<i2").copy())
        return raw.view(torch.bfloat16).to(torch.float32).view(*shape)


class Int8Row:
    """Per-row fp32 scale + int8 values (round to nearest)."""

    name = "int8-row"

    def nbytes(self, shape: Sequence[int]) -> int:
        rows, _ = _rows(shape)
        return 4 * rows + math.prod(shape)

    def encode(self, t: torch.Tensor) -> bytes:
        rows, cols = _rows(t.shape)
        x = t.detach().to("cpu", torch.float32).reshape(rows, cols)
        scale = x.abs().amax(dim=1) / 127.0 if cols else torch.zeros(rows)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / safe[:, None]), -127, 127).to(torch.int8)
        return scale.numpy().astype("<f4").tobytes() + q.numpy().tobytes()

    def decode(self, blob: bytes, shape: Sequence[int]) -> torch.Tensor:
        rows, cols = _rows(shape)
        scale = np.frombuffer(blob[: 4 * rows], dtype="<f4")
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise CodecError("int8-row scales must be finite and non-negative")
        q = np.frombuffer(blob[4 * rows :], dtype=np.int8)
        if np.any(q == -128):
            raise CodecError("int8-row code -128 is reserved")
        values = q.reshape(rows, cols).astype(np.float32) * scale[:, None]
        return torch.from_numpy(values).view(*shape)


TENSOR_CODECS: dict[str, TensorCodec] = {c.name: c for c in (Fp32(), Fp16(), Bf16(), Int8Row())}


def encode_tensors(tensors: Sequence[torch.Tensor], codec: str) -> bytes:
    """Encode ``tensors`` back to back with ``codec``.

    Parameters
    ----------
    tensors
        Tensors in manifest order; non-finite values are refused.
    codec
        One of ``TENSOR_CODECS``.

    Returns
    -------
    bytes
        The concatenated encodings.
    """
    if codec not in TENSOR_CODECS:
        raise ValueError(f"unknown tensor codec {codec!r}; expected one of {', '.join(TENSOR_CODECS)}")
    cod = TENSOR_CODECS[codec]
    parts = []
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {i} has non-finite values; refusing to send it")
        parts.append(cod.encode(t))
    return b"".join(parts)


def decode_tensors(
    blob: bytes, shapes: Sequence[Sequence[int]], codec: str, *, max_abs: float = math.inf, where: str = "tensors"
) -> list[torch.Tensor]:
    """Decode tensors of known ``shapes``; size first, then values.

    Parameters
    ----------
    blob
        Output of ``encode_tensors``.
    shapes
        Expected shapes in order (the receiver's manifest).
    codec
        The codec the sender was told to use.
    max_abs
        Largest acceptable absolute value.
    where
        Names the payload in error messages.

    Returns
    -------
    list[torch.Tensor]
        fp32 tensors.
    """
    if codec not in TENSOR_CODECS:
        raise CodecError(f"{where}: unknown tensor codec {codec!r}")
    cod = TENSOR_CODECS[codec]
    sizes = [cod.nbytes(s) for s in shapes]
    if not isinstance(blob, (bytes, bytearray)) or len(blob) != sum(sizes):
        got = len(blob) if isinstance(blob, (bytes, bytearray)) else type(blob).__name__
        raise CodecError(f"{where}: expected {sum(sizes)} bytes of {codec} for {len(shapes)} tensors, got {got}")
    out = []
    pos = 0
    for i, (shape, size) in enumerate(zip(shapes, sizes)):
        t = cod.decode(bytes(blob[pos : pos + size]), shape)
        pos += size
        if not bool(torch.isfinite(t).all()):
            raise CodecError(f"{where}: tensor {i} {tuple(shape)} has non-finite values")
        if t.numel() and float(t.abs().max()) > max_abs:
            raise CodecError(f"{where}: tensor {i} {tuple(shape)} has |value| {float(t.abs().max()):.3g} > {max_abs:g}")
        out.append(t)
    return out
