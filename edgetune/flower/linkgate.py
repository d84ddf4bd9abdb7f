"""The thin-link gateways: one HTTP/2 connection between a site and the server, few requests on it.

Flower 1.42's SuperNode talks protobuf over HTTPS/1.1 to the SuperLink: it polls every 3 s (a
hard-coded ``time.sleep(3)``), sends a heartbeat every ~20 s (a hard-coded 30 s interval), and every
request repeats about 1 KB of headers (the node's public key alone is ~300 B). The SuperLink closes a
connection idle for 5 s, so a slower request pays a new TLS handshake. None of this has a supported
option. Rather than patch Flower, edgetune puts two small reverse proxies around the thin link::

    SuperNode --HTTPS/1.1, loopback--> SiteGateway ==HTTP/2 + TLS, one connection==> ServerGateway
              --HTTPS/1.1, loopback--> SuperLink

    linkgate.py          this design, the Fleet API paths and headers, ThinLink, what both ends share
    linkgate_site.py     SiteGateway: local poll and heartbeat answers, stale-session close
    linkgate_server.py   ServerGateway: held polls (hypercorn, HTTP/2)

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
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from edgetune.linkmeter import close_loop

PULL = "/v1/fleet/pull-messages"
HEARTBEAT = "/v1/fleet/send-node-heartbeat"
ACTIVATE = "/v1/fleet/activate-node"
DEACTIVATE = "/v1/fleet/deactivate-node"
PROTOBUF = "application/protobuf"
TIMESTAMP_HEADER = "flwr-timestamp"
HOLD_HEADER = "x-edgetune-hold"
SIGNATURE_LIFE_S = 300.0
"""How long the SuperLink accepts a node's signed timestamp (flwr TIMESTAMP_TOLERANCE)."""
KEEPALIVE_S = 24 * 3600.0
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


def keep_headers(headers: Any) -> list[tuple[str, str]]:
    """The headers that cross the link (``FORWARD_HEADERS``, ``flwr-*``, the hold header), lower-cased str."""
    out = []
    for k, v in headers:
        k = k.decode("latin-1").lower() if isinstance(k, bytes) else k.lower()
        v = v.decode("latin-1") if isinstance(v, bytes) else v
        if k in FORWARD_HEADERS or k.startswith("flwr-") or k == HOLD_HEADER:
            out.append((k, v))
    return out


class LoopThread:
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
                close_loop(loop)

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()
        if not started.wait(timeout_s) or error:
            raise RuntimeError(f"{self.name} did not start: {error[0] if error else 'timeout'}")

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
