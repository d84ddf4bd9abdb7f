"""Key material of one federation: the server's signing key, a registry, one kit per site.

``edgetune keys`` writes this folder once, offline, on the server side (security.md section 3.2,
modelled on FLARE's startup kits)::

    out_dir/
      server/signing.key         Ed25519 private key, PEM PKCS8, mode 0600 (stays on the server)
      server/signing.pub         its public key, PEM SubjectPublicKeyInfo
      registry.json              server public key + kid, {site_id: raw X25519 public key, base64}
      sites/<site_id>/           the "site kit", copied to that site and nowhere else
        agreement.key            X25519 private key, PEM PKCS8, mode 0600
        server.pub               the pinned server public key
        site.json                {"site_id": ...}

One key per purpose: the X25519 agreement key opens seed envelopes; it is not Flower's
node-authentication key. ``kid = sha256(raw Ed25519 public key)[:8]`` names the server key, so a
site can tell "signed by a key I do not pin" (rotation, wrong federation) from "forged".

Every loader raises ``ValueError`` naming the file and what is wrong with it, so that an
operator can fix a deployment from the message alone. Private keys that group or others can
read are refused, as ssh does. ``keyfiles.py`` reads and writes the single files.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from edgetune.crypto import keyfiles

REGISTRY_FORMAT = "edgetune-keys-v1"
"""Value of ``registry.json``'s ``format`` field; bump it when the layout changes."""

KID_BYTES = 8

_SITE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def valid_site_id(site_id: str) -> str:
    """Return ``site_id`` if it is a safe site name, else raise ``ValueError``.

    Parameters
    ----------
    site_id
        1 to 64 characters from ``[A-Za-z0-9._-]``, and neither ``.`` nor ``..``.

    Returns
    -------
    str
        ``site_id`` unchanged.
    """
    # Site ids become directory names under sites/: "." and ".." would escape it.
    if not isinstance(site_id, str) or not _SITE_ID_RE.fullmatch(site_id) or site_id in {".", ".."}:
        raise ValueError(f"invalid site id {site_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ - (not '.' or '..')")
    return site_id


def key_id(public: Ed25519PublicKey) -> bytes:
    """``sha256(raw public key)[:8]``: the ``kid`` that names a server signing key."""
    return hashlib.sha256(public.public_bytes_raw()).digest()[:KID_BYTES]


@dataclass(frozen=True)
class ServerKeys:
    """The server's signing key; only the server process holds it."""

    signing_key: Ed25519PrivateKey
    kid: bytes

    def __post_init__(self) -> None:
        if self.kid != key_id(self.signing_key.public_key()):
            raise ValueError("ServerKeys: kid does not match the signing key")


@dataclass(frozen=True)
class SiteKeys:
    """What one site holds: its agreement key and the server key it pins."""

    site_id: str
    agreement_key: X25519PrivateKey
    server_public: Ed25519PublicKey
    server_kid: bytes

    def __post_init__(self) -> None:
        valid_site_id(self.site_id)
        if self.server_kid != key_id(self.server_public):
            raise ValueError("SiteKeys: server_kid does not match server_public")


@dataclass(frozen=True)
class Registry:
    """Public half of the federation: what the server needs to seal envelopes for each site."""

    server_public: Ed25519PublicKey
    server_kid: bytes
    sites: dict[str, X25519PublicKey]
    """site_id -> public agreement key."""

    def __post_init__(self) -> None:
        if self.server_kid != key_id(self.server_public):
            raise ValueError("Registry: server_kid does not match server_public")
        for site_id, public in self.sites.items():
            valid_site_id(site_id)
            check_agreement_key(public, f"Registry: site {site_id!r}")


_PROBE = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"edgetune-x25519-probe").digest())


def check_agreement_key(public: X25519PublicKey, where: str) -> None:
    """Refuse a small-order X25519 public key (all zeros and the other points of order 1, 2, 4, 8).

    Every shared secret with such a key is all zeros, whatever the other side's private key (the
    clamped scalar is a multiple of 8): sealing for it fails, and a key that worked would protect
    nothing. ``cryptography`` raises on the all-zero result, so one exchange finds them all.

    Parameters
    ----------
    public
        A site's agreement public key.
    where
        Names the key in the error (file and site).
    """
    try:
        _PROBE.exchange(public)
    except ValueError:
        raise ValueError(
            f"{where}: the X25519 public key {public.public_bytes_raw().hex()} has small order (every shared "
            "secret would be zero); re-enrol the site with `edgetune keys DIR --add SITE`"
        ) from None


def site_kit_dir(out_dir: Path, site_id: str) -> Path:
    """Folder of the kit for ``site_id`` under a key folder ``out_dir``."""
    return Path(out_dir) / "sites" / valid_site_id(site_id)


# ---------------------------------------------------------------------------------------------
# Writing


def generate(out_dir: Path, site_ids: Sequence[str], *, overwrite: bool = False) -> None:
    """Create a new federation's keys: a server signing key, one kit per site, the registry.

    Parameters
    ----------
    out_dir
        Key folder; created if missing.
    site_ids
        Sites to enrol (more can be added later with ``add_sites``).
    overwrite
        Replace existing keys. This deletes ``server/``, ``sites/`` and ``registry.json`` under
        ``out_dir`` (only those), so every old kit stops working.

    Raises
    ------
    ValueError
        On invalid or duplicate site ids, or if ``out_dir`` already holds keys and
        ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    ids = _new_site_ids(site_ids, existing=())
    owned = [out_dir / "server", out_dir / "sites", out_dir / "registry.json"]
    present = [p for p in owned if p.exists() or p.is_symlink()]
    if present and not overwrite:
        raise ValueError(
            f"{out_dir}: already holds keys ({', '.join(p.name for p in present)}); "
            "pass overwrite=True to replace them (old site kits then stop working)"
        )
    for path in present:
        # Stale kits left next to a new server key would pin a key nobody signs with.
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    out_dir.mkdir(parents=True, exist_ok=True)
    signing_key = Ed25519PrivateKey.generate()
    server_public = signing_key.public_key()
    server_dir = out_dir / "server"
    keyfiles.make_private_dir(server_dir)
    keyfiles.write_atomic(server_dir / "signing.key", keyfiles.private_pem(signing_key), mode=0o600)
    keyfiles.write_atomic(server_dir / "signing.pub", keyfiles.public_pem(server_public), mode=0o644)

    sites = {site_id: _write_site_kit(out_dir, site_id, server_public) for site_id in ids}
    # The registry is written last: a crash part-way leaves no registry listing a missing kit.
    _write_registry(out_dir, Registry(server_public, key_id(server_public), sites))


def add_sites(out_dir: Path, site_ids: Sequence[str]) -> None:
    """Enrol more sites in an existing federation; the server key is left untouched.

    Parameters
    ----------
    out_dir
        Key folder written by ``generate``.
    site_ids
        New sites; none may be in the registry already or have a kit folder.

    Raises
    ------
    ValueError
        On invalid, duplicate or already enrolled site ids, or an unreadable registry.
    """
    out_dir = Path(out_dir)
    registry = load_registry(out_dir)
    ids = _new_site_ids(site_ids, existing=registry.sites)
    for site_id in ids:
        kit = site_kit_dir(out_dir, site_id)
        if kit.exists():
            # Left by an interrupted run, or hand-made: never overwrite a key someone may hold.
            raise ValueError(f"{kit}: exists but {site_id!r} is not in the registry; remove it first")
    sites = dict(registry.sites)
    for site_id in ids:
        sites[site_id] = _write_site_kit(out_dir, site_id, registry.server_public)
    _write_registry(out_dir, Registry(registry.server_public, registry.server_kid, sites))


def _new_site_ids(site_ids: Sequence[str], *, existing: Container[str]) -> list[str]:
    if isinstance(site_ids, str):
        raise ValueError(f"site_ids must be a sequence of ids, got the string {site_ids!r}")
    ids = [valid_site_id(s) for s in site_ids]
    seen: set[str] = set()
    for site_id in ids:
        if site_id in seen:
            raise ValueError(f"duplicate site id {site_id!r}")
        if site_id in existing:
            raise ValueError(f"site {site_id!r} is already enrolled")
        seen.add(site_id)
    return ids


def _write_site_kit(out_dir: Path, site_id: str, server_public: Ed25519PublicKey) -> X25519PublicKey:
    agreement_key = X25519PrivateKey.generate()
    kit = site_kit_dir(out_dir, site_id)
    keyfiles.make_private_dir(kit.parent)
    keyfiles.make_private_dir(kit)
    keyfiles.write_atomic(kit / "agreement.key", keyfiles.private_pem(agreement_key), mode=0o600)
    keyfiles.write_atomic(kit / "server.pub", keyfiles.public_pem(server_public), mode=0o644)
    keyfiles.write_atomic(kit / "site.json", keyfiles.json_bytes({"site_id": site_id}), mode=0o644)
    return agreement_key.public_key()


def _write_registry(out_dir: Path, registry: Registry) -> None:
    doc = {
        "format": REGISTRY_FORMAT,
        "server_public_key": keyfiles.b64(registry.server_public.public_bytes_raw()),
        "server_kid": registry.server_kid.hex(),
        "sites": {s: keyfiles.b64(pub.public_bytes_raw()) for s, pub in sorted(registry.sites.items())},
    }
    keyfiles.write_atomic(out_dir / "registry.json", keyfiles.json_bytes(doc), mode=0o644)


# ---------------------------------------------------------------------------------------------
# Loading


def load_server(out_dir: Path) -> ServerKeys:
    """Load the server's signing key from ``out_dir/server/``.

    Parameters
    ----------
    out_dir
        Key folder written by ``generate``.

    Returns
    -------
    ServerKeys
        The signing key and its ``kid``.

    Raises
    ------
    ValueError
        If ``signing.key`` is missing, readable by group/others, or not an Ed25519 private key,
        or if ``signing.pub`` exists and holds another key.
    """
    server_dir = Path(out_dir) / "server"
    key_path = server_dir / "signing.key"
    signing_key = keyfiles.load_private(key_path, Ed25519PrivateKey, "an Ed25519 private key")
    pub_path = server_dir / "signing.pub"
    if pub_path.exists():
        public = keyfiles.load_public(pub_path, Ed25519PublicKey, "an Ed25519 public key")
        if public.public_bytes_raw() != signing_key.public_key().public_bytes_raw():
            raise ValueError(f"{pub_path}: does not match {key_path} (key folders mixed up?)")
    return ServerKeys(signing_key, key_id(signing_key.public_key()))


def load_registry(out_dir: Path) -> Registry:
    """Load ``out_dir/registry.json``.

    Parameters
    ----------
    out_dir
        Key folder written by ``generate``.

    Returns
    -------
    Registry
        The server public key and kid, and every enrolled site's agreement public key.

    Raises
    ------
    ValueError
        If the file is missing or unreadable, is not valid JSON, has duplicate keys or site
        ids, a bad site id, a malformed key, a kid that does not match the server key, or two
        sites sharing one agreement key.
    """
    path = Path(out_dir) / "registry.json"
    doc = keyfiles.load_json(path)
    if doc.get("format") != REGISTRY_FORMAT:
        raise ValueError(f"{path}: format is {doc.get('format')!r}, expected {REGISTRY_FORMAT!r}")
    raw = keyfiles.b64_field(path, doc, "server_public_key", 32)
    server_public = Ed25519PublicKey.from_public_bytes(raw)
    kid_hex = doc.get("server_kid")
    if not isinstance(kid_hex, str) or kid_hex != key_id(server_public).hex():
        raise ValueError(f"{path}: server_kid {kid_hex!r} does not match server_public_key")
    entries = doc.get("sites")
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: 'sites' must be an object {{site_id: base64 public key}}")
    sites: dict[str, X25519PublicKey] = {}
    owner: dict[bytes, str] = {}
    for site_id in entries:
        try:
            valid_site_id(site_id)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        site_raw = keyfiles.b64_field(path, entries, site_id, 32)
        # A shared agreement key would let one site open another's envelopes.
        if site_raw in owner:
            raise ValueError(f"{path}: sites {owner[site_raw]!r} and {site_id!r} share one public key")
        owner[site_raw] = site_id
        sites[site_id] = X25519PublicKey.from_public_bytes(site_raw)
        check_agreement_key(sites[site_id], f"{path}: site {site_id!r}")
    return Registry(server_public, key_id(server_public), sites)


def load_site(site_dir: Path) -> SiteKeys:
    """Load a site kit (``out_dir/sites/<site_id>``, or wherever the site copied it).

    Parameters
    ----------
    site_dir
        Folder holding ``agreement.key``, ``server.pub`` and ``site.json``. Its name need not
        be the site id: ``site.json`` is authoritative.

    Returns
    -------
    SiteKeys
        The site id, its agreement key, and the pinned server key with its kid.

    Raises
    ------
    ValueError
        If a file is missing or unreadable, the private key is readable by group/others, a key
        has the wrong type, or ``site.json`` is malformed.
    """
    site_dir = Path(site_dir)
    json_path = site_dir / "site.json"
    doc = keyfiles.load_json(json_path)
    site_id = doc.get("site_id")
    if not isinstance(site_id, str):
        raise ValueError(f"{json_path}: 'site_id' is missing or not a string")
    try:
        valid_site_id(site_id)
    except ValueError as e:
        raise ValueError(f"{json_path}: {e}") from None
    agreement_key = keyfiles.load_private(site_dir / "agreement.key", X25519PrivateKey, "an X25519 private key")
    server_public = keyfiles.load_public(site_dir / "server.pub", Ed25519PublicKey, "an Ed25519 public key")
    return SiteKeys(site_id, agreement_key, server_public, key_id(server_public))
