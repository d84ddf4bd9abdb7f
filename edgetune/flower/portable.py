"""Portable simulated sites: a site's key kit and its state between rounds travel with the run.

Flower's simulation engine runs a site's messages on whichever actor of its Ray pool is free, and on
a Ray cluster (multi-node simulation) that actor may sit on another machine each round. Without
``run.portable_sites`` a simulated site reads its kit from the server's run folder and keeps its
state (spsa's replica saves, dppf's copy, deft's residuals) under ``<cache>/sites/<site>``: both on
the disk of the machine the actor runs on, which is the server's only on one machine. With it:

* **kit**: the server hands each node the kit of the site it claims, in a second hello query, and
  the node proves the site with it as usual (``discover_sites``). The kit is kept in the node's
  Flower ``Context`` (``KIT_KEY``), which the engine passes to whichever actor runs the node's next
  message; an actor writes it to a private folder of its own process before it loads it. Only
  kits the server generated for a simulation are handed out (never with ``crypto.keys_dir``), and a
  deployed site (``edgetune site``) refuses a kit from the server.
* **state**: before each message the site's state folder (a private folder of the actor's
  process) is emptied and refilled from the Context (``STORE_KEY``); after it the folder is packed
  back. The engine keeps the Context with the simulation, so the state follows the site from
  actor to actor, and the algorithms see exactly what they would see on one shared disk.

The folders are packed as two parallel lists in a ConfigRecord (relative paths, file bytes);
``restore`` accepts only plain relative paths inside the folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from flwr.app import ConfigRecord, Context

from edgetune.io import atomic_write_bytes, private_dir

KIT_KEY = "edgetune-kit"
STORE_KEY = "edgetune-store"
RUN_KEY = "run.portable_sites"
KIT_FILES = ("agreement.key", "server.pub", "site.json")
"""What a site kit holds (``crypto/keys.py``); nothing else is handed out."""

_ROOT: list[Path] = []


def enabled(run_config: Mapping[str, Any]) -> bool:
    """Whether the run's config (Flower's ``context.run_config``) asks for portable simulated sites."""
    return run_config.get(RUN_KEY) is True


def local_root() -> Path:
    """The private folder of this process for kits and site state (removed when the process exits)."""
    if not _ROOT:
        path = Path(tempfile.mkdtemp(prefix=f"edgetune-portable-p{os.getpid()}-"))
        atexit.register(shutil.rmtree, path, True)
        _ROOT.append(path)
    return _ROOT[0]


def pack(folder: Path, only: tuple[str, ...] = ()) -> ConfigRecord:
    """Every regular file under ``folder`` (or just the top-level names ``only``) as one record."""
    folder = Path(folder)
    names: list[str] = []
    blobs: list[bytes] = []
    if only:
        paths = [folder / n for n in only]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"{folder}: missing {', '.join(missing)}")
    else:
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) if folder.is_dir() else []
    for path in paths:
        names.append(path.relative_to(folder).as_posix())
        blobs.append(path.read_bytes())
    return ConfigRecord({"names": names, "files": blobs})


def record(names: object, files: object) -> ConfigRecord:
    """A packed folder from a message's two lists; ``ValueError`` unless they are str and bytes lists."""
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError("portable folder: the names are not a list of strings")
    if not (isinstance(files, list) and all(isinstance(b, bytes) for b in files)):
        raise ValueError("portable folder: the files are not a list of byte strings")
    return ConfigRecord({"names": list(names), "files": list(files)})


def _safe(name: object) -> PurePosixPath:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ValueError(f"portable folder entry {str(name)[:80]!r} is not a plain relative path")
    path = PurePosixPath(name)
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"portable folder entry {name[:80]!r} is not a plain relative path")
    return path


def restore(packed: ConfigRecord | None, folder: Path, only: tuple[str, ...] = ()) -> Path:
    """Empty ``folder`` (a private folder) and write the files of ``packed`` into it.

    ``only``: the entries must be exactly these top-level names (a kit). Raises ``ValueError``
    naming a malformed record or an entry that is not a plain relative path; nothing is written then.
    """
    names: list[str] = []
    blobs: list[bytes] = []
    if packed is not None:
        checked = record(packed.get("names", []), packed.get("files", []))
        names, blobs = list(checked["names"]), list(checked["files"])  # type: ignore[arg-type]
        if len(names) != len(blobs) or len(set(names)) != len(names):
            raise ValueError("portable folder record: names and files do not pair up")
    paths = [_safe(n) for n in names]
    if only and sorted(str(p) for p in paths) != sorted(only):
        raise ValueError(f"a site kit holds exactly {', '.join(only)}; got {', '.join(map(str, paths)) or 'nothing'}")
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    private_dir(folder)
    for rel, blob in zip(paths, blobs, strict=True):
        target = folder.joinpath(*rel.parts)
        if target.parent != folder:
            private_dir(target.parent)
        atomic_write_bytes(target, blob)
    return folder


def kit_folder(context: Context, site: str) -> Path:
    """The site's kit, written from ``context.state`` into this process's private folder.

    Raises ``ValueError`` when the node was never handed a kit (no hello with a kit reached it).
    """
    if KIT_KEY not in context.state:
        raise ValueError(
            f"simulated site {site}: portable sites get their kit in the hello exchange; this node has none"
        )
    folder = local_root() / f"run-{context.run_id}" / "kits" / site
    return restore(context.state.config_records[KIT_KEY], folder, only=KIT_FILES)


def state_folder(context: Context, site: str) -> Path:
    """Where this process keeps ``site``'s state while it runs one of its messages."""
    return local_root() / f"run-{context.run_id}" / "sites" / site


def load_state(context: Context, site: str) -> Path:
    """Refill the site's state folder from ``context.state`` (empty when the Context has none yet)."""
    record = context.state.config_records[STORE_KEY] if STORE_KEY in context.state else None
    return restore(record, state_folder(context, site))


def save_state(context: Context, site: str) -> None:
    """Pack the site's state folder into ``context.state`` for the actor that runs its next message."""
    context.state[STORE_KEY] = pack(state_folder(context, site))
