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

The package: ``load.py`` reads a run folder, ``tables.py`` turns it into table cells, ``render.py``
builds the document and writes HTML or Markdown, ``comparison.py`` puts several runs side by side.
"""

from edgetune.report.comparison import compare, compare_row, cumulative_uplink, format_compare_table, plot_compare
from edgetune.report.load import Run, load_run
from edgetune.report.render import (
    CSS,
    FORMATS,
    PLOTS,
    Block,
    Code,
    Image,
    Table,
    Text,
    build_document,
    render_html,
    render_markdown,
    write_report,
)
from edgetune.report.tables import (
    IMV_KEYS,
    ROUND_COLUMNS,
    fmt_value,
    imv_table,
    ledger_tables,
    other_metrics_table,
    round_table,
    summary_items,
)

__all__ = [
    "CSS",
    "FORMATS",
    "IMV_KEYS",
    "PLOTS",
    "ROUND_COLUMNS",
    "Block",
    "Code",
    "Image",
    "Run",
    "Table",
    "Text",
    "build_document",
    "compare",
    "compare_row",
    "cumulative_uplink",
    "fmt_value",
    "format_compare_table",
    "imv_table",
    "ledger_tables",
    "load_run",
    "other_metrics_table",
    "plot_compare",
    "render_html",
    "render_markdown",
    "round_table",
    "summary_items",
    "write_report",
]
