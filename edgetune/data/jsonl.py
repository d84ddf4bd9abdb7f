"""Site data as JSON Lines: validated loading and atomic writing.

A row is a JSON object in one of the forms ``data/rows.py`` reads: ``instruction`` and
``response`` strings, a ``text`` string, or chat ``messages``; ``columns`` maps those fields to the
file's own key names. Other string fields, such as ``site``, are kept; fields of other types (ids,
scores) are dropped. A bad file fails on load with the file and line number, not later inside a
training step on a remote site.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edgetune.data.rows import to_example


def load_jsonl(
    path: str | os.PathLike[str], *, columns: Mapping[str, str] | None = None, max_bytes: int = 2_000_000_000
) -> list[dict[str, Any]]:
    """Load and validate a JSONL file of examples.

    Parameters
    ----------
    path
        JSONL file, UTF-8, one JSON object per line; blank lines are skipped.
    columns
        ``data.columns`` as a dict: which keys hold instruction, response, text, messages, system.
    max_bytes
        Largest file accepted, checked before reading.

    Returns
    -------
    list[dict]
        One example per row (``rows.to_example``): ``instruction`` and ``response`` plus the row's
        other string fields (``text`` rows become ``{"instruction": "", "response": text, ...}``), or
        ``messages`` for chat rows.

    Raises
    ------
    ValueError
        If the file is too large or empty, or a line is not a valid example; the message
        names the file and the line number.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, more than max_bytes={max_bytes}")
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
            if line_no == 1:
                line = line.removeprefix("\ufeff")  # a BOM from Windows editors is not an error
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg}, column {err.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply to be an example") from None
            rows.append(to_example(obj, where, columns))
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return rows


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` as JSONL, atomically.

    The rows go to a temporary file in the same folder, which is fsynced and then renamed
    over ``path``, so a crash or a full disk leaves either the old file or the new one,
    never a torn one.

    Parameters
    ----------
    path
        Destination file; its folder must exist.
    rows
        JSON-serialisable mappings, one per line.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk; not possible on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
