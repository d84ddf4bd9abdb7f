"""Integer lists on the wire: unsigned LEB128 varints and sorted index lists as varint gaps.

deft sends its index lists this way (about one byte per index at 1% density); any algorithm that
sends integers can. Decoding refuses too many values, over-long or non-minimal numbers and
(``decode_indices``) unsorted, repeated or out-of-range indices before anything is allocated.
"""

from __future__ import annotations

import numpy as np

from edgetune.comm.codecs import CodecError

MAX_VARINT_BYTES = 5
"""35 bits: any flat index of a model with fewer than 34 G trainable parameters."""


def encode_varints(values: np.ndarray) -> bytes:
    """Non-negative integers -> unsigned LEB128 varints, back to back.

    Parameters
    ----------
    values
        Integers in [0, 2**35).

    Returns
    -------
    bytes
        1 byte per value below 128, 2 below 16384, ..., at most ``MAX_VARINT_BYTES``.
    """
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size == 0:
        return b""
    if int(v.min()) < 0 or int(v.max()) >= 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError(f"varint values must be in [0, 2**{7 * MAX_VARINT_BYTES})")
    num_bytes = np.ones(v.size, dtype=np.int64)
    for b in range(1, MAX_VARINT_BYTES):
        num_bytes += v >= 1 << (7 * b)
    ends = np.cumsum(num_bytes)
    starts = ends - num_bytes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for b in range(MAX_VARINT_BYTES):
        m = num_bytes > b
        if not m.any():
            break
        low7 = (v[m] >> (7 * b)) & 0x7F
        more = (num_bytes[m] > b + 1).astype(np.int64) << 7
        out[starts[m] + b] = (low7 | more).astype(np.uint8)
    return out.tobytes()


def decode_varints(blob: bytes, *, max_count: int, where: str) -> np.ndarray:
    """Inverse of ``encode_varints``; refuses more than ``max_count`` values before decoding them.

    Parameters
    ----------
    blob
        The encoded integers.
    max_count
        Most values accepted.
    where
        Names the field in error messages.

    Returns
    -------
    np.ndarray
        int64 values.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise CodecError(f"{where}: expected bytes, got {type(blob).__name__}")
    raw = np.frombuffer(bytes(blob), dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = np.flatnonzero(raw < 0x80)
    if last.size > max_count:
        raise CodecError(f"{where}: {last.size} values, at most {max_count} allowed")
    if raw[-1] >= 0x80:
        raise CodecError(f"{where}: ends inside a number")
    first = np.concatenate(([0], last[:-1] + 1))
    lengths = last - first + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise CodecError(f"{where}: a number longer than {MAX_VARINT_BYTES} bytes")
    if np.any((lengths > 1) & (raw[last] == 0)):
        raise CodecError(f"{where}: a number is not minimally encoded")
    shift = 7 * (np.arange(raw.size) - np.repeat(first, lengths))
    return np.add.reduceat((raw & 0x7F).astype(np.int64) << shift, first)


def encode_indices(idx: np.ndarray) -> bytes:
    """Strictly increasing flat indices -> varints of the first index and the differences."""
    v = np.asarray(idx, dtype=np.int64)
    gaps = np.diff(v, prepend=0)
    if v.size and (v[0] < 0 or (gaps[1:] < 1).any()):
        raise ValueError("indices must be non-negative and strictly increasing")
    return encode_varints(gaps)


def decode_indices(blob: bytes, *, dim: int, max_count: int, where: str) -> np.ndarray:
    """Decode ``encode_indices`` and check: at most ``max_count``, strictly increasing, < ``dim``.

    Parameters
    ----------
    blob
        The encoded indices.
    dim
        Length of the flat vector the indices point into.
    max_count
        Most indices accepted.
    where
        Names the payload in error messages.

    Returns
    -------
    np.ndarray
        Sorted, unique int64 indices in [0, dim). An unsorted list cannot be encoded (the
        differences are unsigned); a repeated index is a difference of 0 and is refused.
    """
    gaps = decode_varints(blob, max_count=max_count, where=where)
    if gaps.size > 1 and int(gaps[1:].min()) < 1:
        raise CodecError(f"{where}: indices are not strictly increasing (a repeated index)")
    if gaps.size and int(gaps.max()) >= dim:
        raise CodecError(f"{where}: index out of range (a step of {int(gaps.max())}, dimension {dim})")
    idx = np.cumsum(gaps)
    if idx.size and int(idx[-1]) >= dim:
        raise CodecError(f"{where}: index {int(idx[-1])} out of range (dimension {dim})")
    return idx
