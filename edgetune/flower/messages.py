"""edgetune payloads <-> Flower records, and what Flower actually serializes.

A payload (``comm/wire.py``) is one byte string. Small ones travel as ``bytes`` in a
ConfigRecord; large ones (weights, factors) as a uint8 Array in an ArrayRecord, which Flower
chunks into 5 MiB objects. ``flower_bytes`` measures a message the way Flower ships it: the
deflated size of every object in its tree (Message, metadata, RecordDict, records, chunks).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

SMALL_KEY = "et"
LARGE_KEY = "etarr"
BLOB_KEY = "p"
ARRAY_THRESHOLD = 4 << 20
NPY_HEADER_MAX = 4096
"""Generous bound on a .npy header (numpy writes 128 bytes for a 1-D uint8 array)."""


class MessageError(ValueError):
    """A Flower message without a well-formed edgetune payload."""


def to_content(blob: bytes) -> RecordDict:
    """Wrap one payload in a RecordDict."""
    if len(blob) < ARRAY_THRESHOLD:
        return RecordDict({SMALL_KEY: ConfigRecord({BLOB_KEY: blob})})
    return RecordDict({LARGE_KEY: ArrayRecord({BLOB_KEY: Array(np.frombuffer(blob, dtype=np.uint8))})})


def from_content(content: RecordDict, *, max_bytes: int) -> bytes:
    """Extract the payload, checking structure and size before copying it."""
    keys = set(content.keys())
    if keys == {SMALL_KEY}:
        record = content.config_records.get(SMALL_KEY)
        if record is None or set(record.keys()) != {BLOB_KEY} or not isinstance(record[BLOB_KEY], bytes):
            raise MessageError(f"message record {SMALL_KEY!r} must hold exactly one bytes field {BLOB_KEY!r}")
        blob = record[BLOB_KEY]
        assert isinstance(blob, bytes)  # checked above; for the type checker
        if len(blob) > max_bytes:
            raise MessageError(f"payload of {len(blob)} bytes exceeds the limit of {max_bytes}")
        return blob
    if keys == {LARGE_KEY}:
        arrays = content.array_records.get(LARGE_KEY)
        if arrays is None or set(arrays.keys()) != {BLOB_KEY}:
            raise MessageError(f"message record {LARGE_KEY!r} must hold exactly one array {BLOB_KEY!r}")
        arr = arrays[BLOB_KEY]
        if arr.stype != "numpy.ndarray":
            raise MessageError(f"payload array must be a numpy.ndarray, got stype {arr.stype!r}")
        if arr.dtype != "uint8":
            raise MessageError(f"payload array must be uint8, got {arr.dtype}")
        n = 1
        for s in arr.shape:
            n *= s
        if len(arr.shape) != 1 or n > max_bytes:
            raise MessageError(f"payload array of shape {arr.shape} exceeds the limit of {max_bytes} bytes")
        # the metadata is only a claim: the .npy data (header + body) must be about as long as it
        # says before numpy parses it, and what it parses to must match it
        if len(arr.data) > n + NPY_HEADER_MAX:
            raise MessageError(f"payload array data of {len(arr.data)} bytes is larger than its shape {arr.shape}")
        try:
            value = arr.numpy()
        except Exception as err:  # numpy raises many types for a corrupt .npy (ValueError, EOFError, ...)
            raise MessageError(f"payload array data is not a valid .npy array: {type(err).__name__}: {err}") from err
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.shape != (n,):
            got = (getattr(value, "dtype", type(value).__name__), getattr(value, "shape", None))
            raise MessageError(f"payload array data is {got}, its metadata says uint8 of shape ({n},)")
        return value.tobytes()
    raise MessageError(f"message content has records {sorted(keys)}, expected {SMALL_KEY!r} or {LARGE_KEY!r}")


def flower_bytes(msg: Message) -> int:
    """Serialized size of a message: deflated bytes of every object Flower would push/pull."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
