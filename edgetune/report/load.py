"""Reading a run folder for a report: ``metrics.jsonl`` rows (with the link meters' real bytes per
round, when merged), ``config.toml``, ``summary.json`` and ``ledger.jsonl``.
"""

from __future__ import annotations

import json
import tomllib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.io import read_jsonl


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
            run.config = flatten_tables(tomllib.loads(run.config_text))
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


def flatten_tables(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys (``{"spsa": {"lr": 1}}`` -> ``{"spsa.lr": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten_tables(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
