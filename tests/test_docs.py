"""The docs site: the generated benchmarks page, the architecture tree, and an offline ``mkdocs build --strict``."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _gen():
    """docs/gen_benchmarks.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gen_benchmarks", DOCS / "gen_benchmarks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(markdown: str, heading: str | None = None) -> str:
    """The first fenced block that lists ``edgetune/`` (after ``heading`` when given)."""
    start = markdown.index(heading) if heading else 0
    for block in markdown[start:].split("```")[1::2]:
        if "\nedgetune/\n" in block:
            return block.strip("\n")
    raise AssertionError("no file tree found")


def test_gen_benchmarks_handles_missing_broken_and_unknown_results(tmp_path):
    """Every benchmark script gets a section: its rows when its results file exists (unknown keys shown as
    they are, wide tables transposed), "not yet run" when it does not, "could not be read" when it is not
    JSON rows; results without a script are shown too. Generating twice gives the same text."""
    # Prepare
    gen = _gen()
    bench = tmp_path / "benchmarks"
    results = bench / "results"
    results.mkdir(parents=True)
    for name in ("alpha", "beta", "gamma", "run_all", "__init__"):
        (bench / f"{name}.py").write_text(f'"""Measures {name} things.\n\nMore text."""\n')
    (results / "alpha.json").write_text(json.dumps([{"x": 1, "y": 0.123456, "z": "a|b"}, {"x": 2, "y": None}]))
    (results / "gamma.json").write_text("{not json")
    wide = [{f"k{i}": i * 1.5 for i in range(12)} | {"name": n} for n in ("first", "second")]
    (results / "orphan.json").write_text(json.dumps(wide))
    run = {"benchmark": "run", "device_name": "GPU-X", "all_pass": False, "rows": [{"check": "c1"}, {"check": "c2"}]}
    (results / "beta_run.json").write_text(json.dumps(run))

    # Execute
    page = gen.generate(results, bench)

    # Assert
    assert page == gen.generate(results, bench)
    assert [line for line in page.splitlines() if line.startswith("## ")] == [
        "## alpha",
        "## beta",
        "## beta_run",
        "## gamma",
        "## orphan",
    ]
    assert "Measures alpha things." in page and "More text" not in page
    assert "| x | y | z |" in page and "| 1 | 0.1235 | a\\|b |" in page
    assert "*Not yet run*" in page.split("## beta")[1].split("## gamma")[0]
    assert "*Could not be read*" in page.split("## gamma")[1]
    assert "| `name` | first | second |" in page and "| `k11` | 16.5 | 16.5 |" in page
    assert "## run_all" not in page and "__init__" not in page
    run_section = page.split("## beta_run")[1].split("## gamma")[0]  # a run's rows, with its own scalars
    assert "(2 rows)" in run_section and "GPU-X" in run_section and "c2" in run_section


def test_gen_benchmarks_on_the_repository_results_is_deterministic_and_writes_only_on_change(tmp_path):
    """The real results render the same twice; --check fails on a stale page and passes after writing."""
    # Prepare
    gen = _gen()
    out = tmp_path / "benchmarks.md"
    out.write_text("stale\n")

    # Execute
    stale = gen.main(["--out", str(out), "--check"])
    written = gen.main(["--out", str(out)])
    fresh = gen.main(["--out", str(out), "--check"])

    # Assert
    assert (stale, written, fresh) == (1, 0, 0)
    assert out.read_text() == gen.generate() == gen.generate()
    assert out.read_text().startswith("# Benchmarks\n")


def test_architecture_page_has_the_readme_file_tree():
    """docs/architecture.md carries the README's "Read the code" tree verbatim (the site cannot link the README)."""
    readme = (ROOT / "README.md").read_text()
    architecture = (DOCS / "architecture.md").read_text()
    assert _tree(architecture) == _tree(readme, "## Read the code")


def test_mkdocs_build_strict_succeeds_offline(tmp_path):
    """The site builds with --strict (every page in the nav, every link and anchor resolves) from a copy of
    docs/ with a freshly generated benchmarks page, and no page pulls anything from the network."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[dev]' installs it)")
    # Prepare
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    assert _gen().main(["--out", str(tmp_path / "docs" / "benchmarks.md")]) == 0
    site = tmp_path / "site"

    # Execute
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    # Assert
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "WARNING" not in log, log
    for page in ("index.html", "quickstart.html", "simulation.html", "benchmarks.html", "architecture.html"):
        assert (site / page).is_file(), page
    assert (site / "algorithms" / "spsa.html").is_file()
    for page in site.rglob("*.html"):
        fetched = re.findall(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=\"(https?://[^\"]+)", page.read_text())
        assert not fetched, f"{page.relative_to(site)} loads {fetched}"


def test_every_run_all_command_the_benchmarks_page_offers_is_a_step_run_all_accepts():
    """The page said `run_all --only spsa_sweep` (and four more) for scripts run_all does not know: it
    refuses them. The offered names must be exactly run_all's steps that have a page section."""
    from benchmarks import run_all

    steps = {s.name for s in run_all.plan(False, "")} | {s.name for s in run_all.OPT_IN}
    assert _gen().run_all_steps(ROOT / "benchmarks") == steps
    page = (DOCS / "benchmarks.md").read_text()
    offered = set(re.findall(r"run_all --only (\w+)", page))
    assert offered and offered <= steps
    assert "run_all --only spsa_sweep" not in page and "python -m benchmarks.spsa_sweep" in page
