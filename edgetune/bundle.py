"""What a site downloads per run (the Flower app bundle), and the check that its edgetune matches the server's.

Flower ships each run's app as a FAB: the files of the app folder that ``[tool.flwr.app] fab-include``
in ``pyproject.toml`` selects, plus that ``pyproject.toml``. edgetune's ClientApp and ServerApp are
modules of the installed package (``edgetune/flower/client_app.py``, ``server_app.py``; its
``[tool.flwr.app.components]`` names them), so the FAB carries no code at all: the checkout's
``fab-include`` names only ``pyproject.toml``, and the folders ``edgetune simulate``/``server`` submit
(``project.write_app_folder``) hold nothing else (a few KB instead of the whole checkout). The code a
site runs is its own installed edgetune. That is only safe when it is the server's edgetune:
``code_version`` names the installed package by version and a hash of its source, the server sends its
own in the ``query.hello`` of every run, and a site whose version differs answers with an error naming
both, and takes no part in the run.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``edgetune <version> (code <12 hex digits>)``: the hash covers every ``.py`` file of the
    installed package (paths and contents), so two installs of the same version from different
    commits still differ.
    """
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    try:
        version = metadata.version("edgetune")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"edgetune {version} (code {digest.hexdigest()[:12]})"


def check_version(server_version: str, site: str = "this site") -> None:
    """``ValueError`` naming both versions unless the server runs this site's edgetune."""
    mine = code_version()
    if server_version != mine:
        sent = server_version or "no version (a server older than this check)"
        raise ValueError(
            f"{site} runs {mine} but the server runs {sent}: install the server's edgetune on this site "
            "(the app bundle carries only the Flower app modules; all other code is the site's own)"
        )
