"""TLS and Flower node-authentication material for a deployment (``edgetune certs``).

Layout under the federation's key folder (next to the seed-envelope keys of ``keys.py``)::

    tls/ca.crt, tls/ca.key            a private CA (ECDSA P-256, 10 years); ca.key stays offline
    tls/superlink.crt, superlink.key  the SuperLink's certificate (SANs: the given hosts/IPs)
    sites/<id>/ca.crt                 the CA, so the site can verify the SuperLink
    sites/<id>/node.key, node.pub     Flower SuperNode authentication key (ECDSA P-256, OpenSSH
                                      format, as ``flower-supernode --auth-supernode-private-key``
                                      expects); node.pub is registered with ``flwr supernode register``

Flower's node authentication signs a timestamp per request with the node key (notes/
flower_conventions.md section 3.4); it requires TLS. The seed-envelope keys are separate
(one key per purpose).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgetune.crypto.keys import site_kit_dir, valid_site_id
from edgetune.io import atomic_write_bytes

CA_DAYS = 3650
CERT_DAYS = 825


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgetune"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def tls_dir(out_dir: Path) -> Path:
    """Folder of the CA and the SuperLink certificate."""
    return Path(out_dir) / "tls"


def generate_tls(out_dir: Path, hosts: Sequence[str], *, overwrite: bool = False) -> None:
    """Create a CA and a SuperLink certificate valid for ``hosts`` (DNS names or IP addresses)."""
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or IP (--hosts)")
    folder = tls_dir(out_dir)
    if (folder / "ca.crt").exists() and not overwrite:
        raise ValueError(f"{folder} already holds a CA; pass --overwrite to replace it (sites must then get new kits)")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("edgetune CA"))
        .issuer_name(_name("edgetune CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    atomic_write_bytes(folder / "ca.key", _pem_key(ca_key), mode=0o600)
    atomic_write_bytes(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    atomic_write_bytes(folder / "superlink.key", _pem_key(key), mode=0o600)
    atomic_write_bytes(folder / "superlink.crt", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def generate_node_keys(out_dir: Path, site_ids: Sequence[str], *, overwrite: bool = False) -> None:
    """One Flower node-authentication key pair per site kit, plus a copy of the CA certificate."""
    ca = tls_dir(out_dir) / "ca.crt"
    if not ca.is_file():
        raise ValueError(f"no CA at {ca}: run `edgetune certs {out_dir} --hosts ...` first")
    for site in site_ids:
        kit = site_kit_dir(out_dir, valid_site_id(site))
        if not kit.is_dir():
            raise ValueError(f"no site kit {kit}: run `edgetune keys {out_dir} --sites {site}` first")
        if (kit / "node.key").exists() and not overwrite:
            raise ValueError(f"{kit / 'node.key'} exists; pass --overwrite to replace it")
        # P-256: Flower accepts any NIST curve; every request carries the node's public key and a
        # signature, and P-256's are ~110 B shorter than P-384's (128-bit security, as TLS's X25519)
        key = ec.generate_private_key(ec.SECP256R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic_write_bytes(kit / "node.key", private, mode=0o600)
        atomic_write_bytes(kit / "node.pub", public + b"\n", mode=0o644)
        atomic_write_bytes(kit / "ca.crt", ca.read_bytes(), mode=0o644)
