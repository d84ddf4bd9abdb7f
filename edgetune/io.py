"""Crash-safe files: atomic writes, append-only JSON lines, checkpoint folders and private state.

Every file that matters is written to a temporary name in its own folder, flushed, fsynced
and renamed over the old one, and the folder is fsynced: a crash or a full disk leaves either
the old file or the new one, never a torn mix. ``torch``/``safetensors`` report a full disk
as ``RuntimeError``, not ``OSError``, so both are caught.

Temporary names are random and created exclusively without following symlinks
(``create_exclusive``), so a link planted at a guessable name can neither capture what is
written nor redirect the write onto another file.

JSON-lines logs have one rule shared by the reader and the appender (``jsonl_valid_prefix``):
a line counts only once its newline is on disk. A last line without its newline is torn (even
when its bytes happen to parse), is never read, and the next append cuts it off first.

State that a resumed run trusts (``write_state_json``/``read_state_json``) is 0600 and carries a
sha256 of its content: a corrupted field is refused with the file's name, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class StorageError(RuntimeError):
    """A write failed (disk full, permissions); the previous version is intact."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def create_exclusive(path: Path | str, mode: int = 0o600) -> int:
    """Create ``path`` as a new file and return a write descriptor.

    Fails (``FileExistsError``) if anything, a symlink included, is already there: nothing is
    ever written through a link that someone planted at the name.
    """
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)


def write_exclusive(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Write a new file (``create_exclusive``) with ``data``; any old file or link is removed first."""
    path = Path(path)
    if path.is_symlink() or path.exists():
        path.unlink()
    fd = create_exclusive(path, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have filtered the mode os.open applied
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path | str) -> Path:
    """Create ``path`` (and parents) and make it 0700, refusing a symlink in its place."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_symlink():
        raise StorageError(f"{path} is a symlink; refusing to keep private state there")
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask and ignored for an existing folder
    return path


def fsync_dir(path: Path) -> None:
    """Fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _temp_name(path: Path, tag: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(8)}")


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    created = False
    try:
        fd = create_exclusive(tmp, 0o600 if mode is None else mode)
        created = True
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        if created:
            tmp.unlink(missing_ok=True)
        raise StorageError(f"could not write {path}: {err}; the previous version is unchanged") from err


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)


# --------------------------------------------------------------------------------------------
# Checksummed private state
# --------------------------------------------------------------------------------------------

STATE_FORMAT = "edgetune-state-v1"


def _state_digest(body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_state_json(path: Path | str, body: Any) -> None:
    """Atomically write ``body`` as 0600 JSON with a sha256 of its canonical form.

    For state a restarted process trusts (a server's round state, a site's replica record): it
    may reveal the model (round secrets, replay logs), so nobody else may read it, and
    ``read_state_json`` refuses it if any byte of the content changed.
    """
    doc = {"format": STATE_FORMAT, "sha256": _state_digest(body), "state": body}
    atomic_write_bytes(path, (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode(), mode=0o600)


def read_state_json(path: Path | str) -> Any:
    """Read what ``write_state_json`` wrote; ``ValueError`` naming the file if it does not check out."""
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); the state file is corrupted") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or set(doc) != {"format", "sha256", "state"}:
        raise ValueError(f"{path}: not an {STATE_FORMAT} file (no checksum); refusing to use it")
    try:
        digest = _state_digest(doc["state"])
    except ValueError as err:
        raise ValueError(f"{path}: state holds a value JSON cannot carry ({err})") from None
    if doc["sha256"] != digest:
        raise ValueError(f"{path}: checksum mismatch (the file was corrupted or edited); refusing to use it")
    return doc["state"]


def set_private_tree(root: Path | str) -> None:
    """Make every folder under ``root`` 0700 and every file 0600 (symlinks are left alone)."""
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o700)
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o600)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(dirpath, d))]


# --------------------------------------------------------------------------------------------
# JSON lines
# --------------------------------------------------------------------------------------------


def jsonl_valid_prefix(data: bytes, where: str = "") -> tuple[int, list[dict[str, Any]]]:
    """Split a JSON-lines log into its committed records and the length of their bytes.

    A line is committed once its newline is written. Bytes after the last newline are a torn
    append (a crash or a full disk mid-write), even when they parse. A complete last line that
    does not parse as a JSON object is treated as torn too (a filesystem may leave garbage
    after a crash); an unparseable line *before* a committed one is corruption: ``ValueError``
    naming ``where``:line.

    Returns
    -------
    tuple[int, list[dict]]
        The byte length of the committed prefix (where an appender must cut the file) and its records.
    """
    end = data.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    starts = []
    pos = 0
    while pos < end:
        nl = data.index(b"\n", pos)
        starts.append((pos, nl))
        pos = nl + 1
    for i, (lo, hi) in enumerate(starts):
        line = data[lo:hi]
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"a JSON {type(obj).__name__}, not an object")
        except (ValueError, RecursionError) as err:
            if i == len(starts) - 1:
                return lo, records  # the last complete line is garbage: torn, cut it too
            raise ValueError(f"{where}:{i + 1}: not valid JSON ({err})") from err
        records.append(obj)
    return end, records


def append_jsonl(path: Path | str, obj: dict[str, Any]) -> None:
    """Append one JSON line and fsync it, first cutting off a torn tail (``jsonl_valid_prefix``)."""
    path = Path(path)
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | _NOFOLLOW | _CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(fd, "rb", closefd=False) as f:
                    keep, _ = jsonl_valid_prefix(f.read(), str(path))
                if keep != size:
                    # a crash tore the last line (readers never saw it): drop it, or it glues onto ours
                    os.ftruncate(fd, keep)
                    os.fsync(fd)
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise StorageError(f"could not append to {path}: {err}") from err


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Read the committed JSON lines (a torn last line is not read; see ``jsonl_valid_prefix``)."""
    path = Path(path)
    if not path.exists():
        return []
    return jsonl_valid_prefix(path.read_bytes(), str(path))[1]


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def atomic_folder(final: Path, fill: Callable[[Path], None], *, keep: int | None = None) -> Path:
    """Create folder ``final`` atomically: ``fill(tmp)`` writes into a temp folder that is then
    fsynced and renamed. On failure the temp folder is removed and ``StorageError`` raised; an
    existing ``final`` is left as it was. With ``keep``, only the newest ``keep`` sibling
    folders sharing ``final``'s name prefix (before the last ``-``) remain.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while writing this folder
    for stale in parent.glob(f".{final.name}.old-*"):
        if final.exists():
            shutil.rmtree(stale, ignore_errors=True)  # killed after the swap: the new folder is in place
        else:
            os.replace(stale, final)  # killed between moving the old folder aside and the new one in
    tmp: Path | None = None
    try:
        # a random name, created 0700: checkpoints are the model, nobody else needs to read them
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
        fill(tmp)
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fd = os.open(Path(root) / name, os.O_RDONLY | _NOFOLLOW)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(Path(root))
        if final.exists():
            old = _temp_name(final, "old")
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        tmp = None
        fsync_dir(parent)
    except BaseException as err:
        if tmp is not None:
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


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Fill ``dst`` with hard links to the files of ``src`` (copies where links are impossible).

    For a state folder that starts as the previous one: writers must replace files (atomic
    writes), never modify them in place, or the previous folder would change with them.
    """
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            s, d = Path(dirpath) / name, dst / rel / name
            if s.is_symlink() or not stat.S_ISREG(s.lstat().st_mode):
                continue
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)
        dirs[:] = [x for x in dirs if not (Path(dirpath) / x).is_symlink()]


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
