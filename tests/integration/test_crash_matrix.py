"""Crash matrix (security.md F3, F7): the server killed at every step of a round, its journal torn at every
byte of its last line, and a full disk at every write; every case resumes and ends on the uninterrupted
run's state hash, with each round committed exactly once.

Each case runs the server in a forked child (``os.fork``), so a kill is ``os._exit``: no ``finally``
block, no flush, exactly what ``kill -9`` leaves on disk (every write the code made was already
fsynced). A second child then resumes the run folder to the end. The tiny model keeps a case near a
second of CPU; ``tests/integration/test_resume.py`` kills real processes with SIGKILL at two points.

Cases (3 rounds, 2 sites; spsa and kavg, and for a full disk also dppf, deft and lowrank with ``FULL``):

* every ``federation.FAULT_POINTS`` step of every round (the last-round-only ``after-summary`` once);
* before every ``os.replace`` of the run (each atomic file and folder: state, ledger, metrics, checkpoint);
* ENOSPC at every ``os.write``, whole or after half the bytes went out (state files, journal and metrics
  appends, ledger, replica stores, and the sites' replay guards and saved replicas);
* the journal cut at every byte offset of its last line, for a last line that is a commit, a plan or
  the finished record (offset len(line) is the complete record without its newline).

The sites run in the server's process and write to the same disk. ``run.min_sites`` is every site: a site
whose write fails refuses its reply (its replay guard must be on disk before it uses a round secret), so
the round misses quorum and is retried with byte-identical envelopes, which the site, with space again,
answers as in the uninterrupted run. With a smaller quorum the round would rightly commit without that site:
another trajectory, not a lost state (``test_a_site_whose_disk_is_full_is_a_failed_site_not_a_failed_run``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import faults, inproc, runs
from edgetune.federation import FAULT_POINTS
from edgetune.io import atomic_write_bytes, read_jsonl
from edgetune.journal import Journal

pytestmark = pytest.mark.slow

NAME = "crash"
"""Every run folder has this name: the run id, hence the (deterministic) secrets, derive from it."""
ROUNDS = 3
NUM_SITES = 2


def _flat(algorithm: str) -> dict:
    flat = tiny_flat(
        **{
            "num_rounds": ROUNDS,
            "data.demo_facts": 2,
            "eval.num_examples": 2,
            "eval.max_new_tokens": 1,
            "spsa.num_steps": 1,
            "run.min_sites": NUM_SITES,  # a site that fails a write makes the round retry (module docstring)
        }
    )
    if algorithm != "spsa":
        flat.update({"algorithm": algorithm, "kavg.local_steps": 1, "kavg.lr": 1e-2})
    if algorithm == "lowrank":
        flat.update({"model.trainable": "lora", "model.lora_rank": 4, "model.lora_alpha": 8.0})
    return flat


def _fast_children() -> None:
    """In a child only: fsync is a no-op (a killed process loses nothing the page cache holds; fsync
    matters for power loss, which ``test_io.py`` covers), and the loss plot is a stub written the same
    way (atomically), so a case costs its rounds, not matplotlib's layout."""
    os.fsync = lambda fd: None

    def plot(rows, path, *, title=""):
        atomic_write_bytes(path, b"\x89PNG stub", mode=0o644)

    runs.plot_loss_vs_bytes = plot


def _child(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked process; its exit code (137 for a simulated kill -9)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            torch.set_num_threads(1)
            _fast_children()
            fn()
        except BaseException:
            traceback.print_exc(limit=3)
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _run(run_dir: Path, flat: dict, fault: Callable[[], None] | None = None) -> int:
    """Run (or resume) the federation in ``run_dir`` in a child; ``fault`` installs a crash first."""

    def go() -> None:
        # Each case's sites keep their own persistent state (replica, replay guard) next to its run
        # folder: a real site has one future; sharing the folder across cases would let one case's
        # sites remember another case's round-3 envelope (a different random nonce: "equivocation").
        os.environ["EDGETUNE_CACHE"] = str(run_dir.parent / "site-cache")
        if fault is not None:
            fault()
        inproc.run(cfgmod.from_run_config(flat), NUM_SITES, run_dir=run_dir)

    return _child(go)


def _outcome(run_dir: Path) -> dict:
    journal = [json.loads(x) for x in (run_dir / "journal.jsonl").read_text().splitlines() if x.strip()]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ckpt = json.loads((run_dir / "checkpoints" / f"round-{ROUNDS:04d}" / "edgetune.json").read_text())
    return {
        "commits": [r["round"] for r in journal if r["t"] == "commit"],
        "finished": [r["round"] for r in journal if r["t"] == "finished"],
        "rows": [r["round"] for r in rows],
        "hash": rows[-1]["state_hash"],
        "commit_hash": [r["hash"] for r in journal if r["t"] == "commit"][-1],
        "summary_hash": json.loads((run_dir / "summary.json").read_text())["final_state_hash"],
        "checkpoint_hash": ckpt["state_hash"],
    }


def _expected(ref_hash: str) -> dict:
    return {
        "commits": list(range(1, ROUNDS + 1)),
        "finished": [ROUNDS],
        "rows": list(range(ROUNDS + 1)),
        "hash": ref_hash,
        "commit_hash": ref_hash,
        "summary_hash": ref_hash,
        "checkpoint_hash": ref_hash,
    }


def _resume_and_check(run_dir: Path, flat: dict, ref_hash: str, case: str) -> None:
    if not any(r["t"] == "finished" for r in read_jsonl(run_dir / "journal.jsonl")):
        code = _run(run_dir, flat)
        assert code == 0, f"{case}: the resumed run failed (exit {code})"
    assert _outcome(run_dir) == _expected(ref_hash), case
    assert not any(p.name.startswith(".") for p in (run_dir / "server-state").iterdir()), f"{case}: temp left"


def _kill_at(point: str, round_idx: int) -> Callable[[], None]:
    def install() -> None:
        def fp(name: str, r: int) -> None:
            if (name, r) == (point, round_idx):
                os._exit(137)

        faults.point = fp

    return install


def _count(names: tuple[str, ...], out: Path) -> Callable[[], None]:
    """Count calls of ``os.<names>``; write [calls before round 2, calls to the end of round 2, calls to the
    end of the last round (before the summary and the finished line), total] to ``out``."""

    def install() -> None:
        calls = [0]
        marks: dict[int, int] = {}
        for name in names:
            real = getattr(os, name)

            def counting(*args, _real=real, **kwargs):
                calls[0] += 1
                return _real(*args, **kwargs)

            setattr(os, name, counting)

        def fp(name: str, r: int) -> None:
            if name == "after-checkpoint":
                marks[r] = calls[0]

        faults.point = fp
        real_exit = os._exit

        def exit_with_count(code: int) -> None:
            out.write_text(json.dumps([marks[1], marks[2], marks[ROUNDS], calls[0]]))
            real_exit(code)

        os._exit = exit_with_count

    return install


def _kill_before(name: str, k: int) -> Callable[[], None]:
    def install() -> None:
        real = getattr(os, name)
        calls = [0]

        def hooked(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os._exit(137)
            return real(*args, **kwargs)

        setattr(os, name, hooked)

    return install


def _enospc_at(k: int, partial: bool) -> Callable[[], None]:
    def install() -> None:
        calls = [0]
        for name in ("write", "pwrite"):
            real = getattr(os, name)

            def hooked(fd, data, *rest, _real=real):
                calls[0] += 1
                if calls[0] == k:
                    if partial and len(data) > 1:
                        _real(fd, bytes(data[: len(data) // 2]), *rest)
                    raise OSError(errno.ENOSPC, "No space left on device")
                return _real(fd, data, *rest)

            setattr(os, name, hooked)

    return install


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One run in this process first, so that every fork starts with the imports and lazy
    initialisations done (``inproc.build`` clears the model and replica caches for each run)."""
    for algorithm in ("spsa", "kavg"):
        inproc.run(cfgmod.from_run_config(_flat(algorithm)), NUM_SITES, run_dir=tmp_path_factory.mktemp("warm") / NAME)


FULL = os.environ.get("EDGETUNE_CRASH_FULL") == "1"
"""The whole matrix (every round, every call, every algorithm, every offset): about an hour on 2 shared
cores. By default (CI) the matrix covers round 2 of 3, the middle round, whose steps are those of every
round, and the run's tail after the last round (plot, summary, the finished line); the last line's byte
offsets are all cut for the finished line, every 3rd for a plan line and every 8th for the long commit line
(always including the last two: the record without its newline, and whole)."""


def _reference(tmp_path: Path, flat: dict) -> str:
    ref = tmp_path / "ref" / NAME
    assert _run(ref, flat) == 0
    return _outcome(ref)["hash"]


def _calls(tmp_path: Path, flat: dict, names: tuple[str, ...]) -> list[int]:
    """1-based indices of the ``os.<names>`` calls to fault: those of round 2 and of the run's tail after
    the last round, or all of them (FULL)."""
    out = tmp_path / ("count-" + "-".join(names))
    assert _run(tmp_path / (out.name + "-run") / NAME, flat, _count(names, out)) == 0
    before2, end2, end_last, total = json.loads(out.read_text())
    if FULL:
        return list(range(1, total + 1))
    return [*range(before2 + 1, end2 + 1), *range(end_last + 1, total + 1)]


def _points() -> list[tuple[str, int]]:
    rounds = range(1, ROUNDS + 1) if FULL else [2]
    return [(p, r) for p in FAULT_POINTS if p != "after-summary" for r in rounds] + [("after-summary", ROUNDS)]


@pytest.mark.parametrize("algorithm", ["spsa", "kavg"])
def test_kill_at_every_fault_point_and_every_rename_resumes_to_the_same_hash(tmp_path, warm, algorithm):
    """Killed at each named step of a round, or just before any atomic rename (state, ledger, metrics,
    checkpoint): the restarted server finishes with rounds 1..3 committed once and the uninterrupted run's
    hash (metrics, journal, summary and checkpoint agree), and no temporary state folder is left."""
    flat = _flat(algorithm)
    ref_hash = _reference(tmp_path, flat)
    cases: list[tuple[str, Callable[[], None]]] = [(f"{p}@{r}", _kill_at(p, r)) for p, r in _points()]
    renames = _calls(tmp_path, flat, ("replace",))
    cases += [(f"before os.replace #{k}", _kill_before("replace", k)) for k in renames]
    for i, (case, fault) in enumerate(cases):
        run_dir = tmp_path / f"case-{i}" / NAME
        code = _run(run_dir, flat, fault)
        assert code == 137, f"{case}: expected the kill (137), got {code}"
        _resume_and_check(run_dir, flat, ref_hash, case)
        shutil.rmtree(run_dir.parent)
    points = len(_points())
    print(f"\n{algorithm}: {len(cases)} kill cases ({points} fault points, {len(renames)} renames): all resumed")
    assert len(renames) >= 8


ONLY_FULL = pytest.mark.skipif(not FULL, reason="EDGETUNE_CRASH_FULL=1 (a few minutes each on 2 cores)")


@pytest.mark.parametrize(
    "algorithm",
    ["spsa", "kavg", *(pytest.param(a, marks=ONLY_FULL) for a in ("dppf", "deft", "lowrank"))],
)
def test_disk_full_at_every_write_resumes_to_the_same_hash(tmp_path, warm, algorithm):
    """ENOSPC at an os.write / os.pwrite (whole, or after half of the bytes reached the file, as a full disk
    tears an append): the run stops (or carries on where the write was optional), and a restart with space
    again ends on the uninterrupted run's hash with every round committed once."""
    flat = _flat(algorithm)
    ref_hash = _reference(tmp_path, flat)
    writes = _calls(tmp_path, flat, ("write", "pwrite"))
    for k in writes:
        for partial in (False, True):
            run_dir = tmp_path / f"case-{k}-{partial}" / NAME
            _run(run_dir, flat, _enospc_at(k, partial))
            _resume_and_check(run_dir, flat, ref_hash, f"ENOSPC at write #{k} (partial={partial})")
            shutil.rmtree(run_dir.parent)
    print(f"\n{algorithm}: {2 * len(writes)} disk-full cases: all resumed")
    assert len(writes) >= 8


def _site_disk_full(site: str, nth: int, round_idx: int) -> Callable[[], None]:
    """ENOSPC at the ``nth`` write into ``site``'s own state folder in round ``round_idx`` (after the plan)."""

    def install() -> None:
        real = os.write
        armed, seen = [False], [0]

        def fp(name: str, r: int) -> None:
            if (name, r) == ("after-plan", round_idx):
                armed[0] = True

        def hooked(fd, data, *rest):
            if armed[0] and f"/sites/{site}/" in os.readlink(f"/proc/self/fd/{fd}"):
                seen[0] += 1
                if seen[0] == nth:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, *rest)

        faults.point = fp
        os.write = hooked

    return install


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a written file through /proc")
@pytest.mark.parametrize("nth", [1, 2], ids=["replay-guard", "saved-replica"])
def test_a_site_whose_disk_is_full_is_a_failed_site_not_a_failed_run(tmp_path, warm, nth):
    """With a quorum of one site, a full disk at site-0's first or second write of round 2 (its replay guard,
    stored before it uses the round's secret; its saved replica) makes that site refuse its reply: round 2
    commits without it, naming it and the full disk; in round 3 the site, with space again, catches up and is
    aggregated; every round is committed once and the run finishes without a restart."""
    flat = {**_flat("spsa"), "run.min_sites": 1}
    run_dir = tmp_path / "case" / NAME
    assert _run(run_dir, flat, _site_disk_full("site-0", nth, 2)) == 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    journal = read_jsonl(run_dir / "journal.jsonl")
    assert [r["round"] for r in journal if r["t"] == "commit"] == [1, 2, 3]
    assert [r["num_accepted"] for r in rows[1:]] == [2, 1, 2]
    assert set(rows[2]["rejected"]) == {"site-0"} and "No space left on device" in rows[2]["rejected"]["site-0"]
    assert "rejected" not in rows[1] and "rejected" not in rows[3]
    assert journal[-1]["t"] == "finished"


@pytest.mark.parametrize("last", ["commit", "plan", "finished"])
def test_journal_torn_at_every_offset_of_its_last_line_resumes_to_the_same_hash(tmp_path, warm, last):
    """The journal's last line (a commit, a plan, or the finished record) cut at every byte offset, including
    the complete record without its newline: it is never read as committed, the next append cuts it off, and
    the resumed run ends on the uninterrupted run's hash with every round committed once."""
    flat = _flat("spsa")
    ref_hash = _reference(tmp_path, flat)
    template = tmp_path / "template" / NAME
    if last == "finished":
        assert _run(template, flat) == 0
    else:
        point = "after-commit" if last == "commit" else "after-plan"
        assert _run(template, flat, _kill_at(point, ROUNDS)) == 137
    data = (template / "journal.jsonl").read_bytes()
    head = data[: data.rstrip(b"\n").rfind(b"\n") + 1]
    line = data[len(head) :].rstrip(b"\n")
    assert json.loads(line)["t"] == last
    step = 1 if FULL or len(line) < 64 else 3 if len(line) < 200 else 8
    offsets = sorted({*range(0, len(line) + 1, step), len(line) - 1, len(line)})
    for offset in offsets:
        run_dir = tmp_path / f"torn-{offset}" / NAME
        shutil.copytree(template.parent, run_dir.parent, symlinks=True)  # the run and its sites' state
        (run_dir / "journal.jsonl").write_bytes(head + line[:offset])
        assert Journal(run_dir).records == Journal(template).records[:-1], f"offset {offset}: torn line was read"
        _resume_and_check(run_dir, flat, ref_hash, f"{last} line torn at byte {offset} of {len(line)}")
        shutil.rmtree(run_dir.parent)
    print(f"\ntorn {last} line ({len(line)} bytes): {len(offsets)} offsets: all resumed")
