"""The run journal: a write-ahead log of round state, so a killed server resumes exactly.

``runs/<run-id>/journal.jsonl`` holds one fsynced JSON line per event::

    {"t": "plan",     "round": r}                 the round's messages are fixed and saved
    {"t": "commit",   "round": r, "hash": ...}    the round was aggregated and its state saved
    {"t": "finished", "round": R}                 the run is over: it never restarts

The server half's own state (``save_state``/``load_state``) lives in ``runs/<run-id>/server-state/``
and is written before the journal line that refers to it, so after a crash at any point:

* the last ``commit`` names the state to load; later rounds restart from there;
* a ``plan`` without a commit means the round's messages (for spsa: the secret and the sealed
  envelopes) were saved: they are resent byte for byte, so sites see a duplicate, not a new round;
* ``finished`` makes a restart refuse to train again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetune.io import append_jsonl, read_jsonl


class RunFinished(RuntimeError):
    """The run folder holds a finished run; it is never trained again."""


class Journal:
    """Append-only, crash-tolerant record of a run's rounds."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "journal.jsonl"
        self.records: list[dict[str, Any]] = read_jsonl(self.path)

    def _add(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)
        self.records.append(record)

    @property
    def finished(self) -> bool:
        return any(r["t"] == "finished" for r in self.records)

    @property
    def last_commit(self) -> int:
        return max((r["round"] for r in self.records if r["t"] == "commit"), default=0)

    def commits(self) -> list[int]:
        """Rounds committed, in order (each exactly once in a sound journal)."""
        return [r["round"] for r in self.records if r["t"] == "commit"]

    def plan(self, round_idx: int) -> None:
        self._add({"t": "plan", "round": round_idx})

    def commit(self, round_idx: int, state_hash: str, metrics: dict[str, Any] | None = None) -> None:
        """Record a committed round with its aggregate metrics (to rebuild a lost metrics row)."""
        if round_idx in self.commits():
            raise AssertionError(f"round {round_idx} committed twice")
        self._add({"t": "commit", "round": round_idx, "hash": state_hash, "metrics": metrics or {}})

    def commit_record(self, round_idx: int) -> dict[str, Any]:
        """The commit line of ``round_idx``."""
        return next(r for r in self.records if r["t"] == "commit" and r["round"] == round_idx)

    def finish(self, round_idx: int) -> None:
        self._add({"t": "finished", "round": round_idx})
