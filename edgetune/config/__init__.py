"""One configuration tree for a run: ``RunConfig``.

Every key is a dotted field path (``spsa.num_probes``) with a scalar value, so the same
spelling works in recipes (TOML tables), in Flower's ``[tool.flwr.app.config]`` and on
the command line (``spsa.lr=1e-5``). Lists travel as comma-separated strings.

``flatten(RunConfig())`` must equal the ``[tool.flwr.app.config]`` table of
``pyproject.toml`` (Flower rejects undeclared keys); ``python -m edgetune.config``
prints that table.

The package, by seam: ``sections.py`` (run, model, data, eval, crypto, imv), ``algorithms.py``
(one section per algorithm), ``run.py`` (``RunConfig``, cross-section checks, ``flatten`` /
``from_run_config``), ``recipes.py`` (recipes, overrides, TOML, the pyproject table) and
``values.py`` (helpers they share). Import everything from ``edgetune.config``.
"""

from edgetune.config.algorithms import (
    ALGORITHM_NAMES,
    DeftSection,
    DppfSection,
    KavgSection,
    LowrankSection,
    SpsaSection,
)
from edgetune.config.recipes import (
    flatten_toml,
    load_recipe,
    parse_override,
    pyproject_table,
    to_toml,
    toml_value,
    write_pyproject,
)
from edgetune.config.run import DEFAULT_INT_RANGE, INT_LIMITS, RunConfig, flatten, from_run_config
from edgetune.config.sections import (
    DATA_FIELDS,
    CryptoSection,
    DataSection,
    EvalSection,
    ImvSection,
    ModelSection,
    RunSection,
    check_prompt_template,
)
from edgetune.config.values import Scalar, check_gpus_per_site, device_list, is_power_of_two, split_csv

__all__ = [
    "ALGORITHM_NAMES",
    "DATA_FIELDS",
    "DEFAULT_INT_RANGE",
    "INT_LIMITS",
    "CryptoSection",
    "DataSection",
    "DeftSection",
    "DppfSection",
    "EvalSection",
    "ImvSection",
    "KavgSection",
    "LowrankSection",
    "ModelSection",
    "RunConfig",
    "RunSection",
    "Scalar",
    "SpsaSection",
    "check_gpus_per_site",
    "check_prompt_template",
    "device_list",
    "flatten",
    "flatten_toml",
    "from_run_config",
    "is_power_of_two",
    "load_recipe",
    "parse_override",
    "pyproject_table",
    "split_csv",
    "to_toml",
    "toml_value",
    "write_pyproject",
]
