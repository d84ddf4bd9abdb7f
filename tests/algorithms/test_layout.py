"""The shape of ``edgetune/algorithms`` and of the loop's protocol, checked from the source.

* no algorithm module imports another (shared code lives in weights.py, training.py, sitestore.py,
  screening.py, models/lora.py, comm/varint.py), and no shared module imports an algorithm;
* federation.py, serverstate.py and inproc.py call only what ``base.py`` (``ServerHalf``,
  ``ClientHalf``) and ``federation.Transport`` declare, and never probe with hasattr/getattr;
* every registered server half implements every member ``ServerHalf`` declares;
* kavg.py and the in-process loop read as one round in under 250 lines; no file over 450 lines.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from edgetune.algorithms import ALGORITHMS
from edgetune.algorithms.base import ClientHalf, ServerHalf
from edgetune.federation import Transport

ROOT = Path(__file__).resolve().parents[2]
ALGO_DIR = ROOT / "edgetune" / "algorithms"
PACKAGE = "edgetune.algorithms"


def _algorithm_names() -> set[str]:
    """Top-level names under edgetune/algorithms that hold a registered algorithm (module or package)."""
    names = set()
    for spec in ALGORITHMS.values():
        for cls in (spec.server_cls, spec.client_cls):
            parts = cls.__module__.split(".")
            assert parts[:2] == ["edgetune", "algorithms"], cls.__module__
            names.add(parts[2])
    return names


def _imported_owners(path: Path, algo_dir: Path) -> set[str]:
    """Top-level names under edgetune.algorithms that ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = (PACKAGE + "." + ".".join(path.relative_to(algo_dir).with_suffix("").parts)).split(".")
    if path.name == "__init__.py":
        here = here[:-1] + ["__init__"]
    found = set()
    for node in ast.walk(tree):  # imports inside functions count too
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*here[: -node.level], *([base] if base else [])])
            # "from edgetune.algorithms import kavg" names the module in the alias
            modules = [base] + ([f"{base}.{a.name}" for a in node.names] if base == PACKAGE else [])
        for mod in modules:
            parts = mod.split(".")
            if parts[:2] == ["edgetune", "algorithms"] and len(parts) > 2:
                found.add(parts[2])
    return found


def cross_imports(algo_dir: Path, algorithms: set[str]) -> list[str]:
    """'file imports X' for every import of another algorithm, or of any algorithm from a shared module."""
    bad = []
    for path in sorted(p for p in algo_dir.rglob("*.py") if p != algo_dir / "__init__.py"):
        rel = path.relative_to(algo_dir)
        owner = rel.parts[0].removesuffix(".py")
        for other in _imported_owners(path, algo_dir) - {owner}:
            if other in algorithms:
                what = "algorithm" if owner in algorithms else "shared module"
                bad.append(f"{rel} ({what}) imports algorithm {other}")
    return bad


def test_no_algorithm_module_imports_another():
    """Parsing every file under edgetune/algorithms: no algorithm imports another, no shared module
    imports an algorithm (the registry ``__init__`` is the one place that names them all)."""
    algorithms = _algorithm_names()
    assert algorithms == {"kavg", "lowrank", "dppf", "deft", "spsa"}
    assert cross_imports(ALGO_DIR, algorithms) == []


def test_the_import_check_catches_a_cross_import(tmp_path):
    """The check above fails for a module that imports another algorithm, however spelled."""
    fake = tmp_path / "edgetune" / "algorithms"
    (fake / "deft").mkdir(parents=True)
    (fake / "dppf.py").write_text("from edgetune.algorithms.lowrank import lora_pairs\n")
    (fake / "kavg.py").write_text("def f():\n    from edgetune.algorithms import dppf\n")
    (fake / "deft" / "server.py").write_text("from ...algorithms.kavg import KavgServer\nfrom . import partitions\n")
    (fake / "weights.py").write_text("import edgetune.algorithms.spsa.log\n")
    (fake / "__init__.py").write_text("from edgetune.algorithms.kavg import KavgServer\n")  # the registry may
    bad = cross_imports(fake, {"kavg", "lowrank", "dppf", "deft", "spsa"})
    assert sorted(bad) == [
        "deft/server.py (algorithm) imports algorithm kavg",
        "dppf.py (algorithm) imports algorithm lowrank",
        "kavg.py (algorithm) imports algorithm dppf",
        "weights.py (shared module) imports algorithm spsa",
    ]


def _declared(proto: type) -> set[str]:
    return {n for n in vars(proto) if not n.startswith("_")} | set(getattr(proto, "__annotations__", {}))


LOOP_FILES = ("edgetune/federation.py", "edgetune/serverstate.py", "edgetune/inproc.py")
ROLES = {"server": ServerHalf, "transport": Transport}
PROBES = {"hasattr", "getattr"}


def test_the_loop_calls_only_what_the_protocol_declares():
    """Every attribute the loop reads on a server half or a transport is declared in base.py /
    federation.Transport; nothing is looked up with hasattr or getattr, no private attribute of
    another object is touched, and no algorithm module is imported (only base.py and the registry)."""
    undeclared, probes = [], []
    for rel in LOOP_FILES:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ROLES:
                if node.attr not in _declared(ROLES[node.value.id]):
                    undeclared.append(f"{rel}: {node.value.id}.{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PROBES:
                probes.append(f"{rel}:{node.lineno} {node.func.id}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgetune.algorithms"):
                for name in [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]:
                    if name.split(".")[2:3] and name.split(".")[2] in _algorithm_names():
                        undeclared.append(f"{rel}:{node.lineno} imports {name}: algorithm internals")
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id not in {"self", "cls"}:
                    undeclared.append(f"{rel}:{node.lineno} private {node.value.id}.{node.attr}")
    assert undeclared == [], undeclared
    assert probes == [], probes


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_server_half_implements_the_whole_protocol(name):
    """Each registered server half defines every ServerHalf member itself (not the Protocol's stub),
    with the same parameters; each client half defines ``step``."""
    spec = ALGORITHMS[name]
    for member in sorted(_declared(ServerHalf) - {"phases"}):
        impl = getattr(spec.server_cls, member)
        assert impl is not getattr(ServerHalf, member), f"{name}: {member} missing"
        want = list(inspect.signature(getattr(ServerHalf, member)).parameters)
        assert list(inspect.signature(impl).parameters) == want, f"{name}.{member}"
    assert isinstance(spec.server_cls.phases, tuple) and spec.server_cls.phases
    assert list(inspect.signature(spec.client_cls.step).parameters) == list(
        inspect.signature(ClientHalf.step).parameters
    )


def _code_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_kavg_and_the_inproc_loop_read_in_under_250_lines():
    """README: read inproc.py, then algorithms/kavg.py; together they show a whole round."""
    total = _code_lines(ROOT / "edgetune" / "inproc.py") + _code_lines(ALGO_DIR / "kavg.py")
    assert total < 250


def test_no_file_in_edgetune_is_over_450_lines():
    """Files that hold one concern stay readable: none over 450 lines."""
    sizes = {str(p.relative_to(ROOT)): _code_lines(p) for p in (ROOT / "edgetune").rglob("*.py")}
    over = {p for p, n in sizes.items() if n > 450}
    assert over == set(), {p: sizes[p] for p in over}
