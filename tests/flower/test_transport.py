"""FlowerTransport: rounds close at quorum + grace or at the deadline; late replies are stale."""

from __future__ import annotations

import time
import uuid

import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edgetune.comm import wire
from edgetune.comm.ledger import ByteLedger
from edgetune.federation import Failure
from edgetune.flower.messages import from_content, to_content
from edgetune.flower.server_loop import FlowerTransport


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class FakeGrid:
    """Push stores messages; a site answers ``delay[site]`` seconds after the push (echoing)."""

    def __init__(self, delay: dict[int, float]) -> None:
        self.nodes = list(delay)
        self.delay = delay
        self.inbox: dict[str, tuple[float, Message]] = {}

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.inbox[msg.metadata.message_id] = (time.time() + self.delay[msg.metadata.dst_node_id], msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            ready, msg = self.inbox.get(mid, (None, None))
            if ready is not None and time.time() >= ready:
                del self.inbox[mid]
                payload = wire.decode(from_content(msg.content, max_bytes=1 << 20), max_bytes=1 << 20)
                reply = Message(to_content(wire.encode({"echo": payload["x"]})), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                out.append(reply)
        return out


def _transport(delay, quorum, grace_s):
    nodes = {f"site-{i}": 100 + i for i in range(len(delay))}
    grid = FakeGrid({100 + i: d for i, d in enumerate(delay)})
    return FlowerTransport(
        grid, ByteLedger(), nodes, lambda phase: 1 << 16, quorum=quorum, grace_s=grace_s, poll_s=0.02
    ), grid


def _blobs(n):
    return {f"site-{i}": wire.encode({"x": i}) for i in range(n)}


def test_closes_at_quorum_plus_grace_and_marks_straggler():
    """Two fast sites meet quorum 2; after the grace the round closes without the slow one."""
    transport, _ = _transport([0.0, 0.0, 5.0], quorum=2, grace_s=0.2)
    t0 = time.time()
    out = transport.exchange(1, "train", _blobs(3), timeout_s=30)
    assert time.time() - t0 < 2.0
    assert isinstance(out["site-2"], Failure) and "quorum grace" in out["site-2"].reason
    assert wire.decode(out["site-0"], max_bytes=100) == {"echo": 0}


def test_waits_for_everyone_when_they_answer_within_the_grace():
    """A site slower than the others but within the grace is waited for."""
    transport, _ = _transport([0.0, 0.0, 0.3], quorum=2, grace_s=2.0)
    out = transport.exchange(1, "train", _blobs(3), timeout_s=30)
    assert all(isinstance(v, bytes) for v in out.values())


def test_deadline_without_quorum_and_late_reply_reported_stale():
    """Without quorum the exchange ends at the deadline; the late reply, pulled later, is stale."""
    transport, _ = _transport([0.0, 0.6], quorum=2, grace_s=0.0)
    out = transport.exchange(1, "train", _blobs(2), timeout_s=0.3)
    assert isinstance(out["site-1"], Failure) and "deadline" in out["site-1"].reason
    time.sleep(0.5)
    assert transport.drain_stale() == {"site-1@round-1": "stale: replied after its round closed (ignored)"}
    assert transport.drain_stale() == {}


def test_flower_sizes_recorded_for_every_message():
    """The ledger gets a Flower-serialized size for each message sent and each reply received."""
    transport, _ = _transport([0.0, 0.0], quorum=2, grace_s=0.0)
    transport.exchange(3, "train", _blobs(2), timeout_s=5)
    rows = [r for r in transport.ledger.rows if r.kind == "flower"]
    assert sorted((r.site_id, r.direction) for r in rows) == [
        ("site-0", "down"),
        ("site-0", "up"),
        ("site-1", "down"),
        ("site-1", "up"),
    ]
    assert all(r.num_bytes > 200 for r in rows)
    assert RecordDict  # the records module imports cleanly with flwr
