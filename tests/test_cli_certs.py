"""`edgetune keys` / `edgetune certs` as an operator runs them, including adding a site later."""

from __future__ import annotations

from typer.testing import CliRunner

from edgetune.cli import app

runner = CliRunner()


def _ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # rich wraps long lines at spaces


def test_adding_a_site_keeps_the_ca_and_existing_node_keys(tmp_path):
    """keys --add then certs again: the new kit gets a node key; the CA and old node keys are unchanged."""
    # Prepare
    fed = tmp_path / "fed"
    _ok("keys", str(fed), "--sites", "plant-a,plant-b")
    _ok("certs", str(fed), "--hosts", "localhost")
    before = {p: (fed / p).read_bytes() for p in ("tls/ca.crt", "tls/superlink.crt", "sites/plant-a/node.key")}

    # Execute
    _ok("keys", str(fed), "--sites", "plant-c", "--add")
    out = _ok("certs", str(fed), "--hosts", "localhost")

    # Assert
    assert {p: (fed / p).read_bytes() for p in before} == before
    kit = fed / "sites" / "plant-c"
    assert (kit / "node.key").stat().st_mode & 0o777 == 0o600
    assert (kit / "ca.crt").read_bytes() == before["tls/ca.crt"]
    assert "plant-c (new node key" in out and "plant-a (node key kept" in out


def test_certs_overwrite_replaces_the_ca_and_every_node_key(tmp_path):
    """--overwrite issues a new CA and new node keys for every kit."""
    fed = tmp_path / "fed"
    _ok("keys", str(fed), "--sites", "plant-a")
    _ok("certs", str(fed), "--hosts", "localhost")
    ca, node = (fed / "tls/ca.crt").read_bytes(), (fed / "sites/plant-a/node.key").read_bytes()

    _ok("certs", str(fed), "--hosts", "localhost", "--overwrite")

    assert (fed / "tls/ca.crt").read_bytes() != ca
    assert (fed / "sites/plant-a/node.key").read_bytes() != node


def test_certs_without_keys_says_to_run_keys_first(tmp_path):
    """certs before keys: a clear error and exit 1, nothing written."""
    result = runner.invoke(app, ["certs", str(tmp_path / "nope"), "--hosts", "localhost"])
    assert result.exit_code == 1
    assert "no site registry" in " ".join(result.output.split())
    assert not (tmp_path / "nope").exists()
