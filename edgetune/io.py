"""Crash-safe files: atomic writes, append-only JSON lines and checkpoint folders.

Every file that matters is written to a temporary name in its own folder, flushed, fsynced
and renamed over the old one, and the folder is fsynced: a crash or a full disk leaves either
the old file or the new one, never a torn mix. ``torch``/``safetensors`` report a full disk
as ``RuntimeError``, not ``OSError``, so both are caught.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


class StorageError(RuntimeError):
    """A write failed (disk full, permissions); the previous version is intact."""


def fsync_dir(path: Path) -> None:
    """Fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is None else mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"could not write {path}: {err}; the previous version is unchanged") from err


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)


def append_jsonl(path: Path | str, obj: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (readers skip a torn last line)."""
    path = Path(path)
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    try:
        with open(path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    # a crash tore the last line (read_jsonl ignores it): drop it, or it glues onto ours
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise StorageError(f"could not append to {path}: {err}") from err


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Read JSON lines, ignoring a torn (unparseable) last line left by a crash."""
    path = Path(path)
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({err})") from err
    return rows


def atomic_folder(final: Path, fill: Callable[[Path], None], *, keep: int | None = None) -> Path:
    """Create folder ``final`` atomically: ``fill(tmp)`` writes into a temp folder that is then
    fsynced and renamed. On failure the temp folder is removed and ``StorageError`` raised; an
    existing ``final`` is left as it was. With ``keep``, only the newest ``keep`` sibling
    folders sharing ``final``'s name prefix (before the last ``-``) remain.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fd = os.open(Path(root) / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(Path(root))
        if final.exists():
            old = parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, StorageError) or not isinstance(err, (OSError, RuntimeError)):
            raise
        raise StorageError(f"could not write {final}: {err}; earlier checkpoints in {parent} are unchanged") from err
    if keep is not None:
        prefix = final.name.rsplit("-", 1)[0] + "-"
        siblings = sorted(
            (p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefix)),
            key=lambda p: (len(p.name), p.name),  # round-10000 after round-9999
        )
        for old_dir in [p for p in siblings[:-keep] if p != final]:
            shutil.rmtree(old_dir, ignore_errors=True)
    return final


RUN_FOLDER = re.compile(r"[0-9a-f]{16,}")
"""Names of per-run folders (hex run ids); nothing else next to them is ever pruned."""


def prune_sibling_runs(folder: Path, keep: int = 2) -> list[Path]:
    """Delete all but the ``keep`` most recently modified run folders next to ``folder`` (never ``folder``).

    A site keeps per-run state (spsa replicas, dppf copies, deft residuals) in folders named by the
    hex run id; without pruning, every run would leave its copy of the trainable weights behind.
    Only siblings whose names are run ids (``RUN_FOLDER``) are candidates. Returns the folders removed.
    """
    parent = Path(folder).parent
    if not parent.is_dir():
        return []
    runs = sorted(
        (p for p in parent.iterdir() if p.is_dir() and RUN_FOLDER.fullmatch(p.name)), key=lambda p: p.stat().st_mtime
    )
    removed = []
    for stale in runs[: max(0, len(runs) - keep)]:
        if stale.resolve() != Path(folder).resolve():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed
