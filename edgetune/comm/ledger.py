"""ByteLedger: encoded bytes per (round, phase, site, direction), recorded where encoded.

Two kinds of rows are added here: ``payload`` (the length of the edgetune payload, ``comm/wire.py``) and
``flower`` (the serialized Flower message that carried it, measured in ``edgetune/flower``).
Their difference is Flower's framing; a test keeps the two consistent. A third kind, ``link`` (the TCP
bytes a link meter counted on a site's link, per round), is merged into ``ledger.jsonl`` after a run by
``edgetune/linkmeter.py``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LedgerRow:
    """One measured message."""

    round_idx: int
    phase: str
    site_id: str
    direction: str  # "down" (server -> site) or "up"
    num_bytes: int
    kind: str = "payload"  # "payload" or "flower"


class ByteLedger:
    """Append-only record of message sizes."""

    def __init__(self) -> None:
        self.rows: list[LedgerRow] = []

    def add(
        self, round_idx: int, phase: str, site_id: str, direction: str, num_bytes: int, kind: str = "payload"
    ) -> None:
        """Record one message of ``num_bytes`` (the ``len()`` of what was encoded)."""
        if direction not in {"up", "down"}:
            raise ValueError(f"direction must be up or down, got {direction!r}")
        if kind not in {"payload", "flower"}:
            raise ValueError(f"kind must be payload or flower, got {kind!r}")
        if num_bytes < 0:
            raise ValueError("num_bytes must be >= 0")
        self.rows.append(LedgerRow(round_idx, phase, site_id, direction, int(num_bytes), kind))

    def total(self, *, direction: str, kind: str = "payload", round_idx: int | None = None) -> int:
        """Sum of bytes in one direction, for one round or all rounds."""
        return sum(
            r.num_bytes
            for r in self.rows
            if r.direction == direction and r.kind == kind and (round_idx is None or r.round_idx == round_idx)
        )

    def per_site(self, *, round_idx: int, direction: str, kind: str = "payload") -> dict[str, int]:
        """Bytes per site in one round and direction."""
        out: dict[str, int] = defaultdict(int)
        for r in self.rows:
            if r.round_idx == round_idx and r.direction == direction and r.kind == kind:
                out[r.site_id] += r.num_bytes
        return dict(out)

    def write_jsonl(self, path: Path) -> None:
        """Write every row as one JSON line (atomically)."""
        from edgetune.io import atomic_write_bytes

        text = "".join(json.dumps(asdict(r)) + "\n" for r in self.rows)
        atomic_write_bytes(path, text.encode())
