"""FlowerTransport: rounds close at quorum + grace or at the deadline; late replies are stale."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from edgetune.comm import wire
from edgetune.comm.ledger import ByteLedger
from edgetune.federation import Failure, _decode_replies
from edgetune.flower.messages import flower_bytes, from_content, to_content
from edgetune.flower.server_loop import FlowerTransport, send_and_receive


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class FakeGrid:
    """Push stores messages; a site answers ``delay[site]`` seconds after the push (echoing)."""

    def __init__(self, delay: dict[int, float]) -> None:
        self.nodes = list(delay)
        self.delay = delay
        self.inbox: dict[str, tuple[float, Message]] = {}
        self.most_in_flight = 0
        self.pushed: list[int] = []  # destination nodes, in push order

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.inbox[msg.metadata.message_id] = (time.time() + self.delay[msg.metadata.dst_node_id], msg)
            ids.append(msg.metadata.message_id)
            self.pushed.append(msg.metadata.dst_node_id)
        self.most_in_flight = max(self.most_in_flight, len(self.inbox))
        return ids

    def send_and_receive(self, messages, timeout):
        ids = set(self.push_messages(messages))
        deadline, out = time.time() + timeout, []
        while ids and time.time() < deadline:
            for reply in self.pull_messages(list(ids)):
                ids.discard(reply.metadata.reply_to_message_id)
                out.append(reply)
            time.sleep(0.01)
        return out

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


def _transport(delay, quorum, grace_s, in_flight=0):
    nodes = {f"site-{i}": 100 + i for i in range(len(delay))}
    grid = FakeGrid({100 + i: d for i, d in enumerate(delay)})
    return FlowerTransport(
        grid,
        ByteLedger(),
        nodes,
        lambda phase: 1 << 16,
        quorum=quorum,
        grace_s=grace_s,
        poll_s=0.02,
        in_flight=in_flight,
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
    """The ledger gets, per site and direction, the Flower-serialized size of the very message that was
    pushed (down) or pulled (up): a site with a 20 kB payload is charged its own 20 kB, both ways."""
    transport, grid = _transport([0.0, 0.0], quorum=2, grace_s=0.0)
    pushed, pulled = {}, {}
    push, pull = grid.push_messages, grid.pull_messages

    def record_push(messages):
        ids = push(messages)
        pushed.update({m.metadata.dst_node_id: m for m in messages})
        return ids

    def record_pull(message_ids):
        replies = pull(message_ids)
        pulled.update({r.metadata.src_node_id: r for r in replies})
        return replies

    grid.push_messages, grid.pull_messages = record_push, record_pull
    big = hashlib.sha256(b"incompressible").digest() * 625  # 20 kB that deflate cannot shrink
    blobs = {"site-0": wire.encode({"x": 0}), "site-1": wire.encode({"x": big})}

    out = transport.exchange(3, "train", blobs, timeout_s=5)

    assert wire.decode(out["site-1"], max_bytes=1 << 16) == {"echo": big}
    rows = {(r.site_id, r.direction): r.num_bytes for r in transport.ledger.rows if r.kind == "flower"}
    assert rows == {
        ("site-0", "down"): flower_bytes(pushed[100]),
        ("site-0", "up"): flower_bytes(pulled[100]),
        ("site-1", "down"): flower_bytes(pushed[101]),
        ("site-1", "up"): flower_bytes(pulled[101]),
    }
    for direction in ("down", "up"):
        assert rows["site-1", direction] - rows["site-0", direction] >= len(big)
        assert rows["site-0", direction] > len(blobs["site-0"])  # Flower's envelope around the payload


# ---- run.in_flight: a window of messages (Flower's in-memory link state scans all stored messages per node) ----


def _down_sites(transport):
    return sorted(r.site_id for r in transport.ledger.rows if r.kind == "flower" and r.direction == "down")


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_a_window_keeps_at_most_n_messages_out_and_still_asks_every_site(in_flight):
    """With run.in_flight = N no more than N messages are stored at once, every site is asked (in site order)
    and answers, and every message's bytes are counted once; 0 keeps today's all-at-once exchange."""
    transport, grid = _transport([0.02] * 7, quorum=7, grace_s=0.0, in_flight=in_flight)
    out = transport.exchange(1, "train", _blobs(7), timeout_s=30)
    assert {s: wire.decode(v, max_bytes=100) for s, v in out.items()} == {f"site-{i}": {"echo": i} for i in range(7)}
    assert grid.most_in_flight == in_flight
    assert grid.pushed == [100 + i for i in range(7)]
    assert _down_sites(transport) == [f"site-{i}" for i in range(7)]
    everyone, grid_all = _transport([0.02] * 7, quorum=7, grace_s=0.0)
    everyone.exchange(1, "train", _blobs(7), timeout_s=30)
    assert grid_all.most_in_flight == 7


def test_a_site_still_waiting_for_its_turn_at_the_deadline_is_not_sent_and_not_charged():
    """The deadline closes a windowed exchange like any other: the site in flight is late (its reply
    will be stale), the sites whose messages never left get a Failure that says so, and no bytes are
    counted for a message that was never sent."""
    transport, grid = _transport([0.2] * 4, quorum=4, grace_s=0.0, in_flight=1)
    out = transport.exchange(1, "train", _blobs(4), timeout_s=0.3)
    assert isinstance(out["site-0"], bytes)
    assert isinstance(out["site-1"], Failure) and "no reply" in out["site-1"].reason
    for site in ("site-2", "site-3"):
        assert isinstance(out[site], Failure) and "not sent" in out[site].reason
    assert _down_sites(transport) == ["site-0", "site-1"]
    assert grid.pushed == [100, 101]


def test_the_quorum_grace_starts_once_every_site_has_been_asked():
    """A site whose message waits behind the window cannot be late: with quorum 1 met by the first reply,
    the grace (0.4 s) counts from the moment the last message went out, so the third site (asked at about
    0.6 s, answering at 0.9 s) is still in the round; counted from the first reply it would be dropped."""
    transport, _ = _transport([0.3, 0.3, 0.3], quorum=1, grace_s=0.4, in_flight=1)
    out = transport.exchange(1, "train", _blobs(3), timeout_s=30)
    assert all(isinstance(v, bytes) for v in out.values()), out


def test_windowed_send_and_receive_returns_every_reply_with_a_bounded_window():
    """hello and bye go through the same window: all replies come back, never more than N in flight;
    with no window (0) it is Flower's own send_and_receive."""
    grid = FakeGrid({100 + i: 0.01 for i in range(9)})
    msgs = [
        Message(to_content(wire.encode({"x": i})), dst_node_id=100 + i, message_type="query.hello") for i in range(9)
    ]
    replies = send_and_receive(grid, msgs, timeout_s=30, window=4)
    assert sorted(r.metadata.src_node_id for r in replies) == [100 + i for i in range(9)]
    assert grid.most_in_flight == 4
    grid = FakeGrid({100 + i: 0.01 for i in range(9)})
    msgs = [
        Message(to_content(wire.encode({"x": i})), dst_node_id=100 + i, message_type="query.hello") for i in range(9)
    ]
    assert len(send_and_receive(grid, msgs, timeout_s=30, window=0)) == 9
    assert grid.most_in_flight == 9
    slow = FakeGrid({100 + i: 0.3 for i in range(4)})
    msgs = [
        Message(to_content(wire.encode({"x": i})), dst_node_id=100 + i, message_type="query.hello") for i in range(4)
    ]
    assert [r.metadata.src_node_id for r in send_and_receive(slow, msgs, timeout_s=0.45, window=1)] == [100]
    assert slow.pushed == [100, 101]


class ErrorGrid(FakeGrid):
    """Every site answers with an error payload far longer than the phase's reply limit."""

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            ready, msg = self.inbox.pop(mid, (None, None))
            if ready is not None:
                text = f"ValueError: site {msg.metadata.dst_node_id}: example 7 has no choices " + "x" * 300
                reply = Message(to_content(wire.encode({"error": text})), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                out.append(reply)
        return out


def test_a_sites_error_text_longer_than_its_reply_limit_reaches_the_round_log():
    """spsa replies are capped at about 100 bytes; a site's error must not be dropped as an oversized
    reply, while a normal reply over the limit still is (federation's decoding)."""
    grid = ErrorGrid({100: 0.0, 101: 0.0})
    transport = FlowerTransport(
        grid, ByteLedger(), {"site-0": 100, "site-1": 101}, lambda phase: 104, quorum=2, grace_s=0.0, poll_s=0.01
    )
    out = transport.exchange(1, "train", _blobs(2), timeout_s=10)
    replies, failed = _decode_replies(out, 104)
    assert replies == {}
    assert failed["site-0"].startswith("site error: ValueError: site 100: example 7 has no choices")
    big = {"site-0": wire.encode({"codes": b"x" * 200})}
    assert "exceeds the limit of 104" in _decode_replies(big, 104)[1]["site-0"]
