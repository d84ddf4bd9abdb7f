"""Recipes and TOML: reading a recipe with ``key=value`` overrides, writing dotted keys as TOML tables,
and the ``[tool.flwr.app.config]`` table of pyproject.toml (``python -m edgetune.config``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from edgetune.config.run import RunConfig, flatten, from_run_config
from edgetune.config.values import Scalar

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
"""The source checkout's pyproject.toml (``--write-pyproject`` rewrites its config table)."""


def flatten_toml(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Turn nested TOML tables into dotted keys."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_toml(value, f"{name}."))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override with TOML value syntax (bare words become strings)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read a recipe TOML file into dotted keys, apply ``key=value`` overrides, then ``extra`` (dotted
    keys set by command-line options, which win), and validate the result.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"recipe {p} does not exist")
    try:
        flat = flatten_toml(tomllib.loads(p.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"recipe {p} is not valid TOML: {err}") from err
    for item in overrides or []:
        key, value = parse_override(item)
        flat[key] = value
    flat.update(extra or {})
    from_run_config(flat)  # validate now, with the recipe's name in the traceback
    return flat


def to_toml(flat: dict[str, Scalar]) -> str:
    """Write dotted keys as TOML tables (the inverse of ``flatten_toml`` for one level)."""
    top = {k: v for k, v in flat.items() if "." not in k}
    sections: dict[str, dict[str, Scalar]] = {}
    for key, value in flat.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for section, items in sections.items():
        lines.append("")
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in items.items())
    return "\n".join(lines) + "\n"


def toml_value(v: Scalar) -> str:
    """One scalar as a TOML literal (strings escaped: quotes, backslashes, control characters)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    out = []
    for ch in v:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def pyproject_table(cfg: RunConfig | None = None) -> str:
    """The ``[tool.flwr.app.config]`` block of pyproject.toml: every key, with ``cfg``'s values
    (default: the defaults).
    """
    lines = ["[tool.flwr.app.config]"]
    for line in to_toml(flatten(cfg if cfg is not None else RunConfig())).splitlines():
        lines.append(f"[tool.flwr.app.config.{line[1:]}" if line.startswith("[") else line)
    return "\n".join(lines).rstrip() + "\n"


def write_pyproject(path: Path) -> bool:
    """Rewrite the config block of ``path`` in place; return True if it changed."""
    text = path.read_text()
    start = text.index("[tool.flwr.app.config]")
    # the block ends at the first table that is not a tool.flwr.app.config sub-table
    pos = start
    while True:
        nxt = text.find("\n[", pos + 1)
        if nxt == -1:
            end = len(text)
            break
        if not text.startswith("[tool.flwr.app.config", nxt + 1):
            end = nxt + 1
            break
        pos = nxt
    new = text[:start] + pyproject_table() + "\n" + text[end:].lstrip("\n")
    if new != text:
        path.write_text(new)
        return True
    return False
