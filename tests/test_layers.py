"""The library's lower layers never reach the Flower glue: nothing under ``edgetune/data/`` or
``edgetune/metrics/`` imports ``edgetune.flower``, ``flwr`` or ``flwr_datasets``, directly or through
other edgetune modules, at module level or inside a function (ruff's banned-api rule sees only ``flwr``
and cannot tell layers apart). Data splits that need flwr-datasets get the partitioner passed in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune.data.sources import site_examples

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgetune"
LOWER = ("edgetune.data", "edgetune.metrics")
FLOWER = ("edgetune.flower", "flwr", "flwr_datasets")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, anywhere in it (function bodies, try blocks, ``if TYPE_CHECKING``),
    relative imports resolved against ``module``; ``from a import b`` yields both ``a`` and ``a.b``.
    """
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in {
            "import_module",
            "__import__",
        }:
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def _within(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def import_graph() -> dict[str, set[str]]:
    """edgetune module -> the edgetune modules and third-party roots it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = imports_of(path.read_text(), name, is_package=path.name == "__init__.py")
    return graph


def flower_paths(graph: dict[str, set[str]], start: str) -> list[list[str]]:
    """Import chains from ``start`` that end in the Flower glue (one shortest chain per Flower module reached)."""
    chains: list[list[str]] = []
    seen = {start}
    frontier = [[start]]
    while frontier:
        nxt = []
        for chain in frontier:
            for target in sorted(graph.get(chain[-1], ())):
                if _within(target, FLOWER):
                    chains.append([*chain, target])
                    continue
                if target in graph and target not in seen:
                    seen.add(target)
                    nxt.append([*chain, target])
        frontier = nxt
    return chains


def test_the_checker_sees_function_level_relative_and_dynamic_imports():
    """A deliberately broken data module: each way of reaching the Flower glue is caught."""
    broken = textwrap.dedent(
        """
        import json

        def split(rows):
            from edgetune.flower.partition import partition
            return partition(rows, 2, method="iid")

        def relative():
            from ..flower import linkgate

        def dynamic():
            import importlib
            return importlib.import_module("flwr.app")

        try:
            import flwr_datasets
        except ImportError:
            pass
        """
    )
    found = imports_of(broken, "edgetune.data.broken")
    assert {"edgetune.flower.partition", "edgetune.flower", "flwr.app", "flwr_datasets"} <= found
    assert "json" in found
    graph = {"edgetune.data.broken": {"edgetune.evaluation"}, "edgetune.evaluation": found}
    assert ["edgetune.data.broken", "edgetune.evaluation", "edgetune.flower.partition"] in flower_paths(
        graph, "edgetune.data.broken"
    )


@pytest.mark.parametrize("layer", LOWER)
def test_no_lower_module_imports_the_flower_glue_directly_or_through_others(layer):
    graph = import_graph()
    modules = [m for m in graph if _within(m, (layer,))]
    assert len(modules) >= 3, f"no modules found under {layer}"  # the walk really saw the package
    offending = {m: flower_paths(graph, m) for m in modules}
    offending = {m: chains for m, chains in offending.items() if chains}
    assert not offending, "\n".join(" -> ".join(c) for chains in offending.values() for c in chains)


def test_splitting_a_data_file_uses_the_partitioner_passed_in_and_refuses_without_one(tmp_path):
    # Prepare: a data file of four rows from two plants; a partitioner that records its call
    rows = [{"instruction": f"q{i}", "response": f"a{i}", "site": "ab"[i % 2]} for i in range(40)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    cfg = cfgmod.from_run_config(
        tiny_flat(**{"data.source": "file", "data.path": str(path), "data.partition": "dirichlet", "run.seed": 7})
    )
    calls = []

    def halves(rows, num_partitions, *, method, by, alpha, seed):
        calls.append((len(rows), num_partitions, method, by, alpha, seed))
        return [list(rows[i::num_partitions]) for i in range(num_partitions)]

    # Execute
    site1 = site_examples(cfg, 1, 2, partitioner=halves)

    # Assert: the split came from the partitioner (odd rows of the train split), with the recipe's settings
    assert calls == [(36, 2, "dirichlet", "site", cfg.data.dirichlet_alpha, 7)]  # 10% held out for eval
    assert site1 and all(ex["instruction"] in {r["instruction"] for r in rows} for ex in site1)
    with pytest.raises(ValueError, match="needs a partitioner"):
        site_examples(cfg, 0, 2)


def test_importing_and_using_data_and_metrics_loads_no_flower(tmp_path):
    """At run time too: every data/ and metrics/ module imported, a site's data built, and no Flower module loaded."""
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import edgetune.data, edgetune.metrics
        for pkg in (edgetune.data, edgetune.metrics):
            for info in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{pkg.__name__}.{info.name}")
        from edgetune import config
        from edgetune.data.sources import heldout_examples, site_examples
        cfg = config.from_run_config({"data.source": "triage"})
        assert site_examples(cfg, 0, 2) and heldout_examples(cfg, 2)
        flower = ("flwr", "flwr_datasets", "edgetune.flower")
        loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in flower))
        print(loaded)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
