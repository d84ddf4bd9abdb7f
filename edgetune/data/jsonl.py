"""Site data as JSON Lines: validated loading and atomic writing.

A row is a JSON object with either ``instruction`` and ``response`` strings, or a ``text``
string (read as instruction ``""`` and response ``text``). Other string fields, such as
``site``, are kept; fields of other types (ids, scores) are dropped. A bad file fails on
load with the file and line number, not later inside a training step on a remote site.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

KNOWN_FIELDS = ("instruction", "response", "text", "site")
"""Fields that must be strings when present."""


def load_jsonl(path: str | os.PathLike[str], *, max_bytes: int = 2_000_000_000) -> list[dict[str, str]]:
    """Load and validate a JSONL file of examples.

    Parameters
    ----------
    path
        JSONL file, UTF-8, one JSON object per line; blank lines are skipped.
    max_bytes
        Largest file accepted, checked before reading.

    Returns
    -------
    list[dict[str, str]]
        One dict per row with ``instruction`` and ``response`` plus the row's other string
        fields (``text`` rows become ``{"instruction": "", "response": text, ...}``).

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
            rows.append(_example(obj, where))
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


def _example(obj: object, where: str) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in KNOWN_FIELDS:
        if name in obj and not isinstance(obj[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(obj[name]).__name__}")
    has_pair = "instruction" in obj or "response" in obj
    if has_pair and "text" in obj:
        raise ValueError(f"{where}: has both 'text' and 'instruction'/'response'; use one form")
    if has_pair:
        if "instruction" not in obj or "response" not in obj:
            missing = "response" if "instruction" in obj else "instruction"
            raise ValueError(f"{where}: has no {missing!r} field")
        instruction, response = obj["instruction"], obj["response"]
    elif "text" in obj:
        instruction, response = "", obj["text"]
    else:
        raise ValueError(f"{where}: needs 'instruction' and 'response', or 'text'")
    # An empty answer trains only the end-of-turn token: almost surely a broken export.
    if not response.strip():
        raise ValueError(f"{where}: empty {'text' if 'text' in obj else 'response'}")
    extra = {k: v for k, v in obj.items() if isinstance(v, str) and k not in ("instruction", "response", "text")}
    out = {"instruction": instruction, "response": response, **extra}
    for key, value in out.items():
        for text in (key, value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                # a lone surrogate escape ("\ud800") parses, but no tokenizer can encode it: fail here,
                # with the line, not later in a training step on a remote site
                bad = ord(text[err.start])
                raise ValueError(f"{where}: field {key!r} holds a lone surrogate U+{bad:04X}, not text") from None
    return out


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
