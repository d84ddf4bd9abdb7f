"""The site host: one long-lived process per deployed site that keeps the model loaded between rounds.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process, which would
import torch and transformers and load the model again each round (``benchmarks/site_reload.py``
measures that: about as long as the round's own compute for the embedded model on a 2-core CPU).
``edgetune site`` therefore starts this host next to its SuperNode and names its socket in the node
config (``site-host``); the ClientApp handler then only decodes the Flower message and hands the
payload to the host, which runs ``client.step`` on the model it already holds and returns the reply.
Flower still does all of the federating: the host is this machine's compute, not a transport.

The channel is a Unix socket in the site's state folder (0700; the socket 0600) with an HMAC
challenge on a random key in a 0600 file (created exclusively, never through a planted link), so only
processes of this site's user that can read the key may use it::

    host -> client   nonce (32 bytes)
    client -> host   HMAC-SHA256(key, "edgetune-sitehost-v1|" | nonce)      within HANDSHAKE_TIMEOUT_S
    host -> client   "ok"
    client -> host   length (8 bytes) | request                             within RECEIVE_TIMEOUT_S
    host -> client   length (8 bytes) | answer                 the client waits up to its request timeout

Every connection is served in its own thread with those timeouts, so a peer that connects and never
authenticates (or never sends) is dropped and blocks nobody; steps themselves run one at a time.
Requests and answers are edgetune wire payloads (``comm/wire.py``), never pickles::

    request  {"cfg": JSON of the run config, "run": run id, "site", "index", "num", "kit", "data",
              "phase", "payload": the decoded message payload (wire), "state": the site's state (wire)}
    answer   {"reply": wire payload, "state": wire payload, "step_s": seconds of client.step}
             or {"error": "..."} (a ValueError: the ClientApp replies with it, as without a host)
             or {"crash": "..."} (anything else; the ClientApp raises it, so Flower reports a failure)

Steps are run one at a time, in arrival order (a site answers one message at a time).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from edgetune.comm import wire
from edgetune.io import private_dir, write_exclusive

MAX_MESSAGE_BYTES = 1 << 30
KEY_BYTES = 32
HANDSHAKE_TIMEOUT_S = 10.0
"""A peer must answer the challenge within this long after connecting."""
RECEIVE_TIMEOUT_S = 120.0
"""... and send its whole request within this long after that (and take the answer as quickly)."""
REQUEST_TIMEOUT_S = 3600.0
"""How long a client waits for an answer by default (a round's local compute on a slow CPU)."""
_LABEL = b"edgetune-sitehost-v1|"
_LEN = struct.Struct(">Q")


class SiteHostError(RuntimeError):
    """The site host could not be reached, or it crashed on a request."""


def key_path(socket_path: Path) -> Path:
    return Path(str(socket_path) + ".key")


def write_key(socket_path: Path) -> bytes:
    """A fresh random key for the socket, in a new 0600 file next to it (never written through a link)."""
    key = secrets.token_bytes(KEY_BYTES)
    write_exclusive(key_path(socket_path), key, mode=0o600)
    return key


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"peer closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _send_frame(conn: socket.socket, data: bytes) -> None:
    conn.sendall(_LEN.pack(len(data)) + data)


def _recv_frame(conn: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
    if n > MAX_MESSAGE_BYTES:
        raise ValueError(f"frame of {n} bytes exceeds {MAX_MESSAGE_BYTES}")
    return _recv_exact(conn, n)


def _mac(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, _LABEL + nonce, hashlib.sha256).digest()


class SiteHost:
    """Holds this site's client halves (and through them the model) for as long as the site runs."""

    def __init__(self) -> None:
        self.clients: dict[tuple[str, str], Any] = {}
        self.workdir: Path | None = None

    def client(self, req: dict[str, Any]) -> Any:
        from edgetune import config as cfgmod
        from edgetune.build import build_client, process_workdir

        key = (str(req["run"]), str(req["site"]))
        if key not in self.clients:
            cfg = cfgmod.from_run_config(json.loads(req["cfg"]))
            if self.workdir is None:
                self.workdir = process_workdir(cfg)
            self.clients[key] = build_client(
                cfg,
                str(req["site"]),
                int(req["index"]),
                int(req["num"]),
                Path(str(req["kit"])),
                workdir=self.workdir,
                data_path=str(req["data"]),
            )
        return self.clients[key]

    def answer(self, blob: bytes) -> bytes:
        """One request in, one answer out; never raises."""
        try:
            req = wire.decode(blob, max_bytes=MAX_MESSAGE_BYTES)
            wire.require(
                req,
                {
                    "cfg": str,
                    "run": str,
                    "site": str,
                    "index": int,
                    "num": int,
                    "kit": str,
                    "data": str,
                    "phase": str,
                    "payload": bytes,
                    "state": bytes,
                },
                where="site host request",
            )
            payload = wire.decode(req["payload"], max_bytes=MAX_MESSAGE_BYTES)
            state = wire.decode(req["state"], max_bytes=MAX_MESSAGE_BYTES)
            client = self.client(req)
            t0 = time.perf_counter()
            reply, new_state = client.step(req["phase"], payload, dict(state))
            step_s = time.perf_counter() - t0
            return wire.encode({"reply": wire.encode(reply), "state": wire.encode(new_state), "step_s": step_s})
        except ValueError as err:
            return wire.encode({"error": f"{type(err).__name__}: {err}"})
        except Exception as err:  # a crash in one round must not take the site down
            return wire.encode({"crash": f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"})


def _serve_one(conn: socket.socket, key: bytes, host: SiteHost, lock: threading.Lock) -> None:
    """One connection: challenge, request, answer, each under its timeout; never raises."""
    try:
        with conn:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            nonce = secrets.token_bytes(32)
            conn.sendall(nonce)
            if not hmac.compare_digest(_recv_exact(conn, 32), _mac(key, nonce)):
                print("[edgetune] site host refused a connection: wrong key", flush=True)
                return
            conn.sendall(b"ok")
            conn.settimeout(RECEIVE_TIMEOUT_S)
            blob = _recv_frame(conn)
            with lock:  # one step at a time: the model is shared
                answer = host.answer(blob)
            _send_frame(conn, answer)
    except (OSError, EOFError, ValueError) as err:  # a peer that hung up, stalled or sent garbage
        print(f"[edgetune] site host dropped a connection: {type(err).__name__}: {err}", flush=True)


def serve(socket_path: Path, *, ready_file: Path | None = None) -> None:
    """Serve requests on ``socket_path`` until killed."""
    socket_path = Path(socket_path)
    private_dir(socket_path.parent)
    if socket_path.is_symlink() or socket_path.exists():
        socket_path.unlink()  # left by a killed host (or planted: never followed)
    key = write_key(socket_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file itself: 0600
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    host = SiteHost()
    lock = threading.Lock()
    print(f"[edgetune] site host ready on {socket_path} (pid {os.getpid()})", flush=True)
    if ready_file is not None:
        write_exclusive(ready_file, str(os.getpid()).encode(), mode=0o600)
    with listener:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as err:
                print(f"[edgetune] site host: accept failed: {err}", flush=True)
                continue
            threading.Thread(target=_serve_one, args=(conn, key, host, lock), daemon=True).start()


def request(socket_path: Path, req: dict[str, Any], *, timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """Send one request to the site host; returns its answer (``reply``/``state``, ``error`` or ``crash``).

    Waits at most ``timeout_s`` for the answer (and ``HANDSHAKE_TIMEOUT_S`` to connect and authenticate).
    """
    try:
        key = key_path(socket_path).read_bytes()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            conn.connect(str(socket_path))
            nonce = _recv_exact(conn, 32)
            conn.sendall(_mac(key, nonce))
            if _recv_exact(conn, 2) != b"ok":
                raise EOFError("the host did not accept the key")
            conn.settimeout(RECEIVE_TIMEOUT_S)
            _send_frame(conn, wire.encode(req))
            conn.settimeout(timeout_s)
            answer = _recv_frame(conn)
    except (OSError, EOFError, ValueError) as err:
        raise SiteHostError(f"site host at {socket_path} unreachable: {type(err).__name__}: {err}") from err
    return wire.decode(answer, max_bytes=MAX_MESSAGE_BYTES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetune.sitehost", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)
    # load the heavy libraries now, before the first round needs them
    import torch  # noqa: F401
    import transformers  # noqa: F401

    try:
        serve(args.socket, ready_file=args.ready_file)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
