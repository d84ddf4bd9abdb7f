"""The server's state between rounds: the folders ``save_state`` writes and a restart loads.

Crash safety (``journal.py``): the server half's state goes into a new, private (0700/0600),
checksummed folder under ``server-state/`` before the journal line that names it; the journal
line is the single commit point, so a kill at any point, a torn journal line or a full disk
leaves a run that resumes and ends on the uninterrupted run's state hash. A restart refuses a
journal of another run or another training configuration (``training_identity``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from edgetune.algorithms.base import ServerHalf
from edgetune.config import RunConfig, flatten
from edgetune.io import (
    atomic_folder,
    link_or_copy_tree,
    private_dir,
    read_state_json,
    set_private_tree,
    write_state_json,
)
from edgetune.journal import Journal, JournalMismatch, RunFinished
from edgetune.runs import RunRecorder

STATE_DIR = "server-state"
STATE_MARKER = "edgetune-state.json"
_STATE_NAME = re.compile(r"(plan|commit)-\d{6,}-\d{6,}")
_STATE_LEFTOVER = re.compile(r"\.(plan|commit)-\d{6,}-\d{6,}\.(tmp|old)-.*")

OPERATIONAL_KEYS = frozenset(
    {
        "num_rounds",
        "run.dir",
        "run.round_timeout_s",
        "run.quorum_grace_s",
        "run.checkpoint_every",
        "run.keep_checkpoints",
        "model.device",
        "model.cache_dir",
        "crypto.keys_dir",
        "crypto.envelope_ttl_s",
    }
)
"""Config keys a restarted server may change (where it runs, how long it waits, how long it trains);
any other difference means the folder holds another run's journal, which is refused."""


def training_identity(cfg: RunConfig) -> dict[str, Any]:
    """The configuration that defines what a run trains.

    All keys but ``OPERATIONAL_KEYS`` and ``eval.*``/``imv.*`` (those change what is measured, not trained).
    """
    return {
        k: v
        for k, v in sorted(flatten(cfg).items())
        if k not in OPERATIONAL_KEYS and not k.startswith(("eval.", "imv."))
    }


def check_identity(cfg: RunConfig, recorder: RunRecorder, journal: Journal) -> None:
    """Refuse a journal written by another run: another folder name, or another training configuration."""
    start = journal.start_record()
    if start is None:
        return  # a new run, or a journal written before start lines existed
    if start.get("run") != recorder.dir.name:
        raise JournalMismatch(
            f"{journal.path} belongs to run {start.get('run')!r}, not {recorder.dir.name!r} (a copied or renamed "
            "run folder?); start a new run in an empty folder"
        )
    recorded = start.get("config", {})
    now = training_identity(cfg)
    differ = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    if differ:
        detail = ", ".join(f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in differ[:8])
        raise JournalMismatch(
            f"{recorder.dir} holds a run trained with another configuration ({detail}); resume it with its own "
            "config.toml, or start a new run with another run.name"
        )


def committed_state_folder(run_dir: Path, journal: Journal | None = None) -> Path:
    """The server-state folder a restart of ``run_dir`` loads: the one the journal names last.

    Its marker must name this run and the journal's last committed round (``ValueError`` naming the
    folder otherwise); a journal from before state folders were named: ``server-state/`` itself.
    """
    run_dir = Path(run_dir)
    journal = journal if journal is not None else Journal(run_dir)
    committed = journal.last_commit
    named = journal.last_state()
    if named is None:
        return run_dir / STATE_DIR
    expected = named["round"] if named["t"] == "commit" else named["round"] - 1
    if expected != committed:
        raise ValueError(
            f"{journal.path}: the last state line ({named['t']} {named['round']}) does not follow "
            f"the last commit ({committed})"
        )
    folder = run_dir / STATE_DIR / named["state"]
    marker = read_state_json(folder / STATE_MARKER)
    if marker.get("run") != run_dir.name or marker.get("committed") != committed:
        raise ValueError(
            f"{folder}: holds round {marker.get('committed')} of run {marker.get('run')!r}, the journal "
            f"expects round {committed} of {run_dir.name!r}"
        )
    return folder


def resume(cfg: RunConfig, server: ServerHalf, recorder: RunRecorder, journal: Journal) -> int:
    """Load the server state the journal names last; drop rows recorded after the last commit."""
    if journal.finished:
        raise RunFinished(
            f"{recorder.dir} holds a finished run (journal says so); start a new run with another run.name"
        )
    check_identity(cfg, recorder, journal)
    committed = journal.last_commit
    if journal.last_state() is not None:
        folder = committed_state_folder(recorder.dir, journal)
        restored = server.load_state(folder)
        if restored != committed:
            raise RuntimeError(f"journal says round {committed} is committed, {folder} holds round {restored}")
    elif committed:  # a journal from before state folders were named: the state is server-state/ itself
        restored = server.load_state(recorder.dir / STATE_DIR)
        if restored != committed:
            raise RuntimeError(f"journal says round {committed} is committed, the saved state is round {restored}")
    prune_states(recorder, journal)
    recorder.truncate(committed)
    return committed


def save_state(server: ServerHalf, recorder: RunRecorder, journal: Journal, kind: str, round_idx: int) -> str:
    """Write the server half's state into a new folder (not yet committed: no journal line names it).

    The folder starts as hard links to the files of the state the journal names last, so what did
    not change (spsa's replica, kavg's weights of an unchanged round) costs no copy; ``save_state``
    replaces files atomically and never writes into them in place.
    """
    root = private_dir(recorder.dir / STATE_DIR)
    committed = round_idx if kind == "commit" else round_idx - 1
    name = f"{kind}-{round_idx:06d}-{len(journal.records):06d}"
    prev = journal.last_state()

    def fill(tmp: Path) -> None:
        if prev is not None and (root / prev["state"]).is_dir():
            link_or_copy_tree(root / prev["state"], tmp)
        server.save_state(tmp, committed)
        write_state_json(
            tmp / STATE_MARKER, {"run": recorder.dir.name, "committed": committed, "kind": kind, "round": round_idx}
        )
        set_private_tree(tmp)

    if (root / name).exists():
        shutil.rmtree(root / name)  # left by a crash before its journal line: never named, never loaded
    atomic_folder(root / name, fill)
    return name


def prune_states(recorder: RunRecorder, journal: Journal) -> None:
    """Delete state folders no journal line needs (older rounds, folders a crash left unnamed)."""
    root = recorder.dir / STATE_DIR
    if not root.is_dir():
        return
    keep = journal.state_names()
    for path in root.iterdir():
        if (_STATE_NAME.fullmatch(path.name) and path.name not in keep) or _STATE_LEFTOVER.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
