"""The app bundle carries no code (the apps are modules of the installed edgetune), and a site whose
edgetune differs from the server's refuses the run with both versions named."""

from __future__ import annotations

import importlib
import io
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_files

from edgetune import bundle

ROOT = Path(__file__).resolve().parents[2]


def _fab_names(files: dict[str, Path]) -> tuple[bytes, list[str]]:
    fab, _ = build_fab_from_files(files)
    return fab, zipfile.ZipFile(io.BytesIO(fab)).namelist()


def _assert_components_come_from_the_package(pyproject: Path) -> None:
    components = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["components"]
    assert set(components) == {"serverapp", "clientapp"}
    for ref in components.values():
        module, _, attr = ref.partition(":")
        assert module.startswith("edgetune."), f"{ref} is not a module of the installed edgetune"
        assert hasattr(importlib.import_module(module), attr), f"{ref} does not resolve in the installed package"


def test_fab_of_the_checkout_carries_no_code_and_stays_small():
    """The apps are modules of the installed edgetune ([tool.flwr.app.components] names them), so the
    checkout's FAB is its pyproject.toml alone: nothing of edgetune/, tests/, docs/ travels per run."""
    # the checkout's files as git knows them (walking .venv as `flwr build` does takes minutes on a busy CI)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = {p: ROOT / p for p in tracked.split() if (ROOT / p).is_file()}
    fab, names = _fab_names(files)
    _assert_components_come_from_the_package(ROOT / "pyproject.toml")
    assert not [n for n in names if n.endswith(".py")], names
    assert not [n for n in names if n.split("/")[0] in {"edgetune", "tests", "docs", "benchmarks", "recipes"}]
    assert len(fab) < 20_000, f"app bundle is {len(fab):,} B"


def test_fab_of_a_generated_app_folder_names_the_same_components(tmp_path):
    """`edgetune simulate`/`server` submit a generated folder: its FAB is one pyproject.toml naming the
    checkout's components, with the run's config table."""
    from edgetune import project

    folder = project.write_app_folder(tmp_path / "app")
    fab, names = _fab_names({p.name: p for p in folder.iterdir()})
    _assert_components_come_from_the_package(folder / "pyproject.toml")
    assert project.components_of(folder / "pyproject.toml") == project.components_of(ROOT / "pyproject.toml")
    assert [n for n in names if not n.startswith(".info/")] == ["pyproject.toml"]
    assert len(fab) < 20_000, f"app bundle is {len(fab):,} B"


def test_code_version_names_version_and_source_hash():
    v = bundle.code_version()
    assert v.startswith("edgetune ") and "(code " in v and len(v.split("code ")[1].rstrip(")")) == 12


def test_a_site_with_other_code_refuses_with_both_versions():
    bundle.check_version(bundle.code_version())  # same install: accepted
    other = "edgetune 0.1.0 (code 000000000000)"
    with pytest.raises(ValueError) as err:
        bundle.check_version(other, "plant-a")
    assert other in str(err.value) and bundle.code_version() in str(err.value) and "plant-a" in str(err.value)
    with pytest.raises(ValueError, match="no version"):
        bundle.check_version("")


def test_hello_refuses_a_server_running_other_code(monkeypatch):
    """The ClientApp's query.hello raises before naming its site when the versions differ."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from edgetune.flower import client_handler

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    ctx = Context(
        run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={}
    )
    msg = Message(
        RecordDict({"hello": ConfigRecord({"kit_root": "", "edgetune": "edgetune 9 (code x)"})}), 5, "query.hello"
    )
    with pytest.raises(ValueError, match="install the server's edgetune"):
        client_handler.hello(msg, ctx)
    ok = Message(
        RecordDict({"hello": ConfigRecord({"kit_root": "", "edgetune": bundle.code_version()})}), 5, "query.hello"
    )
    assert client_handler.hello(ok, ctx).content["hello"]["site"] == "site-0"
