"""Key folder: layout, permissions, round trips, and error messages that name the file."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgetune.crypto import keys

SITES = ["site-a", "site-b"]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    keys.generate(out, SITES)
    return out


def test_generate_writes_layout_with_private_modes(key_dir: Path):
    """generate writes the documented files; private keys are 0600 in 0700 folders, no temp files left."""
    # Prepare / Execute: the fixture ran generate.
    # Assert
    assert mode(key_dir / "server") == 0o700
    assert mode(key_dir / "server" / "signing.key") == 0o600
    assert (key_dir / "server" / "signing.pub").is_file()
    assert (key_dir / "registry.json").is_file()
    for site_id in SITES:
        kit = keys.site_kit_dir(key_dir, site_id)
        assert kit == key_dir / "sites" / site_id
        assert mode(kit) == 0o700
        assert mode(kit / "agreement.key") == 0o600
        assert (kit / "server.pub").is_file()
        assert json.loads((kit / "site.json").read_text()) == {"site_id": site_id}
    assert not [p for p in key_dir.rglob("*") if p.name.endswith(".tmp")]


def test_loaded_keys_agree(key_dir: Path):
    """Server, registry and every kit load back the same public keys; kid = sha256(raw pub)[:8]."""
    # Execute
    server = keys.load_server(key_dir)
    registry = keys.load_registry(key_dir)
    kits = {s: keys.load_site(keys.site_kit_dir(key_dir, s)) for s in SITES}

    # Assert
    server_public = server.signing_key.public_key()
    assert server.kid == hashlib.sha256(server_public.public_bytes_raw()).digest()[:8]
    assert registry.server_public == server_public and registry.server_kid == server.kid
    assert sorted(registry.sites) == SITES
    for site_id, kit in kits.items():
        assert kit.site_id == site_id
        assert kit.server_public == server_public and kit.server_kid == server.kid
        assert registry.sites[site_id] == kit.agreement_key.public_key()


def test_registry_is_human_readable(key_dir: Path):
    """registry.json is indented JSON listing the kid and each site's base64 public key."""
    # Execute
    text = (key_dir / "registry.json").read_text()
    doc = json.loads(text)

    # Assert
    assert "\n  " in text
    assert doc["server_kid"] == keys.load_server(key_dir).kid.hex()
    assert sorted(doc["sites"]) == SITES


def test_generate_refuses_to_overwrite(key_dir: Path):
    """An existing key folder is never silently replaced; overwrite=True replaces it whole."""
    # Prepare
    before = (key_dir / "server" / "signing.key").read_bytes()

    # Execute / Assert: refused, untouched.
    with pytest.raises(ValueError, match="already holds keys"):
        keys.generate(key_dir, ["site-c"])
    assert (key_dir / "server" / "signing.key").read_bytes() == before

    # Execute / Assert: overwrite gives a new server key and drops the stale kits.
    keys.generate(key_dir, ["site-c"], overwrite=True)
    assert (key_dir / "server" / "signing.key").read_bytes() != before
    assert sorted(p.name for p in (key_dir / "sites").iterdir()) == ["site-c"]
    assert sorted(keys.load_registry(key_dir).sites) == ["site-c"]


@pytest.mark.parametrize("name", ["agreement.key", "server.pub", "site.json"])
def test_site_kit_missing_file_is_named(key_dir: Path, name: str):
    """A kit missing any file fails with a message naming that file and saying it is missing."""
    # Prepare
    kit = keys.site_kit_dir(key_dir, "site-a")
    (kit / name).unlink()

    # Execute / Assert
    with pytest.raises(ValueError, match="missing") as err:
        keys.load_site(kit)
    assert str(kit / name) in str(err.value)


def test_server_and_registry_missing_files_are_named(tmp_path: Path):
    """load_server and load_registry on an empty folder name the file they looked for."""
    # Execute / Assert
    with pytest.raises(ValueError, match="missing") as err:
        keys.load_server(tmp_path)
    assert str(tmp_path / "server" / "signing.key") in str(err.value)
    with pytest.raises(ValueError, match="missing") as err:
        keys.load_registry(tmp_path)
    assert str(tmp_path / "registry.json") in str(err.value)


def test_world_readable_private_key_is_refused(key_dir: Path):
    """Like ssh, a private key readable by group/others is refused with a chmod 600 hint."""
    # Prepare
    kit = keys.site_kit_dir(key_dir, "site-a")
    os.chmod(kit / "agreement.key", 0o644)
    os.chmod(key_dir / "server" / "signing.key", 0o640)

    # Execute / Assert
    with pytest.raises(ValueError, match="chmod 600") as err:
        keys.load_site(kit)
    assert "agreement.key" in str(err.value)
    with pytest.raises(ValueError, match="chmod 600"):
        keys.load_server(key_dir)


def test_wrong_key_type_and_garbage_are_named(key_dir: Path):
    """A key of the wrong type, or a file that is no key at all, is reported with its path."""
    # Prepare: an Ed25519 key where the X25519 agreement key belongs.
    kit = keys.site_kit_dir(key_dir, "site-a")
    path = kit / "agreement.key"
    ed = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(ed)

    # Execute / Assert
    with pytest.raises(ValueError, match="expected an X25519 private key") as err:
        keys.load_site(kit)
    assert str(path) in str(err.value)

    path.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="not an X25519 private key"):
        keys.load_site(kit)

    other = keys.site_kit_dir(key_dir, "site-b") / "server.pub"
    other.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError, match="not an Ed25519 public key") as err:
        keys.load_site(other.parent)
    assert str(other) in str(err.value)


def test_registry_errors_name_the_problem(key_dir: Path):
    """Unreadable JSON, duplicate site ids, a bad key and a kid mismatch are each reported."""
    # Prepare
    path = key_dir / "registry.json"
    doc = json.loads(path.read_text())
    pub = doc["sites"]["site-a"]
    cases = {
        "unreadable JSON": "{not json",
        "duplicate key 'site-a'": json.dumps({**doc, "sites": {"site-a": pub, "site-x": pub}}).replace(
            '"site-x"', '"site-a"'
        ),
        "share one public key": json.dumps({**doc, "sites": {"site-a": pub, "site-b": pub}}),
        "not base64": json.dumps({**doc, "sites": {"site-a": "***"}}),
        "decodes to 3 bytes": json.dumps({**doc, "sites": {"site-a": "AAAA"}}),
        "invalid site id": json.dumps({**doc, "sites": {"../x": pub}}),
        "server_kid": json.dumps({**doc, "server_kid": "00" * 8}),
        "format": json.dumps({**doc, "format": "v0"}),
    }
    for expected, text in cases.items():
        # Execute
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            keys.load_registry(key_dir)

        # Assert
        assert expected in str(err.value) and str(path) in str(err.value), (expected, err.value)


def test_add_sites_keeps_server_key(key_dir: Path):
    """add_sites enrols new kits, keeps the server key and the old kits, and lists all sites."""
    # Prepare
    signing_before = (key_dir / "server" / "signing.key").read_bytes()
    kit_before = (keys.site_kit_dir(key_dir, "site-a") / "agreement.key").read_bytes()

    # Execute
    keys.add_sites(key_dir, ["site-c"])

    # Assert
    assert (key_dir / "server" / "signing.key").read_bytes() == signing_before
    assert (keys.site_kit_dir(key_dir, "site-a") / "agreement.key").read_bytes() == kit_before
    registry = keys.load_registry(key_dir)
    assert sorted(registry.sites) == ["site-a", "site-b", "site-c"]
    new_kit = keys.load_site(keys.site_kit_dir(key_dir, "site-c"))
    assert new_kit.server_kid == keys.load_server(key_dir).kid
    assert registry.sites["site-c"] == new_kit.agreement_key.public_key()


def test_add_sites_rejects_enrolled_and_duplicate_ids(key_dir: Path):
    """Re-enrolling a site, or naming one twice, is refused before anything is written."""
    # Execute / Assert
    with pytest.raises(ValueError, match="already enrolled"):
        keys.add_sites(key_dir, ["site-a"])
    with pytest.raises(ValueError, match="duplicate"):
        keys.add_sites(key_dir, ["site-c", "site-c"])
    assert not keys.site_kit_dir(key_dir, "site-c").exists()


BAD_IDS = ["", ".", "..", "a/b", "a b", "x" * 65, "caf\u00e9", "a\n", "../etc", "a\\b"]


@pytest.mark.parametrize("site_id", BAD_IDS)
def test_invalid_site_ids_rejected(tmp_path: Path, site_id: str):
    """Site ids outside [A-Za-z0-9._-]{1,64} (and '.', '..') are rejected everywhere."""
    # Execute / Assert
    with pytest.raises(ValueError, match="invalid site id"):
        keys.valid_site_id(site_id)
    with pytest.raises(ValueError, match="invalid site id"):
        keys.generate(tmp_path / "k", ["ok", site_id])
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("site_id", ["a", "site-01", "Plant_3.line-2", "x" * 64])
def test_valid_site_ids_accepted(site_id: str):
    """Names from the allowed alphabet, 1 to 64 characters, pass unchanged."""
    assert keys.valid_site_id(site_id) == site_id


def test_generate_rejects_duplicate_ids(tmp_path: Path):
    """Two sites with one id would share a kit folder; generate refuses."""
    with pytest.raises(ValueError, match="duplicate"):
        keys.generate(tmp_path, ["a", "b", "a"])


# The X25519 points of small order (order 1, 2, 4, 8) and their non-canonical encodings (libsodium's
# blocklist in crypto_scalarmult/curve25519/ref10/x25519_ref10.c): every shared secret with them is zero.
SMALL_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


@pytest.mark.parametrize("point", SMALL_ORDER)
def test_small_order_site_key_is_refused_naming_the_site(key_dir: Path, point: str):
    """A registry entry with a low-order X25519 key (all zeros and the other small-order points) is refused
    when the registry is loaded, naming the file and the site, instead of failing later in a round."""
    import base64

    path = key_dir / "registry.json"
    doc = json.loads(path.read_text())
    doc["sites"]["site-b"] = base64.b64encode(bytes.fromhex(point)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"{path}: site 'site-b': .*small order"):
        keys.load_registry(key_dir)


def test_small_order_key_in_a_registry_object_is_refused():
    """Registry objects built in code get the same check."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    signing = Ed25519PrivateKey.generate()
    with pytest.raises(ValueError, match="site 'site-z'.*small order"):
        keys.Registry(
            signing.public_key(),
            keys.key_id(signing.public_key()),
            {"site-z": X25519PublicKey.from_public_bytes(bytes(32))},
        )
