"""ByteLedger: sums by direction, round, kind and site; input checks; JSON-lines round trip."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from edgetune.comm.ledger import ByteLedger, LedgerRow
from edgetune.io import read_jsonl


@pytest.fixture
def ledger() -> ByteLedger:
    led = ByteLedger()
    # round 1: two sites, a downlink each, uplinks in two phases for site a
    led.add(1, "train", "a", "down", 100)
    led.add(1, "train", "b", "down", 110)
    led.add(1, "indices", "a", "up", 7)
    led.add(1, "values", "a", "up", 5)
    led.add(1, "train", "b", "up", 3)
    # Flower framing of the same round
    led.add(1, "train", "a", "up", 400, kind="flower")
    led.add(1, "train", "a", "down", 900, kind="flower")
    # round 2
    led.add(2, "train", "a", "down", 1000)
    led.add(2, "train", "a", "up", 11)
    led.add(2, "train", "c", "up", 0)
    return led


def test_total_per_direction_and_kind(ledger: ByteLedger):
    """total() sums one direction of one kind over all rounds; kinds and directions never mix."""
    # Execute / Assert
    assert ledger.total(direction="up") == 7 + 5 + 3 + 11 + 0
    assert ledger.total(direction="down") == 100 + 110 + 1000
    assert ledger.total(direction="up", kind="flower") == 400
    assert ledger.total(direction="down", kind="flower") == 900


def test_total_per_round(ledger: ByteLedger):
    """total(round_idx=r) counts only round r; a round with no rows totals 0."""
    # Execute / Assert
    assert ledger.total(direction="up", round_idx=1) == 15
    assert ledger.total(direction="up", round_idx=2) == 11
    assert ledger.total(direction="down", round_idx=2) == 1000
    assert ledger.total(direction="up", kind="flower", round_idx=2) == 0
    assert ledger.total(direction="up", round_idx=3) == 0


def test_per_site_sums_phases_and_filters(ledger: ByteLedger):
    """per_site sums a site's messages across phases in one round, direction and kind, and lists only senders."""
    # Execute / Assert
    assert ledger.per_site(round_idx=1, direction="up") == {"a": 12, "b": 3}
    assert ledger.per_site(round_idx=1, direction="down") == {"a": 100, "b": 110}
    assert ledger.per_site(round_idx=1, direction="up", kind="flower") == {"a": 400}
    assert ledger.per_site(round_idx=2, direction="up") == {"a": 11, "c": 0}
    assert ledger.per_site(round_idx=9, direction="up") == {}


def test_per_site_adds_up_to_total(ledger: ByteLedger):
    """For every round, direction and kind, the per-site bytes add up to total()."""
    # Execute / Assert
    for r in (1, 2):
        for d in ("up", "down"):
            for k in ("payload", "flower"):
                assert sum(ledger.per_site(round_idx=r, direction=d, kind=k).values()) == ledger.total(
                    direction=d, kind=k, round_idx=r
                )


def test_empty_ledger_totals_zero():
    """A fresh ledger has no rows and totals 0 everywhere."""
    # Prepare
    led = ByteLedger()

    # Execute / Assert
    assert led.rows == []
    assert led.total(direction="up") == 0 and led.total(direction="down", kind="flower") == 0
    assert led.per_site(round_idx=1, direction="up") == {}


def test_rows_store_plain_ints():
    """num_bytes is stored as a Python int (so JSON works) even when given a numpy integer."""
    # Prepare
    led = ByteLedger()

    # Execute
    led.add(1, "train", "a", "up", np.int64(42))

    # Assert
    assert led.rows == [LedgerRow(1, "train", "a", "up", 42, "payload")]
    assert type(led.rows[0].num_bytes) is int


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"direction": "UP"}, "direction must be up or down, got 'UP'"),
        ({"direction": "sideways"}, "direction must be up or down"),
        ({"direction": ""}, "direction must be up or down"),
        ({"kind": "grpc"}, "kind must be payload or flower, got 'grpc'"),
        ({"kind": "Payload"}, "kind must be payload or flower"),
        ({"num_bytes": -1}, "num_bytes must be >= 0"),
    ],
)
def test_add_rejects_bad_rows_without_recording(kwargs: dict, message: str):
    """A bad direction, kind or negative size raises ValueError and leaves the ledger unchanged."""
    # Prepare
    led = ByteLedger()
    led.add(1, "train", "a", "up", 10)
    args = {"round_idx": 1, "phase": "train", "site_id": "a", "direction": "up", "num_bytes": 5} | kwargs

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        led.add(**args)
    assert len(led.rows) == 1 and led.total(direction="up") == 10


def test_write_jsonl_round_trip(ledger: ByteLedger, tmp_path: Path):
    """write_jsonl writes one JSON object per row, in order, that rebuild the same LedgerRows."""
    # Prepare
    path = tmp_path / "run" / "ledger.jsonl"

    # Execute
    ledger.write_jsonl(path)
    lines = path.read_text().splitlines()

    # Assert
    assert len(lines) == len(ledger.rows)
    assert [LedgerRow(**json.loads(line)) for line in lines] == ledger.rows
    assert read_jsonl(path) == [asdict(r) for r in ledger.rows]


def test_write_jsonl_replaces_file_atomically(ledger: ByteLedger, tmp_path: Path):
    """A second write replaces the whole file (a shorter ledger leaves no stale rows) and no temp file remains."""
    # Prepare
    path = tmp_path / "ledger.jsonl"
    ledger.write_jsonl(path)
    small = ByteLedger()
    small.add(5, "train", "z", "up", 1)

    # Execute
    small.write_jsonl(path)

    # Assert
    assert read_jsonl(path) == [asdict(small.rows[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl"]


def test_write_jsonl_empty_ledger(tmp_path: Path):
    """An empty ledger writes an empty file."""
    # Prepare
    path = tmp_path / "ledger.jsonl"

    # Execute
    ByteLedger().write_jsonl(path)

    # Assert
    assert path.read_bytes() == b""
