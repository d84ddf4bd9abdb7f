"""The run journal: a write-ahead log of round state; its lines are the run's only commit points.

``runs/<run-id>/journal.jsonl`` holds one fsynced JSON line per event::

    {"t": "start",    "run": name, "config": {...}}            which run this folder holds
    {"t": "plan",     "round": r, "state": "plan-..."}          round r's messages are fixed and saved
    {"t": "commit",   "round": r, "hash": ..., "state": "commit-..."}   round r was aggregated
    {"t": "finished", "round": R}                               the run is over: it never restarts

Every line carries ``sum``, a checksum of the rest of the line: a corrupted line is refused, not
read. The server half's state is saved into a NEW folder ``server-state/<kind>-<round>-<seq>/``
before the line that names it (``state``); a restart loads the folder named by the last line
that names one, and ignores (then deletes) any other. So the journal line is the single commit
point, and a crash at any moment leaves a resumable run:

* killed after a state folder was written but before its line: the folder is unnamed and the
  previous line's state is loaded; the step is redone;
* killed after a ``commit`` line: that round's state is loaded; later rounds follow;
* a ``plan`` without a commit: the round's messages (for spsa: the secret and the sealed
  envelopes) were saved, and are resent byte for byte, so sites see a duplicate, not a new round;
* a torn or unterminated last line (a crash or a full disk mid-append) was never committed:
  ``io.jsonl_valid_prefix`` drops it in the reader and the next append cuts it off;
* ``finished`` makes a restart refuse to train again; a journal of another run (another folder
  name, or another training configuration) is refused too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edgetune.io import append_jsonl, read_jsonl


class RunFinished(RuntimeError):
    """The run folder holds a finished run; it is never trained again."""


class JournalMismatch(RuntimeError):
    """The run folder holds another run's journal (renamed or copied folder, another configuration)."""


def _checksum(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "sum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class Journal:
    """Append-only, crash-tolerant record of a run's rounds."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "journal.jsonl"
        self.records: list[dict[str, Any]] = read_jsonl(self.path)
        for i, record in enumerate(self.records):
            # journals written before checksums existed have no "sum"; any line that has one must match it
            if "sum" in record and record["sum"] != _checksum(record):
                raise ValueError(
                    f"{self.path}: record {i + 1} ({record.get('t')!r}, round {record.get('round')}) fails its "
                    "checksum: the journal was corrupted or edited; refusing to resume from it"
                )
            if not isinstance(record.get("t"), str):
                raise ValueError(f"{self.path}: record {i + 1} has no type 't'")

    def _add(self, record: dict[str, Any]) -> None:
        record = {**record, "sum": _checksum(record)}
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

    def start_record(self) -> dict[str, Any] | None:
        """The ``start`` line (None in a new journal, or one written before start lines existed)."""
        return next((r for r in self.records if r["t"] == "start"), None)

    def last_state(self) -> dict[str, Any] | None:
        """The last line that names a server-state folder: the state a restart loads."""
        return next((r for r in reversed(self.records) if "state" in r), None)

    def state_names(self) -> set[str]:
        """State folders a restart may still need: those of the last two lines that name one.

        The one before the last is what a restart loads if the last line is ever lost.
        """
        named = [r["state"] for r in self.records if "state" in r]
        return set(named[-2:])

    def start(self, run: str, config: dict[str, Any]) -> None:
        """First line of a new run: the run folder's name and its training configuration."""
        assert not self.records, "start on a journal that has records"
        self._add({"t": "start", "run": run, "config": config})

    def plan(self, round_idx: int, state: str | None = None) -> None:
        self._add({"t": "plan", "round": round_idx, **({"state": state} if state else {})})

    def commit(
        self, round_idx: int, state_hash: str, metrics: dict[str, Any] | None = None, state: str | None = None
    ) -> None:
        """Record a committed round with its aggregate metrics (to rebuild a lost metrics row)."""
        if round_idx in self.commits():
            raise AssertionError(f"round {round_idx} committed twice")
        record = {"t": "commit", "round": round_idx, "hash": state_hash, "metrics": metrics or {}}
        self._add({**record, **({"state": state} if state else {})})

    def commit_record(self, round_idx: int) -> dict[str, Any]:
        """The commit line of ``round_idx``."""
        return next(r for r in self.records if r["t"] == "commit" and r["round"] == round_idx)

    def finish(self, round_idx: int) -> None:
        self._add({"t": "finished", "round": round_idx})
