"""RunConfig: defaults agree with pyproject.toml, strict key/type checks, recipes, overrides, TOML round trips."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edgetune import config
from edgetune.config import (
    CryptoSection,
    ModelSection,
    RunConfig,
    RunSection,
    SpsaSection,
    flatten,
    flatten_toml,
    from_run_config,
    load_recipe,
    parse_override,
    pyproject_table,
    to_toml,
    write_pyproject,
)

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


def dotted(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables to dotted keys, written here so the test does not trust flatten_toml."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= dotted(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def types_of(flat: dict[str, Any]) -> dict[str, type]:
    return {k: type(v) for k, v in flat.items()}


# --- defaults and pyproject.toml ----------------------------------------------------------------------------------


def test_defaults_equal_pyproject_config_table():
    """flatten(RunConfig()) equals [tool.flwr.app.config] key for key, value for value and type for type."""
    # Prepare
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]

    # Execute
    declared = dotted(table)
    defaults = flatten(RunConfig())

    # Assert
    assert sorted(declared) == sorted(defaults)
    assert declared == defaults
    assert types_of(declared) == types_of(defaults)


def test_flatten_covers_every_dataclass_field():
    """flatten has one key per leaf field of every section (no section value leaks through as an object)."""
    # Prepare
    expected = set()
    for f in dataclasses.fields(RunConfig):
        if f.default_factory is not dataclasses.MISSING:
            expected |= {f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory())}
        else:
            expected.add(f.name)

    # Execute
    flat = flatten(RunConfig())

    # Assert
    assert set(flat) == expected
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())


def test_pyproject_block_is_what_the_generator_prints():
    """pyproject.toml contains pyproject_table() verbatim, so write_pyproject has nothing to change."""
    # Prepare
    text = PYPROJECT.read_text()

    # Execute
    block = pyproject_table()

    # Assert
    assert block in text


def test_write_pyproject_is_a_no_op_when_current(tmp_path: Path):
    """write_pyproject on an up-to-date copy returns False and leaves the file byte-identical."""
    # Prepare
    copy = tmp_path / "pyproject.toml"
    shutil.copyfile(PYPROJECT, copy)

    # Execute
    changed = write_pyproject(copy)

    # Assert
    assert changed is False
    assert copy.read_bytes() == PYPROJECT.read_bytes()


def test_write_pyproject_rewrites_only_the_config_block(tmp_path: Path):
    """A stale block (changed value, missing key, obsolete sub-table) is regenerated; the rest is untouched."""
    # Prepare
    original = PYPROJECT.read_text()
    stale = original.replace("num_rounds = 3\n", "num_rounds = 99\n", 1).replace("seed_pool = 0\n", "", 1)
    stale = stale.replace(
        "[tool.flwr.app.config.run]", "[tool.flwr.app.config.old]\nx = 1\n\n[tool.flwr.app.config.run]"
    )
    assert stale != original
    copy = tmp_path / "pyproject.toml"
    copy.write_text(stale)

    # Execute
    changed = write_pyproject(copy)

    # Assert
    assert changed is True
    assert tomllib.loads(copy.read_text()) == tomllib.loads(original)
    assert copy.read_text() == original


def test_module_main_prints_the_pyproject_table():
    """`python -m edgetune.config` writes exactly pyproject_table() to stdout and exits 0."""
    # Execute
    proc = subprocess.run(
        [sys.executable, "-m", "edgetune.config"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == pyproject_table()


# --- from_run_config ----------------------------------------------------------------------------------------------


def test_from_run_config_round_trips_defaults():
    """from_run_config(flatten(RunConfig())) == RunConfig(), and so does an empty mapping."""
    # Execute / Assert
    assert from_run_config(flatten(RunConfig())) == RunConfig()
    assert from_run_config({}) == RunConfig()


def test_from_run_config_round_trips_non_defaults():
    """A config with changed fields in several sections survives flatten -> from_run_config unchanged."""
    # Prepare
    cfg = RunConfig(
        num_rounds=17,
        run=RunSection(name="exp-1", seed=42, min_sites=3, round_timeout_s=12.5),
        model=ModelSection(path="tiny", trainable="all", lora_rank=4),
        crypto=CryptoSection(deterministic_secrets=True, max_skip=7),
        spsa=SpsaSection(eps=2.0**-14, lr=1e-4, directions="shared", aggregator="median", scalar_codec="log8"),
    )

    # Execute
    back = from_run_config(flatten(cfg))

    # Assert
    assert back == cfg
    assert back != RunConfig()


def test_from_run_config_partial_keys_keep_other_defaults():
    """Keys not given keep their defaults, in the same section and in other sections."""
    # Execute
    cfg = from_run_config({"spsa.lr": 1e-4, "num_rounds": 9})

    # Assert
    assert cfg == RunConfig(num_rounds=9, spsa=SpsaSection(lr=1e-4))


@pytest.mark.parametrize(
    ("flat", "named"),
    [
        ({"spsa.lrr": 1.0}, "spsa.lrr"),
        ({"spas.lr": 1.0}, "spas.lr"),
        ({"rounds": 3}, "rounds"),
        ({"spsa": 1}, "spsa"),
        ({"z.b": 1, "a.b": 2, "num_rounds": 3}, "a.b, z.b"),
    ],
)
def test_unknown_keys_rejected_by_name(flat: dict, named: str):
    """Keys that RunConfig does not declare raise ValueError listing each of them (sorted)."""
    # Execute / Assert
    with pytest.raises(ValueError, match=f"unknown config key\\(s\\): {re.escape(named)}$"):
        from_run_config(flat)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("spsa.num_steps", "four"),
        ("spsa.num_steps", 2.5),
        ("spsa.num_steps", "2.5"),
        ("spsa.num_steps", True),
        ("spsa.num_steps", None),
        ("spsa.num_steps", [1]),
        ("spsa.lr", "fast"),
        ("spsa.lr", True),
        ("spsa.lr", None),
        ("crypto.deterministic_secrets", 1),
        ("crypto.deterministic_secrets", "yes"),
        ("run.name", 3),
        ("model.path", 1.0),
        ("model.path", False),
        ("num_rounds", "nan"),
    ],
)
def test_type_errors_name_the_key(key: str, value: Any):
    """A value of the wrong type raises ValueError naming the dotted key."""
    # Execute / Assert
    with pytest.raises(ValueError, match=f"config key {re.escape(repr(key))}: expected"):
        from_run_config({key: value})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("spsa.num_steps", "7", 7),
        ("spsa.num_steps", 7.0, 7),
        ("spsa.num_steps", "1e1", 10),
        ("spsa.lr", 1, 1.0),
        ("spsa.lr", "1e-4", 1e-4),
        ("crypto.deterministic_secrets", "TRUE", True),
        ("crypto.deterministic_secrets", "false", False),
        ("model.path", "tiny", "tiny"),
    ],
)
def test_values_are_coerced_to_the_field_type(key: str, value: Any, expected: Any):
    """Strings and integral floats that mean the field's type are coerced to exactly that type."""
    # Execute
    got = flatten(from_run_config({key: value}))[key]

    # Assert
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("eps", [1e-3, 3 * 2.0**-11, 0.0, -(2.0**-10), 0.75, 2.0**-10 * (1 + 2.0**-52)])
def test_spsa_eps_must_be_a_power_of_two(eps: float):
    """spsa.eps that is not a positive power of two (even by one ulp) is rejected, naming spsa.eps."""
    # Execute / Assert
    with pytest.raises(ValueError, match="spsa.eps must be a power of two"):
        from_run_config({"spsa.eps": eps})


@pytest.mark.parametrize("eps", [math.inf, -math.inf, math.nan])
def test_spsa_eps_non_finite_rejected(eps: float):
    """A non-finite spsa.eps is rejected with a message naming spsa.eps."""
    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape("spsa.eps")):
        from_run_config({"spsa.eps": eps})


@pytest.mark.parametrize("eps", [2.0**-10, 2.0**-24, 0.5, 1.0, 4.0, 2.0**-1074])
def test_spsa_eps_powers_of_two_accepted(eps: float):
    """Every positive power of two (subnormal included) is a valid spsa.eps and kept exactly."""
    # Execute / Assert
    assert from_run_config({"spsa.eps": eps}).spsa.eps == eps


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"num_rounds": 0}, "num_rounds must be >= 1"),
        ({"algorithm": "kavg2"}, "algorithm must be one of spsa"),
        ({"run.min_sites": 0}, "run.min_sites must be >= 1"),
        ({"run.num_sites": 3, "run.min_sites": 4}, "run.min_sites = 4 is more than run.num_sites = 3"),
        ({"run.name": "a/b"}, "run.name must be a plain folder name"),
        ({"run.name": ".."}, "run.name must be a plain folder name"),
        ({"model.dtype": "int4"}, "model.dtype must be"),
        ({"data.source": "jsonl"}, "needs data.path"),
        ({"spsa.aggregator": "median"}, "needs spsa.directions = 'shared'"),
        ({"spsa.scalar_codec": "fp16"}, "spsa.scalar_codec must be int8-sr, log8, sign"),
        ({"spsa.trim_frac": 0.5}, "spsa.trim_frac must be in"),
        ({"spsa.scale": -1.0}, "spsa.scale must be a finite positive number"),
        ({"spsa.scale": math.inf}, "spsa.scale"),
    ],
)
def test_section_validation_names_the_key(flat: dict, message: str):
    """Values of the right type but out of range raise ValueError whose message names the key."""
    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(message)):
        from_run_config(flat)


def test_csv_properties_split_and_strip():
    """Comma-separated list fields become tuples with blanks and empty items dropped."""
    # Prepare
    model = ModelSection(target_modules=" q_proj, ,v_proj ,", trainable="embed, lm_head")

    # Execute / Assert
    assert model.target_module_list == ("q_proj", "v_proj")
    assert model.trainable_patterns == ("embed", "lm_head")


# --- recipes ------------------------------------------------------------------------------------------------------


def test_recipes_exist():
    """At least one recipe ships, so the parametrised recipe tests below are not vacuous."""
    # Assert
    assert RECIPES, "no recipes/**/*.toml found"


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_parses_and_validates(recipe: Path):
    """Each recipe loads with load_recipe, only uses declared keys, and builds a RunConfig of its folder's algorithm."""
    # Execute
    flat = load_recipe(recipe)
    cfg = from_run_config(flat)

    # Assert
    assert set(flat) <= set(flatten(RunConfig()))
    assert flat == dotted(tomllib.loads(recipe.read_text()))
    assert cfg.algorithm == recipe.parent.name


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_starts_with_purpose_expected_hardware(recipe: Path):
    """Each recipe opens with a comment block giving its purpose, the expected result and the hardware."""
    # Prepare
    lines = recipe.read_text().splitlines()

    # Execute
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line.lower())

    # Assert
    assert lines and lines[0].startswith("#")
    text = "\n".join(header)
    for word in ("purpose", "expected", "hardware"):
        assert word in text, f"{recipe.name}: header comment lacks {word!r}"


def test_load_recipe_applies_overrides(tmp_path: Path):
    """Overrides replace recipe values with TOML-typed values, and add keys the recipe lacks."""
    # Prepare
    recipe = tmp_path / "r.toml"
    recipe.write_text("# purpose\nnum_rounds = 3\n[spsa]\nlr = 0.001\n")

    # Execute
    flat = load_recipe(recipe, ["spsa.lr=1e-4", "model.path=tiny", "crypto.deterministic_secrets=true"])

    # Assert
    assert flat == {
        "num_rounds": 3,
        "spsa.lr": 1e-4,
        "model.path": "tiny",
        "crypto.deterministic_secrets": True,
    }


@pytest.mark.parametrize(
    ("body", "overrides", "message"),
    [
        ("[spsa]\nlrr = 1.0\n", [], "unknown config key(s): spsa.lrr"),
        ("num_rounds = 2\n", ["spsa.typo=1"], "unknown config key(s): spsa.typo"),
        ("[spsa]\nnum_steps = 'x'\n", [], "config key 'spsa.num_steps'"),
        ("[spsa\n", [], "is not valid TOML"),
        ("num_rounds = 2\n", ["no-equals-sign"], "is not of the form key=value"),
    ],
)
def test_load_recipe_rejects_bad_recipes(tmp_path: Path, body: str, overrides: list[str], message: str):
    """A recipe or override with an unknown key, wrong type or bad syntax raises ValueError saying so."""
    # Prepare
    recipe = tmp_path / "bad.toml"
    recipe.write_text(body)

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(message)):
        load_recipe(recipe, overrides)


def test_load_recipe_missing_file_names_path(tmp_path: Path):
    """A missing recipe raises ValueError naming the path."""
    # Prepare
    path = tmp_path / "nope.toml"

    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(f"recipe {path} does not exist")):
        load_recipe(path)


# --- parse_override -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("num_rounds=5", ("num_rounds", 5)),
        ("spsa.lr=1e-5", ("spsa.lr", 1e-5)),
        ("spsa.lr = 2.5", ("spsa.lr", 2.5)),
        ("x=-3", ("x", -3)),
        ("x=1_000", ("x", 1000)),
        ("x=inf", ("x", math.inf)),
        ("crypto.deterministic_secrets=true", ("crypto.deterministic_secrets", True)),
        ("b=false", ("b", False)),
        ('model.path="my model"', ("model.path", "my model")),
        ("model.path='single'", ("model.path", "single")),
        ("model.path=tiny", ("model.path", "tiny")),
        ("model.trainable=q_proj,v_proj", ("model.trainable", "q_proj,v_proj")),
        ("run.dir=/tmp/runs dir", ("run.dir", "/tmp/runs dir")),
        ("a=b=c", ("a", "b=c")),
        ("a=", ("a", "")),
        ("  spaced  =  word  ", ("spaced", "word")),
    ],
)
def test_parse_override(text: str, expected: tuple[str, Any]):
    """key=value uses TOML value syntax (numbers, bools, quoted strings); anything else is a bare string."""
    # Execute
    got = parse_override(text)

    # Assert
    assert got == expected
    assert type(got[1]) is type(expected[1])


def test_parse_override_requires_equals():
    """An override without '=' raises ValueError quoting it."""
    # Execute / Assert
    with pytest.raises(ValueError, match="'spsa.lr' is not of the form key=value"):
        parse_override("spsa.lr")


# --- to_toml / flatten_toml ---------------------------------------------------------------------------------------


def test_to_toml_round_trips_defaults():
    """flatten_toml(tomllib.loads(to_toml(flat))) gives back flatten(RunConfig()), values and types."""
    # Prepare
    flat = flatten(RunConfig())

    # Execute
    back = flatten_toml(tomllib.loads(to_toml(flat)))

    # Assert
    assert back == flat
    assert types_of(back) == types_of(flat)


def test_to_toml_round_trips_awkward_values():
    """Quotes, backslashes, unicode, '#', '=', tabs, tiny/huge/negative floats and big ints survive to_toml."""
    # Prepare
    flat = {
        "top": "plain",
        "n": -(2**62),
        "a.quote": 'say "hi"',
        "a.backslash": "C:\\runs\\x\\",
        "a.unicode": "héllo 日本 🎉",
        "a.hash": "# not a comment = still a string",
        "a.tab": "a\tb",
        "a.empty": "",
        "b.tiny": 5e-324,
        "b.eps": 2.0**-10,
        "b.huge": 1e300,
        "b.neg": -1.25e-7,
        "b.integral": 3.0,
        "b.inf": -math.inf,
        "b.flag": False,
    }

    # Execute
    back = flatten_toml(tomllib.loads(to_toml(flat)))

    # Assert
    assert back == flat
    assert types_of(back) == types_of(flat)


def test_to_toml_writes_top_level_keys_before_tables():
    """Top-level keys come before any [table], whatever the input order (else TOML would nest them)."""
    # Prepare
    flat = {"spsa.lr": 0.5, "num_rounds": 2}

    # Execute
    text = to_toml(flat)

    # Assert
    assert text == "num_rounds = 2\n\n[spsa]\nlr = 0.5\n"


def test_flatten_toml_nests_any_depth():
    """flatten_toml joins nested table names with dots at any depth and keeps leaf values as they are."""
    # Execute
    flat = flatten_toml({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": "x"})

    # Assert
    assert flat == {"a.b.c": 1, "a.d": [1, 2], "e": "x"}


# --- regressions: bugs found by these tests, now fixed ---


@pytest.mark.parametrize("seed", [2**53 + 1, 2**60 + 1, 2**63 - 1])
def test_large_int_values_are_kept_exactly(seed: int):
    """An integer key keeps its exact value (run.seed keys every stream: a silent change is a different run)."""
    # Execute / Assert
    assert from_run_config({"run.seed": seed}).run.seed == seed


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("spsa.lr", math.nan),
        ("spsa.lr", math.inf),
        ("spsa.lr", "nan"),
        ("spsa.scale_mult", math.nan),
        ("run.round_timeout_s", math.nan),
        ("data.dirichlet_alpha", math.nan),
        ("crypto.envelope_ttl_s", math.nan),
        ("model.lora_alpha", math.nan),
    ],
)
def test_non_finite_floats_rejected(key: str, value: Any):
    """No float key accepts NaN or infinity: they would poison every update or disable a check."""
    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape(key)):
        from_run_config({key: value})


@pytest.mark.parametrize("value", ["two\nlines", "cr\rhere", "nul\x00", "del\x7f", "bell\x07"])
def test_to_toml_escapes_control_characters(value: str):
    """A string with a control character is written as valid TOML that reads back equal."""
    # Prepare
    flat = {"run.name": value}

    # Execute / Assert
    assert flatten_toml(tomllib.loads(to_toml(flat))) == flat


def test_module_exposes_algorithm_names():
    """ALGORITHM_NAMES lists exactly the algorithm sections RunConfig carries (one section per algorithm)."""
    # Prepare
    sections = {f.name for f in dataclasses.fields(RunConfig) if f.default_factory is not dataclasses.MISSING}

    # Execute / Assert
    assert set(config.ALGORITHM_NAMES) <= sections
    assert set(config.ALGORITHM_NAMES) == sections - {"run", "model", "data", "eval", "crypto", "imv"}
    from edgetune.algorithms import ALGORITHMS

    assert set(config.ALGORITHM_NAMES) == set(ALGORITHMS)


# --- issue 13: sizes that could only be typos are refused at load, naming the key --------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("data.batch_size", 10**12),
        ("kavg.local_steps", 10**9),
        ("spsa.num_steps", 10**9),
        ("eval.num_examples", 10**12),
        ("num_rounds", 10**9),
        ("run.seed", 2**64),
        ("run.seed", -(2**63) - 1),
        ("data.max_length", 10**9),
    ],
)
def test_absurd_sizes_and_seeds_beyond_64_bits_are_refused(key, value):
    """A batch of 1e12 examples, 1e9 local steps or a seed that does not fit the 64-bit key schedule is
    refused when the config is read (before a site gets it), with the key and its range."""
    with pytest.raises(ValueError, match=rf"{re.escape(key)} = {value} is outside"):
        from_run_config({key: value})


def test_every_integer_key_has_a_bound():
    """No integer key accepts 2**62 except the seed (64-bit by design): each is bounded explicitly or by
    the default range, so a new key cannot reintroduce the class."""
    for key, default in flatten(RunConfig()).items():
        if isinstance(default, bool) or not isinstance(default, int) or key == "run.seed":
            continue
        with pytest.raises(ValueError, match=re.escape(key)):
            from_run_config({key: 2**62})
    from_run_config({"run.seed": 2**63 - 1})


def test_spsa_scalars_per_round_are_bounded():
    with pytest.raises(ValueError, match="spsa.num_steps x spsa.num_probes"):
        from_run_config({"spsa.num_steps": 10_000, "spsa.num_probes": 10_000})
