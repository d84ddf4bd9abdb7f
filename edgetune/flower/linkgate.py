"""The thin-link gateways: one HTTP/2 connection between a site and the server, few requests on it.

Flower 1.42's SuperNode talks protobuf over HTTPS/1.1 to the SuperLink: it polls every 3 s (a
hard-coded ``time.sleep(3)``), sends a heartbeat every ~20 s (a hard-coded 30 s interval), and every
request repeats about 1 KB of headers (the node's public key alone is ~300 B). The SuperLink closes a
connection idle for 5 s, so a slower request pays a new TLS handshake. None of this has a supported
option. Rather than patch Flower, edgetune puts two small reverse proxies around the thin link::

    SuperNode --HTTPS/1.1, loopback--> SiteGateway ==HTTP/2 + TLS, one connection==> ServerGateway
              --HTTPS/1.1, loopback--> SuperLink

Both speak Flower's Fleet HTTP API (``/v1/fleet/*``) and forward every request unchanged except:

* **HTTP/2** between the gateways: HPACK sends the repeated headers (public key, versions, content
  type) once per connection; a request then costs its signature, timestamp and body. The connection
  stays open (both ends keep it ``KEEPALIVE_S``), so rounds do not pay TLS handshakes.
* **Held polls**: the site gateway answers the SuperNode's 3-s polls itself with "no message" while
  one poll is outstanding upstream; the server gateway holds that poll, asking the SuperLink on
  loopback every ``SERVER_POLL_S``, until a message is there or ``hold_s`` passed. A message reaches
  the SuperNode at its next local poll (<= 3 s later). The held request carries the SuperNode's own
  signature, which the SuperLink accepts for 300 s (node auth signs a timestamp, not the body), so
  ``hold_s`` stays below that.
* **Heartbeats**: the site gateway rewrites the heartbeat interval the SuperNode announces (in
  ``ActivateNode`` and ``SendNodeHeartbeat``, bodies the signature does not cover) to
  ``heartbeat_s`` and forwards one heartbeat per ``0.7 * heartbeat_s``, answering the others itself.
  The SuperLink therefore declares a dead site offline after 2 * ``heartbeat_s`` instead of 60 s.

What it costs: a killed site is noticed later (2 * ``heartbeat_s``); the gateways are two more
processes to run; they depend on the Fleet API's paths and four protobuf messages, which
``tests/flower/test_linkgate.py`` checks against the installed Flower. The loopback hop between the
SuperNode and its site gateway uses TLS with a throwaway certificate (Flower signs requests only over
TLS); it never leaves the machine.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
    ActivateNodeRequest,
    ActivateNodeResponse,
    DeactivateNodeRequest,
    PullMessagesResponse,
)
from flwr.proto.heartbeat_pb2 import (  # pylint: disable=E0611
    SendNodeHeartbeatRequest,
    SendNodeHeartbeatResponse,
)

PULL = "/v1/fleet/pull-messages"
HEARTBEAT = "/v1/fleet/send-node-heartbeat"
ACTIVATE = "/v1/fleet/activate-node"
DEACTIVATE = "/v1/fleet/deactivate-node"
PROTOBUF = "application/protobuf"
TIMESTAMP_HEADER = "flwr-timestamp"
HOLD_HEADER = "x-edgetune-hold"
SIGNATURE_LIFE_S = 300.0
"""How long the SuperLink accepts a node's signed timestamp (flwr TIMESTAMP_TOLERANCE)."""
SERVER_POLL_S = 1.0
KEEPALIVE_S = 24 * 3600.0
UPSTREAM_TIMEOUT_S = 330.0
FORWARD_HEADERS = ("content-type", "accept")
"""Request headers that cross the link besides Flower's own (``flwr-*``); user-agent, accept-encoding
and the like stay behind."""


@dataclass(frozen=True)
class ThinLink:
    """The thin-link profile's knobs (``edgetune site --link thin``)."""

    hold_s: float = 240.0
    """Longest a poll waits at the server gateway for a message (below the 300 s signature life)."""
    heartbeat_s: float = 300.0
    """Heartbeat interval the SuperLink is told; a dead site is declared offline after twice this."""

    def __post_init__(self) -> None:
        if not 1.0 <= self.hold_s <= SIGNATURE_LIFE_S - 30:
            raise ValueError(f"hold_s must be in [1, {SIGNATURE_LIFE_S - 30:.0f}] s, got {self.hold_s}")
        if not 10.0 <= self.heartbeat_s <= 1800.0:  # the SuperLink's accepted range
            raise ValueError(f"heartbeat_s must be in [10, 1800] s, got {self.heartbeat_s}")


@dataclass
class Reply:
    """An HTTP response as the gateways pass it on."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _keep(headers: Any) -> list[tuple[str, str]]:
    out = []
    for k, v in headers:
        k = k.decode("latin-1").lower() if isinstance(k, bytes) else k.lower()
        v = v.decode("latin-1") if isinstance(v, bytes) else v
        if k in FORWARD_HEADERS or k.startswith("flwr-") or k == HOLD_HEADER:
            out.append((k, v))
    return out


def _empty_reply(path: str) -> Reply:
    body = SendNodeHeartbeatResponse(success=True).SerializeToString() if path == HEARTBEAT else b""
    return Reply(200, [("content-type", PROTOBUF)], body)


def _with_interval(body: bytes, message: Any, seconds: float) -> bytes:
    msg = message()
    msg.ParseFromString(body)
    msg.heartbeat_interval = seconds
    return msg.SerializeToString(deterministic=True)


# --- the site's end ---------------------------------------------------------------------------------------------------


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
        self._runner = _LoopThread(f"site-gateway-{upstream}")

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
        return Reply(resp.status_code, _keep(resp.headers.raw), resp.content)

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
                headers = _keep(event.headers)
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


# --- the server's end -------------------------------------------------------------------------------------------------


class ServerGateway:
    """HTTP/2 over TLS for thin-link sites (hypercorn); forwards to the SuperLink on loopback."""

    def __init__(
        self,
        superlink: str,
        certfile: Path | str,
        keyfile: Path | str,
        ca_file: Path | str | None,
        *,
        listen: tuple[str, int],
    ) -> None:
        self.superlink = superlink
        self.certfile, self.keyfile = str(certfile), str(keyfile)
        self.ca_file = ca_file
        self.listen = listen
        self.stats = {"forwarded": 0, "held_polls": 0, "superlink_polls": 0}
        self._client: httpx.AsyncClient | None = None
        self._runner = _LoopThread(f"server-gateway-{listen[1]}")

    async def _forward(self, path: str, headers: list[tuple[str, str]], body: bytes) -> Reply:
        assert self._client is not None
        scheme = "https" if self.ca_file else "http"
        resp = await self._client.post(f"{scheme}://{self.superlink}{path}", content=body, headers=headers)
        return Reply(resp.status_code, _keep(resp.headers.raw), resp.content)

    async def handle(
        self, path: str, headers: list[tuple[str, str]], body: bytes, gone: Callable[[], bool] = lambda: False
    ) -> Reply:
        """One request from a site gateway; a pull with a hold header waits for a message.

        ``gone()`` says the site hung up (its process died): a held poll then stops asking the
        SuperLink, or it would take the node's next message (the restarted site's, same node id)
        to nowhere.
        """
        self.stats["forwarded"] += 1
        hold = next((v for k, v in headers if k == HOLD_HEADER), None)
        headers = [(k, v) for k, v in headers if k != HOLD_HEADER]
        if path != PULL or hold is None:
            return await self._forward(path, headers, body)
        self.stats["held_polls"] += 1
        deadline = time.monotonic() + min(float(hold), SIGNATURE_LIFE_S - 30)
        signed = next((v for k, v in headers if k == TIMESTAMP_HEADER), "")
        try:  # never hold a request past its signature's life at the SuperLink
            age = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(signed)).total_seconds()
            deadline = min(deadline, time.monotonic() + SIGNATURE_LIFE_S - 30 - age)
        except ValueError:
            pass
        while True:
            self.stats["superlink_polls"] += 1
            reply = await self._forward(path, headers, body)
            if reply.status != 200 or PullMessagesResponse.FromString(reply.body).messages_list:
                return reply
            if time.monotonic() + SERVER_POLL_S >= deadline:
                return reply
            await asyncio.sleep(SERVER_POLL_S)
            if gone():
                self.stats["abandoned_holds"] = self.stats.get("abandoned_holds", 0) + 1
                return reply

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI app hypercorn serves."""
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = bytearray()
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        hangup = asyncio.get_running_loop().create_task(receive())  # completes on http.disconnect
        try:
            reply = await self.handle(scope["path"], _keep(scope["headers"]), bytes(body), hangup.done)
        except httpx.HTTPError as err:
            reply = Reply(502, [("content-type", "text/plain")], f"server gateway: {err!r}".encode())
        headers = [(k.encode(), v.encode()) for k, v in reply.headers]
        if not hangup.done():
            hangup.cancel()
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "http.response.body", "body": reply.body})

    async def _start(self) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        verify: ssl.SSLContext | bool = False
        if self.ca_file:
            # the SuperLink is our own process on loopback: its chain is checked, its name (issued for the
            # public address) is not
            verify = ssl.create_default_context(cafile=str(self.ca_file))
            verify.check_hostname = False
        self._client = httpx.AsyncClient(
            verify=verify, timeout=60.0, limits=httpx.Limits(keepalive_expiry=4.0), trust_env=False
        )
        config = Config()
        config.bind = [f"{self.listen[0]}:{self.listen[1]}"]
        config.certfile, config.keyfile = self.certfile, self.keyfile
        config.alpn_protocols = ["h2"]
        config.keep_alive_timeout = KEEPALIVE_S
        config.include_date_header = False  # a new value every second would defeat HPACK
        config.include_server_header = False
        config.accesslog = None
        config.errorlog = None
        never = asyncio.Event()  # hypercorn's default trigger installs signal handlers (main thread only)
        self._serving = asyncio.get_running_loop().create_task(
            serve(self.asgi, config, shutdown_trigger=never.wait)  # type: ignore[arg-type]
        )
        deadline = time.monotonic() + 20
        while True:  # return once it listens
            try:
                _, w = await asyncio.open_connection(
                    "127.0.0.1" if self.listen[0] in {"0.0.0.0", ""} else self.listen[0], self.listen[1]
                )
                w.close()
                return
            except OSError:
                if self._serving.done() or time.monotonic() > deadline:
                    raise RuntimeError(f"server gateway did not listen on {self.listen}") from None
                await asyncio.sleep(0.1)

    def start(self) -> ServerGateway:
        """Serve in a background thread."""
        self._runner.start(self._start)
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._runner.stop()


class _LoopThread:
    """An asyncio loop in a daemon thread: ``start(coro_fn)`` runs the coroutine, then keeps serving."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def start(self, setup: Callable[[], Awaitable[None]], timeout_s: float = 30.0) -> None:
        started = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            try:
                loop.run_until_complete(setup())
            except BaseException as err:  # reported by start()
                error.append(err)
                started.set()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.run_until_complete(asyncio.sleep(0))
                loop.close()

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()
        if not started.wait(timeout_s) or error:
            raise RuntimeError(f"{self.name} did not start: {error[0] if error else 'timeout'}")

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
