"""A site's replay guard: what it remembers between rounds, and the file that survives a restart.

``envelope.open_envelope`` refuses an envelope for a round at or below the last accepted one (except
the exact envelope accepted last). ``ReplayGuard`` is that memory: the last accepted round and its
envelope's sha256, with a fixed 52-byte encoding. Kept only in Flower's in-memory node state, a
restart would forget it and every old envelope of the run would open again. DESIGN.md section 3 asks
sites to persist the last accepted round, and security.md section 3.4 to do it *before* using the
secret. So::

    guard = newest(state guard, guard file)        # whichever accepted the later round
    opened, guard = open_envelope(..., guard=guard)
    store(path, guard)                             # atomic, 0600, in a 0700 folder; then use it

One small file per (server key, run) (``<state_dir>/replay-guard/<kid>-<run id>.guard``, 52 bytes, with
the guard's own checksum): a corrupted file is refused with its name rather than read as "nothing
accepted yet". The server key id is part of the name because the run id is derived from the run's
name: a federation with new keys (a new simulation) that reuses a run name is another replay domain.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from pathlib import Path

from edgetune.io import atomic_write_bytes, private_dir

_GUARD_MAGIC = b"ETG1"
_GUARD = struct.Struct(">4sQ32s8s")
_ROUND = struct.Struct(">Q")


@dataclass(frozen=True)
class ReplayGuard:
    """What a site remembers between rounds: the last accepted round and its envelope's sha256.

    ``last_round == 0`` (with an empty digest) means nothing was accepted yet; rounds are 1-based.
    """

    last_round: int = 0
    last_digest: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.last_round < 2**64:
            raise ValueError(f"ReplayGuard: last_round {self.last_round} out of range")
        expected = 0 if self.last_round == 0 else 32
        if len(self.last_digest) != expected:
            raise ValueError(
                f"ReplayGuard: last_digest is {len(self.last_digest)} bytes, expected {expected} "
                f"for last_round {self.last_round}"
            )

    def to_bytes(self) -> bytes:
        """Fixed 52-byte encoding: magic, round, digest, and a checksum against disk corruption."""
        digest = self.last_digest or bytes(32)
        body = _GUARD_MAGIC + _ROUND.pack(self.last_round) + digest
        return body + hashlib.sha256(body).digest()[:8]

    @classmethod
    def from_bytes(cls, blob: bytes) -> ReplayGuard:
        """Parse ``to_bytes`` output; raise ``ValueError`` on anything else.

        Parameters
        ----------
        blob
            Bytes read back from the site's state file.

        Returns
        -------
        ReplayGuard
            The stored guard.
        """
        if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) != _GUARD.size:
            size = len(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else type(blob).__name__
            raise ValueError(f"replay guard: expected {_GUARD.size} bytes, got {size}")
        magic, last_round, digest, check = _GUARD.unpack(bytes(blob))
        if magic != _GUARD_MAGIC:
            raise ValueError("replay guard: bad magic (not a replay-guard file)")
        if not hmac.compare_digest(check, hashlib.sha256(bytes(blob)[:-8]).digest()[:8]):
            raise ValueError("replay guard: checksum mismatch (file corrupted)")
        if (last_round == 0) != (digest == bytes(32)):
            raise ValueError("replay guard: round and digest disagree")
        return cls(last_round, digest if last_round else b"")


def guard_path(state_dir: Path, server_kid: bytes, run_id: bytes) -> Path:
    """Where a site keeps the replay guard of run ``run_id`` under the server key ``server_kid``."""
    return Path(state_dir) / "replay-guard" / f"{server_kid.hex()}-{run_id.hex()}.guard"


def load(path: Path) -> ReplayGuard:
    """The stored guard (a fresh one if none was stored); ``ValueError`` naming the file if it is corrupt."""
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        return ReplayGuard()
    try:
        return ReplayGuard.from_bytes(blob)
    except ValueError as err:
        raise ValueError(
            f"{path}: {err}; this site refuses envelopes until the file is restored or removed (removing it lets "
            "this run's old envelopes open again)"
        ) from None


def newest(a: ReplayGuard, b: ReplayGuard) -> ReplayGuard:
    """The guard that accepted the later round (the stricter one)."""
    return a if a.last_round >= b.last_round else b


def store(path: Path, guard: ReplayGuard) -> None:
    """Write ``guard`` atomically (0600, in a 0700 folder), before the secret it guards is used."""
    path = Path(path)
    private_dir(path.parent)
    atomic_write_bytes(path, guard.to_bytes(), mode=0o600)
