"""A site's replay guard on disk: the last accepted round survives a SuperNode or site-host restart.

``envelope.open_envelope`` refuses an envelope for a round at or below the last accepted one (except
the exact envelope accepted last), but the guard it is given lived only in Flower's in-memory node
state: after a restart every old envelope of the run opened again. DESIGN.md section 3 asks sites to
persist the last accepted round, and security.md section 3.4 to do it *before* using the secret. So::

    guard = newest(state guard, guard file)        # whichever accepted the later round
    opened, guard = open_envelope(..., guard=guard)
    store(path, guard)                             # atomic, 0600, in a 0700 folder; then use it

One small file per (server key, run) (``<state_dir>/replay-guard/<kid>-<run id>.guard``, 52 bytes, with
the guard's own checksum): a corrupted file is refused with its name rather than read as "nothing
accepted yet". The server key id is part of the name because the run id is derived from the run's
name: a federation with new keys (a new simulation) that reuses a run name is another replay domain.
"""

from __future__ import annotations

from pathlib import Path

from edgetune.crypto.envelope import ReplayGuard
from edgetune.io import atomic_write_bytes, private_dir


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
