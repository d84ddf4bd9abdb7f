"""Reports of a run folder (``edgetune report``) and of several runs side by side (``edgetune compare``).

Reads only what a run leaves in ``runs/<run-id>/`` (see ``edgetune/runs.py``): ``config.toml``,
``metrics.jsonl``, ``summary.json``, ``ledger.jsonl`` and the plots ``loss_vs_bytes.png`` and
``imv.png``. A run that has not finished yet (no summary, no plots) still gets a report of the rounds
it has.

``report`` writes one file. HTML is self-contained: the plots are embedded as base64 ``data:`` URIs
and the styles are inline, so the file can be mailed or archived alone. Markdown links the plots by
their path relative to the report. The output depends only on the run folder's files (no
timestamps), so a report of the same folder is the same bytes.

``compare`` draws held-out loss (and accuracy, where measured) against cumulative uplink bytes, one
line per run, and returns one table row per run.

No Flower and no torch here; matplotlib is imported only to draw.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import tomllib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.io import atomic_write_bytes, read_jsonl

PLOTS = (
    ("loss_vs_bytes.png", "Held-out loss against cumulative bytes (uplink, and uplink + downlink)"),
    ("imv.png", "Flatness: checkpoint IMV and worker IMV against rounds"),
)
FORMATS = ("html", "md")


# --- reading a run folder -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a report needs from one run folder."""

    dir: Path
    rows: list[dict[str, Any]]
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    ledger: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The run's name: its folder's name."""
        return self.dir.name

    @property
    def algorithm(self) -> str:
        """From ``summary.json``, else ``config.toml``, else ``?``."""
        if self.summary and self.summary.get("algorithm"):
            return str(self.summary["algorithm"])
        return str(self.config.get("algorithm") or "?")


def load_run(run_dir: Path | str) -> Run:
    """Read a run folder; ``ValueError`` (naming the path) when it is not one."""
    path = Path(run_dir)
    if not path.exists():
        raise ValueError(f"{path}: no such run folder")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder (expected a run folder such as runs/<run-id>)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{path}: not a run folder (no metrics.jsonl)")
    rows = sorted(read_jsonl(metrics), key=lambda r: int(r.get("round", 0)))
    if not rows:
        raise ValueError(f"{metrics}: no rounds recorded yet")
    run = Run(dir=path, rows=rows)
    config_path = path / "config.toml"
    if config_path.is_file():
        run.config_text = config_path.read_text()
        try:
            run.config = _flatten(tomllib.loads(run.config_text))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{config_path}: not valid TOML ({err})") from err
    summary_path = path / "summary.json"
    if summary_path.is_file():
        try:
            run.summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{summary_path}: not valid JSON ({err})") from err
    run.ledger = read_jsonl(path / "ledger.jsonl")
    _add_link_bytes(run.rows, run.ledger)
    return run


def _add_link_bytes(rows: list[dict[str, Any]], ledger: Sequence[dict[str, Any]]) -> None:
    """Per round, the real bytes a link meter counted (``link`` ledger rows, all sites) next to the payload."""
    link: dict[tuple[int, str], int] = defaultdict(int)
    for r in ledger:
        if r.get("kind") == "link":
            link[(int(r.get("round_idx", -1)), str(r.get("direction")))] += int(r.get("num_bytes", 0))
    if not link:
        return
    for row in rows:
        up, down = link.get((int(row.get("round", -1)), "up")), link.get((int(row.get("round", -1)), "down"))
        if up is not None or down is not None:
            row["uplink_link_bytes"], row["downlink_link_bytes"] = up or 0, down or 0
            if up and row.get("uplink_bytes") is not None:
                row["uplink_payload_share"] = row["uplink_bytes"] / up


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- formatting -----------------------------------------------------------------------------------------------------


def fmt_value(value: Any) -> str:
    """A value as table text: integers with thousands separators, floats to 6 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in sorted(value.items()))
    if isinstance(value, list):
        return ", ".join(fmt_value(v) for v in value)
    return str(value)


def _fixed(spec: str) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return fmt_value(value)

    return fmt


def _hash_prefix(value: Any) -> str:
    return str(value)[:12]


def _rejections(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{site}: {reason}" for site, reason in sorted(value.items()))
    return fmt_value(value)


ROUND_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("round", "round", fmt_value),
    ("train_loss", "train loss", _fixed(".4f")),
    ("heldout_loss", "held-out loss", _fixed(".4f")),
    ("accuracy", "accuracy", _fixed(".3f")),
    ("uplink_bytes", "uplink B", _fixed(",")),
    ("downlink_bytes", "downlink B", _fixed(",")),
    ("cum_uplink_bytes", "cum. uplink B", _fixed(",")),
    ("cum_downlink_bytes", "cum. downlink B", _fixed(",")),
    ("uplink_flower_bytes", "uplink Flower B", _fixed(",")),
    ("downlink_flower_bytes", "downlink Flower B", _fixed(",")),
    ("uplink_link_bytes", "uplink real B", _fixed(",")),
    ("downlink_link_bytes", "downlink real B", _fixed(",")),
    ("uplink_payload_share", "payload / real up", _fixed(".2%")),
    ("num_accepted", "sites", _fixed(".0f")),
    ("num_rejected", "rejected", _fixed(".0f")),
    ("wall_s", "wall s", _fixed(".2f")),
    ("state_hash", "state hash", _hash_prefix),
    ("worker_mv", "MV", _fixed(".4g")),
    ("worker_imv", "worker IMV", _fixed(".4g")),
    ("imv", "IMV", _fixed(".4g")),
    ("imv_radius", "IMV radius", _fixed(".4g")),
    ("rejected", "rejections", _rejections),
)
"""The per-round table: (metrics key, header, format). A column shows only when some row has the key;
the Flower byte columns only when some row has a non-zero value (in-process runs have no Flower); the
real (link) columns only when link-meter logs were merged into the run (``edgetune/linkmeter.py``)."""

IMV_KEYS = ("imv", "imv_radius", "imv_base_loss", "imv_capped", "worker_mv", "worker_imv", "dppf_alpha", "dppf_lam")


def round_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the per-round table."""
    cols = []
    for key, header, fmt in ROUND_COLUMNS:
        values = [r.get(key) for r in rows]
        if all(v is None for v in values):
            continue
        if key.endswith("_flower_bytes") and not any(values):
            continue
        cols.append((key, header, fmt))
    cells = [["" if r.get(k) is None else fmt(r[k]) for k, _, fmt in cols] for r in rows]
    return [h for _, h, _ in cols], cells


def other_metrics_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Every per-round key the main table does not show (algorithm-specific metrics), by round."""
    shown = {k for k, _, _ in ROUND_COLUMNS}
    keys = sorted({k for r in rows for k in r} - shown)
    if not keys:
        return [], []
    return ["round", *keys], [[fmt_value(r.get("round")), *(fmt_value(r.get(k)) for k in keys)] for r in rows]


def imv_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rounds with a flatness measurement (checkpoint valley probe or dppf worker spread)."""
    keys = [k for k in IMV_KEYS if any(r.get(k) is not None for r in rows)]
    if not keys:
        return [], []
    probed = [r for r in rows if any(r.get(k) is not None for k in keys)]
    return ["round", *keys], [[fmt_value(r.get("round")), *(fmt_value(r.get(k)) for k in keys)] for r in probed]


def _natural(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def ledger_tables(ledger: Sequence[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Bytes per site per direction (payload, and Flower-serialized where recorded); per phase if several."""
    if not ledger:
        return {}
    kinds = sorted({str(r.get("kind", "payload")) for r in ledger}, key=lambda k: (k != "payload", k))
    per_site: dict[str, dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
    messages: dict[str, int] = defaultdict(int)
    per_phase: dict[str, dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
    for r in ledger:
        site, kind, direction = str(r.get("site_id")), str(r.get("kind", "payload")), str(r.get("direction"))
        n = int(r.get("num_bytes", 0))
        per_site[site][(kind, direction)] += n
        per_phase[str(r.get("phase"))][(kind, direction)] += n
        if kind == "payload":
            messages[site] += 1
    cols = [(kind, d) for kind in kinds for d in ("down", "up")]
    names = {"down": "downlink", "up": "uplink"}
    headers = [f"{names[d]} {'' if kind == 'payload' else kind + ' '}B" for kind, d in cols]
    sites = sorted(per_site, key=_natural)
    cells = [[s, *(f"{per_site[s][c]:,}" for c in cols), f"{messages[s]:,}"] for s in sites]
    cells.append(["total", *(f"{sum(per_site[s][c] for s in sites):,}" for c in cols), f"{sum(messages.values()):,}"])
    out = {"site": (["site", *headers, "payload messages"], cells)}
    if len(per_phase) > 1:
        phases = sorted(per_phase)
        out["phase"] = (["phase", *headers], [[p, *(f"{per_phase[p][c]:,}" for c in cols)] for p in phases])
    return out


def summary_items(run: Run) -> list[tuple[str, str]]:
    """The key facts first, then every other entry of ``summary.json``."""
    facts: list[tuple[str, str]] = [("run folder", str(run.dir)), ("algorithm", run.algorithm)]
    for key in ("model.path", "model.trainable", "run.num_sites", "run.seed", "num_rounds"):
        if key in run.config:
            facts.append((key, fmt_value(run.config[key])))
    rounds_done = max(int(r.get("round", 0)) for r in run.rows)
    facts.append(("rounds recorded", str(rounds_done)))
    if run.summary is None:
        facts.append(("summary.json", "not written (the run has not finished)"))
    else:
        seen = {k for k, _ in facts}
        for key, value in run.summary.items():
            if key not in seen:
                facts.append((key, fmt_value(value)))
    return facts


# --- one run: an intermediate document, rendered to HTML or Markdown ------------------------------------------------


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


# --- several runs ---------------------------------------------------------------------------------------------------


def cumulative_uplink(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Cumulative uplink payload bytes after each row (``cum_uplink_bytes``, else a running sum)."""
    out, total = [], 0
    for r in rows:
        total += int(r.get("uplink_bytes") or 0)
        out.append(int(r["cum_uplink_bytes"]) if r.get("cum_uplink_bytes") is not None else total)
    return out


def compare_row(run: Run) -> dict[str, Any]:
    """One run's line of the comparison table, from its metrics rows (so unfinished runs work)."""
    losses = [r["heldout_loss"] for r in run.rows if r.get("heldout_loss") is not None]
    accs = [r["accuracy"] for r in run.rows if r.get("accuracy") is not None]
    trained = [r for r in run.rows if int(r.get("round", 0)) > 0]
    return {
        "run": run.name,
        "algorithm": run.algorithm,
        "rounds": max(int(r.get("round", 0)) for r in run.rows),
        "heldout_loss_first": losses[0] if losses else None,
        "heldout_loss_last": losses[-1] if losses else None,
        "accuracy_first": accs[0] if accs else None,
        "accuracy_last": accs[-1] if accs else None,
        "uplink_bytes_total": sum(int(r.get("uplink_bytes") or 0) for r in trained),
        "downlink_bytes_total": sum(int(r.get("downlink_bytes") or 0) for r in trained),
        "dir": str(run.dir),
    }


def _arrow(first: Any, last: Any, spec: str) -> str:
    if first is None and last is None:
        return "-"
    return f"{format(first, spec)} → {format(last, spec)}"


def format_compare_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as an aligned plain-text table (one line per run)."""
    headers = ["run", "algorithm", "rounds", "held-out loss", "accuracy", "uplink B", "downlink B"]
    cells = [
        [
            r["run"],
            r["algorithm"],
            str(r["rounds"]),
            _arrow(r["heldout_loss_first"], r["heldout_loss_last"], ".4f"),
            _arrow(r["accuracy_first"], r["accuracy_last"], ".3f"),
            f"{r['uplink_bytes_total']:,}",
            f"{r['downlink_bytes_total']:,}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    right = {2, 5, 6}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(s.rstrip() for s in out) + "\n"


def plot_compare(runs: Sequence[Run], path: Path) -> None:
    """Held-out loss (left) and accuracy (right, where any run measured it) against cumulative uplink bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any(r.get("accuracy") is not None for run in runs for r in run.rows)
    ncols = 2 if has_acc else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), dpi=120, squeeze=False)
    panels = [("heldout_loss", "held-out loss (answer tokens)", axes[0][0])]
    if has_acc:
        panels.append(("accuracy", "exact-match accuracy", axes[0][1]))
    for key, ylabel, ax in panels:
        for run in runs:
            cum = cumulative_uplink(run.rows)
            pts = [(max(c, 1), r[key]) for c, r in zip(cum, run.rows) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{run.algorithm} · {run.name}")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bytes (encoded payloads; round 0 at 1 B)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle("edgetune compare")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), mode=0o644)


def compare(run_dirs: Sequence[Path | str], out: Path | str) -> list[dict[str, Any]]:
    """Plot several runs into ``out`` (PNG) and return one table row per run."""
    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give a file name for the plot (e.g. compare.png)")
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: the plot is a PNG; give a .png file name")
    runs = [load_run(d) for d in run_dirs]
    plot_compare(runs, out)
    return [compare_row(run) for run in runs]
