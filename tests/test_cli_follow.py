"""Following a run asks Flower for its status rarely (each ask is a new ``flwr ls`` process that takes
CPU from the simulated sites), yet notices the end as soon as the run writes its summary."""

from __future__ import annotations

import json
import threading
import time

from edgetune import live


def test_follow_asks_for_status_rarely_and_at_once_when_the_summary_appears(tmp_path):
    # Prepare: a run that writes two rounds, then its summary; Flower reports it finished only
    # after the summary exists
    calls: list[float] = []

    def status() -> str:
        calls.append(time.monotonic())
        return "finished:completed" if (tmp_path / "summary.json").exists() else "running"

    def run() -> None:
        for r in range(2):
            time.sleep(0.3)
            with open(tmp_path / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"round": r, "heldout_loss": 1.0}) + "\n")
        time.sleep(0.3)
        (tmp_path / "summary.json").write_text("{}")

    table = live.RoundTable("t", 2)
    writer = threading.Thread(target=run)
    writer.start()
    # Execute
    started = time.monotonic()
    final = live.follow(table, tmp_path, status, poll_s=0.05, status_every_s=3600)
    writer.join()
    # Assert: one ask at the start, one when the summary appeared; every row shown
    assert final == "finished:completed"
    assert len(calls) == 2
    assert time.monotonic() - started < 30
    assert [row["round"] for row in table.rows] == [0, 1]
