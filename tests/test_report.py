"""edgetune report / compare on real run folders (tiny model, in process, two rounds)."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest
from conftest import session_cache, tiny_flat
from typer.testing import CliRunner

from edgetune import config as cfgmod
from edgetune import inproc, report
from edgetune.cli import app
from edgetune.io import read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny spsa runs, ``run-a`` and ``run-b`` (different learning rates)."""
    base = tmp_path_factory.mktemp("runs")
    cache = session_cache(tmp_path_factory)
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETUNE_CACHE", cache)
        for name, lr in (("run-a", 1e-3), ("run-b", 2e-3)):
            cfg = cfgmod.from_run_config(tiny_flat(**{"num_rounds": 2, "spsa.lr": lr}))
            inproc.run(cfg, 2, run_dir=base / name)
            out.append(base / name)
    return out


def _squash(text: str) -> str:
    """Output without whitespace (rich wraps long lines at the terminal width)."""
    return "".join(text.split())


def test_html_report_holds_every_round_and_embeds_the_plot(runs, tmp_path):
    """The default report is RUN_DIR/report.html; it shows every metrics.jsonl row's held-out loss, bytes and
    state hash prefix, and embeds loss_vs_bytes.png byte for byte as a data URI, with nothing fetched."""
    # Prepare
    run_dir = runs[0]
    rows = read_jsonl(run_dir / "metrics.jsonl")

    # Execute
    result = CliRunner().invoke(app, ["report", str(run_dir)])

    # Assert
    assert result.exit_code == 0, result.output
    path = run_dir / "report.html"
    page = path.read_text()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert f'<td class="num">{row["heldout_loss"]:.4f}</td>' in page
        assert row["state_hash"][:12] in page
        assert f"{row['cum_uplink_bytes']:,}" in page
        if row.get("train_loss") is not None:
            assert f"{row['train_loss']:.4f}" in page
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert uris, "no embedded PNG"
    assert base64.b64decode(uris[0]) == (run_dir / "loss_vs_bytes.png").read_bytes()
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert 'algorithm = "spsa"' in page  # the config, from config.toml


def test_report_bytes_per_site_add_up_to_the_summary(runs):
    """The per-site ledger table's total uplink and downlink equal summary.json's totals."""
    # Prepare
    run = report.load_run(runs[0])
    summary = json.loads((runs[0] / "summary.json").read_text())

    # Execute
    headers, cells = report.ledger_tables(run.ledger)["site"]

    # Assert
    total = dict(zip(headers, cells[-1]))
    assert total["site"] == "total"
    assert total["uplink B"] == f"{summary['uplink_bytes_total']:,}"
    assert total["downlink B"] == f"{summary['downlink_bytes_total']:,}"
    assert [c[0] for c in cells[:-1]] == ["site-0", "site-1"]


def test_markdown_report_links_the_plot_relative_to_the_report(runs, tmp_path):
    """--format md links the PNG by a path relative to the report file, which resolves to the run's plot;
    the per-round values are in a Markdown table."""
    # Prepare
    run_dir = runs[0]
    out = tmp_path / "reports" / "a.md"
    rows = read_jsonl(run_dir / "metrics.jsonl")

    # Execute
    beside = report.write_report(run_dir, fmt="md")
    elsewhere = report.write_report(run_dir, out=out)  # format from the suffix

    # Assert
    assert beside == run_dir / "report.md"
    assert "](loss_vs_bytes.png)" in beside.read_text()
    text = elsewhere.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and (out.parent / links[0]).resolve() == (run_dir / "loss_vs_bytes.png").resolve()
    assert "data:image" not in text
    for row in rows:
        assert f"| {row['round']} |" in text
        assert f"{row['heldout_loss']:.4f}" in text


def test_report_of_an_unfinished_run_says_what_is_missing(runs, tmp_path):
    """A run folder without summary.json and plots (still running, or killed) still gets a report."""
    # Prepare
    run_dir = tmp_path / "unfinished"
    shutil.copytree(runs[1], run_dir)
    for name in ("summary.json", "loss_vs_bytes.png", "imv.png", "report.html"):
        (run_dir / name).unlink(missing_ok=True)

    # Execute
    page = report.write_report(run_dir).read_text()

    # Assert
    assert "not written (the run has not finished)" in page
    assert "No plots in the run folder yet" in page
    assert "data:image" not in page


def test_compare_two_runs_writes_one_png_and_a_table_of_both(runs, tmp_path):
    """compare draws both runs into one PNG and prints one line per run with its totals."""
    # Prepare
    out = tmp_path / "cmp.png"
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]

    # Execute
    result = CliRunner().invoke(app, ["compare", str(runs[0]), str(runs[1]), "--out", str(out)])
    rows = report.compare(runs, tmp_path / "again.png")

    # Assert
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG_MAGIC)
    lines = [line for line in result.output.splitlines() if line.startswith("run-")]
    assert [line.split()[0] for line in lines] == ["run-a", "run-b"]
    for row, s in zip(rows, summaries):
        assert row["algorithm"] == "spsa" and row["rounds"] == 2
        assert row["uplink_bytes_total"] == s["uplink_bytes_total"]
        assert row["downlink_bytes_total"] == s["downlink_bytes_total"]
        assert row["heldout_loss_first"] == s["heldout_loss_first"]
        assert row["heldout_loss_last"] == s["heldout_loss_last"]
    table = report.format_compare_table(rows)
    assert "run-a" in table and "run-b" in table and f"{summaries[0]['uplink_bytes_total']:,}" in table


def test_missing_or_foreign_folders_are_clear_errors(runs, tmp_path):
    """A missing folder and a folder without metrics.jsonl are ValueErrors naming the path; the CLI exits 1."""
    # Prepare
    missing = tmp_path / "no-such-run"
    empty = tmp_path / "not-a-run"
    empty.mkdir()

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        report.load_run(missing)
    with pytest.raises(ValueError, match=re.escape(str(empty)) + r".*no metrics\.jsonl"):
        report.load_run(empty)
    runner = CliRunner()
    for args, path in (
        (["report", str(missing)], missing),
        (["report", str(empty)], empty),
        (["compare", str(runs[0]), str(missing), "--out", str(tmp_path / "c.png")], missing),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert _squash(str(path)) in _squash(result.output)
    assert not (tmp_path / "c.png").exists()
    bad = runner.invoke(app, ["report", str(runs[0]), "--format", "pdf"])
    # an enum option: the CLI itself refuses it (usage error, exit 2) and names the choices
    assert bad.exit_code == 2 and "html" in bad.output and "md" in bad.output, bad.output
