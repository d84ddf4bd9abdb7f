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


def test_live_table_shows_the_choice_loss_column_only_for_runs_that_measure_it():
    """Runs on data with candidate answers get a choice-loss column; other runs' tables keep theirs."""
    plain, choices = live.RoundTable("t", 2), live.RoundTable("t", 2)
    plain.add({"round": 0, "heldout_loss": 2.5, "accuracy": 0.25})
    choices.add({"round": 0, "heldout_loss": 2.5, "accuracy": 0.25, "choice_loss": 3.9227})
    headers = [[c.header for c in t.render().columns] for t in (plain, choices)]
    assert "choice loss" not in headers[0]
    assert headers[1][headers[1].index("accuracy") + 1] == "choice loss"
    assert "3.9227" in list(choices.render().columns[headers[1].index("choice loss")].cells)
