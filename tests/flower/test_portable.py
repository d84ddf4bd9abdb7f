"""Portable simulated sites (flower/portable.py): kits handed over at hello, state carried in the Context."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edgetune.bundle import code_version
from edgetune.crypto import keys as keymod
from edgetune.flower import client_handler, portable
from edgetune.flower.server_loop import discover_sites

SITES = ["site-0", "site-1", "site-2"]


class HelloGrid:
    """Delivers hello queries to in-process nodes through the real ClientApp handler."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts

    def send_and_receive(self, msgs, timeout=None):
        out = []
        for msg in msgs:
            n = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply = client_handler.hello(msg, self.contexts[n])
            reply.metadata.__dict__["_src_node_id"] = n
            out.append(reply)
        return out


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def test_pack_and_restore_round_trip_a_nested_folder_and_empty_the_target_first(tmp_path):
    src = tmp_path / "src"
    (src / "run" / "spsa").mkdir(parents=True)
    (src / "run" / "spsa" / "replica.json").write_bytes(b'{"applied": 3}')
    (src / "top.bin").write_bytes(bytes(range(256)))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.bin").write_bytes(b"from an earlier message")
    portable.restore(portable.pack(src), dst)
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "run/spsa/replica.json",
        "top.bin",
    ]
    assert (dst / "top.bin").read_bytes() == bytes(range(256))
    portable.restore(None, dst)  # a Context without state: an empty folder
    assert not any(dst.iterdir())


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../b", "", "a\\b", "./x", "a//b"])
def test_restore_refuses_entries_outside_the_folder_and_writes_nothing(tmp_path, name):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "kept").write_bytes(b"old")
    with pytest.raises(ValueError, match="plain relative path"):
        portable.restore(ConfigRecord({"names": [name], "files": [b"x"]}), dst)
    assert (dst / "kept").read_bytes() == b"old"


def test_restore_refuses_malformed_records(tmp_path):
    with pytest.raises(ValueError, match="pair up"):
        portable.restore(ConfigRecord({"names": ["a", "b"], "files": [b"x"]}), tmp_path / "d")
    with pytest.raises(ValueError, match="list of strings"):
        portable.record([1], [b"x"])
    with pytest.raises(ValueError, match="byte strings"):
        portable.record(["a"], ["not bytes"])
    with pytest.raises(ValueError, match="holds exactly"):
        portable.restore(
            ConfigRecord({"names": ["site.json"], "files": [b"{}"]}), tmp_path / "k", only=portable.KIT_FILES
        )


def _node(node_id: int, partition: int, portable_sites: bool = True, **node_config) -> Context:
    run_config = {"run.portable_sites": portable_sites}
    return Context(
        1, node_id, {"partition-id": partition, "num-partitions": 3, **node_config}, RecordDict(), run_config
    )


@pytest.fixture
def fed(tmp_path: Path):
    keymod.generate(tmp_path / "keys", SITES)
    sites = tmp_path / "keys" / "sites"
    return sites, keymod.load_registry(tmp_path / "keys"), lambda s: portable.pack(sites / s, only=portable.KIT_FILES)


def test_portable_nodes_get_their_kit_in_the_hello_exchange_and_prove_with_it(fed):
    _, registry, kits = fed
    contexts = {100: _node(100, 0), 101: _node(101, 1), 102: _node(102, 2)}
    # no kit root: a site could not read the server's disk even if it tried
    assert discover_sites(HelloGrid(contexts), sorted(contexts), "", registry, 5.0, kits=kits) == {
        "site-0": 100,
        "site-1": 101,
        "site-2": 102,
    }
    for n, ctx in contexts.items():  # each node holds only its own kit, in its Context
        folder = portable.kit_folder(ctx, f"site-{n - 100}")
        assert keymod.load_site(folder).site_id == f"site-{n - 100}"


def test_without_kits_a_portable_node_without_a_kit_is_left_out(fed):
    _, registry, _ = fed
    with pytest.raises(RuntimeError, match="no node proved"):
        discover_sites(HelloGrid({100: _node(100, 0)}), [100], "", registry, 5.0)


@pytest.mark.parametrize(
    "ctx",
    [_node(100, 0, portable_sites=False), _node(100, 0, **{"site-id": "site-0", "kit-dir": "/somewhere"})],
    ids=["not-portable", "deployed"],
)
def test_a_site_that_is_not_portable_refuses_a_kit_from_the_server(fed, ctx):
    _, _, kits = fed
    kit = kits("site-0")
    fields = {"kit_names": list(kit["names"]), "kit_files": list(kit["files"]), "edgetune": code_version()}
    msg = Message(RecordDict({"hello": ConfigRecord(fields)}), dst_node_id=100, message_type="query.hello")
    with pytest.raises(ValueError, match="refuses"):
        client_handler.hello(msg, ctx)
    assert portable.KIT_KEY not in ctx.state


def test_a_kit_that_was_never_handed_over_is_a_clear_error():
    with pytest.raises(ValueError, match="hello exchange"):
        portable.kit_folder(_node(100, 0), "site-0")


def test_site_state_survives_a_move_to_another_process_only_through_the_context(tmp_path, monkeypatch):
    ctx = _node(100, 0)
    folder = portable.load_state(ctx, "site-0")
    (folder / "run").mkdir()
    (folder / "run" / "dppf-000001.safetensors").write_bytes(b"x_i after round 1")
    portable.save_state(ctx, "site-0")
    monkeypatch.setattr(portable, "_ROOT", [])  # another actor process: its own empty private folder
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    moved = portable.load_state(ctx, "site-0")
    assert moved != folder and str(moved).startswith(str(tmp_path))
    assert (moved / "run" / "dppf-000001.safetensors").read_bytes() == b"x_i after round 1"
