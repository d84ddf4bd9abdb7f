"""The site's end of the thin link: HTTP/1.1 on loopback for the SuperNode, one HTTP/2 connection upstream.

Answers the SuperNode's 3-s polls itself while one poll is held at the server gateway, forwards one
heartbeat per ``0.7 * heartbeat_s`` with the interval rewritten, and closes a killed predecessor's
session on activation. The design and its costs: ``linkgate.py``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import httpx
from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
    ActivateNodeRequest,
    ActivateNodeResponse,
    DeactivateNodeRequest,
)
from flwr.proto.heartbeat_pb2 import (  # pylint: disable=E0611
    SendNodeHeartbeatRequest,
    SendNodeHeartbeatResponse,
)

from edgetune.flower.linkgate import (
    ACTIVATE,
    DEACTIVATE,
    HEARTBEAT,
    HOLD_HEADER,
    KEEPALIVE_S,
    PROTOBUF,
    PULL,
    LoopThread,
    Reply,
    ThinLink,
    keep_headers,
)

UPSTREAM_TIMEOUT_S = 330.0
"""Longest wait for the server gateway's answer: a held poll (<= 270 s) plus slack."""


def _empty_reply(path: str) -> Reply:
    body = SendNodeHeartbeatResponse(success=True).SerializeToString() if path == HEARTBEAT else b""
    return Reply(200, [("content-type", PROTOBUF)], body)


def _with_interval(body: bytes, message: Any, seconds: float) -> bytes:
    msg = message()
    msg.ParseFromString(body)
    msg.heartbeat_interval = seconds
    return msg.SerializeToString(deterministic=True)


class SiteGateway:
    """HTTP/1.1 on loopback for the SuperNode; HTTP/2 over TLS to the server gateway."""

    def __init__(
        self,
        upstream: str,
        ca_file: Path | str,
        profile: ThinLink,
        *,
        connect_to: tuple[str, int] | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        state_file: Path | None = None,
    ) -> None:
        """``upstream`` is the server gateway's host:port (its certificate's name); ``connect_to`` sends the
        TCP connection elsewhere (a link meter in front of it) while TLS still checks ``upstream``'s name.
        """
        self.host, _, port = upstream.rpartition(":")
        self.host = self.host.strip("[]")
        self.port_up = int(port)
        self.ca_file = str(ca_file)
        self.profile = profile
        self.connect_to = connect_to
        self.listen = listen
        self.state_file = state_file
        self._local_tls: Path | None = None
        self.port = 0
        self.stats = {"forwarded": 0, "local_polls": 0, "local_heartbeats": 0, "held_polls": 0}
        self._pending: Reply | None = None
        self._held: asyncio.Task[None] | None = None
        self._last_heartbeat = 0.0
        self._client: httpx.AsyncClient | None = None
        self._runner = LoopThread(f"site-gateway-{upstream}")

    def _url(self, path: str) -> str:
        host, port = self.connect_to or (self.host, self.port_up)
        return f"https://{host}:{port}{path}"

    async def _send(self, path: str, headers: list[tuple[str, str]], body: bytes) -> Reply:
        assert self._client is not None
        ext = {"sni_hostname": self.host} if self.connect_to else {}
        try:
            resp = await self._client.post(self._url(path), content=body, headers=headers, extensions=ext)
        except httpx.HTTPError as err:
            # Flower's retry logic backs off on 502 as on a refused connection
            return Reply(502, [("content-type", "text/plain")], f"site gateway: {err!r}".encode())
        self.stats["forwarded"] += 1
        return Reply(resp.status_code, keep_headers(resp.headers.raw), resp.content)

    async def handle(self, path: str, headers: list[tuple[str, str]], body: bytes) -> Reply:
        """One request from the SuperNode."""
        if path == PULL:
            return await self._pull(headers, body)
        if path == HEARTBEAT:
            now = time.monotonic()
            if now - self._last_heartbeat < 0.7 * self.profile.heartbeat_s:
                self.stats["local_heartbeats"] += 1
                return _empty_reply(HEARTBEAT)
            reply = await self._send(path, headers, _with_interval(body, SendNodeHeartbeatRequest, self._hb()))
            if reply.status == 200:
                self._last_heartbeat = now
            return reply
        if path == ACTIVATE:
            return await self._activate(headers, _with_interval(body, ActivateNodeRequest, self._hb()))
        return await self._send(path, headers, body)

    async def _activate(self, headers: list[tuple[str, str]], body: bytes) -> Reply:
        """Activate the node; if the SuperLink refuses because this site's previous session (killed
        without its goodbye) still counts as online, say that goodbye for it and try once more.

        The SuperLink would otherwise wait two heartbeat intervals (10 min with the thin profile's
        300 s). Only this site can do it: the request carries the SuperNode's own signature, and the
        node id is the one this gateway saw activated last time (``state_file``). A second copy of a
        site started while the first still runs therefore takes over from it (Flower alone would refuse
        the second).
        """
        self._last_heartbeat = time.monotonic()
        reply = await self._send(ACTIVATE, headers, body)
        previous = self._previous_node_id()
        if reply.status != 200 and previous is not None:
            bye = DeactivateNodeRequest(node_id=previous).SerializeToString(deterministic=True)
            await self._send(DEACTIVATE, headers, bye)
            self.stats["stale_sessions_closed"] = self.stats.get("stale_sessions_closed", 0) + 1
            reply = await self._send(ACTIVATE, headers, body)
        if reply.status == 200 and self.state_file is not None:
            node_id = ActivateNodeResponse.FromString(reply.body).node_id
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(str(node_id))
        return reply

    def _previous_node_id(self) -> int | None:
        if self.state_file is None or not self.state_file.is_file():
            return None
        try:
            return int(self.state_file.read_text().strip())
        except ValueError:
            return None

    def _hb(self) -> float:
        return float(self.profile.heartbeat_s)

    async def _pull(self, headers: list[tuple[str, str]], body: bytes) -> Reply:
        if self._pending is not None:
            reply, self._pending = self._pending, None
            return reply
        if self._held is None or self._held.done():
            # this poll goes upstream and waits there; the SuperNode hears "nothing yet" meanwhile
            held_headers = [*headers, (HOLD_HEADER, f"{self.profile.hold_s:g}")]
            self._held = asyncio.get_running_loop().create_task(self._hold(held_headers, body))
        self.stats["local_polls"] += 1
        return _empty_reply(PULL)

    async def _hold(self, headers: list[tuple[str, str]], body: bytes) -> None:
        self.stats["held_polls"] += 1
        reply = await self._send(PULL, headers, body)
        if reply.status != 200 or reply.body:
            self._pending = reply  # a message, or an error the SuperNode must see

    # --- serving -----------------------------------------------------------------------------------------------

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_h11(reader, writer, self.handle)

    def local_tls(self, folder: Path) -> Path:
        """TLS for the loopback hop (Flower's SuperNode signs requests only over TLS): a throwaway CA and
        a certificate for 127.0.0.1 in ``folder``; returns the CA file to give the SuperNode.
        """
        from edgetune.crypto import certs

        certs.generate_tls(folder, ["127.0.0.1", "localhost"], overwrite=True)
        self._local_tls = certs.tls_dir(folder)
        return self._local_tls / "ca.crt"

    async def _start(self) -> None:
        local = None
        if self._local_tls is not None:
            local = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            local.load_cert_chain(self._local_tls / "superlink.crt", self._local_tls / "superlink.key")
        ctx = ssl.create_default_context(cafile=self.ca_file)
        self._client = httpx.AsyncClient(
            http2=True,
            verify=ctx,
            timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=30.0),
            limits=httpx.Limits(max_connections=4, keepalive_expiry=KEEPALIVE_S),
            trust_env=False,
        )
        server = await asyncio.start_server(self._serve_conn, *self.listen, ssl=local)
        self.port = int(server.sockets[0].getsockname()[1])

    def start(self) -> SiteGateway:
        """Serve in a background thread; ``self.port`` is the SuperNode's ``--superlink`` port."""
        self._runner.start(self._start)
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._runner.stop()


async def _serve_h11(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Callable[[str, list[tuple[str, str]], bytes], Awaitable[Reply]],
) -> None:
    """A minimal HTTP/1.1 server loop (keep-alive, Content-Length bodies) for one connection."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                path = event.target.decode("latin-1")
                headers = keep_headers(event.headers)
                body = bytearray()
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await reader.read(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                reply = await handler(path, headers, bytes(body))
                out_headers = [*reply.headers, ("content-length", str(len(reply.body)))]
                writer.write(conn.send(h11.Response(status_code=reply.status, headers=out_headers)))
                writer.write(conn.send(h11.Data(data=reply.body)) + conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
    except (h11.RemoteProtocolError, ConnectionError, OSError):
        return
    finally:
        writer.close()
