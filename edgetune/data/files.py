"""Your own data, from the files you already have: JSONL, JSON, parquet, CSV, ``save_to_disk`` folders.

``load_examples(path, columns=...)`` picks the reader from the path:

    *.jsonl                     edgetune's own reader (errors name ``file:LINE``)
    *.json, *.parquet, *.csv    ``datasets``' builders (offline, cached in a temporary folder)
    a folder                    ``datasets.load_from_disk`` (a ``Dataset``, or the ``train`` split of a
                                ``DatasetDict``)

Every row goes through ``rows.to_example``, so all formats accept the same three forms
(instruction/response, text, chat messages) with the same column mapping and the same errors,
naming the file, the row (1-based) and the column. A mapped column that the table lacks is
reported before any row is read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgetune.data.jsonl import load_jsonl
from edgetune.data.rows import column_names, to_example

TABLE_SUFFIXES = (".json", ".parquet", ".csv")
"""Files read with ``datasets`` (``.jsonl`` has its own reader)."""


def load_examples(path: str | os.PathLike[str], *, columns: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Examples from a data file or a ``save_to_disk`` folder (see the module docstring).

    Raises
    ------
    ValueError
        The path does not exist or has an unknown format, a mapped column is missing, or a row is
        invalid (file, row and column named); or the file holds no rows.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return load_jsonl(path, columns=columns)
    if path.is_dir():
        records, names = _from_disk(path)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        records, names = _from_file(path)
    else:
        raise ValueError(
            f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .parquet, .csv or a folder "
            "written by datasets' save_to_disk"
        )
    _check_columns(path, names, columns)
    if not records:
        raise ValueError(f"{path}: no examples (the table has no rows)")
    return [to_example(record, f"{path} row {i}", columns) for i, record in enumerate(records, start=1)]


def _from_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    from datasets import Dataset, Features, Value
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    # a private cache: reading a user's file must not leave Arrow copies in ~/.cache
    with tempfile.TemporaryDirectory(prefix="edgetune-data-") as cache:
        try:
            if path.suffix.lower() == ".parquet":
                ds = Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
            elif path.suffix.lower() == ".csv":
                ds = Dataset.from_csv(str(path), cache_dir=cache, keep_in_memory=True)
                # CSV cells are text: a column of numbers must not turn into ints
                ds = ds.cast(Features({name: Value("string") for name in ds.column_names}))
            else:
                ds = Dataset.from_json(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as err:  # pyarrow and datasets raise many types for a malformed file
            raise ValueError(f"{path}: cannot be read as {path.suffix[1:]}: {type(err).__name__}: {err}") from None
        return ds.to_list(), list(ds.column_names)


def _from_disk(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path), keep_in_memory=True)
    except Exception as err:
        raise ValueError(
            f"{path}: a folder, but not one written by datasets' save_to_disk ({type(err).__name__}: {err})"
        ) from None
    if isinstance(ds, DatasetDict):
        splits = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise ValueError(
                f"{path}: a DatasetDict with splits {splits} and no 'train' split; save the split to use "
                "(ds['name'].save_to_disk(...)) or give held-out data in data.eval_path"
            )
    return ds.to_list(), list(ds.column_names)


def _check_columns(path: Path, names: list[str], columns: Mapping[str, str] | None) -> None:
    have = set(names)
    for field, column in (columns or {}).items():
        if column not in have:
            raise ValueError(
                f"data.columns maps {field} to {column!r}, but {path} has no column {column!r} "
                f"(its columns: {', '.join(names) or 'none'})"
            )
    col = column_names(columns)
    if not ({col["instruction"], col["response"]} <= have or col["text"] in have or col["messages"] in have):
        raise ValueError(
            f"{path} has none of the columns instruction + response, text or messages (its columns: "
            f"{', '.join(names) or 'none'}); map yours with data.columns, e.g. 'instruction=prompt,response=completion'"
        )
