"""Flower app folders: where edgetune's ServerApp and ClientApp live, and the projects around them.

The two apps are modules of the installed package (``edgetune/flower/server_app.py`` and
``client_app.py``), named once here (``SERVER_APP``, ``CLIENT_APP``); ``pyproject.toml``'s
``[tool.flwr.app.components]`` must say the same (a test checks). An app folder therefore needs
nothing but a ``pyproject.toml``: Flower imports the components from the environment, so
``edgetune simulate``/``server`` work from any directory with an installed edgetune, and the app
bundle Flower ships to sites is one small file.

``edgetune new DIR`` writes such a folder for a user's own federation (as ``flwr new`` would):
``pyproject.toml`` (every config key, with the recipe's values, so plain ``flwr run .`` runs it),
``recipe.toml`` (what differs from the defaults, for ``edgetune simulate recipe.toml``), a README
and a ``.gitignore``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from edgetune import config as cfgmod

SERVER_APP = "edgetune.flower.server_app:app"
"""Flower's component reference of edgetune's ServerApp (``[tool.flwr.app.components] serverapp``)."""
CLIENT_APP = "edgetune.flower.client_app:app"
"""Flower's component reference of edgetune's ClientApp (``[tool.flwr.app.components] clientapp``)."""
PUBLISHER = "edgetune"

PATH_KEYS = ("data.path", "data.eval_path", "model.cache_dir", "crypto.keys_dir", "run.dir")
"""Config values that are file system paths. Flower runs the apps in processes of its own, whose
working directory is not the user's: relative paths are made absolute before a run is handed over."""


def version() -> str:
    """The installed edgetune's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("edgetune")
    except PackageNotFoundError:  # a checkout on sys.path without an install
        return "0+unknown"


def bundled_root() -> Path:
    """Where the recipes and benchmarks are: the source checkout, or the copy inside the wheel."""
    package = Path(__file__).resolve().parent
    checkout = package.parent
    if (checkout / "recipes").is_dir() and (checkout / "benchmarks" / "run_all.py").is_file():
        return checkout
    return package / "_bundled"


def run_bench(args: list[str], *, quick: bool) -> int:
    """``edgetune bench``: run ``benchmarks/run_all.py`` offline; its exit code.

    From an installed edgetune the results go to ``./bench-results``, not into site-packages.
    """
    root = bundled_root()
    if not (root / "benchmarks" / "run_all.py").is_file():
        raise FileNotFoundError(f"{root / 'benchmarks'} not found: this edgetune install has no benchmarks")
    if root != Path(__file__).resolve().parent.parent and not any(a.startswith("--results-dir") for a in args):
        args = [*args, "--results-dir", str(Path.cwd() / "bench-results")]
    cmd = [sys.executable, "-m", "benchmarks.run_all", *(["--quick"] if quick else []), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=root, env=env, check=False).returncode


def recipes_dir() -> Path:
    return bundled_root() / "recipes"


def bundled_recipe(name: str) -> Path:
    """A recipe shipped with edgetune, by path or by name (``spsa/tiny-4c``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    candidate = recipes_dir() / (name if name.endswith(".toml") else f"{name}.toml")
    if candidate.is_file():
        return candidate
    known = sorted(str(p.relative_to(recipes_dir()))[:-5] for p in recipes_dir().glob("*/*.toml"))
    raise ValueError(f"no recipe {name!r}: give a recipe file or one of {', '.join(known) or '(none shipped)'}")


def absolute_paths(flat: dict[str, Any], base: Path) -> dict[str, Any]:
    """``flat`` with relative path values (``PATH_KEYS``, and ``model.path`` when it names an existing
    folder) made absolute against ``base``.
    """
    out = dict(flat)
    keys = [k for k in PATH_KEYS if isinstance(out.get(k), str) and out[k]]
    model = out.get("model.path")
    if isinstance(model, str) and model not in {"tiny", "smollm2"} and (base / model).expanduser().is_dir():
        keys.append("model.path")
    for key in keys:
        path = Path(str(out[key])).expanduser()
        if not path.is_absolute():
            out[key] = str((base / path).resolve())
    return out


def pyproject_text(name: str, cfg: cfgmod.RunConfig, *, description: str = "") -> str:
    """A Flower app's ``pyproject.toml`` running edgetune's apps with ``cfg`` as the default config."""
    description = description or "A federated fine-tuning project (edgetune on Flower)"
    return (
        "# A Flower app (flwr run .) whose ServerApp and ClientApp are edgetune's installed ones.\n"
        "# edgetune must be installed wherever the apps run; with Flower's runtime dependency\n"
        "# installation off (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1) nothing is downloaded.\n"
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        f"name = {cfgmod.toml_value(name)}\n"
        'version = "0.1.0"\n'
        f"description = {cfgmod.toml_value(description)}\n"
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.hatch.build.targets.wheel]\n"
        'packages = ["."]\n\n'
        "[tool.flwr.app]\n"
        f'publisher = "{PUBLISHER}"\n\n'
        "[tool.flwr.app.components]\n"
        f'serverapp = "{SERVER_APP}"\n'
        f'clientapp = "{CLIENT_APP}"\n\n'
        f"# edgetune {version()}: every config key (flwr run . --run-config recipe.toml overrides them)\n"
        + cfgmod.pyproject_table(cfg)
    )


def write_app_folder(folder: Path, cfg: cfgmod.RunConfig | None = None) -> Path:
    """A minimal Flower app folder (just ``pyproject.toml``) that ``flwr run`` can submit."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(pyproject_text("edgetune-run", cfg or cfgmod.RunConfig()))
    return folder


def components_of(pyproject: Path) -> dict[str, str]:
    """``[tool.flwr.app.components]`` of a pyproject.toml."""
    return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["components"])


RECIPE_HEADER = """\
# Purpose: {purpose}
# Expected: {expected}
# Hardware: any CPU (a GPU is used when present: model.device = "auto").
# Run it:   edgetune simulate recipe.toml          (Flower's simulation engine, a live table)
#           flwr run .                             (plain Flower; pyproject.toml holds the same values)
# Only what differs from edgetune's defaults is here; every key is in pyproject.toml and in
# `python -m edgetune.config`.
"""


def new_recipe(*, algorithm: str = "spsa", model: str = "smollm2", data: str = "", sites: int = 2) -> dict[str, Any]:
    """The dotted keys of a starting recipe for ``algorithm`` on ``model`` (demo data unless ``data``)."""
    if algorithm not in cfgmod.ALGORITHM_NAMES:
        raise ValueError(f"--algorithm must be one of {', '.join(cfgmod.ALGORITHM_NAMES)}, got {algorithm!r}")
    flat: dict[str, Any] = {"algorithm": algorithm, "num_rounds": 3, "run.num_sites": sites, "model.path": model}
    tiny = model == "tiny"
    if algorithm == "lowrank":
        flat.update({"model.trainable": "lora", "kavg.optimizer": "adamw", "kavg.lr": 1e-3 if not tiny else 1e-2})
    elif tiny:
        flat["model.trainable"] = "all"
    if algorithm == "spsa" and tiny:
        flat.update({"spsa.lr": 1e-3, "crypto.deterministic_secrets": True})
    if data:
        flat.update({"data.source": "file", "data.path": data, "data.partition": "iid"})
    elif tiny:
        flat.update({"data.demo_facts": 6, "data.batch_size": 4, "eval.num_examples": 16})
    cfgmod.from_run_config(flat)  # validate
    return flat


def new_project(
    folder: Path,
    *,
    from_recipe: str = "",
    algorithm: str | None = None,
    model: str | None = None,
    data: str | None = None,
    sites: int | None = None,
) -> Path:
    """Create ``folder`` with pyproject.toml, recipe.toml, README.md and .gitignore.

    ``from_recipe`` starts from a recipe file or a shipped recipe (``spsa/tiny-4c``); the other
    options override it (or, without one, build a recipe: spsa on SmolLM2 and demo data for 2 sites).
    Refuses a folder that already has files.
    """
    folder = Path(folder).expanduser().resolve()
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not empty; pick a new folder")
    if data:
        data_path = Path(data).expanduser().resolve()
        if not data_path.exists():
            raise ValueError(f"--data {data} does not exist")
        data = str(data_path)
    if from_recipe:
        source = bundled_recipe(from_recipe)
        flat = cfgmod.load_recipe(source)
        purpose = f"started from {source.name}; edit freely."
        if algorithm:
            flat["algorithm"] = algorithm
        if model:
            flat["model.path"] = model
        if data:
            flat.update({"data.source": "file", "data.path": data})
        if sites:
            flat["run.num_sites"] = sites
            # the sites asked for are the federation: a larger quorum from the recipe could never commit
            flat["run.min_sites"] = min(int(flat.get("run.min_sites", 1)), sites)
    else:
        flat = new_recipe(algorithm=algorithm or "spsa", model=model or "smollm2", data=data or "", sites=sites or 2)
        purpose = f"{flat['algorithm']} on {flat['model.path']}, {'your data' if data else 'the demo data'}."
    flat["run.dir"] = str(folder / "runs")  # absolute: Flower's apps do not run in this folder
    cfg = cfgmod.from_run_config(flat)
    folder.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in folder.name).strip("-") or "federation"
    recipe = RECIPE_HEADER.format(
        purpose=purpose,
        expected=f"{cfg.num_rounds} rounds of {cfg.algorithm} across {cfg.run.num_sites or 2} simulated sites.",
    )
    (folder / "recipe.toml").write_text(recipe + cfgmod.to_toml(flat))
    (folder / "pyproject.toml").write_text(pyproject_text(name, cfg))
    (folder / ".gitignore").write_text("runs/\n.edgetune/\n__pycache__/\n")
    (folder / "README.md").write_text(_readme(name, cfg))
    return folder


def _readme(name: str, cfg: cfgmod.RunConfig) -> str:
    sites = cfg.run.num_sites or 2
    return f"""# {name}

A federated fine-tuning project made by `edgetune new` (edgetune {version()}).

```bash
edgetune simulate recipe.toml                  # {sites} simulated sites on Flower's simulation engine
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
flwr run . --federation-config "num-supernodes={sites}"   # the same with plain Flower (pyproject.toml's values)
flwr run . --run-config recipe.toml            # after editing recipe.toml (flwr run . alone reads pyproject.toml)
```

Runs land in `runs/<run-id>/` (metrics.jsonl, summary.json, checkpoints). Your own model: set
`model.path` to a folder or a model id in your Hugging Face cache; your own data: `data.source = "file"`
and `data.path` (JSONL, JSON, parquet, CSV or a `save_to_disk` folder). See edgetune's docs:
"Your own model", "Your own data", "GPU sites", "Troubleshooting".
"""
