"""Crash-safe files: a failed write (full disk, failed rename) leaves the old version intact and no temp files."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from edgetune import io as eio
from edgetune.io import (
    StorageError,
    append_jsonl,
    atomic_folder,
    atomic_write_bytes,
    atomic_write_json,
    read_jsonl,
)

OLD = b"old checkpoint \x00\xff" * 1000


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# --- atomic_write_bytes -------------------------------------------------------------------------------------------


def test_atomic_write_replaces_content_and_leaves_no_temp(tmp_path: Path):
    """A write replaces the whole file (shorter data leaves no tail) and nothing else appears in the folder."""
    # Prepare
    target = tmp_path / "state.bin"
    target.write_bytes(OLD)

    # Execute
    atomic_write_bytes(target, b"new")

    # Assert
    assert target.read_bytes() == b"new"
    assert listing(tmp_path) == ["state.bin"]


def test_atomic_write_creates_parents_and_empty_files(tmp_path: Path):
    """Missing parent folders are created, and empty data gives an empty file."""
    # Prepare
    target = tmp_path / "a" / "b" / "empty.bin"

    # Execute
    atomic_write_bytes(str(target), b"")

    # Assert
    assert target.read_bytes() == b""
    assert listing(target.parent) == ["empty.bin"]


def test_atomic_write_file_modes(tmp_path: Path):
    """Files are 0600 by default; an explicit mode is applied exactly, whatever the umask."""
    # Prepare
    private, public = tmp_path / "private", tmp_path / "public"
    old_umask = os.umask(0o077)

    # Execute
    try:
        atomic_write_bytes(private, b"k")
        atomic_write_bytes(public, b"p", mode=0o644)
    finally:
        os.umask(old_umask)

    # Assert
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


@pytest.mark.parametrize("partial", [False, True])
def test_disk_full_during_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, partial: bool):
    """ENOSPC from os.write (at once, or after part of the data went out) leaves the old file byte-equal,
    no temp file, and a StorageError naming the path with the OSError as its cause."""
    # Prepare
    target = tmp_path / "ckpt.bin"
    target.write_bytes(OLD)
    real_write = os.write
    calls = []

    def full_disk(fd, data):
        calls.append(len(data))
        assert listing(tmp_path) != ["ckpt.bin"]  # the temp file exists when the disk fills
        if partial and len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eio.os, "write", full_disk)

    # Execute
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(target, b"N" * 100_000)
    monkeypatch.undo()

    # Assert
    assert calls and (len(calls) == 2) == partial
    assert target.read_bytes() == OLD
    assert listing(tmp_path) == ["ckpt.bin"]
    assert str(target) in str(info.value) and "previous version is unchanged" in str(info.value)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC


@pytest.mark.parametrize("failing", ["replace", "fsync", "open"])
def test_failed_step_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str):
    """If open, fsync or the rename fails: old file byte-equal, no temp file left, the error names the path."""
    # Prepare
    target = tmp_path / "ckpt.bin"
    target.write_bytes(OLD)
    monkeypatch.setattr(eio.os, failing, enospc)

    # Execute
    with pytest.raises(StorageError, match=f"could not write {target}"):
        atomic_write_bytes(target, b"new data")
    monkeypatch.undo()

    # Assert
    assert target.read_bytes() == OLD
    assert listing(tmp_path) == ["ckpt.bin"]


def test_failed_first_write_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A failed write to a path that did not exist leaves no file and no temp file behind."""
    # Prepare
    target = tmp_path / "new.bin"
    monkeypatch.setattr(eio.os, "replace", enospc)

    # Execute
    with pytest.raises(StorageError):
        atomic_write_bytes(target, b"data")
    monkeypatch.undo()

    # Assert
    assert listing(tmp_path) == []


def test_atomic_write_json_is_sorted_indented_and_public(tmp_path: Path):
    """atomic_write_json writes sorted, indented JSON ending in a newline, mode 0644, that loads back equal."""
    # Prepare
    target = tmp_path / "summary.json"
    obj = {"b": [1, 2.5], "a": {"z": None, "y": "é"}}

    # Execute
    atomic_write_json(target, obj)

    # Assert
    text = target.read_text()
    assert json.loads(text) == obj
    assert text == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


# --- atomic_folder ------------------------------------------------------------------------------------------------


def fill_with(files: dict[str, bytes]):
    def fill(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)

    return fill


def test_atomic_folder_creates_and_replaces(tmp_path: Path):
    """atomic_folder creates the folder; a second call replaces it wholesale (no stale files), leaving no temp."""
    # Prepare
    final = tmp_path / "ckpt" / "round-0001"

    # Execute
    first = atomic_folder(final, fill_with({"a.bin": b"1", "only-old.txt": b"x"}))
    first_tree = tree(final)
    atomic_folder(final, fill_with({"a.bin": b"2", "sub/b.bin": b"3"}))

    # Assert
    assert first == final and first_tree == {"a.bin": b"1", "only-old.txt": b"x"}
    assert tree(final) == {"a.bin": b"2", "sub/b.bin": b"3"}
    assert listing(final.parent) == ["round-0001"]


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("safetensors: No space left on device")]
)
def test_atomic_folder_fill_failure_keeps_previous(tmp_path: Path, error: Exception):
    """fill raising OSError or RuntimeError (torch's disk-full) leaves the previous folder intact and no temp
    folder, and raises StorageError naming the folder."""
    # Prepare
    final = tmp_path / "round-0002"
    atomic_folder(final, fill_with({"model.safetensors": OLD, "config.json": b"{}"}))
    before = tree(final)

    def fill(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise error

    # Execute
    with pytest.raises(StorageError, match=f"could not write {final}") as info:
        atomic_folder(final, fill)

    # Assert
    assert info.value.__cause__ is error
    assert tree(final) == before
    assert listing(tmp_path) == ["round-0002"]


def test_atomic_folder_passes_storage_error_through(tmp_path: Path):
    """A StorageError raised inside fill propagates as the same object (not wrapped twice), temp removed."""
    # Prepare
    final = tmp_path / "round-0001"
    error = StorageError("inner write failed")

    def fill(tmp: Path) -> None:
        raise error

    # Execute
    with pytest.raises(StorageError) as info:
        atomic_folder(final, fill)

    # Assert
    assert info.value is error
    assert listing(tmp_path) == []


def test_atomic_folder_failed_swap_out_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """If moving the old folder aside fails, the old folder is untouched and the new one is discarded."""
    # Prepare
    final = tmp_path / "round-0001"
    atomic_folder(final, fill_with({"w": OLD}))
    monkeypatch.setattr(eio.os, "replace", enospc)

    # Execute
    with pytest.raises(StorageError):
        atomic_folder(final, fill_with({"w": b"new"}))
    monkeypatch.undo()

    # Assert
    assert tree(final) == {"w": OLD}
    assert listing(tmp_path) == ["round-0001"]


def test_keep_prunes_only_older_siblings(tmp_path: Path):
    """keep=2 leaves the two newest round-* folders; other names, files and hidden folders are untouched."""
    # Prepare
    (tmp_path / "other-0001").mkdir()
    (tmp_path / "roundabout").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "round-notes.txt").write_text("a file, not a checkpoint")

    # Execute
    for r in range(1, 6):
        atomic_folder(tmp_path / f"round-{r:04d}", fill_with({"r": str(r).encode()}), keep=2)

    # Assert
    assert listing(tmp_path) == [".hidden", "other-0001", "round-0004", "round-0005", "round-notes.txt", "roundabout"]
    assert (tmp_path / "round-0005" / "r").read_bytes() == b"5"


@pytest.mark.parametrize(("keep", "left"), [(1, ["round-0003"]), (None, ["round-0001", "round-0002", "round-0003"])])
def test_keep_one_and_keep_none(tmp_path: Path, keep: int | None, left: list[str]):
    """keep=1 leaves only the folder just written; keep=None never prunes."""
    # Execute
    for r in range(1, 4):
        atomic_folder(tmp_path / f"round-{r:04d}", fill_with({"r": b""}), keep=keep)

    # Assert
    assert listing(tmp_path) == left


# --- JSON lines ---------------------------------------------------------------------------------------------------


def test_append_jsonl_appends_sorted_lines(tmp_path: Path):
    """append_jsonl creates the file, then appends one sorted-key line per call without touching earlier bytes."""
    # Prepare
    path = tmp_path / "metrics.jsonl"

    # Execute
    append_jsonl(path, {"round": 1, "loss": 2.5})
    first = path.read_bytes()
    append_jsonl(path, {"round": 2, "loss": 2.25, "note": "é"})

    # Assert
    assert first == b'{"loss": 2.5, "round": 1}\n'
    assert path.read_bytes().startswith(first)
    assert path.read_text().count("\n") == 2
    assert read_jsonl(path) == [{"round": 1, "loss": 2.5}, {"round": 2, "loss": 2.25, "note": "é"}]


def test_append_jsonl_failure_names_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A failed append (disk full at fsync) raises StorageError naming the file."""
    # Prepare
    path = tmp_path / "metrics.jsonl"
    monkeypatch.setattr(eio.os, "fsync", enospc)

    # Execute / Assert
    with pytest.raises(StorageError, match=f"could not append to {path}"):
        append_jsonl(path, {"round": 1})


def test_read_jsonl_missing_file_is_empty(tmp_path: Path):
    """A log that was never written reads as no rows."""
    # Execute / Assert
    assert read_jsonl(tmp_path / "none.jsonl") == []


@pytest.mark.parametrize("torn", ['{"round": 3, "lo', "{", '{"round": 3}garbage'])
def test_read_jsonl_skips_torn_last_line(tmp_path: Path, torn: str):
    """An unparseable last line (a crash mid-append) is ignored; the rows before it are returned."""
    # Prepare
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n\n{"round": 2}\n' + torn)

    # Execute / Assert
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}]


def test_read_jsonl_raises_on_torn_middle_line(tmp_path: Path):
    """An unparseable line that is not the last is corruption: ValueError naming file:line."""
    # Prepare
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, "lo\n{"round": 3}\n')

    # Execute / Assert
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        read_jsonl(path)


# --- regressions: bugs found by these tests, now fixed ---


def test_append_after_torn_tail_keeps_log_readable(tmp_path: Path):
    """After a crash mid-append, later appends are all readable and the log never becomes unreadable."""
    # Prepare: a crash left a torn last line
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, "lo')

    # Execute: the resumed run appends two more rounds
    append_jsonl(path, {"round": 2})
    append_jsonl(path, {"round": 3})

    # Assert
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}, {"round": 3}]


def test_atomic_folder_any_fill_error_leaves_no_temp(tmp_path: Path):
    """Whatever fill raises, the error propagates, the previous folder is intact and no temp folder remains."""
    # Prepare
    final = tmp_path / "round-0001"
    atomic_folder(final, fill_with({"w": OLD}))

    def fill(tmp: Path) -> None:
        (tmp / "w").write_bytes(b"partial")
        raise ValueError("tokenizer refused to save")

    # Execute
    with pytest.raises(ValueError, match="tokenizer refused"):
        atomic_folder(final, fill)

    # Assert
    assert tree(final) == {"w": OLD}
    assert listing(tmp_path) == ["round-0001"]


def test_atomic_folder_failed_swap_in_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """If moving the new folder into place fails after the old one was moved aside, the old one is restored."""
    # Prepare
    final = tmp_path / "round-0001"
    atomic_folder(final, fill_with({"w": OLD}))
    real_replace = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(eio.os, "replace", second_fails)

    # Execute
    with pytest.raises(StorageError):
        atomic_folder(final, fill_with({"w": b"new"}))
    monkeypatch.undo()

    # Assert
    assert len(calls) >= 2
    assert tree(final) == {"w": OLD}
    assert listing(tmp_path) == ["round-0001"]


def test_keep_never_prunes_the_folder_just_written(tmp_path: Path):
    """The folder atomic_folder returns exists after pruning, also once round numbers outgrow the zero padding."""
    # Prepare: runs.py names checkpoints round-{r:04d}
    atomic_folder(tmp_path / "round-9999", fill_with({"r": b""}), keep=2)

    # Execute
    out = atomic_folder(tmp_path / "round-10000", fill_with({"r": b""}), keep=1)

    # Assert
    assert out.is_dir()
    assert listing(tmp_path) == ["round-10000"]


def test_prune_sibling_runs_keeps_the_newest_two_and_the_current(tmp_path: Path):
    """Only the two most recently modified run folders survive, and the current one always does."""
    # Prepare: four runs (hex run ids), the current one the oldest by mtime (a resumed old run)
    runs = []
    (tmp_path / "spsa").mkdir()  # not a run folder: never pruned
    for i in range(4):
        d = tmp_path / f"{i:016x}"
        d.mkdir()
        (d / "x.safetensors").write_bytes(b"x" * 10)
        os.utime(d, (1000 + i, 1000 + i))
        runs.append(d)

    # Execute
    removed = eio.prune_sibling_runs(runs[0])

    # Assert
    assert [p.name for p in removed] == [f"{1:016x}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:016x}" for i in (0, 2, 3)] + ["spsa"]
    assert eio.prune_sibling_runs(tmp_path / "missing" / "run") == []


# --- issue 13: the reader and the appender agree on what is committed --------------------------------------------


@pytest.mark.parametrize("tail", ['{"round": 3}', '{"round": 3, "lo', "garbage\n"])
def test_unterminated_or_garbage_last_line_is_never_read_and_is_cut_by_the_next_append(tmp_path: Path, tail: str):
    """A complete record without its newline is torn (it was never committed): read_jsonl does not return
    it, and the next append cuts it off instead of leaving the reader and the appender in disagreement.
    Likewise a complete last line that is not JSON. Earlier records are never touched."""
    # Prepare
    path = tmp_path / "journal.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n' + tail)

    # Execute
    before = read_jsonl(path)
    append_jsonl(path, {"round": 4})

    # Assert
    assert before == [{"round": 1}, {"round": 2}]
    assert path.read_text() == '{"round": 1}\n{"round": 2}\n{"round": 4}\n'
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}, {"round": 4}]


def test_jsonl_valid_prefix_at_every_offset_of_a_line(tmp_path: Path):
    """Cut at every byte offset of its last line, a log reads as the lines before it, and the length the
    appender keeps is exactly those lines' bytes; only the complete line with its newline counts."""
    head = b'{"a": 1}\n'
    line = b'{"round": 2, "hash": "abc"}'
    for offset in range(len(line) + 1):
        keep, rows = eio.jsonl_valid_prefix(head + line[:offset])
        assert (keep, rows) == (len(head), [{"a": 1}]), offset
    whole = head + line + b"\n"
    assert eio.jsonl_valid_prefix(whole) == (len(whole), [{"a": 1}, {"round": 2, "hash": "abc"}])


def test_deep_nesting_in_a_log_is_corruption_not_a_recursion_error(tmp_path: Path):
    """A line nested deeper than the parser's recursion limit raises ValueError naming file:line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + '\n{"round": 2}\n')
    with pytest.raises(ValueError, match=f"{path}:1"):
        read_jsonl(path)


# --- issue 13: temporary names cannot be captured by planted symlinks ----------------------------------------------


def test_atomic_write_never_writes_through_a_planted_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Symlinks planted at every temp name the old code used (``.name.tmp-<pid>``) and at a name chosen by
    the attacker are never written through: the target file keeps its content and the write succeeds."""
    # Prepare
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    target = tmp_path / "state" / "secret.json"
    target.parent.mkdir()
    (target.parent / f".secret.json.tmp-{os.getpid()}").symlink_to(victim)

    # Execute
    atomic_write_bytes(target, b"round secrets")
    with pytest.raises(FileExistsError):
        eio.create_exclusive(target.parent / f".secret.json.tmp-{os.getpid()}")

    # Assert
    assert victim.read_bytes() == b"do not touch"
    assert target.read_bytes() == b"round secrets" and not target.is_symlink()


def test_write_exclusive_replaces_a_planted_symlink_instead_of_following_it(tmp_path: Path):
    """A key file whose name an attacker pre-created as a symlink gets a fresh 0600 file; the link target
    is untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"x")
    key = tmp_path / "host.sock.key"
    key.symlink_to(victim)
    eio.write_exclusive(key, b"k" * 32)
    assert victim.read_bytes() == b"x"
    assert key.read_bytes() == b"k" * 32 and not key.is_symlink()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


# --- issue 13: private, checksummed state ------------------------------------------------------------------------


def test_state_json_is_private_and_refuses_any_changed_field(tmp_path: Path):
    """write_state_json writes 0600; read_state_json returns the state, and refuses a file where one field
    changed (naming the file), a file without the checksum, and a file that is not JSON."""
    # Prepare
    path = tmp_path / "spsa.json"
    state = {"scale": 8.0, "secrets": {"3": "ab" * 32}, "applied": 2}

    # Execute
    eio.write_state_json(path, state)
    good = eio.read_state_json(path)
    doc = json.loads(path.read_text())
    doc["state"]["scale"] = 9.0
    path.write_text(json.dumps(doc))

    # Assert
    assert good == state
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match=f"{path}: checksum mismatch"):
        eio.read_state_json(path)
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="no checksum"):
        eio.read_state_json(path)
    path.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="not valid JSON"):
        eio.read_state_json(path)


def test_private_dir_and_tree_modes(tmp_path: Path):
    """private_dir makes a 0700 folder whatever the umask; set_private_tree makes files 0600, folders 0700."""
    old = os.umask(0o022)
    try:
        d = eio.private_dir(tmp_path / "server-state")
        (d / "sub").mkdir()
        (d / "sub" / "f").write_bytes(b"x")
        eio.set_private_tree(d)
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "sub").stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "sub" / "f").stat().st_mode) == 0o600


def test_atomic_folder_after_a_kill_mid_swap_restores_the_previous_folder(tmp_path: Path):
    """A process killed after moving the old folder aside but before moving the new one in leaves
    ``.name.old-*`` and no ``name``; the next write restores the old one first, then replaces it; leftover
    temp folders of a killed write are removed."""
    final = tmp_path / "round-0001"
    atomic_folder(final, fill_with({"w": OLD}))
    os.replace(final, tmp_path / ".round-0001.old-dead")
    (tmp_path / ".round-0001.tmp-dead").mkdir()
    atomic_folder(tmp_path / "round-0002", fill_with({"w": b"2"}))  # another folder: leaves them alone
    assert not final.exists()
    atomic_folder(final, fill_with({"w": b"new"}))
    assert tree(final) == {"w": b"new"}
    assert listing(tmp_path) == ["round-0001", "round-0002"]
