"""The site host: one long-lived process per deployed site that keeps the model loaded between rounds.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process, which would
import torch and transformers and load the model again each round (``benchmarks/site_reload.py``
measures that: about as long as the round's own compute for the embedded model on a 2-core CPU).
``edgetune site`` therefore starts this host next to its SuperNode and names its socket in the node
config (``site-host``); the ClientApp handler then only decodes the Flower message and hands the
payload to the host, which runs ``client.step`` on the model it already holds and returns the reply.
Flower still does all of the federating: the host is this machine's compute, not a transport.

The channel is a Unix socket in the site's state folder (mode 0600) with
``multiprocessing.connection``'s HMAC challenge on a random key in a 0600 file, so only processes of
this site's user that can read the key may use it. Requests and answers are edgetune wire payloads
(``comm/wire.py``), never pickles::

    request  {"cfg": JSON of the run config, "run": run id, "site", "index", "num", "kit", "data",
              "phase", "payload": the decoded message payload (wire), "state": the site's state (wire)}
    answer   {"reply": wire payload, "state": wire payload, "step_s": seconds of client.step}
             or {"error": "..."} (a ValueError: the ClientApp replies with it, as without a host)
             or {"crash": "..."} (anything else; the ClientApp raises it, so Flower reports a failure)

Requests are served one at a time, in order (a site answers one message at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from edgetune.comm import wire

MAX_MESSAGE_BYTES = 1 << 30
KEY_BYTES = 32


class SiteHostError(RuntimeError):
    """The site host could not be reached, or it crashed on a request."""


def key_path(socket_path: Path) -> Path:
    return Path(str(socket_path) + ".key")


def write_key(socket_path: Path) -> bytes:
    """A fresh random key for the socket, in a 0600 file next to it."""
    key = secrets.token_bytes(KEY_BYTES)
    path = key_path(socket_path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.chmod(path, 0o600)
    return key


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


def serve(socket_path: Path, *, ready_file: Path | None = None) -> None:
    """Serve requests on ``socket_path`` until killed."""
    socket_path = Path(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        socket_path.unlink()  # left by a killed host
    key = write_key(socket_path)
    old_umask = os.umask(0o177)  # the socket file itself: 0600
    try:
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old_umask)
    host = SiteHost()
    print(f"[edgetune] site host ready on {socket_path} (pid {os.getpid()})", flush=True)
    if ready_file is not None:
        ready_file.write_text(str(os.getpid()))
    with listener:
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError) as err:  # a peer without the key, or one that hung up
                print(f"[edgetune] site host refused a connection: {type(err).__name__}: {err}", flush=True)
                continue
            with conn:
                try:
                    blob = conn.recv_bytes(MAX_MESSAGE_BYTES)
                except (OSError, EOFError):
                    continue
                conn.send_bytes(host.answer(blob))


def request(socket_path: Path, req: dict[str, Any]) -> dict[str, Any]:
    """Send one request to the site host; returns its answer (``reply``/``state``, ``error`` or ``crash``)."""
    try:
        key = key_path(socket_path).read_bytes()
        with Client(str(socket_path), family="AF_UNIX", authkey=key) as conn:
            conn.send_bytes(wire.encode(req))
            answer = conn.recv_bytes(MAX_MESSAGE_BYTES)
    except (AuthenticationError, OSError, EOFError) as err:
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
