"""Real technical prose no one on this project wrote: the docstrings of installed Python packages.

``data.source = "docs"`` gives each site the documentation of one open-source package that
edgetune already depends on, so the corpus installs with edgetune from PyPI and the split is the
text's natural source (each project's own authors, vocabulary and style):

    site-0: transformers   site-1: datasets   site-2: peft   site-3: flwr   (then cycling)

Passages are the module, class and function docstrings of the package's ``.py`` files (for
transformers, outside its ``models/`` tree: thousands of model files with near-identical text), read
with ``ast`` (nothing is imported or executed), with doctest/code lines dropped, cut at
paragraph boundaries into passages of ``MIN_CHARS``..``MAX_CHARS`` characters, deduplicated,
and split by a keyed permutation into training and held-out passages. Rows are ``text`` rows
(the loss covers the whole passage). The texts depend on the installed versions of these
packages; ``corpus_info`` reports the versions and a digest of the passages, and benchmarks
record it next to their results.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

from edgetune.crypto import schedule

PACKAGES = ("transformers", "datasets", "peft", "flwr")
"""One package per site, in this order (site i reads ``PACKAGES[i % 4]``)."""

MIN_CHARS = 240
MAX_CHARS = 720
HELDOUT_FRACTION = 0.1
SYSTEM_PROMPT = "You write technical documentation."
"""The docs recipes' system prompt: the passage is the assistant's answer to an empty request."""

_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |```|\.\. code-block|\.\. )")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"data.source = 'docs' reads the installed package {name!r}, which is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _clean(doc: str) -> list[str]:
    """Paragraphs of a docstring without code, doctests or directive lines."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in doc.splitlines():
        if _CODE_LINE.match(line) or line.strip().startswith(("http://", "https://")):
            continue
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return [re.sub(r"\s+", " ", p).strip() for p in paragraphs if len(p.split()) >= 6]


def _passages(doc: str) -> list[str]:
    out, current = [], ""
    for para in _clean(doc):
        if len(current) + len(para) + 1 > MAX_CHARS and len(current) >= MIN_CHARS:
            out.append(current)
            current = ""
        current = f"{current} {para}".strip() if current else para[:MAX_CHARS]
    if len(current) >= MIN_CHARS:
        out.append(current)
    return out


@lru_cache(maxsize=8)
def package_passages(name: str) -> tuple[str, ...]:
    """All passages of one package's docstrings, in a deterministic order (sorted files, source order).

    Parsed once per installed version and cached as JSON under the edgetune cache folder.
    """
    from edgetune.io import atomic_write_json
    from edgetune.models.folders import cache_root

    cached = cache_root() / "corpora" / f"docs-{name}-{importlib.metadata.version(name)}-v1.json"
    if cached.is_file():
        try:
            return tuple(json.loads(cached.read_text()))
        except ValueError:
            pass  # a damaged cache file: parse again
    passages = _parse_package(name)
    atomic_write_json(cached, list(passages))
    return passages


def _parse_package(name: str) -> tuple[str, ...]:
    root = _package_dir(name)
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if "models" in path.relative_to(root).parts[:1] and name == "transformers":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))),
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc or len(doc) < MIN_CHARS:
                continue
            for passage in _passages(doc):
                if passage not in seen:
                    seen.add(passage)
                    out.append(passage)
    if not out:
        raise ValueError(f"package {name!r} has no docstring passages")
    return tuple(out)


def site_package(site_index: int) -> str:
    return PACKAGES[site_index % len(PACKAGES)]


def _split(name: str, seed: int) -> tuple[list[str], list[str]]:
    passages = package_passages(name)
    order = schedule.permutation(schedule.derive(schedule.run_key(seed), "data", "docs-split", name), len(passages))
    n_held = max(1, int(len(passages) * HELDOUT_FRACTION))
    held = [passages[int(i)] for i in order[:n_held]]
    train = [passages[int(i)] for i in order[n_held:]]
    return train, held


def docs_site(site_index: int, *, seed: int = 0, max_train: int = 0) -> list[dict[str, str]]:
    """Training rows of site ``site_index``: ``{"instruction": "", "response": passage, "site"}``
    (the first ``max_train`` of a keyed order when > 0).
    """
    name = site_package(site_index)
    train, _ = _split(name, seed)
    if max_train:
        train = train[:max_train]
    return [{"instruction": "", "response": p, "site": f"site-{site_index}", "source": name} for p in train]


def docs_heldout(num_sites: int, *, seed: int = 0) -> list[dict[str, str]]:
    """Held-out passages of the packages of ``num_sites`` sites, interleaved by package."""
    names = list(dict.fromkeys(site_package(i) for i in range(num_sites)))
    helds = [_split(n, seed)[1] for n in names]
    depth = max(len(h) for h in helds)
    return [
        {"instruction": "", "response": h[j], "site": f"site-{k}", "source": names[k]}
        for j in range(depth)
        for k, h in enumerate(helds)
        if j < len(h)
    ]


def corpus_info(num_sites: int = len(PACKAGES)) -> dict[str, object]:
    """Package versions, passage counts and a digest of the passages (to say which text a result used)."""
    info: dict[str, object] = {}
    digest = hashlib.sha256()
    for name in dict.fromkeys(site_package(i) for i in range(num_sites)):
        passages = package_passages(name)
        for p in passages:
            digest.update(p.encode())
        info[name] = {"version": importlib.metadata.version(name), "passages": len(passages)}
    info["sha256"] = digest.hexdigest()
    return info
