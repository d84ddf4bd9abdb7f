"""The ServerApp's round loop: ``federation.run_federation`` over ``grid.send_and_receive``.

Flower's ``Strategy.start()`` fixes one train exchange of arrays per round; edgetune's rounds
carry envelopes and one-byte scalars, and some algorithms have several phases, so the loop is
our own, built from Flower's Message API:

    query.hello   -> every node says which site it is and proves it with that site's registered key
                     (node ids change when a SuperNode restarts, site ids do not; canonical orders
                     use site ids; crypto/identity.py)
    train[.phase] -> one message per site per phase, group_id = round
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from edgetune import config as cfgmod
from edgetune.build import build_server, keys_dir_for
from edgetune.bundle import code_version
from edgetune.comm.ledger import ByteLedger
from edgetune.crypto import identity
from edgetune.crypto.keys import Registry, load_registry
from edgetune.federation import ERROR_PAYLOAD_BYTES, Failure, run_federation
from edgetune.flower import portable
from edgetune.flower.messages import MessageError, flower_bytes, from_content, to_content
from edgetune.runs import RunRecorder, format_row, new_run_name

HELLO = "query.hello"
BYE = "query.bye"
BYE_TIMEOUT_S = 20.0


def message_type(phase: str) -> str:
    """``train`` for the default phase, ``train.<phase>`` otherwise."""
    return "train" if phase == "train" else f"train.{phase}"


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """Node ids once ``expected`` nodes are connected (or, with ``expected`` 0, once the count has
    been stable for 3 s). Flower registers simulated nodes asynchronously, so sampling at once
    can miss some.
    """
    deadline = time.time() + timeout_s
    last: list[int] = []
    stable_since = time.time()
    while time.time() < deadline:
        ids = sorted(grid.get_node_ids())
        if ids != last:
            last, stable_since = ids, time.time()
        if expected and len(ids) >= expected:
            return ids
        if not expected and ids and time.time() - stable_since >= 3.0:
            return ids
        time.sleep(0.5)
    if expected:
        raise RuntimeError(f"only {len(last)} of {expected} sites connected within {timeout_s:.0f} s")
    if not last:
        raise RuntimeError(f"no site connected within {timeout_s:.0f} s")
    return last


def send_and_receive(grid: Grid, msgs: list[Message], timeout_s: float, window: int = 0) -> list[Message]:
    """``grid.send_and_receive`` with at most ``window`` messages in flight (0: all at once).

    With a window, the first ``window`` messages are pushed, and one more for each reply pulled,
    until every message has a reply or ``timeout_s`` has passed; messages still queued then are
    never sent. Why: Flower's simulation engine scans every stored message for every node several
    times a second, so N messages at once cost O(N^2) per scan (``run.in_flight``).
    """
    if window <= 0 or len(msgs) <= window:
        return list(grid.send_and_receive(msgs, timeout=timeout_s))
    queue = list(msgs)
    deadline = time.time() + timeout_s
    pending: set[str] = set()
    replies: list[Message] = []
    while True:
        room = window - len(pending)
        batch, queue = queue[:room], queue[room:]
        pending.update(grid.push_messages(batch) if batch else ())
        for reply in grid.pull_messages(list(pending)):
            if reply.metadata.reply_to_message_id in pending:
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        if not (queue or pending) or time.time() >= deadline:
            return replies
        if not queue or len(pending) == window:  # nothing to send until a reply comes
            time.sleep(0.05)


class FlowerTransport:
    """Delivers payloads with Flower's Grid (push, then pull until done) and records Flower's
    serialized sizes.

    An exchange closes when every site has answered, when ``quorum`` sites have answered and
    ``grace_s`` more seconds have passed, or at the deadline. Replies that arrive after their
    exchange closed are pulled later, reported as stale, and never applied.
    """

    def __init__(
        self,
        grid: Grid,
        ledger: ByteLedger,
        node_of: dict[str, int],
        max_reply_bytes: Callable[[str], int],
        *,
        quorum: int = 1,
        grace_s: float = 30.0,
        poll_s: float = 0.5,
        kit_root: str = "",
        registry: Registry | None = None,
        in_flight: int = 0,
        kits: Callable[[str], ConfigRecord] | None = None,
    ) -> None:
        self.grid = grid
        self.kits = kits
        self.in_flight = in_flight
        self.ledger = ledger
        self.node_of = node_of
        self.site_of = {n: s for s, n in node_of.items()}
        self.max_reply_bytes = max_reply_bytes
        self.quorum = quorum
        self.grace_s = grace_s
        self.poll_s = poll_s
        self._late: dict[str, tuple[int, str]] = {}  # message id -> (round, site) of closed exchanges
        self.kit_root = kit_root
        self.registry = registry
        self._refused: set[int] = set()

    def sites(self) -> list[str]:
        """Known sites; nodes that connected since the last round (a restarted SuperNode may get a
        new node id) are asked who they are first, and take over a site only by proving its key.
        """
        new = [n for n in self.grid.get_node_ids() if n not in self.site_of and n not in self._refused]
        if new and self.registry is not None:
            refused: set[int] = set()
            try:
                found = discover_sites(
                    self.grid,
                    new,
                    self.kit_root,
                    self.registry,
                    timeout_s=30.0,
                    refused=refused,
                    window=self.in_flight,
                    kits=self.kits,
                )
            except RuntimeError:
                found = {}
            self._refused |= refused  # a false claim is not asked again; a silent node is, next round
            for site, node in found.items():
                if site in self.node_of:
                    _log(f"site {site!r} moves from node {self.node_of[site]} to node {node} (proved its key)")
            for site, node in found.items():
                self.site_of.pop(self.node_of.get(site, -1), None)
                self.node_of[site] = node
                self.site_of[node] = site
        return sorted(self.node_of)

    def drain_stale(self) -> dict[str, str]:
        """Pull replies to exchanges that already closed; they are reported, never applied."""
        if not self._late:
            return {}
        out = {}
        for reply in self.grid.pull_messages(list(self._late)):
            round_idx, site = self._late.pop(reply.metadata.reply_to_message_id, (0, "?"))
            out[f"{site}@round-{round_idx}"] = "stale: replied after its round closed (ignored)"
        return out

    def exchange(
        self, round_idx: int, phase: str, blobs: dict[str, bytes], *, timeout_s: float
    ) -> dict[str, bytes | Failure]:
        """Send every site its blob and collect the replies (see the class docstring).

        With ``in_flight`` N > 0 at most N messages are out at a time (``run.in_flight``); the rest wait
        in site order and are sent as replies come in. A message's bytes are counted when it is sent;
        the quorum grace starts only once every message is out (a site not yet asked cannot be late);
        a site whose message was still waiting when the exchange closed gets a Failure saying so.
        """
        queue = list(blobs.items())
        deadline = time.time() + timeout_s
        site_of_msg: dict[str, str] = {}
        pending: set[str] = set()

        def send_more() -> None:
            nonlocal queue
            room = len(queue) if self.in_flight <= 0 else self.in_flight - len(pending)
            if room <= 0 or not queue:
                return
            batch, queue = queue[:room], queue[room:]
            msgs = []
            for site, blob in batch:
                # a message lives as long as its exchange: a site that comes back later must not work
                # through a backlog of rounds that already closed
                msg = Message(
                    to_content(blob),
                    dst_node_id=self.node_of[site],
                    message_type=message_type(phase),
                    group_id=f"round-{round_idx}",
                    ttl=max(deadline - time.time(), 60.0),
                )
                self.ledger.add(round_idx, phase, site, "down", flower_bytes(msg), kind="flower")
                msgs.append(msg)
            for msg_id, msg in zip(self.grid.push_messages(msgs), msgs, strict=True):
                site_of_msg[msg_id] = self.site_of[msg.metadata.dst_node_id]
                pending.add(msg_id)

        send_more()
        out: dict[str, bytes | Failure] = {}
        quorum_at: float | None = None
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                msg_id = reply.metadata.reply_to_message_id
                if msg_id not in pending:
                    continue  # at most one reply per (round, site)
                pending.discard(msg_id)
                out[site_of_msg[msg_id]] = self._unwrap(reply, round_idx, phase, site_of_msg[msg_id])
            now = time.time()
            if now < deadline:
                send_more()
            answered = sum(isinstance(v, bytes) for v in out.values())
            if quorum_at is None and answered >= self.quorum and not queue:
                quorum_at = now
            if not pending or now >= deadline or (quorum_at is not None and now - quorum_at >= self.grace_s):
                break
            # while sites still wait for their message, refill the window sooner than the usual poll
            time.sleep(min(self.poll_s, 0.05) if queue else self.poll_s)
        for msg_id in pending:
            site = site_of_msg[msg_id]
            self._late[msg_id] = (round_idx, site)
            waited = (
                "quorum grace" if quorum_at is not None and time.time() < deadline else f"{timeout_s:.0f} s deadline"
            )
            out[site] = Failure(f"no reply before the round closed ({waited})")
        for site, _blob in queue:
            out[site] = Failure(
                f"not sent: the round closed ({timeout_s:.0f} s deadline) before its turn (run.in_flight)"
            )
        return out

    def goodbye(self, timeout_s: float = BYE_TIMEOUT_S) -> list[str]:
        """Tell every site the run is over (``query.bye``), so a site started with ``edgetune site
        --leave-after-run`` disconnects instead of polling the SuperLink until someone stops it.

        Sent once, after the summary is written; waits at most ``timeout_s`` for acknowledgements and
        returns the sites that answered. A site that misses it stays connected (``--leave-after-idle``
        covers that). Its few hundred bytes cross the link after the run's ledger is closed: the link
        meter counts them, the payload ledger does not.
        """
        msgs = [
            Message(
                RecordDict({"bye": ConfigRecord({})}), dst_node_id=n, message_type=BYE, group_id="bye", ttl=timeout_s
            )
            for n in self.node_of.values()
        ]
        acked = []
        for reply in send_and_receive(self.grid, msgs, timeout_s, self.in_flight):
            site = self.site_of.get(reply.metadata.src_node_id)
            if site is not None and not reply.has_error():
                acked.append(site)
        return sorted(acked)

    def _unwrap(self, reply: Message, round_idx: int, phase: str, site: str) -> bytes | Failure:
        if reply.metadata.group_id != f"round-{round_idx}":
            return Failure(f"stale reply for {reply.metadata.group_id}")
        if reply.has_error():
            return Failure(f"ClientApp error {reply.error.code}: {reply.error.reason}")
        self.ledger.add(round_idx, phase, site, "up", flower_bytes(reply), kind="flower")
        try:
            # up to ERROR_PAYLOAD_BYTES here, so a site's error text (longer than an spsa reply) reaches
            # the round's decoding, which holds every non-error reply to the phase's own limit
            return from_content(reply.content, max_bytes=max(self.max_reply_bytes(phase), ERROR_PAYLOAD_BYTES))
        except MessageError as err:
            return Failure(str(err))


def _log(line: str) -> None:
    print(f"[edgetune] {line}", file=sys.stderr, flush=True)


def _hello(node: int, fields: dict[str, Any]) -> Message:
    return Message(
        RecordDict({"hello": ConfigRecord({**fields, "edgetune": code_version()})}),
        dst_node_id=node,
        message_type=HELLO,
        group_id="hello",
    )


def discover_sites(
    grid: Grid,
    node_ids: list[int],
    kit_root: str,
    registry: Registry,
    timeout_s: float,
    refused: set[int] | None = None,
    window: int = 0,
    kits: Callable[[str], ConfigRecord] | None = None,
) -> dict[str, int]:
    """Ask every node which site it is, and believe only the answers proved with that site's key.

    Each node gets a fresh challenge (``crypto/identity.py``) that only the holder of the claimed
    site's registered agreement key can answer. A claim of an unknown site, a missing or wrong
    proof, a malformed or failed answer: that node is left out with a log line, the others are
    mapped. Two nodes proving the same site (one kit started twice) do not stop the run either:
    the lowest node id keeps the site, the other is logged and left out. Raises only when no node
    proved a site at all. ``refused`` collects the nodes whose answer was a false or malformed claim.
    ``window``: at most this many questions in flight (``send_and_receive``; 0: all at once).

    ``kits`` (portable simulated sites, ``flower/portable.py``): a node that answers with a site
    but no proof is asked again with that site's kit (``kits(site)``) and a new challenge, and must
    prove the site with the kit it was handed.
    """
    refused = set() if refused is None else refused
    challenges = {n: identity.new_challenge() for n in node_ids}
    msgs = [_hello(n, {"kit_root": kit_root, "challenge": challenges[n][1]}) for n in node_ids]
    provers: dict[str, list[int]] = {}
    claims: dict[int, str] = {}

    def judge(replies: list[Message], asked: dict[int, tuple[Any, bytes]]) -> None:
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in asked:
                _log(f"hello answer from node {node}, which was not asked: ignored")
                continue
            if reply.has_error():
                _log(f"node {node} failed hello: {reply.error.reason}")
                continue
            try:
                answer = reply.content["hello"]
                site, proof = answer["site"], answer.get("proof")
            except (KeyError, TypeError, AttributeError):
                _log(f"node {node}: malformed hello answer: left out")
                refused.add(node)
                continue
            if not isinstance(site, str) or site not in registry.sites:
                _log(f"node {node} claims site {str(site)[:80]!r}, which has no registered key: left out")
                refused.add(node)
                continue
            if proof is None and kits is not None and node not in claims:
                claims[node] = site  # portable: hand it the kit of the site it claims, then check its proof
                continue
            secret, challenge = asked[node]
            if not identity.verify(secret, challenge, registry.sites[site], site, node, proof):
                _log(f"node {node} claims site {site!r} but cannot prove it with that site's key: left out")
                refused.add(node)
                continue
            provers.setdefault(site, []).append(node)

    judge(send_and_receive(grid, msgs, timeout_s, window), challenges)
    if claims and kits is not None:
        second = {n: identity.new_challenge() for n in claims}
        msgs = [
            _hello(n, {"challenge": second[n][1], **{f"kit_{k}": v for k, v in kits(claims[n]).items()}})
            for n in sorted(claims)
        ]
        judge(send_and_receive(grid, msgs, timeout_s, window), second)
    node_of: dict[str, int] = {}
    for site, nodes in sorted(provers.items()):
        node_of[site] = min(nodes)
        if len(nodes) > 1:
            others = ", ".join(str(n) for n in sorted(nodes)[1:])
            _log(
                f"nodes {sorted(nodes)} all prove site {site!r} (one kit started twice?): node {min(nodes)} "
                f"serves it, node(s) {others} left out"
            )
            refused.update(sorted(nodes)[1:])
    if not node_of:
        raise RuntimeError("no node proved a registered site in the hello query")
    return node_of


def run(grid: Grid, context: Context) -> dict[str, Any]:
    """ServerApp main: build from ``context.run_config`` and run the federation."""
    cfg = cfgmod.from_run_config(dict(context.run_config))
    run_dir = Path(cfg.run.dir).expanduser().resolve() / new_run_name(cfg)
    node_ids = wait_for_nodes(grid, cfg.run.num_sites, timeout_s=max(60.0, cfg.run.round_timeout_s))
    kit_root = str(keys_dir_for(cfg, run_dir) / "sites")
    kits = None
    if cfg.run.portable_sites:  # sites get their kit in the hello exchange, never a path on this disk
        sites_dir = Path(kit_root)
        kits = lambda site: portable.pack(sites_dir / site, only=portable.KIT_FILES)  # noqa: E731
        kit_root = ""
    # Keys must exist before any site looks for its kit: generate (simulation) before hello.
    from edgetune.build import ensure_sim_keys

    provisional = [f"site-{i}" for i in range(len(node_ids))]
    if not cfg.crypto.keys_dir:
        ensure_sim_keys(cfg, run_dir, provisional)
    registry = load_registry(keys_dir_for(cfg, run_dir))
    node_of = discover_sites(
        grid, node_ids, kit_root, registry, timeout_s=cfg.run.round_timeout_s, window=cfg.run.in_flight, kits=kits
    )
    site_ids = sorted(node_of)
    server, tokenizer, evaluate = build_server(cfg, run_dir, site_ids)
    recorder = RunRecorder(cfg, run_dir, on_row=lambda row: print("[edgetune] " + format_row(row), flush=True))
    print(f"[edgetune] run {run_dir.name}: {len(site_ids)} sites {site_ids}, writing {run_dir}", flush=True)
    transport = FlowerTransport(
        grid,
        recorder.ledger,
        node_of,
        server.max_reply_bytes,
        quorum=cfg.run.min_sites,
        grace_s=cfg.run.quorum_grace_s,
        kit_root=kit_root,
        registry=registry,
        in_flight=cfg.run.in_flight,
        kits=kits,
    )
    summary = run_federation(cfg, server, transport, recorder, evaluate, tokenizer)
    acked = transport.goodbye()
    print(f"[edgetune] run {run_dir.name} ended; told {len(acked)} of {len(site_ids)} sites", flush=True)
    return summary
