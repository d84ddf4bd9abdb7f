"""Node -> site binding: a node gets a site only by proving that site's registered key (query.hello).

The grid is a stand-in whose ``send_and_receive`` calls the real ClientApp handler (``client_handler.hello``)
for honest nodes and a lying one for attackers; the server side is the real ``discover_sites`` and
``FlowerTransport.sites``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edgetune.comm.ledger import ByteLedger
from edgetune.crypto import identity
from edgetune.crypto import keys as keymod
from edgetune.flower import client_handler
from edgetune.flower.server_loop import FlowerTransport, discover_sites

SITES = ["site-0", "site-1", "site-2"]


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture
def fed(tmp_path: Path):
    keymod.generate(tmp_path / "keys", SITES)
    return tmp_path / "keys" / "sites", keymod.load_registry(tmp_path / "keys")


def node(node_id: int, partition: int) -> Context:
    """A simulated node: it is site-<partition> and reads its kit under the kit root the server names."""
    return Context(1, node_id, {"partition-id": partition, "num-partitions": 3}, RecordDict(), {})


def impostor(kit_root: Path, own: str, claimed: str):
    """A registered insider (holding ``own``'s kit) that claims to be ``claimed``, proving with its own key."""

    def answer(msg: Message, context: Context) -> Message:
        mine = keymod.load_site(kit_root / own)
        fake = keymod.SiteKeys(claimed, mine.agreement_key, mine.server_public, mine.server_kid)
        proof = identity.prove(fake, msg.content["hello"]["challenge"], context.node_id)
        return Message(RecordDict({"hello": ConfigRecord({"site": claimed, "proof": proof})}), reply_to=msg)

    return answer


class HelloGrid:
    """Delivers hello queries to in-process nodes; ``answer`` maps a node id to its handler."""

    def __init__(self, contexts: dict[int, Context], answer: dict | None = None) -> None:
        self.contexts, self.answer = contexts, answer or {}

    def get_node_ids(self):
        return sorted(self.contexts)

    def send_and_receive(self, msgs, timeout=None):
        out = []
        for msg in msgs:
            n = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply = self.answer.get(n, client_handler.hello)(msg, self.contexts[n])
            reply.metadata.__dict__["_src_node_id"] = n
            out.append(reply)
        return out


def test_honest_nodes_are_mapped_by_their_proved_site(fed):
    kit_root, registry = fed
    grid = HelloGrid({100: node(100, 0), 101: node(101, 1), 102: node(102, 2)})
    assert discover_sites(grid, [100, 101, 102], str(kit_root), registry, 5.0) == {
        "site-0": 100,
        "site-1": 101,
        "site-2": 102,
    }


def test_node_ids_of_the_full_unsigned_64_bit_range_prove_their_site(fed):
    """Flower's node ids are unsigned 64-bit (a deployment handed out 16071490535582024778): every
    node of that range proves its site; an id outside it proves nothing instead of crashing."""
    kit_root, registry = fed
    ids = [16071490535582024778, (1 << 64) - 1, 1 << 63]
    grid = HelloGrid({n: node(n, i) for i, n in enumerate(ids)})
    assert discover_sites(grid, ids, str(kit_root), registry, 5.0) == {f"site-{i}": n for i, n in enumerate(ids)}
    secret, challenge = identity.new_challenge()
    other = X25519PrivateKey.generate().public_key()
    proof = bytes(identity.PROOF_BYTES)
    assert not identity.verify(secret, challenge, other, "site-0", 1 << 64, proof)
    assert not identity.verify(secret, challenge, other, "site-0", -1, proof)


def test_an_insider_claiming_another_site_is_left_out_with_a_log_line(fed, capsys):
    """Node 103 holds site-1's kit and claims site-0: it cannot prove site-0's key, so it is refused (a log
    line says why) and site-0 stays with its own node; the round is not aborted."""
    kit_root, registry = fed
    contexts = {100: node(100, 0), 101: node(101, 1), 103: node(103, 1)}
    grid = HelloGrid(contexts, {103: impostor(kit_root, "site-1", "site-0")})
    refused: set[int] = set()
    found = discover_sites(grid, [100, 101, 103], str(kit_root), registry, 5.0, refused=refused)
    assert found == {"site-0": 100, "site-1": 101} and refused == {103}
    assert "node 103 claims site 'site-0' but cannot prove it" in capsys.readouterr().err


def test_two_nodes_with_one_kit_at_start_up_do_not_abort_the_run(fed, capsys):
    """site-2's kit started on two nodes: both prove it; the lower node id serves it, the other is logged and
    left out, and the other sites are mapped as usual (this raised and stopped the run before)."""
    kit_root, registry = fed
    grid = HelloGrid({100: node(100, 0), 102: node(102, 2), 107: node(107, 2)})
    found = discover_sites(grid, [100, 102, 107], str(kit_root), registry, 5.0)
    assert found == {"site-0": 100, "site-2": 102}
    assert "all prove site 'site-2'" in capsys.readouterr().err


def test_unknown_site_and_missing_proof_are_refused(fed, capsys):
    kit_root, registry = fed

    def claim(site, proof):
        def answer(msg, context):
            fields = {"site": site, **({"proof": proof} if proof is not None else {})}
            return Message(RecordDict({"hello": ConfigRecord(fields)}), reply_to=msg)

        return answer

    contexts = {100: node(100, 0), 104: node(104, 1), 105: node(105, 1), 106: node(106, 1)}
    grid = HelloGrid(contexts, {104: claim("site-9", b"x" * 32), 105: claim("site-1", None), 106: claim("site-1", 7)})
    assert discover_sites(grid, sorted(contexts), str(kit_root), registry, 5.0) == {"site-0": 100}
    err = capsys.readouterr().err
    assert "site 'site-9', which has no registered key" in err and "node 105 claims site 'site-1'" in err
    with pytest.raises(RuntimeError, match="no node proved"):
        discover_sites(HelloGrid({104: contexts[104]}, grid.answer), [104], str(kit_root), registry, 5.0)


def test_a_new_node_mid_run_takes_over_a_site_only_with_its_key(fed):
    """Mid-run, an unknown node claiming site-0 with another kit is not remapped (and not asked again); a
    restarted site-0 (new node id, its own kit) is."""
    kit_root, registry = fed
    contexts = {100: node(100, 0), 101: node(101, 1)}
    grid = HelloGrid(contexts)
    transport = FlowerTransport(
        grid, ByteLedger(), {"site-0": 100, "site-1": 101}, lambda p: 1 << 16, kit_root=str(kit_root), registry=registry
    )
    contexts[110] = node(110, 1)
    grid.answer[110] = impostor(kit_root, "site-1", "site-0")
    assert transport.sites() == ["site-0", "site-1"] and transport.node_of["site-0"] == 100
    assert 110 in transport._refused
    contexts[120] = node(120, 0)  # site-0's SuperNode restarted under a new node id
    transport.sites()
    assert transport.node_of == {"site-0": 120, "site-1": 101}
