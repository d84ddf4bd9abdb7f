"""One run's report: a format-independent document (sections of tables, text, plots, code), rendered to
one self-contained HTML file or to Markdown, and written atomically.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgetune.io import atomic_write_bytes
from edgetune.report.load import Run, load_run
from edgetune.report.tables import imv_table, ledger_tables, other_metrics_table, round_table, summary_items

PLOTS = (
    ("loss_vs_bytes.png", "Held-out loss against cumulative bytes (uplink, and uplink + downlink)"),
    ("imv.png", "Flatness: checkpoint IMV and worker IMV against rounds"),
)
FORMATS = ("html", "md")


@dataclass
class Table:
    """A table block."""

    headers: list[str]
    rows: list[list[str]]


@dataclass
class Text:
    """A paragraph."""

    text: str


@dataclass
class Image:
    """A plot from the run folder."""

    path: Path
    caption: str


@dataclass
class Code:
    """A preformatted block."""

    text: str
    lang: str = ""


Block = Table | Text | Image | Code


def build_document(run: Run) -> list[tuple[str, list[Block]]]:
    """The report's sections, format-independent."""
    sections: list[tuple[str, list[Block]]] = []
    sections.append(("Summary", [Table(["", "value"], [[k, v] for k, v in summary_items(run)])]))

    headers, cells = round_table(run.rows)
    per_round: list[Block] = [
        Text(
            "One row per round from metrics.jsonl (round 0: before training). Bytes are encoded edgetune "
            "payloads summed over all sites; the Flower columns, when shown, are the serialized Flower "
            "messages that carried them; the real columns, when shown, are the TCP bytes a link meter "
            "counted on the sites' links in that round (round 0: run setup, app bundle included). "
            "The state hash is the first 12 hex digits."
        ),
        Table(headers, cells),
    ]
    sections.append(("Per round", per_round))

    plots: list[Block] = []
    for name, caption in PLOTS:
        p = run.dir / name
        if p.is_file():
            plots.append(Image(p, caption))
    if not plots:
        plots.append(Text("No plots in the run folder yet (they are written when the run finishes)."))
    sections.append(("Plots", plots))

    tables = ledger_tables(run.ledger)
    if tables:
        blocks: list[Block] = [
            Text(
                "From ledger.jsonl: every message's encoded size, summed over all rounds and phases. "
                "downlink = server to site, uplink = site to server."
            ),
            Table(*tables["site"]),
        ]
        if "phase" in tables:
            blocks += [Text("By phase:"), Table(*tables["phase"])]
    else:
        blocks = [Text("No ledger.jsonl in the run folder.")]
    sections.append(("Bytes per site", blocks))

    headers, cells = imv_table(run.rows)
    if headers:
        sections.append(
            (
                "Flatness (IMV / MV)",
                [
                    Text(
                        "imv: checkpoint valley probe (1 / mean radius, higher is sharper); worker_mv / "
                        "worker_imv: the spread of dppf's site copies."
                    ),
                    Table(headers, cells),
                ],
            )
        )

    headers, cells = other_metrics_table(run.rows)
    if headers:
        sections.append(("Other per-round metrics", [Table(headers, cells)]))

    if run.config_text:
        sections.append(
            ("Configuration", [Text("config.toml: the resolved configuration."), Code(run.config_text, "toml")])
        )
    else:
        sections.append(("Configuration", [Text("No config.toml in the run folder.")]))
    return sections


_NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?$")


def _is_numeric_column(rows: Sequence[Sequence[str]], i: int) -> bool:
    """Right-align a column whose non-empty cells are all numbers (a total row's label aside)."""
    cells = [r[i] for r in rows if i < len(r) and r[i] and r[i] != "total"]
    return bool(cells) and all(_NUMERIC.match(c) for c in cells)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 78em;
       padding: 0 1em; color: #1f2328; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.55em; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fbfcfd; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9em; }
"""


def render_html(run: Run, sections: list[tuple[str, list[Block]]]) -> str:
    """One self-contained HTML file: inline CSS, plots as base64 ``data:`` URIs."""

    def esc(text: str) -> str:
        return html.escape(text, quote=False)

    def attr(text: str) -> str:
        return html.escape(text, quote=True)

    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>edgetune report: {esc(run.name)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>edgetune run <code>{esc(run.name)}</code></h1>",
        f"<p>{esc(run.algorithm)} · {max(int(r.get('round', 0)) for r in run.rows)} rounds recorded · "
        "generated by <code>edgetune report</code> from the run folder</p>",
    ]
    for title, blocks in sections:
        out.append(f"<h2>{esc(title)}</h2>")
        for block in blocks:
            if isinstance(block, Text):
                out.append(f"<p>{esc(block.text)}</p>")
            elif isinstance(block, Code):
                out.append(f"<pre><code>{esc(block.text)}</code></pre>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{attr(block.caption)}">'
                    f"<figcaption>{esc(block.caption)} ({esc(block.path.name)})</figcaption></figure>"
                )
            else:
                out.append("<table>")
                out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.headers) + "</tr>")
                numeric = [_is_numeric_column(block.rows, i) for i in range(len(block.headers))]
                for row in block.rows:
                    tds = []
                    for cell, num in zip(row, numeric):
                        cls = ' class="num"' if num else ""
                        tds.append(f"<td{cls}>{esc(cell)}</td>")
                    out.append("<tr>" + "".join(tds) + "</tr>")
                out.append("</table>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_markdown(run: Run, sections: list[tuple[str, list[Block]]], out_path: Path) -> str:
    """Markdown; plots linked by their path relative to ``out_path``."""
    out = [
        f"# edgetune run `{run.name}`",
        "",
        f"{run.algorithm} · generated by `edgetune report` from the run folder.",
        "",
    ]
    for title, blocks in sections:
        out += [f"## {title}", ""]
        for block in blocks:
            if isinstance(block, Text):
                out += [block.text, ""]
            elif isinstance(block, Code):
                fence = "```"
                while fence in block.text:
                    fence += "`"
                out += [f"{fence}{block.lang}", block.text.rstrip("\n"), fence, ""]
            elif isinstance(block, Image):
                rel = Path(os.path.relpath(block.path.resolve(), out_path.resolve().parent)).as_posix()
                out += [f"![{block.caption}]({rel})", "", f"*{block.caption} ({block.path.name})*", ""]
            else:
                numeric = [_is_numeric_column(block.rows, i) for i in range(len(block.headers))]
                out.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
                out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def write_report(run_dir: Path | str, *, out: Path | str | None = None, fmt: str | None = None) -> Path:
    """Write the report of one run; return its path.

    Parameters
    ----------
    run_dir
        The run folder (``runs/<run-id>``).
    out
        Output file; default ``RUN_DIR/report.html`` (``report.md`` for Markdown).
    fmt
        ``html`` or ``md``; default: from ``out``'s suffix (``.md``/``.markdown``), else ``html``.
    """
    run = load_run(run_dir)
    if fmt is None:
        fmt = "md" if out is not None and Path(out).suffix.lower() in {".md", ".markdown"} else "html"
    fmt = fmt.lower()
    if fmt == "markdown":
        fmt = "md"
    if fmt not in FORMATS:
        raise ValueError(f"--format must be html or md, got {fmt!r}")
    path = Path(out) if out is not None else run.dir / f"report.{fmt}"
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name for the report")
    sections = build_document(run)
    text = render_html(run, sections) if fmt == "html" else render_markdown(run, sections, path)
    atomic_write_bytes(path, text.encode("utf-8"), mode=0o644)
    return path
