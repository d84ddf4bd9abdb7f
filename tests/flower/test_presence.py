"""Sites that leave when the run is over (issue 12, part 2b): the server's bye, the handler's presence
files, the supervisor's watch, and a SuperNode stopped gracefully with exit code 0."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edgetune.comm.ledger import ByteLedger
from edgetune.deploy import commands
from edgetune.deploy import site as site_driver
from edgetune.flower import client_handler, presence
from edgetune.flower.presence import LeaveWatch
from edgetune.flower.server_loop import BYE, FlowerTransport


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def test_a_new_session_forgets_an_earlier_sessions_files(tmp_path):
    (tmp_path / "run-ended.json").write_text(json.dumps({"run": 3, "at": 0}))
    (tmp_path / "activity").write_text("idle")
    watch = LeaveWatch(tmp_path, after_run=True, idle_s=5)
    assert watch.reason(now=time.time() + 1e6) is None
    assert not (tmp_path / "run-ended.json").exists() and not (tmp_path / "activity").exists()


def test_the_run_end_is_noticed_after_the_reply_grace(tmp_path):
    watch = LeaveWatch(tmp_path, after_run=True, idle_s=0)
    assert presence.note_run_ended(watch.node_config(), 42)
    at = json.loads(watch.leave_file.read_text())["at"]
    assert watch.reason(now=at + 0.5) is None  # the acknowledgement is still on its way
    assert "run 42" in str(watch.reason(now=at + LeaveWatch.REPLY_GRACE_S))


def test_a_site_not_asked_to_leave_writes_nothing(tmp_path):
    watch = LeaveWatch(tmp_path, after_run=False, idle_s=0)
    assert not watch.active and watch.node_config() == {}
    assert not presence.note_run_ended(watch.node_config(), 1)
    with presence.handling(watch.node_config()):
        pass
    assert list(tmp_path.iterdir()) == []


def test_idle_counts_from_the_end_of_the_last_message_never_during_one(tmp_path):
    watch = LeaveWatch(tmp_path, after_run=False, idle_s=30)
    nc = watch.node_config()
    assert presence.LEAVE_KEY not in nc and presence.ACTIVITY_KEY in nc
    assert watch.reason(now=time.time() + 1e6) is None  # no message yet: a site waits for its first run
    with presence.handling(nc):
        # a local step longer than the idle limit is not idleness
        assert watch.activity_file.read_text() == "busy"
        assert watch.reason(now=time.time() + 1e6) is None
    end = watch.activity_file.stat().st_mtime
    assert watch.reason(now=end + 29) is None
    assert "no message for 31 s" in str(watch.reason(now=end + 31))


def test_a_failing_handler_still_marks_the_site_idle(tmp_path):
    watch = LeaveWatch(tmp_path, after_run=False, idle_s=1)
    with pytest.raises(RuntimeError), presence.handling(watch.node_config()):
        raise RuntimeError("step failed")
    assert watch.activity_file.read_text() == "idle"


def test_negative_idle_is_refused(tmp_path):
    with pytest.raises(ValueError, match="leave-after-idle"):
        LeaveWatch(tmp_path, after_run=False, idle_s=-1)


def test_the_supernode_is_told_where_the_files_are(tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "site.json").write_text(json.dumps({"site_id": "site-0"}))
    watch = LeaveWatch(tmp_path, after_run=True, idle_s=60)
    cmd = commands.supernode_command(
        kit, "127.0.0.1:9092", port=1, data_path="", device="", insecure=True, site_index=0, num_sites=1,
        extra_node_config=watch.node_config(),
    )  # fmt: skip
    node_config = cmd[cmd.index("--node-config") + 1]
    assert f'leave-file="{watch.leave_file}"' in node_config
    assert f'activity-file="{watch.activity_file}"' in node_config


def _context(node_config: dict) -> Context:
    return Context(run_id=77, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def test_the_bye_handler_records_the_run_and_acknowledges(tmp_path):
    watch = LeaveWatch(tmp_path, after_run=True, idle_s=10)
    msg = Message(RecordDict({"bye": ConfigRecord({})}), dst_node_id=5, message_type=BYE)
    reply = client_handler.bye(msg, _context({"site-id": "site-0", **watch.node_config()}))
    assert reply.content["bye"]["leaving"] is True
    assert json.loads(watch.leave_file.read_text())["run"] == 77
    assert watch.activity_file.read_text() == "idle"
    # a site that stays acknowledges too, and writes nothing
    reply = client_handler.bye(msg, _context({"site-id": "site-1"}))
    assert reply.content["bye"]["leaving"] is False


class _ByeGrid:
    def __init__(self, answering: set[int]) -> None:
        self.answering = answering
        self.sent: list[Message] = []

    def send_and_receive(self, messages, timeout):
        self.sent.extend(messages)
        out = []
        for msg in messages:
            if msg.metadata.dst_node_id in self.answering:
                reply = Message(RecordDict({"bye": ConfigRecord({"leaving": True})}), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                out.append(reply)
        return out


def test_the_server_says_bye_to_every_site_and_reports_who_answered():
    grid = _ByeGrid(answering={100, 102})
    nodes = {"site-0": 100, "site-1": 101, "site-2": 102}
    transport = FlowerTransport(grid, ByteLedger(), nodes, lambda phase: 1 << 16)
    assert transport.goodbye(timeout_s=1) == ["site-0", "site-2"]
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [100, 101, 102]
    assert {m.metadata.message_type for m in grid.sent} == {BYE}
    assert transport.ledger.rows == []  # after the run's ledger closed: only the link meter sees it


def _fake_supernode(tmp_path, body: str) -> list[str]:
    script = tmp_path / "supernode.py"
    script.write_text("import json, os, signal, sys, time\n" + body)
    return [sys.executable, str(script)]


def test_the_site_leaves_gracefully_with_code_0_when_the_run_ends(tmp_path):
    """The SuperNode gets SIGTERM (Flower then deactivates the node at the SuperLink), not SIGKILL."""
    watch = LeaveWatch(tmp_path, after_run=True, idle_s=0)
    marker = tmp_path / "terminated"
    cmd = _fake_supernode(
        tmp_path,
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('TERM'), sys.exit(0)))\n"
        f"time.sleep(0.3)\nopen({str(watch.leave_file)!r}, 'w').write(json.dumps({{'run': 9, 'at': time.time()}}))\n"
        "time.sleep(120)\n",
    )
    t0 = time.time()
    assert site_driver.supervise_supernode(cmd, dict(os.environ), 0.0, watch) == 0
    assert time.time() - t0 < 30
    assert marker.read_text() == "TERM"


def test_a_supernode_that_fails_is_not_reported_as_a_clean_leave(tmp_path):
    watch = LeaveWatch(tmp_path, after_run=True, idle_s=5)
    cmd = _fake_supernode(tmp_path, "sys.exit(7)\n")
    assert site_driver.supervise_supernode(cmd, dict(os.environ), 0.0, watch) == 7
