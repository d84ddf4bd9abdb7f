"""Key schedule: every random draw in edgetune comes from a key derived here.

``derive(secret, label, *parts)`` is HKDF-SHA256 with an injective ``info`` string built from a
named stream label and length-prefixed parts, so two different (label, parts) never share a
key. Labels name the stream (``pert``, ``quant``, ``imv``, ``partition``, ``data``, ...); the
IMV probe can therefore never consume or shift a training stream.

Non-secret streams (data order, partitions, initialisation) hang off ``run_key(seed)``.
Round secrets (perturbations, quantisation) are 32 random bytes per round, distributed in
seed envelopes (``crypto/envelope.py``).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABELS = frozenset(
    {
        "pert",
        "quant",
        "pool",
        "imv",
        "data",
        "partition",
        "init",
        "secret",
        "deft",
        "dppf",
        "sites",
        "test",
        "token-bias-pool",
    }
)
"""Stream labels in use. A new stream gets a new label here, never a reused one."""

_VERSION = b"edgetune-ks-v1"


def _encode_part(part: int | str | bytes) -> bytes:
    if isinstance(part, bool):
        raise TypeError("bool is not a key-schedule part; use an int")
    if isinstance(part, int):
        return b"i" + struct.pack(">q", part)
    if isinstance(part, str):
        data = part.encode()
        return b"s" + struct.pack(">I", len(data)) + data
    if isinstance(part, (bytes, bytearray)):
        return b"b" + struct.pack(">I", len(part)) + bytes(part)
    raise TypeError(f"unsupported key-schedule part {part!r}")


def derive(secret: bytes, label: str, *parts: int | str | bytes, length: int = 32) -> bytes:
    """Derive a key for stream ``label`` from ``secret`` and ``parts``.

    Parameters
    ----------
    secret
        Input key material: a round secret or ``run_key(seed)``.
    label
        Stream name, one of ``LABELS``.
    parts
        Integers, strings or bytes that identify the draw (round, site, step, probe, ...).
    length
        Output length in bytes.

    Returns
    -------
    bytes
        ``length`` pseudo-random bytes, injective in (label, parts).
    """
    if label not in LABELS:
        raise ValueError(f"unknown stream label {label!r}; add it to LABELS")
    info = _VERSION + _encode_part(label) + b"".join(_encode_part(p) for p in parts)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def run_key(seed: int) -> bytes:
    """Master key of the non-secret streams of a run with integer ``seed``."""
    return hashlib.sha256(b"edgetune-run-seed|" + struct.pack(">q", seed)).digest()


def keystream(key: bytes, n_bytes: int, *, nonce: int = 0, block: int = 0) -> bytes:
    """ChaCha20 keystream of ``n_bytes`` for (key, nonce), starting at 64-byte ``block``.

    Parameters
    ----------
    key
        32-byte key.
    nonce
        Stream number under the key (a tensor index, for example); 0 <= nonce < 2**64.
    block
        First 64-byte block, for random access; 0 <= block < 2**32.

    Returns
    -------
    bytes
        The keystream (integer-only, identical on every platform).
    """
    if len(key) != 32:
        raise ValueError(f"keystream key must be 32 bytes, got {len(key)}")
    if not 0 <= block < 2**32 or not 0 <= nonce < 2**64:
        raise ValueError(f"keystream block {block} or nonce {nonce} out of range")
    # cryptography's 16-byte ChaCha20 nonce = 32-bit little-endian block counter + 96-bit nonce.
    full_nonce = struct.pack("<I", block) + struct.pack("<Q", nonce) + b"\x00\x00\x00\x00"
    enc = Cipher(algorithms.ChaCha20(key, full_nonce), mode=None).encryptor()
    return enc.update(bytes(n_bytes))


def uniform(key: bytes, n: int, *, nonce: int = 0) -> np.ndarray:
    """``n`` float64 values in [0, 1) from the top 53 bits of keystream words."""
    words = np.frombuffer(keystream(key, 8 * n, nonce=nonce), dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def integers(key: bytes, n: int, high: int, *, nonce: int = 0) -> np.ndarray:
    """``n`` integers in [0, high) (64-bit words reduced mod ``high``; bias < high / 2**64)."""
    if high < 1:
        raise ValueError(f"integers: high must be >= 1, got {high}")
    words = np.frombuffer(keystream(key, 8 * n, nonce=nonce), dtype="<u8")
    return (words % np.uint64(high)).astype(np.int64)


def permutation(key: bytes, n: int, *, nonce: int = 0) -> np.ndarray:
    """A permutation of ``range(n)``: a stable argsort of random 64-bit words."""
    words = np.frombuffer(keystream(key, 8 * n, nonce=nonce), dtype="<u8")
    return np.argsort(words, kind="stable").astype(np.int64)
