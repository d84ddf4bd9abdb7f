"""Codecs: everything an algorithm puts on the wire passes through one of these.

Scalar codecs put one projected-gradient scalar in exactly one byte. Both are unbiased inside
the clip [-scale, scale] thanks to stochastic rounding with uniforms from the ``quant`` stream,
and any byte decodes to a finite value with |g| <= scale by construction (a NaN cannot be
sent). Outside the clip values saturate: that bias is the clip, chosen by the server.

* ``int8-sr``: g ~ q * scale / 127 with q in [-127, 127]; code -128 is reserved and rejected.
* ``log8``: sign bit + 7-bit magnitude m, |g| ~ scale * 2**((m - 127) / 8) for m >= 1 and 0 for
  m = 0: a relative grid of 9% steps spanning 2**-15.75 of the clip. Stochastic rounding between
  neighbouring grid values keeps it unbiased.

``sign`` (``sign:B``) puts one projected-gradient scalar in one *bit*: its sign, and one magnitude byte
per block of B local steps (default 16) that every scalar of the block shares (ZO-signSGD's sign
compression, Liu et al. 2019). A site sets a block's magnitude from the block's first step, before it
moves: ``m = sqrt(pi / 2) * RMS(g)`` over that step's P scalars, which makes ``m sign(g)`` an unbiased
projected gradient where g is dominated by the direction's noise (g ~ N(mu, s^2), |mu| << s:
E[sign(g)] = sqrt(2 / pi) mu / s), as it is for zeroth-order probes of many parameters. The magnitude
sits on a 2^(1/8) grid below the clip (code c in 1..255: ``scale * 2^((c - 255) / 8)``, down to 2^-31.75
of the clip; 0: zero), so any byte decodes to a finite value <= the clip; the grid is a table of 8 literal
constants times an exact power of two, so every replica decodes the same float64 bitwise. A scalar that is exactly zero
takes its sign from its keyed uniform (unbiased). Per scalar: 1 + 8 / (B P) bits, about 1.06 with B = 16
and P = 8, against 8 for the byte codecs. Bits pack little-endian after the magnitude bytes; the last
byte's unused bits must be zero.

Every codec is used through ``codec_for(spec)``: a ``RoundCodec`` that sizes, encodes (step by step, as a
site probes) and decodes one site's K x P scalars of a round.
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
"""The one-byte codecs by name."""

SIGN_BLOCK = 16
"""``sign``: local steps per magnitude byte when the spec names none."""
_SIGN_GRID = tuple(
    float.fromhex(h)
    for h in (
        "0x1.0000000000000p+0", "0x1.d5818dcfba487p-1", "0x1.ae89f995ad3adp-1", "0x1.8ace5422aa0dbp-1",
        "0x1.6a09e667f3bcdp-1", "0x1.4bfdad5362a27p-1", "0x1.306fe0a31b715p-1", "0x1.172b83c7d517bp-1",
    )
)  # fmt: skip
"""2^(-r/8) for r = 0..7, as literals: the magnitude grid does not depend on a platform's exp2."""


class StepEncoder(Protocol):
    """Encodes one site's round step by step: ``step`` returns the values the scalars decode to."""

    def step(self, values: np.ndarray, uniforms: np.ndarray) -> np.ndarray: ...

    def blob(self) -> bytes: ...


class RoundCodec(Protocol):
    """One site's K x P scalars of a round: their size on the wire, a step encoder, their decoding."""

    name: str

    def blob_len(self, steps: int, probes: int) -> int: ...

    def encoder(self, scale: float, probes: int) -> StepEncoder: ...

    def decode(self, blob: bytes, steps: int, probes: int, scale: float) -> np.ndarray: ...


class _ByteSteps:
    def __init__(self, codec: ScalarCodec, scale: float) -> None:
        self.codec, self.scale, self.codes = codec, scale, bytearray()

    def step(self, values: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        code = self.codec.encode(values, uniforms, self.scale)
        self.codes += code
        return self.codec.decode(code, len(code), self.scale)

    def blob(self) -> bytes:
        return bytes(self.codes)


class ByteRound:
    """A one-byte codec as a ``RoundCodec``: K*P bytes, each scalar on its own."""

    def __init__(self, codec: ScalarCodec) -> None:
        self.codec, self.name = codec, codec.name

    def blob_len(self, steps: int, probes: int) -> int:
        return steps * probes

    def encoder(self, scale: float, probes: int) -> StepEncoder:
        return _ByteSteps(self.codec, scale)

    def decode(self, blob: bytes, steps: int, probes: int, scale: float) -> np.ndarray:
        return self.codec.decode(blob, steps * probes, scale)


def sign_magnitude(code: int, scale: float) -> float:
    """The magnitude byte ``code`` under clip ``scale``: ``scale * 2^((code - 255) / 8)``, 0 for code 0."""
    if code == 0:
        return 0.0
    down = 255 - code
    return math.ldexp(scale * _SIGN_GRID[down % 8], -(down // 8))


def sign_magnitude_code(target: float, scale: float) -> int:
    """The grid code nearest (in log) to ``target``, at most 255 (the clip); 0 only for a zero target. A
    target below the grid gets the grid's smallest value (code 1), not zero: the server's clip follows the
    sites' magnitudes, and a zero would leave it where it is (a clip 2^32 too large would never shrink).
    """
    if not target > 0:
        return 0
    c = round(255 + 8 * math.log2(min(target, scale) / scale))
    return int(min(max(c, 1), 255))


class _SignSteps:
    def __init__(self, scale: float, probes: int, block: int) -> None:
        self.scale, self.probes, self.block = scale, probes, block
        self.mags, self.k, self.m = bytearray(), 0, 0.0
        self.bits: list[bool] = []

    def step(self, values: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        v = _check_encode_inputs(values, uniforms, self.scale)
        if v.size != self.probes:
            raise ValueError(f"a step has {self.probes} scalars, got {v.size}")
        if self.k % self.block == 0:  # a block starts: its magnitude from this step, before the site moves
            code = sign_magnitude_code(math.sqrt(math.pi / 2 * float(np.mean(v * v))), self.scale)
            self.mags.append(code)
            self.m = sign_magnitude(code, self.scale)
        self.k += 1
        negative = (v < 0) | ((v == 0) & (np.asarray(uniforms, dtype=np.float64) >= 0.5))
        self.bits.extend(bool(b) for b in negative)
        return np.where(negative, -self.m, self.m)

    def blob(self) -> bytes:
        return bytes(self.mags) + np.packbits(np.array(self.bits, dtype=np.uint8), bitorder="little").tobytes()


class SignBlocks:
    """One bit per scalar plus one magnitude byte per ``block`` steps (see the module docstring)."""

    def __init__(self, block: int = SIGN_BLOCK) -> None:
        if not 1 <= block <= 1 << 16:
            raise ValueError(f"sign block must be 1..65536 steps, got {block}")
        self.block = block
        self.name = "sign" if block == SIGN_BLOCK else f"sign:{block}"

    def blob_len(self, steps: int, probes: int) -> int:
        return -(-steps // self.block) + -(-steps * probes // 8)

    def encoder(self, scale: float, probes: int) -> StepEncoder:
        return _SignSteps(scale, probes, self.block)

    def decode(self, blob: bytes, steps: int, probes: int, scale: float) -> np.ndarray:
        n_mag, n = -(-steps // self.block), steps * probes
        size = self.blob_len(steps, probes)
        if isinstance(blob, (bytes, bytearray)) and len(blob) != size:
            raise CodecError(
                f"expected {size} bytes of sign codes for {steps} x {probes} scalars ({n_mag} magnitude bytes + "
                f"{size - n_mag} bytes of sign bits), got {len(blob)} bytes"
            )
        raw = _check_blob(blob, size, scale)
        bits = np.unpackbits(raw[n_mag:], bitorder="little")
        if np.any(bits[n:]):
            raise CodecError("sign codes: the last byte's unused bits must be zero")
        mags = np.array([sign_magnitude(int(c), scale) for c in raw[:n_mag]], dtype=np.float64)
        per_scalar = np.repeat(mags, self.block * probes)[:n]
        return np.where(bits[:n].astype(bool), -per_scalar, per_scalar)


CODEC_NAMES = (*SCALAR_CODECS, "sign")
"""What ``spsa.scalar_codec`` accepts (``sign`` also as ``sign:B``)."""


def codec_for(spec: str) -> RoundCodec:
    """The round codec a plan or a config names: ``int8-sr``, ``log8``, ``sign`` or ``sign:B`` (B steps per
    magnitude byte, 1..65536). Raises ValueError naming the spec otherwise.
    """
    if isinstance(spec, str) and spec in SCALAR_CODECS:
        return ByteRound(SCALAR_CODECS[spec])
    if isinstance(spec, str) and (spec == "sign" or spec.startswith("sign:")):
        block = spec[5:]
        if spec == "sign":
            return SignBlocks()
        if block.isdigit() and block == str(int(block)) and 1 <= int(block) <= 1 << 16:
            return SignBlocks(int(block))
    raise ValueError(f"scalar codec must be int8-sr, log8, sign or sign:B (B = 1..65536 steps), got {spec!r}")


def is_codec(spec: object) -> bool:
    """Whether ``codec_for`` accepts ``spec``."""
    try:
        codec_for(spec)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True
