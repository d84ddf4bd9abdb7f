"""Progress bars for the slow steps (model conversion, evaluation, the valley probe).

On a terminal the bars are rich's, on stderr; elsewhere (Flower logs, CI, pipes) a bar would be noise,
so each task prints one line when it starts and one when it ends, with its elapsed time.
``EDGETUNE_PROGRESS=0`` turns both off, ``=1`` forces bars.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

_console = Console(stderr=True)


def _mode() -> str:
    env = os.environ.get("EDGETUNE_PROGRESS", "")
    if env == "0":
        return "off"
    if env == "1" or _is_terminal():
        return "bar"
    return "lines"


def _is_terminal() -> bool:
    return _console.is_terminal


class Bar:
    """A handle to advance one task: ``advance(n)``, ``update(total=...)``, ``stage(text)``."""

    def __init__(self, progress: Progress | None, task: TaskID | None, description: str) -> None:
        self._progress = progress
        self._task = task
        self.description = description
        self.completed = 0

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def update(self, *, total: int | None = None, completed: int | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total, completed=completed)

    def stage(self, text: str) -> None:
        """Name the current step (shown next to the bar, or as a line)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self.description}: {text}")
        elif _mode() == "lines":
            print(f"[edgetune] {self.description}: {text}", file=sys.stderr, flush=True)


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Bar]:
    """One progress task; ``total`` None shows a pulsing bar (unknown length)."""
    mode = _mode()
    t0 = time.perf_counter()
    if mode == "bar":
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_console,
            transient=False,
        )
        with progress:
            bar = Bar(progress, progress.add_task(description, total=total), description)
            yield bar
            if total is not None:
                bar.update(completed=total)
        return
    if mode == "lines":
        print(f"[edgetune] {description} ...", file=sys.stderr, flush=True)
    bar = Bar(None, None, description)
    yield bar
    if mode == "lines":
        print(f"[edgetune] {description}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
