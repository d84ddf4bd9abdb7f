"""The server's end of the thin link: HTTP/2 over TLS for site gateways, forwarding to the SuperLink on loopback.

Holds a site's poll (asking the SuperLink every ``SERVER_POLL_S``) until a message is there, the
hold runs out, the poll's signature would expire, or the site hangs up. The design and its costs:
``linkgate.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from flwr.proto.fleet_pb2 import PullMessagesResponse  # pylint: disable=E0611

from edgetune.flower.linkgate import (
    HOLD_HEADER,
    KEEPALIVE_S,
    PULL,
    SIGNATURE_LIFE_S,
    TIMESTAMP_HEADER,
    LoopThread,
    Reply,
    keep_headers,
)

SERVER_POLL_S = 1.0
"""How often a held poll asks the SuperLink on loopback for a message."""


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
        self._runner = LoopThread(f"server-gateway-{listen[1]}")

    async def _forward(self, path: str, headers: list[tuple[str, str]], body: bytes) -> Reply:
        assert self._client is not None
        scheme = "https" if self.ca_file else "http"
        resp = await self._client.post(f"{scheme}://{self.superlink}{path}", content=body, headers=headers)
        return Reply(resp.status_code, keep_headers(resp.headers.raw), resp.content)

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
            reply = await self.handle(scope["path"], keep_headers(scope["headers"]), bytes(body), hangup.done)
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
