"""Which Flower node is which site: a challenge that only the site's registered key can answer.

Flower authenticates nodes to the SuperLink, not as sites: node ids change when a SuperNode restarts,
and a node's claim "I am site-3" is just a string. The server therefore sends every node it maps (at
start-up and whenever an unknown node appears) a fresh challenge in the ``query.hello`` message, and
accepts a claim only with a proof made from the claimed site's agreement key, the one in the registry::

    challenge = epk(32) | nonce(16)                       e: fresh X25519 key of the server, per node
    shared    = X25519(site_private, epk) = X25519(e, site_public)
    key       = HKDF-SHA256(shared, info = "edgetune-hello-v1|" | nonce | site_tag | node_id(8))
    proof     = HMAC-SHA256(key, "edgetune-hello-proof|" | challenge)

A registered insider cannot take over another site's slot (it lacks that site's key), a relayed proof
is bound to the node it was made for, and an old proof does not answer a new challenge.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgetune.crypto.keys import SiteKeys, valid_site_id

CHALLENGE_BYTES = 32 + 16
PROOF_BYTES = 32
_LABEL = b"edgetune-hello-v1|"
_PROOF_LABEL = b"edgetune-hello-proof|"


def new_challenge() -> tuple[X25519PrivateKey, bytes]:
    """A fresh (server secret, challenge bytes) pair for one node."""
    secret = X25519PrivateKey.generate()
    return secret, secret.public_key().public_bytes_raw() + os.urandom(16)


def _proof(shared: bytes, challenge: bytes, site_id: str, node_id: int) -> bytes:
    tag = hashlib.sha256(b"edgetune-site|" + valid_site_id(site_id).encode()).digest()[:16]
    info = _LABEL + challenge[32:] + tag + struct.pack(">Q", node_id)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    return hmac.new(key, _PROOF_LABEL + challenge, hashlib.sha256).digest()


def prove(site: SiteKeys, challenge: bytes, node_id: int) -> bytes:
    """The site's answer to ``challenge`` as node ``node_id``.

    Parameters
    ----------
    site
        The site's own keys (its agreement key never leaves it).
    challenge
        The bytes the server sent (``CHALLENGE_BYTES``).
    node_id
        This node's Flower node id.

    Returns
    -------
    bytes
        ``PROOF_BYTES`` bytes.
    """
    if not isinstance(challenge, bytes) or len(challenge) != CHALLENGE_BYTES:
        raise ValueError(f"hello challenge must be {CHALLENGE_BYTES} bytes")
    try:
        shared = site.agreement_key.exchange(X25519PublicKey.from_public_bytes(challenge[:32]))
    except ValueError:
        raise ValueError("hello challenge carries an invalid key") from None
    return _proof(shared, challenge, site.site_id, node_id)


def verify(
    secret: X25519PrivateKey, challenge: bytes, site_public: X25519PublicKey, site_id: str, node_id: int, proof: object
) -> bool:
    """True if ``proof`` answers ``challenge`` with the key registered for ``site_id``, as node ``node_id``.

    Parameters
    ----------
    secret
        The server's half of the challenge (``new_challenge``).
    challenge
        What was sent to the node.
    site_public
        The claimed site's agreement key, from the registry.
    site_id
        The claimed site.
    node_id
        The node the answer came from.
    proof
        The node's answer (untrusted: any type).
    """
    if not isinstance(proof, bytes) or len(proof) != PROOF_BYTES:
        return False
    try:
        expected = _proof(secret.exchange(site_public), challenge, site_id, node_id)
    except (ValueError, struct.error):  # node ids are unsigned 64-bit; anything else proves nothing
        return False
    return hmac.compare_digest(expected, proof)
