"""The thin-link site gateway cuts requests without changing what the SuperNode and SuperLink see:
polls are answered locally while one waits upstream, a pulled message reaches the SuperNode exactly once,
heartbeats cross once per interval with the interval rewritten, and a stale session is closed by the
site itself. Checked against the installed Flower's protobuf messages and Fleet paths."""

from __future__ import annotations

import asyncio

import pytest
from flwr.proto.fleet_pb2 import (
    ActivateNodeRequest,
    ActivateNodeResponse,
    DeactivateNodeRequest,
    PullMessagesResponse,
)
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest, SendNodeHeartbeatResponse
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supernode.fleet_http_client import FleetHttpClient

from edgetune.flower import linkgate, linkgate_server
from edgetune.flower.linkgate import Reply, ThinLink
from edgetune.flower.linkgate_site import SiteGateway

HEADERS = [("content-type", linkgate.PROTOBUF), ("flwr-timestamp", "2026-01-01T00:00:00+00:00")]


class FakeUpstream:
    """Records what the site gateway sends; answers from a script."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list, bytes]] = []
        self.pull_reply = Reply(200, [("content-type", linkgate.PROTOBUF)], b"")
        self.activate_status = [200]
        self.release = asyncio.Event()

    async def __call__(self, path: str, headers: list, body: bytes) -> Reply:
        self.sent.append((path, headers, body))
        if path == linkgate.PULL:
            await self.release.wait()
            return self.pull_reply
        if path == linkgate.ACTIVATE:
            status = self.activate_status.pop(0)
            return Reply(status, [], ActivateNodeResponse(node_id=77).SerializeToString() if status == 200 else b"")
        if path == linkgate.HEARTBEAT:
            return Reply(200, [], SendNodeHeartbeatResponse(success=True).SerializeToString())
        return Reply(200, [], b"")


def _gateway(tmp_path, **profile) -> tuple[SiteGateway, FakeUpstream]:
    gw = SiteGateway("link.example.org:9092", tmp_path / "ca.crt", ThinLink(**profile), state_file=tmp_path / "id")
    up = FakeUpstream()
    gw._send = up  # type: ignore[method-assign]
    return gw, up


def test_fleet_paths_and_messages_exist_in_installed_flower():
    """The gateway's assumptions about Flower's Fleet API: if an upgrade moves these, this fails first."""
    import inspect

    source = inspect.getsource(FleetHttpClient)
    for path in (linkgate.PULL, linkgate.HEARTBEAT, linkgate.ACTIVATE, linkgate.DEACTIVATE):
        assert f'"{path}"' in source
    assert "heartbeat_interval" in ActivateNodeRequest.DESCRIPTOR.fields_by_name
    assert "heartbeat_interval" in SendNodeHeartbeatRequest.DESCRIPTOR.fields_by_name
    assert "node_id" in DeactivateNodeRequest.DESCRIPTOR.fields_by_name


def test_polls_are_local_while_one_waits_upstream_and_a_message_arrives_once(tmp_path):
    async def scenario():
        gw, up = _gateway(tmp_path)
        replies = [await gw.handle(linkgate.PULL, HEADERS, b"pull") for _ in range(5)]
        await asyncio.sleep(0)
        # five SuperNode polls, one request upstream, carrying the hold
        assert [p for p, _, _ in up.sent] == [linkgate.PULL]
        assert (linkgate.HOLD_HEADER, "240") in up.sent[0][1]
        assert all(r.status == 200 and r.body == b"" for r in replies)
        # the held poll returns a message: the next local poll gets it, the one after does not
        msg = PullMessagesResponse(messages_list=[ProtoMessage()])
        msg.messages_list[0].metadata.run_id = 5
        up.pull_reply = Reply(200, [("content-type", linkgate.PROTOBUF)], msg.SerializeToString())
        up.release.set()
        await asyncio.sleep(0.01)
        first = await gw.handle(linkgate.PULL, HEADERS, b"pull")
        assert PullMessagesResponse.FromString(first.body).messages_list[0].metadata.run_id == 5
        up.pull_reply = Reply(200, [], b"")
        second = await gw.handle(linkgate.PULL, HEADERS, b"pull")
        assert second.body == b""  # not delivered twice; a new held poll went upstream instead
        await asyncio.sleep(0.01)
        assert sum(p == linkgate.PULL for p, _, _ in up.sent) == 2

    asyncio.run(scenario())


def test_an_upstream_error_reaches_the_supernode(tmp_path):
    async def scenario():
        gw, up = _gateway(tmp_path)
        up.pull_reply = Reply(401, [], b"Invalid SuperNode authentication")
        up.release.set()
        await gw.handle(linkgate.PULL, HEADERS, b"")
        await asyncio.sleep(0.01)
        assert (await gw.handle(linkgate.PULL, HEADERS, b"")).status == 401

    asyncio.run(scenario())


def test_heartbeats_cross_once_per_interval_with_the_interval_rewritten(tmp_path):
    async def scenario():
        gw, up = _gateway(tmp_path, heartbeat_s=300.0)
        body = SendNodeHeartbeatRequest(heartbeat_interval=30).SerializeToString()
        activate = ActivateNodeRequest(public_key=b"k", heartbeat_interval=30).SerializeToString()
        await gw.handle(linkgate.ACTIVATE, HEADERS, activate)
        answers = [await gw.handle(linkgate.HEARTBEAT, HEADERS, body) for _ in range(10)]
        assert [p for p, _, _ in up.sent] == [linkgate.ACTIVATE]  # activation counts as the first beat
        assert ActivateNodeRequest.FromString(up.sent[0][2]).heartbeat_interval == 300
        assert all(SendNodeHeartbeatResponse.FromString(a.body).success for a in answers)
        gw._last_heartbeat -= 0.7 * 300  # one interval later, the next one crosses
        await gw.handle(linkgate.HEARTBEAT, HEADERS, body)
        assert up.sent[-1][0] == linkgate.HEARTBEAT
        assert SendNodeHeartbeatRequest.FromString(up.sent[-1][2]).heartbeat_interval == 300

    asyncio.run(scenario())


def test_a_restarted_site_closes_its_stale_session_itself(tmp_path):
    """Activation refused while the previous session (node id saved) counts as online: deactivate, retry."""

    async def scenario():
        gw, up = _gateway(tmp_path)
        (tmp_path / "id").write_text("4242")
        up.activate_status = [409, 200]
        reply = await gw.handle(linkgate.ACTIVATE, HEADERS, ActivateNodeRequest(public_key=b"k").SerializeToString())
        assert reply.status == 200
        assert [p for p, _, _ in up.sent] == [linkgate.ACTIVATE, linkgate.DEACTIVATE, linkgate.ACTIVATE]
        assert DeactivateNodeRequest.FromString(up.sent[1][2]).node_id == 4242
        assert (tmp_path / "id").read_text() == "77"

    asyncio.run(scenario())


@pytest.mark.parametrize(("field", "value"), [("hold_s", 0.5), ("hold_s", 280.0), ("heartbeat_s", 5.0)])
def test_profile_rejects_values_flower_would_refuse(field, value):
    with pytest.raises(ValueError, match=field):
        ThinLink(**{field: value})


def _server_gateway(monkeypatch, replies: list[Reply]):
    gw = linkgate_server.ServerGateway("127.0.0.1:1", "c", "k", None, listen=("127.0.0.1", 0))
    calls: list[str] = []

    async def forward(path, headers, body):
        calls.append(path)
        return replies.pop(0) if len(replies) > 1 else replies[0]

    gw._forward = forward  # type: ignore[method-assign]
    monkeypatch.setattr(linkgate_server, "SERVER_POLL_S", 0.01)
    return gw, calls


def _now_header() -> list[tuple[str, str]]:
    import datetime as dt

    return [(linkgate.TIMESTAMP_HEADER, dt.datetime.now(dt.UTC).isoformat()), (linkgate.HOLD_HEADER, "60")]


def test_server_gateway_holds_a_poll_until_a_message(monkeypatch):
    """Empty answers are retried on loopback; the first message goes back; the hold header never reaches
    the SuperLink."""
    msg = PullMessagesResponse(messages_list=[ProtoMessage()]).SerializeToString()
    empty = Reply(200, [], b"")
    gw, calls = _server_gateway(monkeypatch, [empty, empty, empty, Reply(200, [], msg)])
    reply = asyncio.run(gw.handle(linkgate.PULL, _now_header(), b""))
    assert reply.body == msg and len(calls) == 4


def test_server_gateway_stops_holding_for_a_site_that_hung_up(monkeypatch):
    gw, calls = _server_gateway(monkeypatch, [Reply(200, [], b"")])
    hung_up = iter([False, False, True])
    reply = asyncio.run(gw.handle(linkgate.PULL, _now_header(), b"", lambda: next(hung_up)))
    assert reply.body == b"" and len(calls) == 3 and gw.stats["abandoned_holds"] == 1


def test_server_gateway_never_holds_past_the_signature_life(monkeypatch):
    """A poll signed long ago is answered at once: the SuperLink would refuse it after 300 s."""
    import datetime as dt

    gw, calls = _server_gateway(monkeypatch, [Reply(200, [], b"")])
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=280)).isoformat()
    headers = [(linkgate.TIMESTAMP_HEADER, old), (linkgate.HOLD_HEADER, "240")]
    t0 = __import__("time").monotonic()
    asyncio.run(gw.handle(linkgate.PULL, headers, b""))
    assert __import__("time").monotonic() - t0 < 1.0 and len(calls) == 1


def test_the_hold_header_survives_the_server_gateways_header_filter(monkeypatch):
    """The hold travels from the site gateway through hypercorn's ASGI scope to handle()."""
    seen = {}
    gw = linkgate_server.ServerGateway("127.0.0.1:1", "c", "k", None, listen=("127.0.0.1", 0))

    async def handle(path, headers, body, gone):
        seen["headers"] = headers
        return Reply(200, [], b"")

    gw.handle = handle  # type: ignore[method-assign]
    scope = {"type": "http", "path": linkgate.PULL, "headers": [(b"x-edgetune-hold", b"240"), (b"user-agent", b"x")]}
    messages = iter([{"type": "http.request", "body": b"", "more_body": False}])
    sent = []

    async def receive():
        try:
            return next(messages)
        except StopIteration:
            await asyncio.sleep(3600)

    async def send(msg):
        sent.append(msg)

    asyncio.run(gw.asgi(scope, receive, send))
    assert (linkgate.HOLD_HEADER, "240") in seen["headers"] and ("user-agent", "x") not in seen["headers"]
    assert sent[0]["status"] == 200
