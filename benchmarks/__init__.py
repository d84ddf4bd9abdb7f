"""CPU benchmarks: each module is ``python -m benchmarks.NAME``; results land in ``benchmarks/results/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def results_list(out: Path, benchmark: str, field: str) -> list[dict[str, Any]]:
    """``--append``: the rows of a results file ``benchmark`` wrote, a JSON list of objects that each have
    ``field``; anything else is a ``SystemExit`` naming the file (new results never build on a foreign one)."""
    try:
        rows = json.loads(out.read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) and field in r for r in rows):
            raise ValueError(f"expected a JSON list of rows with {field!r}")
    except ValueError as err:
        raise SystemExit(f"--append: {out} is not a {benchmark} results file ({err})") from err
    return rows
