"""``python -m edgetune.config``: print the ``[tool.flwr.app.config]`` table; ``--write-pyproject`` rewrites
it in the repository's pyproject.toml.
"""

import sys

from edgetune.config.recipes import PYPROJECT, pyproject_table, write_pyproject

if sys.argv[1:] == ["--write-pyproject"]:
    changed = write_pyproject(PYPROJECT)
    print("pyproject.toml updated" if changed else "pyproject.toml already up to date")
else:
    sys.stdout.write(pyproject_table())
