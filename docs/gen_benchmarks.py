"""Generate ``docs/benchmarks.md`` from the JSON rows in ``benchmarks/results/``.

Usage (from the repository root)::

    python docs/gen_benchmarks.py [--results benchmarks/results] [--out docs/benchmarks.md] [--check]

One section per benchmark script in ``benchmarks/`` (its module docstring's first line says what it
measures; a missing results file is shown as "not yet run") and per results file without a script.
Each results file holds a JSON list of row objects (a single object counts as one row). Rows with the
same keys share a table; keys nobody knows about are shown as they are. Wide tables (more keys than
fit) are transposed: one line per key, one column per row. The output depends only on the files'
contents (sorted names, no timestamps), so the page can be committed and regenerated without noise.
``--check`` writes nothing and exits 1 when ``--out`` differs from what would be generated.
Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
NOT_BENCHMARKS = {"__init__", "run_all", "plots"}
IMG_DIR = "img/benchmarks"
"""Where the plots are copied, relative to the generated page (mkdocs serves only docs/)."""
MAX_COLUMNS = 8
"""A table with more keys than this is transposed (keys down, rows across)."""
MAX_CELL = 80


def describe(script: Path) -> str:
    """First paragraph of a benchmark script's module docstring (read with ``ast``, not imported)."""
    try:
        doc = ast.get_docstring(ast.parse(script.read_text()))
    except (OSError, SyntaxError, ValueError):
        return ""
    if not doc:
        return ""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


def fmt_scalar(value: Any) -> str:
    """One value as table text: ints with thousands separators, floats to 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def fmt_cell(value: Any) -> str:
    """A cell: scalars formatted, short lists inline, anything else summarised; pipes escaped."""
    if isinstance(value, list):
        if len(value) <= 4 and all(not isinstance(v, list | dict) for v in value):
            text = ", ".join(fmt_scalar(v) for v in value)
        else:
            text = f"({len(value)} items)"
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = fmt_scalar(value)
    text = " ".join(text.split())
    if len(text) > MAX_CELL:
        text = text[: MAX_CELL - 1] + "…"
    return text.replace("|", "\\|")


def group_rows(rows: list[dict[str, Any]]) -> list[tuple[list[str], list[dict[str, Any]]]]:
    """Rows grouped by their key set, in order of first appearance; keys in first-seen order."""
    groups: dict[frozenset[str], tuple[list[str], list[dict[str, Any]]]] = {}
    for row in rows:
        sig = frozenset(row)
        if sig not in groups:
            groups[sig] = (list(row), [])
        groups[sig][1].append(row)
    return list(groups.values())


def label_key(keys: list[str], rows: list[dict[str, Any]]) -> str | None:
    """The first key whose values are distinct non-empty strings (else distinct integers): it names the
    columns of a transposed table.
    """
    for kinds in (str, int):
        for k in keys:
            values = [r.get(k) for r in rows]
            ok = all(isinstance(v, kinds) and not isinstance(v, bool) and v != "" for v in values)
            if ok and len(set(values)) == len(values):
                return k
    return None


def render_table(keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table; transposed when there are more keys than ``MAX_COLUMNS``."""
    if len(keys) <= MAX_COLUMNS:
        lines = ["| " + " | ".join(k.replace("|", "\\|") for k in keys) + " |"]
        lines.append("|" + "---|" * len(keys))
        lines += ["| " + " | ".join(fmt_cell(r.get(k)) for k in keys) + " |" for r in rows]
        return lines
    label = label_key(keys, rows)
    names = [fmt_cell(r[label]) for r in rows] if label else [f"row {i + 1}" for i in range(len(rows))]
    header = ["key" if not label else f"`{label}`", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k in keys:
        if k == label:
            continue
        lines.append("| `" + k.replace("|", "\\|") + "` | " + " | ".join(fmt_cell(r.get(k)) for r in rows) + " |")
    return lines


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one results file; ``ValueError`` says why a file cannot be used."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not readable as JSON ({err})") from err
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        # one run's checks (gpu_check): one table of what every check has, the rest of a check in
        # `details`, and the machine it ran on
        checks = [r for r in data["rows"] if isinstance(r, dict)]
        if len(checks) != len(data["rows"]):
            raise ValueError("its rows are not all JSON objects")
        shared = [k for k in (checks[0] if checks else {}) if all(k in r for r in checks)]
        run = {k: data[k] for k in ("device_name", "torch_version") if k in data}
        data = [
            {**{k: r[k] for k in shared}, "details": {k: v for k, v in r.items() if k not in shared}, **run}
            for r in checks
        ]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON list of objects, got {type(data).__name__}")
    rows = [r for r in data if isinstance(r, dict)]
    if len(rows) != len(data):
        raise ValueError(f"{len(data) - len(rows)} of {len(data)} entries are not JSON objects")
    return rows


@functools.cache
def run_all_steps(benchmarks: Path) -> frozenset[str]:
    """Names ``benchmarks/run_all.py`` accepts in ``--only``: the first argument of each ``Step(...)`` (read with
    ``ast``); a script outside them is run only on its own, so the page offers no ``run_all`` line for it.
    """
    path = benchmarks / "run_all.py"
    if not path.is_file():
        return frozenset()
    return frozenset(
        {
            node.args[0].value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "Step"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        }
    )


def section(name: str, results: Path, script: Path | None, rel_results: str) -> list[str]:
    """One benchmark's section."""
    lines = [f"## {name}", ""]
    if script is not None:
        what = describe(script)
        if what:
            lines += [what, ""]
        also = f" (or `python -m benchmarks.run_all --only {name}`)" if name in run_all_steps(script.parent) else ""
        lines += [f"Run: `python -m benchmarks.{name}`{also}.", ""]
    path = results / f"{name}.json"
    if not path.is_file():
        lines += [f"*Not yet run*: no `{rel_results}/{name}.json`.", ""]
        return lines
    try:
        rows = load_rows(path)
    except ValueError as err:
        lines += [f"*Could not be read*: `{rel_results}/{name}.json` is {err}.", ""]
        return lines
    if not rows:
        lines += [f"`{rel_results}/{name}.json` holds no rows.", ""]
        return lines
    lines += [f"From `{rel_results}/{name}.json` ({len(rows)} row{'s' if len(rows) != 1 else ''}).", ""]
    groups = group_rows(rows)
    for i, (keys, group) in enumerate(groups):
        if len(groups) > 1:
            lines += [f"Rows with the same keys, table {i + 1} of {len(groups)}:", ""]
        lines += render_table(keys, group) + [""]
    for extra in sorted(results.glob(f"{name}.*")):
        if extra.suffix == ".png":
            lines += [f"![{name}]({IMG_DIR}/{extra.name})", ""]
        elif extra.suffix != ".json":
            lines += [f"Also written: `{rel_results}/{extra.name}`.", ""]
    return lines


def copy_plots(results: Path, page_dir: Path) -> list[Path]:
    """Copy the result PNGs next to the page (``IMG_DIR``), rewriting only those that changed."""
    written = []
    for png in sorted(results.glob("*.png")):
        dest = page_dir / IMG_DIR / png.name
        data = png.read_bytes()
        if not dest.is_file() or dest.read_bytes() != data:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            written.append(dest)
    return written


def generate(results: Path = DEFAULT_RESULTS, benchmarks: Path | None = None) -> str:
    """The whole page as Markdown."""
    benchmarks = benchmarks if benchmarks is not None else results.parent
    try:
        rel_results = results.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        rel_results = results.name
    scripts = {p.stem: p for p in benchmarks.glob("*.py") if p.stem not in NOT_BENCHMARKS}
    names = sorted(set(scripts) | {p.stem for p in results.glob("*.json")})
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by docs/gen_benchmarks.py from benchmarks/results/*.json; do not edit by hand. -->",
        "",
        "Every benchmark writes a JSON list of rows to `benchmarks/results/`; this page shows them as they are",
        "(numbers to 4 significant digits; wide tables transposed, one line per key) with the plot each one draws.",
        "Run them all with `make bench` (= `edgetune bench` = `python -m benchmarks.run_all`; about 20 minutes on",
        "2 CPU cores; `edgetune bench --quick` for a smoke run on the tiny model, whose numbers are not the",
        "published ones), then `make docs` to regenerate this page.",
        "The hardware each row ran on is in its own keys (`device`, `cpu_count`, `torch_version`, ...) where the",
        "benchmark records it.",
        "",
    ]
    if not names:
        lines += ["No benchmark has been run yet.", ""]
    for name in names:
        lines += section(name, results, scripts.get(name), rel_results)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) the page."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out is not up to date; write nothing")
    args = parser.parse_args(argv)
    text = generate(args.results)
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run python docs/gen_benchmarks.py", file=sys.stderr)
            return 1
        return 0
    if not args.out.is_file() or args.out.read_text() != text:
        args.out.write_text(text)
    copy_plots(args.results, args.out.parent)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
