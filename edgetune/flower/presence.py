"""Site presence files: how a site's message handler tells ``edgetune site`` that it may leave.

A site on a metered link pays for every minute it stays connected to the SuperLink (polls,
heartbeats, re-handshakes), so a site started with ``edgetune site --leave-after-run`` disconnects
when the run it served has ended, and one started with ``--leave-after-idle S`` when no message has
been handled for S seconds. The SuperNode's ClientApp processes and the supervising ``edgetune site``
process share two small files under the site's state folder, named in the node config:

``leave-file``
    written when the server says the run is over (``query.bye``, sent once after the last round
    committed): ``{"run": <run id>, "at": <unix time>}``.
``activity-file``
    ``busy`` while a message is being handled, ``idle`` after; its modification time is when that
    changed. A site in the middle of a long local step is never taken for idle.

Both are written atomically (temp file, rename), so the supervisor never reads half a file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LEAVE_KEY = "leave-file"
ACTIVITY_KEY = "activity-file"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def note_run_ended(node_config: Mapping[str, Any], run_id: int) -> bool:
    """Record that the server ended run ``run_id``; False when this node was not asked to leave."""
    path = node_config.get(LEAVE_KEY)
    if not path:
        return False
    _write(Path(str(path)), json.dumps({"run": int(run_id), "at": time.time()}))
    return True


@contextmanager
def handling(node_config: Mapping[str, Any]) -> Iterator[None]:
    """Mark this site busy while the body runs and idle after it (a no-op without an activity file)."""
    path = node_config.get(ACTIVITY_KEY)
    if not path:
        yield
        return
    _write(Path(str(path)), "busy")
    try:
        yield
    finally:
        _write(Path(str(path)), "idle")


class LeaveWatch:
    """What the supervisor checks once a second: has the run ended, or has the site been idle too long?

    ``after_run``: leave when a ``leave-file`` newer than this session appears. ``idle_s`` > 0: leave
    when the last handled message ended more than ``idle_s`` seconds ago (never before the first one, and
    never while a message is being handled). Files left by an earlier session are removed at start.
    """

    REPLY_GRACE_S = 3.0
    """How long after the bye the site stays, so its acknowledgement reaches the server."""

    def __init__(self, state: Path, *, after_run: bool, idle_s: float) -> None:
        if idle_s < 0:
            raise ValueError(f"leave-after-idle must be >= 0 seconds, got {idle_s}")
        self.leave_file = state / "run-ended.json"
        self.activity_file = state / "activity"
        self.after_run = after_run
        self.idle_s = idle_s
        for path in (self.leave_file, self.activity_file):
            path.unlink(missing_ok=True)

    @property
    def active(self) -> bool:
        return self.after_run or self.idle_s > 0

    def node_config(self) -> dict[str, str]:
        """The node config entries that make the site's handlers write the files watched here."""
        out = {}
        if self.after_run:
            out[LEAVE_KEY] = str(self.leave_file)
        if self.idle_s > 0:
            out[ACTIVITY_KEY] = str(self.activity_file)
        return out

    def reason(self, now: float | None = None) -> str | None:
        """Why the site should leave now, or None to stay."""
        now = time.time() if now is None else now
        if self.after_run:
            try:
                ended = json.loads(self.leave_file.read_text())
            except (OSError, ValueError):
                ended = None
            if isinstance(ended, dict) and "run" in ended and now - float(ended.get("at", 0)) >= self.REPLY_GRACE_S:
                return f"the server ended run {ended['run']}"
        if self.idle_s > 0:
            try:
                status = self.activity_file.read_text().strip()
                since = self.activity_file.stat().st_mtime
            except OSError:
                return None  # no message handled yet in this session
            if status == "idle" and now - since > self.idle_s:
                return f"no message for {now - since:.0f} s (--leave-after-idle {self.idle_s:g})"
        return None
