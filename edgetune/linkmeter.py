"""Count the bytes that really cross a site's link, and put them next to the payload bytes of a run.

edgetune's ledger records what it encodes (``payload`` rows) and the serialized Flower messages that
carry it (``flower`` rows). A factory pays for neither: it pays for the TCP bytes of every HTTP request,
poll, heartbeat, TLS handshake and app download. ``LinkMeter`` is a byte-counting TCP proxy (asyncio,
no dependencies) put between a site and the network::

    SuperNode (or the thin-link gateway) --> LinkMeter 127.0.0.1:P --> SuperLink (or its gateway)

It forwards bytes untouched (TLS passes through: it sees only ciphertext) and appends one JSON line per
connection and short window to a log::

    {"t": 1767000000.12, "site": "site-0", "conn": 3, "up": 1432, "down": 610}   bytes in the window
    {"t": ..., "site": "site-0", "conn": 3, "event": "open"}                      (and "close")
    {"t": ..., "site": "site-0", "mark": "idle"}                                  a phase mark, see mark()

What is counted: TCP payload bytes in each direction (TLS records, HTTP framing and all). What is not:
TCP/IP headers (about 52 B per segment with IPv4 and timestamps) and retransmissions; a ``tcpdump``
count of the same link is a few percent higher.

``attribute`` splits a log by the run's timeline (``timeline.jsonl`` in the run folder: when the run was
submitted and when each round closed) into ``setup`` (submitted .. round 0 closed: hello, run info, app
bundle), one window per round (round r-1 closed .. round r closed) and ``outside`` (before and after
the run: connecting, idle). ``merge_into_run`` writes the run's windows into ``ledger.jsonl`` as rows of
kind ``link`` and the totals into ``summary.json``; ``edgetune report`` then shows real next to payload
bytes. Timestamps of a site's log and the server's timeline come from two clocks: attribution is as
good as their agreement (NTP keeps it to milliseconds; a round lasts seconds to minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from edgetune.io import append_jsonl, atomic_write_bytes, atomic_write_json, read_jsonl

TIMELINE = "timeline.jsonl"
FLUSH_S = 0.2
"""Longest window one log line covers: attribution to phases is exact up to this much time."""
CHUNK = 65536


def mark_timeline(run_dir: Path | str, event: str, **extra: Any) -> None:
    """Append one event (``submitted``, ``round``, ``finished``) with the current time to the run's timeline."""
    path = Path(run_dir) / TIMELINE
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(path, {"t": round(time.time(), 4), "event": event, **extra})


class LinkMeter:
    """A TCP proxy from ``listen`` to ``upstream`` that logs the bytes of every connection.

    Use ``start()`` / ``stop()`` from a thread (``edgetune site --count-bytes``, tests, benchmarks), or
    ``serve()`` inside an event loop.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        log_path: Path | str,
        *,
        site: str,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        flush_s: float = FLUSH_S,
    ) -> None:
        self.upstream = upstream
        self.log_path = Path(log_path)
        self.site = site
        self.listen = listen
        self.flush_s = flush_s
        self.port = 0
        self.totals = {"up": 0, "down": 0, "connections": 0}
        self._lock = threading.Lock()
        self._next_conn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._log: Any = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    # --- the log -----------------------------------------------------------------------------------------------

    def _write(self, row: dict[str, Any], t: float | None = None) -> None:
        with self._lock:
            stamp = round(time.time() if t is None else t, 4)
            # a plain buffered append, flushed per line: a measurement, not state worth an fsync per packet
            if self._log is None:
                self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (closed in stop())
            self._log.write(json.dumps({"t": stamp, "site": self.site, **row}, sort_keys=True) + "\n")

    def mark(self, label: str) -> None:
        """Write a phase mark (e.g. ``connected``, ``idle``) into the log at the current time."""
        self._write({"mark": label})

    # --- the proxy ---------------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Listen until cancelled."""
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        self.port = int(self._server.sockets[0].getsockname()[1])
        async with self._server:
            await self._server.serve_forever()

    async def _handle(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        self._next_conn += 1
        conn = self._next_conn
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError as err:
            self._write({"conn": conn, "event": "refused", "error": str(err)})
            down_writer.close()
            return
        self.totals["connections"] += 1
        self._write({"conn": conn, "event": "open"})
        window = {"up": 0, "down": 0}
        window_t = [0.0]  # wall time of the window's first byte: the time its log line carries
        loop = asyncio.get_running_loop()

        def flush() -> None:
            if window["up"] or window["down"]:
                self._write({"conn": conn, "up": window["up"], "down": window["down"]}, t=window_t[0])
                window["up"] = window["down"] = 0

        def count(direction: str, n: int) -> None:
            if not (window["up"] or window["down"]):
                window_t[0] = time.time()
                loop.call_later(self.flush_s, flush)
            window[direction] += n
            self.totals[direction] += n

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
            try:
                while data := await reader.read(CHUNK):
                    count(direction, len(data))
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    writer.write_eof()  # half-close: the other direction may still be talking
                except (OSError, RuntimeError):
                    writer.close()

        try:
            await asyncio.gather(pump(down_reader, up_writer, "up"), pump(up_reader, down_writer, "down"))
        except asyncio.CancelledError:
            pass  # the meter is stopping: end this connection normally (asyncio logs a cancelled handler)
        finally:
            flush()
            self._write({"conn": conn, "event": "close"})
            for w in (up_writer, down_writer):
                w.close()

    # --- running in a thread -----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> LinkMeter:
        """Serve in a daemon thread; return once listening (``self.port`` is then set)."""

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            task = self._loop.create_task(self.serve())

            def ready_when_listening() -> None:
                if self.port or task.done():
                    self._ready.set()
                else:
                    self._loop.call_later(0.01, ready_when_listening)  # type: ignore[union-attr]

            self._loop.call_soon(ready_when_listening)
            try:
                self._loop.run_until_complete(task)
            except asyncio.CancelledError:
                pass
            except BaseException as err:  # surfaced by start()
                self._error = err
                self._ready.set()
            finally:
                close_loop(self._loop)

        self._thread = threading.Thread(target=run, name=f"linkmeter-{self.site}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None or not self.port:
            raise RuntimeError(f"link meter for {self.site} did not start: {self._error}")
        return self

    def stop(self) -> None:
        """Stop listening and close open connections (their counts are flushed first)."""
        if self._loop is None or self._thread is None:
            return
        loop = self._loop

        def cancel_all() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()

        try:
            loop.call_soon_threadsafe(cancel_all)
        except RuntimeError:
            return  # the loop already closed
        self._thread.join(timeout=10)
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> LinkMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- attribution -----------------------------------------------------------------------------------------------------


def read_log(paths: Iterable[Path | str]) -> list[dict[str, Any]]:
    """Every row of the given meter logs, oldest first; ``ValueError`` naming a file that is not one."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{p}: no such link-meter log")
        for row in read_jsonl(p):
            if not isinstance(row.get("t"), int | float) or "site" not in row:
                raise ValueError(f"{p}: not a link-meter log (a row without t and site: {str(row)[:120]})")
            rows.append(row)
    return sorted(rows, key=lambda r: r["t"])


def windows(timeline: Sequence[dict[str, Any]]) -> list[tuple[float, float, int, str]]:
    """The run's windows ``(start, end, round_idx, phase)``: ``setup`` then one per round.

    The timeline's last ``submitted`` event opens setup (a resumed run is submitted again); each
    ``round`` event closes its round. Without a ``submitted`` event, setup has no start and is left out.
    """
    submitted = [e["t"] for e in timeline if e.get("event") == "submitted"]
    start = submitted[-1] if submitted else None
    ends: dict[int, float] = {}
    for e in timeline:
        if e.get("event") == "round" and (start is None or e["t"] >= start):
            ends[int(e["round"])] = float(e["t"])  # a redone round (resume) keeps its last close
    out: list[tuple[float, float, int, str]] = []
    prev = start
    for r in sorted(ends):
        if prev is not None:
            out.append((prev, ends[r], r, "setup" if r == 0 else "round"))
        prev = ends[r]
    return out


def attribute(rows: Sequence[dict[str, Any]], timeline: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Split meter rows into the run's windows.

    Returns ``{"ledger": [ledger rows of kind "link"], "outside": {site: {"up": n, "down": n}},
    "connections": {site: n}}``; a byte counted at time t belongs to the window with start < t <= end.
    """
    wins = windows(timeline)
    per: dict[tuple[int, str, str, str], int] = defaultdict(int)
    outside: dict[str, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})
    conns: dict[str, int] = defaultdict(int)
    for row in rows:
        site, t = str(row["site"]), float(row["t"])
        if row.get("event") == "open" and wins and wins[0][0] < t <= wins[-1][1]:
            conns[site] += 1
        if "up" not in row and "down" not in row:
            continue
        win = next((w for w in wins if w[0] < t <= w[1]), None)
        for direction in ("up", "down"):
            n = int(row.get(direction, 0))
            if win is None:
                outside[site][direction] += n
            else:
                per[(win[2], win[3], site, direction)] += n
    ledger = [
        {"round_idx": r, "phase": phase, "site_id": site, "direction": d, "num_bytes": n, "kind": "link"}
        for (r, phase, site, d), n in sorted(per.items())
    ]
    return {"ledger": ledger, "outside": dict(outside), "connections": dict(conns)}


def link_summary(ledger: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals of a run's link rows next to its payload rows: per run, per site, per round."""
    link = [r for r in ledger if r.get("kind") == "link"]
    payload = [r for r in ledger if r.get("kind", "payload") == "payload"]
    if not link:
        return {}
    sites = sorted({r["site_id"] for r in link})
    rounds = sorted({r["round_idx"] for r in link if r["phase"] == "round"})

    def total(rows: Iterable[dict[str, Any]], **match: Any) -> int:
        return sum(r["num_bytes"] for r in rows if all(r.get(k) == v for k, v in match.items()))

    out: dict[str, Any] = {
        "link_uplink_bytes_total": total(link, direction="up"),
        "link_downlink_bytes_total": total(link, direction="down"),
        "link_setup_downlink_bytes_per_site": round(total(link, phase="setup", direction="down") / len(sites)),
        "link_setup_uplink_bytes_per_site": round(total(link, phase="setup", direction="up") / len(sites)),
    }
    if rounds:
        denom = len(sites) * len(rounds)
        up = total(link, phase="round", direction="up")
        down = total(link, phase="round", direction="down")
        out["link_uplink_bytes_per_site_round"] = round(up / denom)
        out["link_downlink_bytes_per_site_round"] = round(down / denom)
        pay_up = sum(r["num_bytes"] for r in payload if r["direction"] == "up" and r["round_idx"] in rounds)
        out["payload_share_of_link_uplink"] = round(pay_up / up, 5) if up else None
    return out


def merge_into_run(run_dir: Path | str, logs: Sequence[Path | str]) -> dict[str, Any]:
    """Attribute the meter logs to the run in ``run_dir``: link rows into ``ledger.jsonl`` (replacing
    earlier link rows), totals into ``summary.json``. Returns the totals.
    """
    run = Path(run_dir)
    timeline = read_jsonl(run / TIMELINE)
    if not any(e.get("event") == "submitted" for e in timeline):
        raise ValueError(f"{run / TIMELINE}: no 'submitted' event, so the run's bytes cannot be told apart")
    result = attribute(read_log(logs), timeline)
    ledger = [r for r in read_jsonl(run / "ledger.jsonl") if r.get("kind") != "link"] + result["ledger"]
    atomic_write_bytes(run / "ledger.jsonl", "".join(json.dumps(r) + "\n" for r in ledger).encode())
    totals = link_summary(ledger)
    totals["link_outside_run_bytes"] = result["outside"]
    totals["link_connections"] = result["connections"]
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(totals)
    atomic_write_json(summary_path, summary)
    return totals


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m edgetune.linkmeter --listen 127.0.0.1:9099 --upstream link:9091 --site plant-a --log L``."""
    from edgetune.deploy import split_address

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="host:port the traffic goes to")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on")
    ap.add_argument("--site", required=True, help="label of this link in the log")
    ap.add_argument("--log", required=True, type=Path, help="JSONL log to append to")
    ns = ap.parse_args(argv)
    meter = LinkMeter(split_address(ns.upstream), ns.log, site=ns.site, listen=split_address(ns.listen))
    meter.start()
    print(f"link meter {ns.site}: 127.0.0.1:{meter.port} -> {ns.upstream}, log {ns.log}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        meter.stop()


if __name__ == "__main__":
    main()


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what still runs on ``loop`` and let it finish (sockets closed, counts flushed) before
    closing the loop, so stopping prints no "Task was destroyed" or "Event loop is closed" tracebacks.
    """
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
