"""One row of a user's data -> one example, with errors that name the file, the row and the column.

A row (a JSON object, a parquet/CSV/``datasets`` record) holds one of three forms, each read from
the columns ``data.columns`` maps (``"instruction=question,response=answer"``; unmapped fields are
read from columns of their own name):

* ``instruction`` and ``response`` strings;
* ``text`` (read as instruction ``""`` and response ``text``);
* ``messages``: a chat, a list of ``{"role": "system"|"user"|"assistant", "content": str}`` (the
  ShareGPT spelling ``{"from": "human"|"gpt"|"system", "value": str}`` is accepted too; a JSON string
  of that list, as a CSV cell holds it, is parsed). It needs at least one non-empty assistant turn.

An optional ``system`` string is the row's own system prompt. Other string fields (``site``, ...)
are kept; fields of other types (ids, scores) are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from edgetune.config import DATA_FIELDS
from edgetune.data.prompts import CHAT_ROLES

KNOWN_STRING_FIELDS = ("instruction", "response", "text", "system", "site")
"""Fields that must be strings when present."""

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def column_names(columns: Mapping[str, str] | None) -> dict[str, str]:
    """``{field: column}`` for every field: the mapped column, else the field's own name."""
    columns = columns or {}
    return {f: columns.get(f, f) for f in DATA_FIELDS}


def to_example(obj: object, where: str, columns: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Validate one row and return its example dict.

    Parameters
    ----------
    obj
        The row (a dict of column -> value).
    where
        Its position for error messages: ``file.jsonl:LINE`` or ``file.parquet row N``.
    columns
        ``data.columns`` as a dict (``DataSection.column_map``).

    Returns
    -------
    dict
        ``{"instruction", "response", ...}`` or ``{"messages", "instruction", "response", ...}``
        (the last user and assistant turns), plus ``system`` and the row's other string fields.

    Raises
    ------
    ValueError
        Naming ``where``, the column and what is wrong.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    col = column_names(columns)
    row = {k: v for k, v in obj.items() if v is not None}  # parquet/CSV nulls: the cell is absent
    for name in KNOWN_STRING_FIELDS:
        column = col.get(name, name)
        if column in row and not isinstance(row[column], str):
            raise ValueError(f"{where}: column {column!r} must be a string, got {type(row[column]).__name__}")
    has_messages = col["messages"] in row
    has_pair = col["instruction"] in row or col["response"] in row
    has_text = col["text"] in row
    if has_messages + has_pair + has_text > 1:
        forms = [
            f
            for f, on in (("'text'", has_text), ("'instruction'/'response'", has_pair), ("'messages'", has_messages))
            if on
        ]
        raise ValueError(f"{where}: has both {' and '.join(forms)}; use one form")
    if has_messages:
        messages = _messages(row[col["messages"]], where, col["messages"])
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        last_answer = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        example: dict[str, Any] = {
            "messages": messages,
            "instruction": last_user,
            "response": last_answer,
            "where": where,
        }
    elif has_pair:
        for name in ("instruction", "response"):
            if col[name] not in row:
                mapped = f" (data.columns maps {name} to it)" if columns and name in columns else ""
                raise ValueError(f"{where}: has no {col[name]!r} column{mapped}")
        example = {"instruction": row[col["instruction"]], "response": row[col["response"]]}
        # An empty answer trains only the end-of-turn token: almost surely a broken export.
        if not example["response"].strip():
            raise ValueError(f"{where}: column {col['response']!r}: empty response")
    elif has_text:
        example = {"instruction": "", "response": row[col["text"]]}
        if not example["response"].strip():
            raise ValueError(f"{where}: column {col['text']!r}: empty text")
    else:
        present = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise ValueError(
            f"{where}: needs 'instruction' and 'response', or 'text', or 'messages' (columns here: {present}); "
            "map your own column names with data.columns, e.g. 'instruction=question,response=answer'"
        )
    if isinstance(row.get(col["system"]), str) and row[col["system"]].strip():
        example["system"] = row[col["system"]]
    used = {col[f] for f in DATA_FIELDS}
    extra = {k: v for k, v in row.items() if isinstance(v, str) and k not in used and k not in example}
    out = {**example, **extra}
    _check_encodable(out, where)
    return out


def _check_encodable(example: Mapping[str, Any], where: str) -> None:
    """A lone surrogate escape (``"\ud800"``) parses as JSON, but no tokenizer can encode it: fail here,
    naming the row, not later in a training step on a remote site.
    """
    texts: list[tuple[str, str]] = []
    for key, value in example.items():
        texts.append((key, key))
        if isinstance(value, str):
            texts.append((key, value))
        elif key == "messages":
            texts.extend((key, m["content"]) for m in value)
    for key, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            bad = ord(text[err.start])
            raise ValueError(f"{where}: field {key!r} holds a lone surrogate U+{bad:04X}, not text") from None


def _messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{where}: column {column!r} is a string but not a JSON list of messages ({err.msg})"
            ) from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: column {column!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: column {column!r}, message {j}: expected an object with role and content")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}: column {column!r}, message {j}: role {role!r} is not system, user or assistant")
        if not isinstance(content, str):
            raise ValueError(
                f"{where}: column {column!r}, message {j} ({role}): content must be a string, "
                f"got {type(content).__name__}"
            )
        if role == "assistant" and not content.strip():
            raise ValueError(f"{where}: column {column!r}, message {j}: empty assistant turn")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        roles = ", ".join(m["role"] for m in out)
        raise ValueError(f"{where}: column {column!r} has no assistant turn (roles: {roles}): nothing to train on")
    return out
