"""The application payload format: one byte string per message, counted by the ledger.

A payload is a flat ``dict[str, bytes | int | float | str | bool]`` (the shape of a Flower
ConfigRecord, without Flower). ``encode`` turns it into one compact byte string; that string is
what Flower carries and what ``comm/ledger.py`` counts, so the bytes on the ledger are the bytes
on the wire, not an estimate.

Layout (all integers unsigned LEB128 varints unless stated)::

    b"ET" version(1) count  then, per entry in sorted key order:
    key_len key(utf-8) type(1) value
    type b"b" bytes: len + data     type b"s" str: len + utf-8
    type b"i" int: zigzag varint    type b"f" float: 8 bytes IEEE-754 little-endian
    type b"t" bool: 1 byte 0/1

``decode`` checks the size before parsing anything and rejects trailing bytes, duplicate or
unsorted keys, bad UTF-8 and unknown types, so a malformed payload never reaches an algorithm.
"""

from __future__ import annotations

import math
import struct
from typing import Any

Payload = dict[str, Any]

MAGIC = b"ET\x01"
MAX_KEY_BYTES = 64
MAX_ENTRIES = 255


class WireError(ValueError):
    """A payload that does not parse, or lacks what the receiver needs."""


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(blob: bytes, pos: int) -> tuple[int, int]:
    n = 0
    shift = 0
    while True:
        if pos >= len(blob):
            raise WireError("payload ends inside a number")
        byte = blob[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and shift:
                raise WireError("payload number is not minimally encoded")
            return n, pos
        shift += 7
        if shift > 70:
            raise WireError("payload number is too long")


def encode(payload: Payload) -> bytes:
    """Encode ``payload`` (see the module docstring for the layout).

    Parameters
    ----------
    payload
        Flat mapping of short string keys to bytes, int, float, str or bool.

    Returns
    -------
    bytes
        The wire form.
    """
    if len(payload) > MAX_ENTRIES:
        raise ValueError(f"payload has {len(payload)} entries, at most {MAX_ENTRIES}")
    out = bytearray(MAGIC)
    out += _varint(len(payload))
    for key in sorted(payload):
        kb = key.encode()
        if not kb or len(kb) > MAX_KEY_BYTES:
            raise ValueError(f"payload key {key!r} must have 1..{MAX_KEY_BYTES} bytes")
        out += _varint(len(kb)) + kb
        value = payload[key]
        if isinstance(value, bool):
            out += b"t" + (b"\x01" if value else b"\x00")
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise ValueError(f"payload int {key!r} is outside int64")
            zig = (value << 1) if value >= 0 else ((-value) << 1) - 1
            out += b"i" + _varint(zig)
        elif isinstance(value, float):
            out += b"f" + struct.pack("<d", value)
        elif isinstance(value, str):
            sb = value.encode()
            out += b"s" + _varint(len(sb)) + sb
        elif isinstance(value, (bytes, bytearray, memoryview)):
            bb = bytes(value)
            out += b"b" + _varint(len(bb)) + bb
        else:
            raise ValueError(f"payload value for {key!r} has unsupported type {type(value).__name__}")
    return bytes(out)


def decode(blob: bytes, *, max_bytes: int) -> Payload:
    """Decode a payload, checking its size first.

    Parameters
    ----------
    blob
        The wire form.
    max_bytes
        Largest acceptable payload; larger ones are rejected before parsing.

    Returns
    -------
    Payload
        The decoded mapping.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise WireError(f"payload must be bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise WireError(f"payload of {len(blob)} bytes exceeds the limit of {max_bytes}")
    if len(blob) < len(MAGIC) + 1 or blob[: len(MAGIC)] != MAGIC:
        raise WireError("payload does not start with the edgetune header")
    blob = bytes(blob)
    count, pos = _read_varint(blob, len(MAGIC))
    if count > MAX_ENTRIES:
        raise WireError(f"payload claims {count} entries, at most {MAX_ENTRIES}")
    out: Payload = {}
    previous = b""
    for _ in range(count):
        klen, pos = _read_varint(blob, pos)
        if not 0 < klen <= MAX_KEY_BYTES or pos + klen > len(blob):
            raise WireError("payload key length out of range")
        kb = blob[pos : pos + klen]
        pos += klen
        if kb <= previous:
            raise WireError("payload keys are duplicated or out of order")
        previous = kb
        try:
            key = kb.decode()
        except UnicodeDecodeError as err:
            raise WireError("payload key is not UTF-8") from err
        if pos >= len(blob):
            raise WireError(f"payload ends before the value of {key!r}")
        kind = blob[pos : pos + 1]
        pos += 1
        value: Any
        if kind == b"t":
            if pos >= len(blob) or blob[pos] not in (0, 1):
                raise WireError(f"payload bool {key!r} is malformed")
            value = blob[pos] == 1
            pos += 1
        elif kind == b"i":
            zig, pos = _read_varint(blob, pos)
            value = (zig >> 1) if not zig & 1 else -((zig + 1) >> 1)
            if not -(1 << 63) <= value < (1 << 63):
                raise WireError(f"payload int {key!r} is outside int64")
        elif kind == b"f":
            if pos + 8 > len(blob):
                raise WireError(f"payload float {key!r} is truncated")
            value = struct.unpack("<d", blob[pos : pos + 8])[0]
            pos += 8
        elif kind in (b"s", b"b"):
            n, pos = _read_varint(blob, pos)
            if pos + n > len(blob):
                raise WireError(f"payload field {key!r} claims {n} bytes, only {len(blob) - pos} left")
            raw = blob[pos : pos + n]
            pos += n
            if kind == b"s":
                try:
                    value = raw.decode()
                except UnicodeDecodeError as err:
                    raise WireError(f"payload string {key!r} is not UTF-8") from err
            else:
                value = raw
        else:
            raise WireError(f"payload field {key!r} has unknown type {kind!r}")
        out[key] = value
    if pos != len(blob):
        raise WireError(f"payload has {len(blob) - pos} trailing bytes")
    return out


_TYPES: dict[type, tuple[type, ...]] = {
    bytes: (bytes,),
    int: (int,),
    float: (float, int),
    str: (str,),
    bool: (bool,),
}


def require(payload: Payload, schema: dict[str, type], *, where: str) -> None:
    """Check that ``payload`` has exactly the keys of ``schema`` with those types.

    Floats must be finite. ``where`` names the message in the error (e.g. ``"site-2 reply"``).
    """
    missing = sorted(set(schema) - set(payload))
    extra = sorted(set(payload) - set(schema))
    if missing or extra:
        raise WireError(f"{where}: missing fields {missing}, unexpected fields {extra}")
    for key, kind in schema.items():
        value = payload[key]
        if kind is not bool and isinstance(value, bool):
            raise WireError(f"{where}: field {key!r} must be {kind.__name__}, got bool")
        if not isinstance(value, _TYPES[kind]):
            raise WireError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
        if kind is float and isinstance(value, int | float) and not math.isfinite(value):
            raise WireError(f"{where}: field {key!r} is not finite ({value})")
