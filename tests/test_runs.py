"""The run folder: summary.json records what happened, including a plot that could not be drawn."""

from __future__ import annotations

import json

from edgetune import config as cfgmod
from edgetune import runs


def _row(r: int, loss: float) -> dict:
    return {
        "round": r,
        "heldout_loss": loss,
        "uplink_bytes": 92 * (r > 0),
        "downlink_bytes": 500 * (r > 0),
        "cum_uplink_bytes": 92 * r,
        "cum_downlink_bytes": 500 * r,
        "state_hash": f"{r:064x}",
    }


def test_finish_writes_summary_with_the_plot_error_when_a_plot_fails(tmp_path, monkeypatch):
    """A failing plot never fails the run, and summary.json on disk says why the plot is missing."""
    # Prepare
    cfg = cfgmod.RunConfig()
    rec = runs.RunRecorder(cfg, tmp_path / "run")
    rec.rows = [_row(0, 5.0), _row(1, 4.5)]

    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(runs, "plot_loss_vs_bytes", broken)

    # Execute
    summary = rec.finish({})

    # Assert
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["plot_error"] == "OSError: no space left on device" == summary["plot_error"]
    assert on_disk["heldout_loss_first"] == 5.0 and on_disk["heldout_loss_last"] == 4.5
    assert on_disk["uplink_bytes_total"] == 92
    assert not (tmp_path / "run" / "loss_vs_bytes.png").exists()


def test_finish_draws_the_plot_and_writes_no_error(tmp_path, monkeypatch):
    """With working plots: the PNG holds held-out loss against cumulative uplink and uplink + downlink bytes
    of every evaluated round (a round without a held-out loss is left out), and the summary has no plot_error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    rec = runs.RunRecorder(cfgmod.RunConfig(), tmp_path / "run")
    rec.rows = [_row(0, 5.0), _row(1, 4.5), {**_row(2, 0.0), "heldout_loss": None}, _row(3, 4.2)]

    summary = rec.finish({})

    assert "plot_error" not in json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert (tmp_path / "run" / "loss_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    (ax,) = fig.axes
    drawn = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    assert drawn == {
        "uplink (sites → server)": ([1, 92, 276], [5.0, 4.5, 4.2]),  # round 0 sent nothing: drawn at 1 (log x)
        "uplink + downlink": ([1, 592, 1776], [5.0, 4.5, 4.2]),
    }
    assert ax.get_xscale() == "log"


def test_the_closing_summary_prints_what_was_measured_and_skips_what_was_not(tmp_path, capsys):
    """The line `edgetune simulate` ends with: held-out loss, choice loss (graded, moves before accuracy)
    and accuracy from first to last evaluated round; a metric the run never evaluated (no accuracy rounds,
    no candidate answers) is left out instead of failing the command after a finished run."""
    from edgetune.live import print_summary

    rec = runs.RunRecorder(cfgmod.RunConfig(), tmp_path / "a")
    rec.rows = [
        {**_row(0, 2.63), "accuracy": 0.25, "choice_loss": 3.92},
        _row(1, 2.0),
        {**_row(2, 1.48), "accuracy": 0.26, "choice_loss": 1.88},
    ]
    summary = rec.finish({})
    assert (summary["choice_loss_first"], summary["choice_loss_last"]) == (3.92, 1.88)
    print_summary(tmp_path / "a")
    out = " ".join(capsys.readouterr().out.split())
    assert "held-out loss 2.6300 → 1.4800" in out and "choice loss 3.9200 → 1.8800" in out
    assert "accuracy 0.250 → 0.260" in out and "uplink 184 B" in out

    rec = runs.RunRecorder(cfgmod.RunConfig(), tmp_path / "b")
    rec.rows = [_row(0, 5.0), _row(1, 4.5)]  # no accuracy, no choice loss
    assert rec.finish({})["accuracy_first"] is None
    print_summary(tmp_path / "b")
    out = " ".join(capsys.readouterr().out.split())
    assert "held-out loss 5.0000 → 4.5000" in out and "accuracy" not in out and "choice loss" not in out
