"""The link meter counts every byte it forwards, per direction and connection, and attribution puts each
byte in exactly one window of the run (setup, round r) or outside it."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from edgetune import linkmeter
from edgetune.io import append_jsonl, read_jsonl


class _EchoTwice:
    """A TCP server that answers every chunk with the chunk twice (so up and down differ)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data + data)


def _exchange(port: int, chunks: list[bytes]) -> int:
    received = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        for c in chunks:
            s.sendall(c)
            want = 2 * len(c)
            got = 0
            while got < want:
                got += len(s.recv(65536))
            received += got
    return received


def _settle(meter: linkmeter.LinkMeter, path, want_closes: int) -> list[dict]:
    deadline = time.time() + 5
    while time.time() < deadline:
        rows = read_jsonl(path)
        if sum(r.get("event") == "close" for r in rows) >= want_closes:
            return rows
        time.sleep(0.05)
    raise AssertionError("connections did not close in the log")


def test_counts_every_byte_both_ways(tmp_path):
    """Up = bytes the client sent, down = bytes it received, over several connections, exactly."""
    # Prepare
    server = _EchoTwice()
    log = tmp_path / "meter.jsonl"
    chunks_a = [b"x" * 100, b"y" * 70000, b"z"]
    chunks_b = [b"q" * 12345]
    # Execute
    with linkmeter.LinkMeter(("127.0.0.1", server.port), log, site="plant-a") as meter:
        got_a = _exchange(meter.port, chunks_a)
        got_b = _exchange(meter.port, chunks_b)
        rows = _settle(meter, log, 2)
    # Assert
    sent = sum(map(len, chunks_a + chunks_b))
    assert sum(r.get("up", 0) for r in rows) == sent == meter.totals["up"]
    assert sum(r.get("down", 0) for r in rows) == got_a + got_b == 2 * sent
    assert {r["conn"] for r in rows if "up" in r} == {1, 2}
    assert all(r["site"] == "plant-a" for r in rows)
    assert meter.totals["connections"] == 2


def test_log_lines_carry_the_time_of_their_bytes(tmp_path):
    """A burst, a pause, a burst: two lines whose times are the bursts' times, not the next byte's."""
    server = _EchoTwice()
    log = tmp_path / "meter.jsonl"
    with linkmeter.LinkMeter(("127.0.0.1", server.port), log, site="s", flush_s=0.1) as meter:
        with socket.create_connection(("127.0.0.1", meter.port)) as s:
            t1 = time.time()
            s.sendall(b"a" * 10)
            s.recv(100)
            time.sleep(1.5)
            t2 = time.time()
            s.sendall(b"b" * 20)
            s.recv(100)
        rows = [r for r in _settle(meter, log, 1) if "up" in r]
    assert [r["up"] for r in rows] == [10, 20]
    assert abs(rows[0]["t"] - t1) < 0.5 and abs(rows[1]["t"] - t2) < 0.5  # not 1.5 s late (a loaded CPU)


def test_unreachable_upstream_is_logged_not_fatal(tmp_path):
    """A refused upstream closes the client's connection and leaves a 'refused' line; the meter keeps serving."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    log = tmp_path / "meter.jsonl"
    with linkmeter.LinkMeter(("127.0.0.1", dead_port), log, site="s") as meter:
        with socket.create_connection(("127.0.0.1", meter.port)) as c:
            c.settimeout(5)
            assert c.recv(10) == b""
        time.sleep(0.1)
    assert any(r.get("event") == "refused" for r in read_jsonl(log))


def _timeline(tmp_path, events):
    for e in events:
        append_jsonl(tmp_path / linkmeter.TIMELINE, e)


def test_attribution_puts_each_byte_in_one_window():
    """Windows are (submitted, round0], (round0, round1], ...; bytes outside go to 'outside'."""
    timeline = [
        {"t": 5.0, "event": "submitted"},
        {"t": 10.0, "event": "round", "round": 0},
        {"t": 20.0, "event": "round", "round": 1},
        {"t": 30.0, "event": "round", "round": 2},
    ]
    rows = [
        {"t": 1.0, "site": "a", "up": 7, "down": 1},  # before the run: connecting
        {"t": 6.0, "site": "a", "conn": 1, "event": "open"},
        {"t": 6.0, "site": "a", "up": 100, "down": 5000},  # setup: the app bundle
        {"t": 10.0, "site": "a", "up": 1, "down": 0},  # at round 0's close: still setup
        {"t": 15.0, "site": "a", "up": 40, "down": 30},
        {"t": 15.0, "site": "b", "up": 41, "down": 31},
        {"t": 25.0, "site": "a", "up": 50, "down": 20},
        {"t": 31.0, "site": "a", "up": 9, "down": 9},  # after the run
    ]
    out = linkmeter.attribute(rows, timeline)
    by = {(r["round_idx"], r["phase"], r["site_id"], r["direction"]): r["num_bytes"] for r in out["ledger"]}
    assert by[(0, "setup", "a", "up")] == 101 and by[(0, "setup", "a", "down")] == 5000
    assert by[(1, "round", "a", "up")] == 40 and by[(1, "round", "b", "up")] == 41
    assert by[(2, "round", "a", "down")] == 20
    assert out["outside"]["a"] == {"up": 16, "down": 10}
    assert out["connections"] == {"a": 1}
    total_in = sum(r["num_bytes"] for r in out["ledger"]) + sum(sum(v.values()) for v in out["outside"].values())
    assert total_in == sum(r.get("up", 0) + r.get("down", 0) for r in rows)


def test_a_resubmitted_run_uses_its_last_submission_and_last_close_of_a_round():
    timeline = [
        {"t": 0.0, "event": "submitted"},
        {"t": 1.0, "event": "round", "round": 0},
        {"t": 2.0, "event": "round", "round": 1},
        {"t": 10.0, "event": "submitted"},  # resumed after a crash: round 1 is redone
        {"t": 11.0, "event": "round", "round": 0},
        {"t": 12.0, "event": "round", "round": 1},
    ]
    assert linkmeter.windows(timeline) == [(10.0, 11.0, 0, "setup"), (11.0, 12.0, 1, "round")]


def test_merge_writes_link_rows_and_summary(tmp_path):
    """merge_into_run adds link rows next to the payload rows and totals with the payload share."""
    run = tmp_path / "run"
    run.mkdir()
    _timeline(
        run,
        [
            {"t": 0.0, "event": "submitted"},
            {"t": 1.0, "event": "round", "round": 0},
            {"t": 2.0, "event": "round", "round": 1},
        ],
    )
    payload = {"round_idx": 1, "phase": "train", "site_id": "a", "direction": "up", "num_bytes": 50, "kind": "payload"}
    (run / "ledger.jsonl").write_text(json.dumps(payload) + "\n")
    (run / "summary.json").write_text(json.dumps({"algorithm": "spsa"}))
    log = tmp_path / "a.jsonl"
    for row in ({"t": 0.5, "site": "a", "up": 300, "down": 9000}, {"t": 1.5, "site": "a", "up": 1000, "down": 400}):
        append_jsonl(log, row)
    # Execute twice: a second merge replaces the first, it does not add to it
    linkmeter.merge_into_run(run, [log])
    totals = linkmeter.merge_into_run(run, [log])
    # Assert
    ledger = read_jsonl(run / "ledger.jsonl")
    assert sum(r["kind"] == "link" for r in ledger) == 4 and sum(r["kind"] == "payload" for r in ledger) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "spsa"
    assert summary["link_uplink_bytes_per_site_round"] == 1000 == totals["link_uplink_bytes_per_site_round"]
    assert summary["link_setup_downlink_bytes_per_site"] == 9000
    assert summary["payload_share_of_link_uplink"] == pytest.approx(0.05)


def test_merge_rejects_a_run_without_submission_and_a_foreign_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _timeline(run, [{"t": 1.0, "event": "round", "round": 0}])
    log = tmp_path / "x.jsonl"
    append_jsonl(log, {"t": 0.5, "site": "a", "up": 1})
    with pytest.raises(ValueError, match="submitted"):
        linkmeter.merge_into_run(run, [log])
    _timeline(run, [{"t": 0.0, "event": "submitted"}])
    bad = tmp_path / "metrics.jsonl"
    append_jsonl(bad, {"round": 1, "train_loss": 2.0})
    with pytest.raises(ValueError, match="not a link-meter log"):
        linkmeter.merge_into_run(run, [bad])
    with pytest.raises(ValueError, match="no such"):
        linkmeter.merge_into_run(run, [tmp_path / "missing.jsonl"])


def test_report_shows_real_next_to_payload_bytes_per_round(tmp_path):
    """After a merge, `edgetune report` has per-round real bytes and the payload's share of them."""
    from edgetune import report

    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"round": 0, "uplink_bytes": 0, "downlink_bytes": 0},
        {"round": 1, "uplink_bytes": 92, "downlink_bytes": 400},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pay = {"round_idx": 1, "phase": "train", "site_id": "a", "direction": "up", "num_bytes": 92, "kind": "payload"}
    (run / "ledger.jsonl").write_text(json.dumps(pay) + "\n")
    _timeline(
        run,
        [
            {"t": 0.0, "event": "submitted"},
            {"t": 1.0, "event": "round", "round": 0},
            {"t": 2.0, "event": "round", "round": 1},
        ],
    )
    log = tmp_path / "a.jsonl"
    append_jsonl(log, {"t": 0.5, "site": "a", "up": 900, "down": 7400})
    append_jsonl(log, {"t": 1.5, "site": "a", "up": 4600, "down": 2100})
    linkmeter.merge_into_run(run, [log])
    text = report.write_report(run, fmt="md").read_text()
    assert "uplink real B" in text and "4,600" in text and "7,400" in text
    assert "2.00%" in text  # 92 / 4,600
    assert "uplink link B" in text  # the per-site table has the link kind too


def test_stopping_with_a_connection_open_flushes_it_and_logs_no_traceback(tmp_path, capfd, caplog):
    """A site that leaves after its run stops its meter while the SuperNode's connection is still open:
    the open connection's bytes reach the log and asyncio prints nothing (it used to print a
    CancelledError traceback from the cancelled connection handler)."""
    server = _EchoTwice()
    log = tmp_path / "meter.jsonl"
    meter = linkmeter.LinkMeter(("127.0.0.1", server.port), log, site="plant-a").start()
    conn = socket.create_connection(("127.0.0.1", meter.port))
    conn.sendall(b"hello")
    deadline = time.time() + 10
    while meter.totals["down"] < 10 and time.time() < deadline:
        time.sleep(0.02)
    meter.stop()
    conn.close()
    err = capfd.readouterr().err + caplog.text  # asyncio reports through the logging module
    assert "CancelledError" not in err and "Task was destroyed" not in err, err
    rows = read_jsonl(log)
    assert sum(r.get("up", 0) for r in rows) == 5 and sum(r.get("down", 0) for r in rows) == 10
    assert [r["event"] for r in rows if "event" in r] == ["open", "close"]
