"""Seed envelopes: the server seals each round's 32-byte secret for each site (security.md 3.3-3.4).

Server -> site, one envelope per (round, site)::

    header = ver(1)=2 | suite(1)=1 | kid(8) | run_id(16) | round(8) | site_tag(16) | epk(32)
             | commit(32) | not_after(8) | nonce(12)                  (134 bytes, big-endian)
    shared = X25519(e, site_pub)                                       e: fresh per envelope
    k      = HKDF-SHA256(shared, salt = run_id | round,
                         info = "edgetune-seed-v1|s2c|" | run_id | round | site_tag | epk | site_pub)
    rk     = reply_key(server, run_id, round, site)                   this site's reply key
    ct     = ChaCha20Poly1305(k).encrypt(nonce, secret | rk | extra, aad = header)
    sig    = Ed25519(server, "edgetune-sig-v1" | header | ct)
    envelope = header | ct | sig

``site_tag = sha256("edgetune-site|" | site_id)[:16]`` and ``commit = sha256("edgetune-commit|" |
secret)``. Every field has a fixed width, so the concatenations are unambiguous. Each key ``k``
is used once (``e`` is fresh), so a random nonce cannot collide under it.

The site checks, cheapest and most telling first: size, version, kid, signature, run, site,
round rules (replay guard), expiry, decryption, commitment. Everything before the signature
is untrusted; everything after it was written by the pinned server, so a rejection there is a
protocol event worth logging (``EnvelopeError.reason``), not line noise.

Replies (site -> server) are sealed under the site's own reply key ``rk``, which reaches only that
site, inside its envelope: a reply proves "this site" (or the server), not "some participant of the
round" as a key derived from the shared round secret would. The server derives ``rk`` again from its
signing key when a reply arrives (``reply_key``), so it stores nothing and a resend after a crash
uses the same key.

Functions here are pure: no file I/O, no clock, no global state. The caller persists
``ReplayGuard.to_bytes()`` atomically *before* using the secret, and the server must keep the
sealed envelope bytes (not only the secret) to resend them after a crash: a re-sealed envelope
is a different envelope and sites reject it as equivocation.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgetune.crypto.guardfile import ReplayGuard
from edgetune.crypto.keys import ServerKeys, SiteKeys, valid_site_id

VERSION = 2
"""2: the plaintext carries the site's reply key after the secret (1 had none; sites refuse 1)."""
SUITE = 1
"""X25519 + HKDF-SHA256 + ChaCha20-Poly1305 + Ed25519; the only suite so far."""

SECRET_BYTES = 32
REPLY_KEY_BYTES = 32
RUN_ID_BYTES = 16
MAX_EXTRA_BYTES = 64 * 1024
CLOCK_SKEW_S = 30.0
"""Grace after ``not_after`` for site clocks that run ahead of the server's."""

_HEADER = struct.Struct(">BB8s16sQ16s32s32sQ12s")
HEADER_BYTES = _HEADER.size  # 134
_ROUND = struct.Struct(">Q")
_ROUND_OFFSET = 1 + 1 + 8 + 16
_TAG_BYTES = 16
_SIG_BYTES = 64
MIN_ENVELOPE_BYTES = HEADER_BYTES + SECRET_BYTES + REPLY_KEY_BYTES + _TAG_BYTES + _SIG_BYTES  # 278
MAX_ENVELOPE_BYTES = MIN_ENVELOPE_BYTES + MAX_EXTRA_BYTES

_NONCE_BYTES = 12
REPLY_OVERHEAD = _NONCE_BYTES + _TAG_BYTES
"""Bytes ``seal_reply`` adds to a payload (nonce 12 + tag 16)."""

_SIG_LABEL = b"edgetune-sig-v1"
_SEED_LABEL = b"edgetune-seed-v1|s2c|"
_REPLY_LABEL = b"edgetune-reply-v1|"
_REPLY_KEY_LABEL = b"edgetune-reply-key-v1|"

REASONS = frozenset(
    {
        "size", "version", "kid", "signature", "run", "site", "replay",
        "equivocation", "skip", "expired", "decrypt", "commit",
    }
)  # fmt: skip


class EnvelopeError(ValueError):
    """An envelope or reply was rejected; ``reason`` is one of ``REASONS`` (for logs and counters)."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"envelope rejected ({reason}): {message}")
        self.reason = reason


@dataclass(frozen=True)
class Opened:
    """An accepted envelope."""

    round_idx: int
    secret: bytes
    """The round's 32-byte secret."""
    reply_key: bytes
    """This site's key for its reply of this round (``seal_reply``); no other site has it."""
    extra: bytes
    """Opaque bytes sealed with the secret (the round config)."""
    digest: bytes
    """sha256 of the whole envelope; what the replay guard remembers."""
    duplicate: bool
    """True if this is the envelope accepted last time, seen again (resend after a crash)."""


def _site_tag(site_id: str) -> bytes:
    return hashlib.sha256(b"edgetune-site|" + valid_site_id(site_id).encode()).digest()[:16]


def commitment(secret: bytes) -> bytes:
    """``sha256("edgetune-commit|" | secret)``: binds a reply or a log line to a round secret."""
    return hashlib.sha256(b"edgetune-commit|" + secret).digest()


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _check_run_id(run_id: bytes) -> None:
    if not isinstance(run_id, bytes) or len(run_id) != RUN_ID_BYTES:
        raise ValueError(f"run_id must be {RUN_ID_BYTES} bytes")


def _check_round(round_idx: int) -> None:
    if isinstance(round_idx, bool) or not isinstance(round_idx, int) or not 1 <= round_idx < 2**64:
        raise ValueError(f"round_idx must be an int in [1, 2**64), got {round_idx!r}")


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")


def seal(
    server: ServerKeys,
    site_public: X25519PublicKey,
    *,
    run_id: bytes,
    round_idx: int,
    site_id: str,
    secret: bytes,
    extra: bytes = b"",
    not_after: float,
) -> bytes:
    """Seal round ``round_idx``'s secret for one site.

    Parameters
    ----------
    server
        The server's signing key.
    site_public
        The site's X25519 agreement key, from the registry.
    run_id
        16 bytes naming the run; sites reject envelopes of other runs.
    round_idx
        1-based round, < 2**64.
    site_id
        The site the envelope is for; sites reject envelopes addressed to another.
    secret
        The round's 32-byte secret R_t.
    extra
        Opaque bytes sealed and authenticated with the secret, at most 64 KiB.
    not_after
        Unix time after which sites reject the envelope (rounded up to a whole second).

    Returns
    -------
    bytes
        ``header | ct | sig``: ``MIN_ENVELOPE_BYTES + len(extra)`` bytes (278 + len(extra)).
    """
    _check_run_id(run_id)
    _check_round(round_idx)
    _check_secret(secret)
    if not isinstance(extra, bytes) or len(extra) > MAX_EXTRA_BYTES:
        raise ValueError(f"extra must be bytes of at most {MAX_EXTRA_BYTES}")
    if not math.isfinite(not_after) or not 0 <= math.ceil(not_after) < 2**64:
        raise ValueError(f"not_after must be a unix time in seconds, got {not_after!r}")
    tag = _site_tag(site_id)
    round_bytes = _ROUND.pack(round_idx)

    ephemeral = X25519PrivateKey.generate()
    epk = ephemeral.public_key().public_bytes_raw()
    site_raw = site_public.public_bytes_raw()
    shared = ephemeral.exchange(site_public)
    key = _hkdf(shared, run_id + round_bytes, _SEED_LABEL + run_id + round_bytes + tag + epk + site_raw)

    nonce = os.urandom(_NONCE_BYTES)
    header = _HEADER.pack(
        VERSION, SUITE, server.kid, run_id, round_idx, tag, epk, commitment(secret),
        math.ceil(not_after), nonce,
    )  # fmt: skip
    rk = reply_key(server, run_id, round_idx, site_id)
    ct = ChaCha20Poly1305(key).encrypt(nonce, secret + rk + extra, header)
    sig = server.signing_key.sign(_SIG_LABEL + header + ct)
    return header + ct + sig


def open_envelope(
    blob: bytes,
    site: SiteKeys,
    *,
    run_id: bytes,
    guard: ReplayGuard,
    now: float,
    max_skip: int = 1000,
    max_bytes: int = 70_000,
) -> tuple[Opened, ReplayGuard]:
    """Check and open an envelope; raise ``EnvelopeError`` for anything but a valid one.

    Parameters
    ----------
    blob
        The envelope as received: untrusted bytes.
    site
        This site's keys, including the pinned server key.
    run_id
        The run this site takes part in.
    guard
        The last accepted round, as persisted by the caller.
    now
        Current unix time in seconds.
    max_skip
        Largest accepted jump ahead of ``guard.last_round``.
    max_bytes
        Largest accepted envelope, checked before anything is parsed.

    Returns
    -------
    tuple[Opened, ReplayGuard]
        The opened envelope and the guard to persist (unchanged for a duplicate), atomically,
        before using the secret.

    Raises
    ------
    EnvelopeError
        With ``reason`` naming the first check that failed, for every malformed, forged,
        misaddressed, replayed or expired input.
    ValueError
        If the caller's own arguments are invalid.
    """
    _check_run_id(run_id)
    if max_skip < 1 or max_bytes < MIN_ENVELOPE_BYTES:
        raise ValueError(f"max_skip must be >= 1 and max_bytes >= {MIN_ENVELOPE_BYTES}")
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite unix time, got {now!r}")

    # 1. Size, before any parsing: everything below reads fixed offsets.
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise EnvelopeError("size", f"expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if not MIN_ENVELOPE_BYTES <= len(blob) <= max_bytes:
        raise EnvelopeError("size", f"{len(blob)} bytes, expected {MIN_ENVELOPE_BYTES}..{max_bytes}")
    header, ct, sig = blob[:HEADER_BYTES], blob[HEADER_BYTES:-_SIG_BYTES], blob[-_SIG_BYTES:]
    ver, suite, kid, env_run, round_idx, tag, epk, commit, not_after, nonce = _HEADER.unpack(header)

    # 2-3. Only then the allow-list and the pinned key.
    if ver != VERSION or suite != SUITE:
        raise EnvelopeError("version", f"version {ver} suite {suite}, expected {VERSION} {SUITE}")
    if kid != site.server_kid:
        raise EnvelopeError("kid", f"signed by key {kid.hex()}, pinned {site.server_kid.hex()}")
    try:
        site.server_public.verify(sig, _SIG_LABEL + header + ct)
    except InvalidSignature:
        raise EnvelopeError("signature", "bad server signature") from None

    # 4. From here on the server wrote every byte: a mismatch is a protocol event, not noise.
    if env_run != run_id:
        raise EnvelopeError("run", f"run {env_run.hex()}, expected {run_id.hex()}")
    if tag != _site_tag(site.site_id):
        raise EnvelopeError("site", f"addressed to another site, not {site.site_id!r}")

    # 5. Round rules. The exact envelope accepted last is let through again, so the site can
    # re-answer a server that crashed after sending; anything else at or below it is refused.
    digest = hashlib.sha256(blob).digest()
    duplicate = round_idx == guard.last_round and hmac.compare_digest(digest, guard.last_digest)
    if not duplicate:
        if round_idx == guard.last_round != 0:
            raise EnvelopeError("equivocation", f"a second, different envelope for round {round_idx}")
        if round_idx <= guard.last_round:
            raise EnvelopeError("replay", f"round {round_idx} <= last accepted {guard.last_round}")
        if round_idx > guard.last_round + max_skip:
            raise EnvelopeError("skip", f"round {round_idx} is more than {max_skip} ahead of {guard.last_round}")
    if now > not_after + CLOCK_SKEW_S:
        raise EnvelopeError("expired", f"expired at {not_after}, now {now:.0f}")

    # 6. Key agreement and AEAD. A low-order epk makes exchange() raise ValueError.
    try:
        shared = site.agreement_key.exchange(X25519PublicKey.from_public_bytes(epk))
    except ValueError:
        raise EnvelopeError("decrypt", "invalid ephemeral key") from None
    site_raw = site.agreement_key.public_key().public_bytes_raw()
    round_bytes = _ROUND.pack(round_idx)
    key = _hkdf(shared, run_id + round_bytes, _SEED_LABEL + run_id + round_bytes + tag + epk + site_raw)
    try:
        plain = ChaCha20Poly1305(key).decrypt(nonce, ct, header)
    except InvalidTag:
        raise EnvelopeError("decrypt", "AEAD tag mismatch (sealed for another key?)") from None

    # 7. The commitment binds the header to the secret inside.
    secret, extra = plain[:SECRET_BYTES], plain[SECRET_BYTES + REPLY_KEY_BYTES :]
    rk = plain[SECRET_BYTES : SECRET_BYTES + REPLY_KEY_BYTES]
    if not hmac.compare_digest(commit, commitment(secret)):
        raise EnvelopeError("commit", "secret does not match the header's commitment")

    opened = Opened(round_idx, secret, rk, extra, digest, duplicate)
    return opened, (guard if duplicate else ReplayGuard(round_idx, digest))


def peek_round(blob: bytes) -> int:
    """The round in an envelope's header, NOT verified: for log lines only.

    Parameters
    ----------
    blob
        An envelope, possibly invalid.

    Returns
    -------
    int
        The header's round field.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < HEADER_BYTES:
        raise EnvelopeError("size", "too short to hold an envelope header")
    return _ROUND.unpack_from(blob, _ROUND_OFFSET)[0]


def reply_key(server: ServerKeys, run_id: bytes, round_idx: int, site_id: str) -> bytes:
    """The key site ``site_id`` seals its reply of ``round_idx`` with (sent inside its envelope only).

    ``HKDF-SHA256(server signing key seed, info = "edgetune-reply-key-v1|" | run_id | round | site_tag)``:
    deterministic, so the server recomputes it for every reply and after a restart; one key per
    (run, round, site), so another site of the round cannot read or forge this site's reply.

    Parameters
    ----------
    server
        The server's keys (only the server can derive reply keys).
    run_id, round_idx, site_id
        What the key is for.

    Returns
    -------
    bytes
        32 bytes.
    """
    _check_run_id(run_id)
    _check_round(round_idx)
    seed = server.signing_key.private_bytes_raw()
    return _hkdf(seed, None, _REPLY_KEY_LABEL + run_id + _ROUND.pack(round_idx) + _site_tag(site_id))


def _reply_key_and_aad(key: bytes, run_id: bytes, round_idx: int, site_id: str) -> tuple[bytes, bytes]:
    if not isinstance(key, bytes) or len(key) != REPLY_KEY_BYTES:
        raise ValueError(f"reply key must be {REPLY_KEY_BYTES} bytes")
    _check_run_id(run_id)
    _check_round(round_idx)
    aad = run_id + _ROUND.pack(round_idx) + _site_tag(site_id)
    return _hkdf(key, None, _REPLY_LABEL + aad), aad


def seal_reply(key: bytes, *, run_id: bytes, round_idx: int, site_id: str, payload: bytes) -> bytes:
    """Encrypt a site's reply for (run, round, site) under the site's reply key.

    Confidential against whoever relays it (the SuperLink operator) and bound to (run, round,
    site). ``key`` is ``Opened.reply_key``, which only this site and the server hold, so the reply
    authenticates this site: another participant of the round can neither read nor forge it.

    Parameters
    ----------
    key
        The site's reply key for this round (``Opened.reply_key``; the server: ``reply_key``).
    run_id, round_idx, site_id
        What the reply is bound to (its associated data).
    payload
        Reply bytes.

    Returns
    -------
    bytes
        ``nonce | ct``: ``len(payload) + REPLY_OVERHEAD`` bytes.
    """
    aead_key, aad = _reply_key_and_aad(key, run_id, round_idx, site_id)
    # The key is reused for a resend after a crash, so the nonce must be random, not fixed.
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(aead_key).encrypt(nonce, payload, aad)


def open_reply(key: bytes, *, run_id: bytes, round_idx: int, site_id: str, blob: bytes, max_bytes: int) -> bytes:
    """Decrypt a reply sealed by ``seal_reply``; raise ``EnvelopeError`` otherwise.

    Parameters
    ----------
    key
        The site's reply key (``reply_key(server, run_id, round_idx, site_id)``).
    run_id, round_idx, site_id
        Where the reply is expected from; a reply bound to anything else fails to decrypt.
    blob
        Untrusted reply bytes.
    max_bytes
        Largest accepted reply, checked before anything else.

    Returns
    -------
    bytes
        The payload.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise EnvelopeError("size", f"expected bytes, got {type(blob).__name__}")
    if not REPLY_OVERHEAD <= len(blob) <= max_bytes:
        raise EnvelopeError("size", f"reply of {len(blob)} bytes, expected {REPLY_OVERHEAD}..{max_bytes}")
    aead_key, aad = _reply_key_and_aad(key, run_id, round_idx, site_id)
    blob = bytes(blob)
    try:
        return ChaCha20Poly1305(aead_key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    except InvalidTag:
        raise EnvelopeError("decrypt", f"reply does not authenticate for round {round_idx}") from None
