"""CPU benchmarks: each module is ``python -m benchmarks.NAME``; results land in ``benchmarks/results/``."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CODE_PATHS = ("edgetune", "benchmarks", "recipes")
"""What a benchmark's numbers depend on: a change there makes earlier results of other code."""


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


def code_version(root: Path) -> str | None:
    """The commit the code under ``root`` is at (12 hex digits), ``+dirty`` when ``CODE_PATHS`` have
    uncommitted changes; None outside a git checkout (an installed copy). Results record it so a run
    kept by ``--append`` can be told apart from one of today's code."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def other_code(rows: Sequence[dict[str, Any]], code: str | None, name: str) -> list[str]:
    """The ``name`` field of the finished ``rows`` not trained on ``code`` (another commit, or none on record:
    an unknown version is never taken for the same one)."""
    return [r[name] for r in rows if r.get("ok") and (code is None or r.get("code") != code)]
