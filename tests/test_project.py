"""Flower app folders and `edgetune new` (edgetune/project.py), and the CLI's version and option checks."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgetune import cli, project
from edgetune import config as cfgmod

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_components_are_the_ones_project_names():
    """The package's own pyproject.toml and every generated app folder name the same two app modules, and
    those modules exist in the package (not in top-level folders a wheel would have to carry)."""
    assert project.components_of(ROOT / "pyproject.toml") == {
        "serverapp": project.SERVER_APP,
        "clientapp": project.CLIENT_APP,
    }
    for ref in (project.SERVER_APP, project.CLIENT_APP):
        module = ref.split(":")[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert not (ROOT / "clients").exists() and not (ROOT / "server").exists()


def test_new_project_is_a_flower_app_whose_config_is_the_recipe(tmp_path):
    """`edgetune new` writes pyproject.toml (Flower's required fields, every config key, the recipe's values,
    an absolute run folder) and a recipe.toml that validates and holds the same values."""
    folder = project.new_project(tmp_path / "my fed", model="tiny", algorithm="lowrank", sites=3)
    pyproject = tomllib.loads((folder / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "my-fed" and pyproject["project"]["version"]
    assert pyproject["tool"]["flwr"]["app"]["publisher"] == "edgetune"
    table = cfgmod.flatten_toml(pyproject["tool"]["flwr"]["app"]["config"])
    assert set(table) == set(cfgmod.flatten(cfgmod.RunConfig()))
    recipe = cfgmod.load_recipe(folder / "recipe.toml")
    assert all(table[k] == v for k, v in recipe.items())
    assert recipe["algorithm"] == "lowrank" and recipe["model.trainable"] == "lora" and recipe["run.num_sites"] == 3
    assert Path(recipe["run.dir"]) == folder / "runs"
    assert cfgmod.from_run_config(table) == cfgmod.from_run_config(recipe)


def test_new_project_from_a_shipped_recipe_and_refusals(tmp_path):
    """--from takes a shipped recipe by name; a non-empty folder, an unknown recipe, a missing data file and
    an unknown algorithm are refused with what to do."""
    folder = project.new_project(tmp_path / "a", from_recipe="spsa/tiny-4c", sites=2)
    recipe = cfgmod.load_recipe(folder / "recipe.toml")
    assert recipe["spsa.lr"] == 0.001 and recipe["run.num_sites"] == 2
    assert recipe["run.min_sites"] == 2  # the recipe's quorum of 3 lowered to the 2 sites asked for
    with pytest.raises(ValueError, match="not empty"):
        project.new_project(folder)
    with pytest.raises(ValueError, match=r"no recipe 'spsa/huge'.*spsa/tiny-4c"):
        project.new_project(tmp_path / "b", from_recipe="spsa/huge")
    with pytest.raises(ValueError, match="--data .* does not exist"):
        project.new_project(tmp_path / "c", data=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="--algorithm must be one of"):
        project.new_recipe(algorithm="fedprox")


def test_relative_paths_become_absolute_against_the_callers_directory(tmp_path):
    """Flower runs the apps in processes of its own: data, key and run paths (and a model folder that exists
    relative to the caller) are made absolute; model ids and absolute paths are left alone."""
    (tmp_path / "models" / "m").mkdir(parents=True)
    flat = {"data.path": "data/a.jsonl", "run.dir": "runs", "model.path": "models/m", "crypto.keys_dir": "/abs/k"}
    out = project.absolute_paths(flat, tmp_path)
    assert out["data.path"] == str(tmp_path / "data" / "a.jsonl") and out["run.dir"] == str(tmp_path / "runs")
    assert out["model.path"] == str(tmp_path / "models" / "m") and out["crypto.keys_dir"] == "/abs/k"
    assert project.absolute_paths({"model.path": "Qwen/Qwen2.5-0.5B"}, tmp_path)["model.path"] == "Qwen/Qwen2.5-0.5B"


def test_cli_version_and_enum_options_are_checked_before_anything_runs(tmp_path):
    """--version prints the installed version; --engine, --format and --link accept only their choices."""
    runner = CliRunner()
    version = runner.invoke(cli.app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"edgetune {project.version()}"
    bad_engine = runner.invoke(cli.app, ["simulate", "recipes/spsa/tiny-4c.toml", "--engine", "ray"])
    assert bad_engine.exit_code == 2 and "'ray' is not one of 'flower', 'inproc'" in bad_engine.output
    bad_format = runner.invoke(cli.app, ["report", str(tmp_path), "--format", "pdf"])
    assert bad_format.exit_code == 2 and "'pdf' is not one of 'html', 'md'" in bad_format.output
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "site.json").write_text('{"site_id": "plant-a"}')
    bad_link = runner.invoke(
        cli.app, ["site", "--kit", str(kit), "--superlink", "127.0.0.1:9092", "--demo-index", "0", "--link", "fast"]
    )
    assert bad_link.exit_code == 2 and "'fast' is not one of 'standard', 'thin'" in bad_link.output
    made = runner.invoke(cli.app, ["new", str(tmp_path / "p"), "--model", "tiny", "--algorithm", "kavg"])
    assert made.exit_code == 0, made.output
    assert cfgmod.load_recipe(tmp_path / "p" / "recipe.toml")["algorithm"] == "kavg"


def test_bench_refuses_an_install_without_benchmarks_and_sends_installed_results_to_the_cwd(tmp_path, monkeypatch):
    """`edgetune bench` names the missing benchmarks folder (exit 1); from an installed copy (not the
    checkout) the results go to ./bench-results unless --results-dir is given; the child's exit code is kept."""
    bare = tmp_path / "bare"
    bare.mkdir()
    monkeypatch.setattr(project, "bundled_root", lambda: bare)
    result = CliRunner().invoke(cli.app, ["bench", "--quick"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "no benchmarks" in output and "not found" in output

    installed = tmp_path / "installed"
    (installed / "benchmarks").mkdir(parents=True)
    (installed / "benchmarks" / "run_all.py").write_text("")
    monkeypatch.setattr(project, "bundled_root", lambda: installed)
    calls: list[list[str]] = []

    class Done:
        returncode = 3

    def fake_run(cmd, cwd, env, check):
        calls.append(cmd)
        assert cwd == installed and env["HF_HUB_OFFLINE"] == "1"
        return Done()

    monkeypatch.setattr(project.subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["bench", "--only", "wire_bytes"])
    assert result.exit_code == 3
    assert calls[-1][-4:] == ["--only", "wire_bytes", "--results-dir", str(tmp_path / "bench-results")]
    result = CliRunner().invoke(cli.app, ["bench", "--quick", "--results-dir=out"])
    assert "--quick" in calls[-1] and calls[-1][-1] == "--results-dir=out"
    assert sum(a.startswith("--results-dir") for a in calls[-1]) == 1
