"""The report's tables as text cells: per round, other metrics, flatness, bytes per site and phase, summary."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from edgetune.report.load import Run


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
    ("choice_loss", "choice loss", _fixed(".4f")),
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
