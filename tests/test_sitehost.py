"""The site host: a separate process keeps the model loaded; its replies are the ones the server accepts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc, sitehost
from edgetune.build import keys_dir_for
from edgetune.comm import wire
from edgetune.crypto.keys import site_kit_dir


@pytest.fixture
def host(tmp_path):
    """A site host process on a socket in tmp_path."""
    sock = tmp_path / "h.sock"
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgetune.sitehost", "--socket", str(sock), "--ready-file", str(ready)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, "site host did not start"
        time.sleep(0.1)
    yield sock
    proc.kill()
    proc.wait()


def _request(sock: Path, cfg, run_dir: Path, payload: dict, state: dict) -> dict:
    return sitehost.request(
        sock,
        {
            "cfg": __import__("json").dumps(cfgmod.flatten(cfg)),
            "run": "123",
            "site": "site-0",
            "index": 0,
            "num": 2,
            "kit": str(site_kit_dir(keys_dir_for(cfg, run_dir), "site-0")),
            "data": "",
            "phase": "train",
            "payload": wire.encode(payload),
            "state": wire.encode(state),
        },
    )


def test_site_host_answers_rounds_the_server_accepts_and_keeps_state(tmp_path, host):
    """Two spsa rounds through the host: each reply is accepted and commits; replaying round 1 is refused."""
    # Prepare
    cfg = cfgmod.from_run_config(tiny_flat(**{"run.num_sites": 2}))
    run_dir = tmp_path / "run"
    server, transport, _, _, _ = inproc.build(cfg, 2, run_dir=run_dir)
    state: dict = {}
    first = None

    for r in (1, 2):
        # Execute
        msg = server.configure(r, "train", ["site-0"])["site-0"]
        first = first or msg
        answer = _request(host, cfg, run_dir, msg, state)

        # Assert
        assert set(answer) == {"reply", "state", "step_s"}, answer
        state = wire.decode(answer["state"], max_bytes=1 << 20)
        result = server.aggregate(r, "train", {"site-0": wire.decode(answer["reply"], max_bytes=1 << 20)}, min_sites=1)
        assert result.committed and result.accepted == ("site-0",), result.rejected

    replay = _request(host, cfg, run_dir, first, state)
    assert "replay" in replay["error"]


def test_site_host_refuses_a_client_without_its_key(tmp_path, host):
    """A process that cannot read the key file (here: a wrong key) is refused; the host keeps serving."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(host))
        conn.recv(32)
        conn.sendall(b"x" * 32)
        assert conn.recv(2) == b""  # closed without "ok"
    assert sitehost.key_path(host).stat().st_mode & 0o777 == 0o600
    assert host.stat().st_mode & 0o777 == 0o600

    answer = sitehost.request(host, {"garbage": 1})
    assert "site host request" in answer["error"]


def test_a_peer_that_never_authenticates_blocks_nobody(tmp_path, host):
    """Three peers connect and go silent (one never answers the challenge, one stops mid-request); a real
    request still gets its answer at once, and the silent peers are dropped after the handshake timeout."""
    import socket

    silent = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(host))
        silent.append(s)
    key = sitehost.key_path(host).read_bytes()
    half = silent[2]
    half.sendall(sitehost._mac(key, half.recv(32)))
    assert half.recv(2) == b"ok"
    half.sendall(sitehost._LEN.pack(1000) + b"x" * 10)  # promises 1000 bytes, sends 10
    t0 = time.time()
    answer = sitehost.request(host, {"garbage": 1}, timeout_s=30)
    assert "site host request" in answer["error"] and time.time() - t0 < 8
    silent[0].settimeout(sitehost.HANDSHAKE_TIMEOUT_S + 20)
    silent[0].recv(32)
    assert silent[0].recv(1) == b""  # dropped by the host's handshake timeout
    for s in silent:
        s.close()


def test_a_host_that_never_answers_is_a_timeout_not_a_hang(tmp_path):
    """A client waits at most its timeout for a host that accepts and then says nothing."""
    import socket
    import threading

    sock = tmp_path / "mute.sock"
    sitehost.key_path(sock).write_bytes(b"k" * 32)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(1)
    held = []

    def mute() -> None:  # authenticates the client, reads its request, then never answers
        conn, _ = server.accept()
        held.append(conn)
        nonce = b"n" * 32
        conn.sendall(nonce)
        conn.recv(32)
        conn.sendall(b"ok")
        conn.recv(1 << 16)

    threading.Thread(target=mute, daemon=True).start()
    t0 = time.time()
    with pytest.raises(sitehost.SiteHostError, match="timed out"):
        sitehost.request(sock, {"x": 1}, timeout_s=1)
    assert time.time() - t0 < 5
    server.close()


def test_planted_links_at_the_key_and_ready_files_are_not_followed(tmp_path):
    """Symlinks planted where the host writes its key and its ready file are replaced, not written through."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    sock = tmp_path / "state" / "h.sock"
    sock.parent.mkdir()
    sitehost.key_path(sock).symlink_to(victim)
    key = sitehost.write_key(sock)
    assert victim.read_bytes() == b"untouched" and sitehost.key_path(sock).read_bytes() == key


def test_unreachable_site_host_is_a_clear_error(tmp_path):
    """No host on the socket: SiteHostError naming the socket (the ClientApp reports a failure)."""
    sock = tmp_path / "none.sock"
    sitehost.key_path(sock).write_bytes(b"k" * 32)
    with pytest.raises(sitehost.SiteHostError, match="none.sock"):
        sitehost.request(sock, {"x": 1})
