"""Codecs: everything an algorithm puts on the wire passes through one of these.

Scalar codecs put one projected-gradient scalar in exactly one byte. Both are unbiased inside
the clip [-scale, scale] thanks to stochastic rounding with uniforms from the ``quant`` stream,
and any byte decodes to a finite value with |g| <= scale by construction (a NaN cannot be
sent). Outside the clip values saturate: that bias is the clip, chosen by the server.

* ``int8-sr``: g ~ q * scale / 127 with q in [-127, 127]; code -128 is reserved and rejected.
* ``log8``: sign bit + 7-bit magnitude m, |g| ~ scale * 2**((m - 127) / 8) for m >= 1 and 0 for
  m = 0: a relative grid of 9% steps spanning 2**-15.75 of the clip. Stochastic rounding between
  neighbouring grid values keeps it unbiased.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np


class CodecError(ValueError):
    """Encoded data that does not decode."""


class ScalarCodec(Protocol):
    """One byte per scalar, with a clip ``scale`` chosen by the server for the round."""

    name: str

    def encode(self, values: np.ndarray, uniforms: np.ndarray, scale: float) -> bytes: ...

    def decode(self, blob: bytes, count: int, scale: float) -> np.ndarray: ...


def _check_encode_inputs(values: np.ndarray, uniforms: np.ndarray, scale: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.shape != np.asarray(uniforms).shape:
        raise ValueError(f"{v.shape} values but {np.shape(uniforms)} uniforms")
    if not np.all(np.isfinite(v)):
        raise ValueError("cannot encode non-finite scalars (a loss was NaN or inf)")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be finite and positive, got {scale}")
    return v


def _check_blob(blob: bytes, count: int, scale: float) -> np.ndarray:
    if not isinstance(blob, (bytes, bytearray)):
        raise CodecError(f"scalar codes must be bytes, got {type(blob).__name__}")
    if len(blob) != count:
        raise CodecError(f"expected {count} one-byte scalars, got {len(blob)} bytes")
    if not (scale > 0 and math.isfinite(scale)):
        raise CodecError(f"scale must be finite and positive, got {scale}")
    return np.frombuffer(bytes(blob), dtype=np.uint8)


class Int8SR:
    """Linear int8 code with stochastic rounding (see module docstring)."""

    name = "int8-sr"

    def encode(self, values: np.ndarray, uniforms: np.ndarray, scale: float) -> bytes:
        """Quantise ``values`` (clipped to +-scale) to one byte each.

        Parameters
        ----------
        values
            Scalars, float64.
        uniforms
            Same shape, in [0, 1): the keyed stochastic-rounding draws.
        scale
            Clip; codes cover [-scale, scale] in 255 levels.

        Returns
        -------
        bytes
            One byte per value.
        """
        v = _check_encode_inputs(values, uniforms, scale)
        step = scale / 127.0
        x = np.clip(v, -scale, scale) / step
        q = np.clip(np.floor(x + np.asarray(uniforms, dtype=np.float64)), -127, 127).astype(np.int8)
        return q.tobytes()

    def decode(self, blob: bytes, count: int, scale: float) -> np.ndarray:
        """Decode ``count`` codes to float64 values in [-scale, scale]."""
        raw = _check_blob(blob, count, scale).view(np.int8)
        if np.any(raw == -128):
            raise CodecError("scalar code -128 is reserved (never produced by an honest site)")
        return raw.astype(np.float64) / 127.0 * scale


class Log8:
    """Sign + 7-bit logarithmic magnitude with unbiased stochastic rounding."""

    name = "log8"
    _GRID_STEPS = 8.0

    def _grid(self, scale: float) -> np.ndarray:
        m = np.arange(128, dtype=np.float64)
        grid = scale * np.exp2((m - 127.0) / self._GRID_STEPS)
        grid[0] = 0.0
        return grid

    def encode(self, values: np.ndarray, uniforms: np.ndarray, scale: float) -> bytes:
        """Quantise ``values`` (clipped to +-scale) to one byte each (see ``Int8SR.encode``)."""
        v = _check_encode_inputs(values, uniforms, scale)
        u = np.asarray(uniforms, dtype=np.float64)
        grid = self._grid(scale)
        mag = np.minimum(np.abs(v), scale)
        upper = np.clip(np.searchsorted(grid, mag, side="left"), 1, 127)
        lower = upper - 1
        lo, hi = grid[lower], grid[upper]
        p_up = np.where(hi > lo, (mag - lo) / (hi - lo), 0.0)
        m = np.where(u < p_up, upper, lower).astype(np.uint8)
        sign = (v < 0).astype(np.uint8) << 7
        return (m | sign).astype(np.uint8).tobytes()

    def decode(self, blob: bytes, count: int, scale: float) -> np.ndarray:
        """Decode ``count`` codes to float64 values in [-scale, scale]."""
        raw = _check_blob(blob, count, scale)
        grid = self._grid(scale)
        mag = grid[raw & 0x7F]
        return np.where(raw & 0x80, -mag, mag)


SCALAR_CODECS: dict[str, ScalarCodec] = {"int8-sr": Int8SR(), "log8": Log8()}
