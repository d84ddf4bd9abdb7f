"""benchmarks/plots.py: one PNG per known result file; a broken file is an error naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import plots

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PNG = b"\x89PNG\r\n\x1a\n"


def test_render_draws_every_known_result_and_skips_missing(tmp_path):
    """The repository's results give one PNG per plotter whose JSON exists; a missing JSON is skipped."""
    # Prepare
    for name in plots.PLOTTERS:
        if (RESULTS / f"{name}.json").exists():
            shutil.copy(RESULTS / f"{name}.json", tmp_path)
    present = {p.stem for p in tmp_path.glob("*.json")}
    assert present, "no benchmark results in the repository"
    (tmp_path / sorted(present)[0]).with_suffix(".json").unlink()

    # Execute
    written = plots.render(tmp_path)

    # Assert
    assert {p.stem for p in written} == present - {sorted(present)[0]}
    assert all(p.read_bytes()[:8] == PNG for p in written)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ("[]", "non-empty JSON list"), ('[{"config": "x"}]', "lacks the field")],
    ids=["syntax", "empty", "missing-field"],
)
def test_render_names_the_broken_file(tmp_path, content, message):
    """A result file that is not JSON rows, or lacks a field its plot needs, raises ValueError with its path."""
    (tmp_path / "bytes_per_round.json").write_text(content)

    with pytest.raises(ValueError, match=message) as err:
        plots.render(tmp_path)

    assert "bytes_per_round.json" in str(err.value)
    assert not (tmp_path / "bytes_per_round.png").exists()


def test_sim_scale_plot_leaves_out_failed_runs(tmp_path, monkeypatch):
    """Only the successful site counts are drawn, in order of sites, with their own times and memory; a
    failed count is named on the figure instead (no KeyError on its missing fields)."""
    rows = [
        {"sites": 200, "ok": True, "mean_round_wall_s": 40.0, "peak_rss_mib": 8192.0, "peak_pss_mib": 6144.0},
        {"sites": 64, "ok": False},
        {"sites": 16, "ok": True, "mean_round_wall_s": 5.0, "peak_rss_mib": 3072.0, "peak_pss_mib": 2048.0},
    ]
    (tmp_path / "sim_scale.json").write_text(json.dumps(rows))
    plt = plots._pyplot()
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))

    written = plots.render(tmp_path)

    assert [p.name for p in written] == ["sim_scale.png"] and written[0].read_bytes()[:8] == PNG
    (fig,) = figures
    time_ax, memory_ax = fig.axes
    drawn = {ax.get_title(): [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()] for ax in fig.axes}
    assert drawn[time_ax.get_title()] == [([16, 200], [5.0, 40.0])]
    assert drawn[memory_ax.get_title()] == [([16, 200], [3.0, 8.0]), ([16, 200], [2.0, 6.0])]  # GiB
    assert "failed runs (not plotted): [64] sites" in fig.get_suptitle()
