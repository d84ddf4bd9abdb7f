"""Progress output of the slow steps (edgetune/progress.py): bars on a terminal, lines in logs, or nothing."""

from __future__ import annotations

from edgetune import progress


def test_logs_get_start_stage_and_done_lines_and_zero_turns_it_off(capsys, monkeypatch):
    """Off a terminal a task prints one line when it starts, one per stage and one with its time when it
    ends; EDGETUNE_PROGRESS=0 prints nothing; the handle counts what was advanced either way."""
    monkeypatch.setenv("EDGETUNE_PROGRESS", "")
    monkeypatch.setattr(progress, "_is_terminal", lambda: False)
    with progress.task("converting", total=3) as bar:
        bar.stage("reading")
        bar.advance(2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[edgetune] converting ..." and lines[1] == "[edgetune] converting: reading"
    assert lines[2].startswith("[edgetune] converting: done in ") and bar.completed == 2
    monkeypatch.setenv("EDGETUNE_PROGRESS", "0")
    with progress.task("quiet", total=1) as bar:
        bar.advance()
    assert capsys.readouterr().err == "" and bar.completed == 1
