"""Seed envelopes and replies: a valid one opens; every malformed, forged or replayed one is
rejected with an EnvelopeError naming the reason, and nothing else ever escapes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgetune.crypto import envelope, keys
from edgetune.crypto.envelope import (
    HEADER_BYTES,
    MIN_ENVELOPE_BYTES,
    REPLY_OVERHEAD,
    EnvelopeError,
    ReplayGuard,
    open_envelope,
    open_reply,
    peek_round,
    seal,
    seal_reply,
)
from edgetune.crypto.keys import ServerKeys, SiteKeys

RUN = bytes(range(16))
NOW = 1_700_000_000.0
TTL = 3600.0
EXTRA = b"round-config"
FRESH = ReplayGuard()


def make_server() -> ServerKeys:
    signing_key = Ed25519PrivateKey.generate()
    return ServerKeys(signing_key, keys.key_id(signing_key.public_key()))


def make_site(server: ServerKeys, site_id: str) -> SiteKeys:
    pub = server.signing_key.public_key()
    return SiteKeys(site_id, X25519PrivateKey.generate(), pub, server.kid)


SERVER = make_server()
SITE_A = make_site(SERVER, "site-a")
SITE_B = make_site(SERVER, "site-b")


def seal_for(
    site: SiteKeys = SITE_A,
    round_idx: int = 1,
    *,
    server: ServerKeys = SERVER,
    site_id: str | None = None,
    run_id: bytes = RUN,
    secret: bytes | None = None,
    extra: bytes = EXTRA,
    not_after: float = NOW + TTL,
) -> bytes:
    return seal(
        server,
        site.agreement_key.public_key(),
        run_id=run_id,
        round_idx=round_idx,
        site_id=site.site_id if site_id is None else site_id,
        secret=os.urandom(32) if secret is None else secret,
        extra=extra,
        not_after=not_after,
    )


def open_at(blob: bytes, guard: ReplayGuard = FRESH, site: SiteKeys = SITE_A, **kw):
    return open_envelope(blob, site, run_id=RUN, guard=guard, now=kw.pop("now", NOW), **kw)


def reason_of(blob: bytes, guard: ReplayGuard = FRESH, site: SiteKeys = SITE_A, **kw) -> str:
    with pytest.raises(EnvelopeError) as err:
        open_at(blob, guard, site, **kw)
    return err.value.reason


@pytest.fixture(scope="module")
def valid() -> bytes:
    return seal_for(SITE_A, 1, secret=b"\x07" * 32)


# ---------------------------------------------------------------------------------------------
# Accepting


def test_valid_envelope_opens(valid: bytes):
    """A valid envelope yields its secret and extra, and a guard advanced to its round."""
    # Execute
    opened, guard = open_at(valid)

    # Assert
    assert opened.secret == b"\x07" * 32 and opened.extra == EXTRA
    assert opened.round_idx == 1 and not opened.duplicate
    assert guard == ReplayGuard(1, opened.digest)
    assert len(valid) == MIN_ENVELOPE_BYTES + len(EXTRA)


def test_envelope_size():
    """The envelope is 278 bytes plus the extra: 378 bytes for a 100-byte extra."""
    assert MIN_ENVELOPE_BYTES == HEADER_BYTES + 32 + 32 + 16 + 64 == 278
    assert len(seal_for(extra=b"x" * 100)) == 378


def test_keys_from_disk_round_trip(tmp_path: Path):
    """Keys written by keys.generate and loaded back seal and open an envelope end to end."""
    # Prepare
    keys.generate(tmp_path, ["plant-1"])
    server, registry = keys.load_server(tmp_path), keys.load_registry(tmp_path)
    site = keys.load_site(keys.site_kit_dir(tmp_path, "plant-1"))
    secret = os.urandom(32)

    # Execute
    blob = seal(
        server, registry.sites["plant-1"], run_id=RUN, round_idx=5, site_id="plant-1",
        secret=secret, not_after=NOW + TTL,
    )  # fmt: skip
    opened, _ = open_envelope(blob, site, run_id=RUN, guard=ReplayGuard(), now=NOW)

    # Assert
    assert opened.secret == secret and opened.extra == b"" and opened.round_idx == 5


def test_exact_duplicate_is_returned_again(valid: bytes):
    """The envelope accepted last, seen again, opens with duplicate=True and an unchanged guard."""
    # Prepare
    first, guard = open_at(valid)

    # Execute
    again, guard_after = open_at(valid, guard)

    # Assert
    assert again.duplicate and again.secret == first.secret and again.extra == first.extra
    assert guard_after == guard


def test_max_extra_fits_default_max_bytes():
    """A 64 KiB extra, the largest allowed, opens under the default max_bytes."""
    blob = seal_for(extra=b"\xab" * envelope.MAX_EXTRA_BYTES)
    opened, _ = open_at(blob)
    assert len(opened.extra) == envelope.MAX_EXTRA_BYTES


# ---------------------------------------------------------------------------------------------
# Malformed input: never accepted, never another exception type


def test_every_bit_flip_is_rejected(valid: bytes):
    """Flipping any single bit of a valid envelope gets it rejected (version, kid or signature)."""
    # Prepare
    reasons = set()

    # Execute
    for bit in range(8 * len(valid)):
        blob = bytearray(valid)
        blob[bit // 8] ^= 1 << (bit % 8)
        reasons.add(reason_of(bytes(blob)))

    # Assert
    assert reasons == {"version", "kid", "signature"}


def test_header_field_flips_name_their_check(valid: bytes):
    """A flipped version byte reads 'version'; a flipped kid byte reads 'kid'."""
    for offset, expected in [(0, "version"), (1, "version"), (2, "kid"), (9, "kid"), (10, "signature")]:
        blob = bytearray(valid)
        blob[offset] ^= 0x01
        assert reason_of(bytes(blob)) == expected


def test_every_truncation_is_rejected(valid: bytes):
    """Every proper prefix (0..len-1 bytes) is rejected; below the minimum, before parsing ('size')."""
    for n in range(len(valid)):
        expected = "size" if n < MIN_ENVELOPE_BYTES else "signature"
        assert reason_of(valid[:n]) == expected


def test_every_extension_is_rejected(valid: bytes):
    """Appending 1..64 bytes (zeros or random) to a valid envelope gets it rejected."""
    for n in range(1, 65):
        assert reason_of(valid + bytes(n)) == "signature"
        assert reason_of(valid + os.urandom(n)) == "signature"


def test_oversize_rejected_before_parsing(valid: bytes):
    """Anything longer than max_bytes is refused on size alone."""
    assert reason_of(valid, max_bytes=len(valid) - 1) == "size"
    assert reason_of(bytes([envelope.VERSION, envelope.SUITE]) + SERVER.kid + bytes(70_000)) == "size"


def test_random_bytes_are_rejected():
    """2,000 random byte strings (some with a valid-looking prefix) raise EnvelopeError, nothing else."""
    # Prepare: half pure noise, half with version, suite and kid right so they reach the signature.
    rng = random.Random(20240607)
    prefix = bytes([envelope.VERSION, envelope.SUITE]) + SERVER.kid
    blobs = []
    for i in range(2000):
        n = rng.choice([rng.randrange(0, 400), rng.randrange(MIN_ENVELOPE_BYTES, 1200)])
        noise = rng.randbytes(n)
        blobs.append(prefix + noise if i % 2 else noise)

    # Execute / Assert: pytest.raises lets any other exception type fail the test.
    reasons = {reason_of(blob) for blob in blobs}
    assert reasons <= {"size", "version", "kid", "signature"}
    assert "signature" in reasons


@pytest.mark.parametrize("blob", [None, "a" * 300, 12345, [1, 2, 3]])
def test_non_bytes_input_is_rejected(blob):
    """Input of a non-bytes type (from a hostile message) is an EnvelopeError, not a TypeError."""
    assert reason_of(blob) == "size"


# ---------------------------------------------------------------------------------------------
# Validly signed, but not for us / not now


def test_wrong_site_rejected():
    """An envelope addressed to site-b is refused by site-a ('site'), even if sealed to a's key."""
    # Prepare: one addressed to b, one addressed to a but encrypted for b's key.
    to_b = seal_for(SITE_B)
    a_tag_b_key = seal_for(SITE_B, site_id="site-a")

    # Execute / Assert
    assert reason_of(to_b, site=SITE_A) == "site"
    assert reason_of(a_tag_b_key, site=SITE_A) == "decrypt"


def test_wrong_run_rejected():
    """An envelope of another run is refused ('run')."""
    assert reason_of(seal_for(run_id=b"\xff" * 16)) == "run"


def test_other_server_key_rejected():
    """An envelope signed by another server key is refused: by kid, or by signature if the kid is faked."""
    # Prepare
    forger = make_server()
    forged = seal_for(server=forger)
    body = bytearray(forged[:-64])
    body[2:10] = SERVER.kid  # claim the pinned kid
    resigned = bytes(body) + forger.signing_key.sign(b"edgetune-sig-v1" + bytes(body))

    # Execute / Assert
    assert reason_of(forged) == "kid"
    assert reason_of(resigned) == "signature"


def test_replay_of_older_round_rejected():
    """After round 2 is accepted, a valid round-1 envelope is a replay."""
    # Prepare
    old = seal_for(round_idx=1)
    _, guard = open_at(seal_for(round_idx=2))

    # Execute / Assert
    assert reason_of(old, guard) == "replay"


def test_equivocation_rejected(valid: bytes):
    """A second, different envelope for the accepted round is equivocation, even with the same secret."""
    # Prepare
    _, guard = open_at(valid)
    fresh = seal_for(round_idx=1, secret=b"\x07" * 32)

    # Execute / Assert
    assert reason_of(fresh, guard) == "equivocation"


def test_skip_beyond_max_skip_rejected():
    """A round more than max_skip ahead of the last accepted is refused; exactly max_skip is allowed."""
    # Prepare
    _, guard = open_at(seal_for(round_idx=3))

    # Execute / Assert
    assert reason_of(seal_for(round_idx=3 + 11), guard, max_skip=10) == "skip"
    opened, _ = open_at(seal_for(round_idx=3 + 10), guard, max_skip=10)
    assert opened.round_idx == 13


def test_expired_rejected():
    """Past not_after + 30 s the envelope is refused; up to 30 s of skew is tolerated."""
    # Prepare
    blob = seal_for(not_after=NOW)

    # Execute / Assert
    open_at(blob, now=NOW + envelope.CLOCK_SKEW_S)
    assert reason_of(blob, now=NOW + envelope.CLOCK_SKEW_S + 1) == "expired"


def test_commitment_mismatch_rejected(monkeypatch):
    """A signed envelope whose header commitment does not match the sealed secret is refused."""
    # Prepare: the server seals with a broken commitment function.
    with monkeypatch.context() as m:
        m.setattr(envelope, "commitment", lambda secret: bytes(32))
        blob = seal_for()

    # Execute / Assert
    assert reason_of(blob) == "commit"


def resign(blob: bytes, offset: int, new: bytes) -> bytes:
    """``blob`` with bytes at ``offset`` replaced, signed again by the real server."""
    body = bytearray(blob[:-64])
    body[offset : offset + len(new)] = new
    return bytes(body) + SERVER.signing_key.sign(b"edgetune-sig-v1" + bytes(body))


def test_signed_but_undecryptable_rejected(valid: bytes):
    """Even with a good signature, a low-order epk or a tampered ciphertext is 'decrypt'."""
    # Prepare: epk sits after ver, suite, kid, run, round and site tag.
    epk_offset = 1 + 1 + 8 + 16 + 8 + 16
    zero_epk = resign(valid, epk_offset, bytes(32))
    bad_ct = resign(valid, HEADER_BYTES, bytes([valid[HEADER_BYTES] ^ 1]))

    # Execute / Assert
    assert reason_of(zero_epk) == "decrypt"
    assert reason_of(bad_ct) == "decrypt"


def test_seal_validates_arguments():
    """seal refuses arguments that would make an envelope no site can accept."""
    pub = SITE_A.agreement_key.public_key()
    good = dict(run_id=RUN, round_idx=1, site_id="site-a", secret=bytes(32), not_after=NOW)
    for bad in [
        {"secret": bytes(31)},
        {"round_idx": 0},
        {"round_idx": 2**64},
        {"run_id": bytes(15)},
        {"site_id": "../x"},
        {"not_after": float("nan")},
        {"extra": bytes(envelope.MAX_EXTRA_BYTES + 1)},
    ]:
        with pytest.raises(ValueError):
            seal(SERVER, pub, **{**good, **bad})


def test_peek_round(valid: bytes):
    """peek_round reads the header's round without verifying; too short is 'size'."""
    assert peek_round(seal_for(round_idx=2**40)) == 2**40
    assert peek_round(valid[:HEADER_BYTES]) == 1
    with pytest.raises(EnvelopeError) as err:
        peek_round(valid[: HEADER_BYTES - 1])
    assert err.value.reason == "size"


# ---------------------------------------------------------------------------------------------
# ReplayGuard


@pytest.mark.parametrize("guard", [ReplayGuard(), ReplayGuard(7, b"\x5a" * 32), ReplayGuard(2**64 - 1, b"\x01" * 32)])
def test_guard_round_trips(guard: ReplayGuard):
    """to_bytes/from_bytes is the identity."""
    assert ReplayGuard.from_bytes(guard.to_bytes()) == guard


def test_guard_rejects_malformed_bytes():
    """Wrong length, any flipped bit, or non-bytes input is refused with ValueError."""
    # Prepare
    good = ReplayGuard(7, b"\x5a" * 32).to_bytes()
    bad: list[object] = [b"", good[:-1], good + b"\x00", "x" * len(good), None]
    for bit in range(8 * len(good)):
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        bad.append(bytes(flipped))

    # Execute / Assert
    for blob in bad:
        with pytest.raises(ValueError):
            ReplayGuard.from_bytes(blob)  # type: ignore[arg-type]


def test_guard_validates_fields():
    """A guard's digest is empty before the first round and 32 bytes after."""
    for last_round, digest in [(0, b"\x00" * 32), (1, b""), (1, b"\x00" * 31), (-1, b"")]:
        with pytest.raises(ValueError):
            ReplayGuard(last_round, digest)


# ---------------------------------------------------------------------------------------------
# Replies


SECRET = b"\x11" * 32
REPLY = dict(run_id=RUN, round_idx=4, site_id="site-a")


def test_reply_round_trip():
    """open_reply returns the payload seal_reply sealed; the overhead is 28 bytes."""
    # Execute
    blob = seal_reply(SECRET, payload=b"scalars", **REPLY)

    # Assert
    assert REPLY_OVERHEAD == 28 and len(blob) == len(b"scalars") + REPLY_OVERHEAD
    assert open_reply(SECRET, blob=blob, max_bytes=1024, **REPLY) == b"scalars"
    assert open_reply(SECRET, blob=seal_reply(SECRET, payload=b"", **REPLY), max_bytes=28, **REPLY) == b""


def test_reply_bit_flips_rejected():
    """Every single-bit flip of a reply fails to decrypt."""
    blob = seal_reply(SECRET, payload=b"scalars", **REPLY)
    for bit in range(8 * len(blob)):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(EnvelopeError) as err:
            open_reply(SECRET, blob=bytes(flipped), max_bytes=1024, **REPLY)
        assert err.value.reason == "decrypt"


def test_reply_bound_to_round_site_run_and_secret():
    """A reply opened as another round, site, run or under another secret is refused ('decrypt')."""
    # Prepare
    blob = seal_reply(SECRET, payload=b"scalars", **REPLY)

    # Execute / Assert
    for secret, changed in [
        (SECRET, {"round_idx": 5}),
        (SECRET, {"site_id": "site-b"}),
        (SECRET, {"run_id": b"\x00" * 16}),
        (b"\x12" * 32, {}),
    ]:
        with pytest.raises(EnvelopeError) as err:
            open_reply(secret, blob=blob, max_bytes=1024, **{**REPLY, **changed})
        assert err.value.reason == "decrypt"


def test_reply_size_checked_first():
    """Replies shorter than the overhead or longer than max_bytes are 'size', before decryption."""
    blob = seal_reply(SECRET, payload=b"scalars", **REPLY)
    for candidate, max_bytes in [(blob[: REPLY_OVERHEAD - 1], 1024), (blob, len(blob) - 1), (None, 1024)]:
        with pytest.raises(EnvelopeError) as err:
            open_reply(SECRET, blob=candidate, max_bytes=max_bytes, **REPLY)  # type: ignore[arg-type]
        assert err.value.reason == "size"


# ---------------------------------------------------------------------------------------------
# Issue 13: a reply proves which site sent it, not only "a participant of the round"


def test_a_participant_cannot_forge_or_read_another_sites_reply():
    """Both sites of round 3 hold the round secret. Site B can seal a reply as site A neither with the secret
    nor with its own reply key: the server opens site A's replies only with A's key, which reaches A alone
    (inside A's envelope). A's own reply opens; B cannot open it either."""
    # Prepare
    secret = os.urandom(32)
    env_a = seal_for(SITE_A, 3, secret=secret)
    env_b = seal_for(SITE_B, 3, secret=secret)
    opened_a, _ = open_at(env_a)
    opened_b, _ = open_at(env_b, site=SITE_B)
    where = {"run_id": RUN, "round_idx": 3, "site_id": "site-a"}
    server_key_a = envelope.reply_key(SERVER, RUN, 3, "site-a")

    # Execute
    honest = seal_reply(opened_a.reply_key, payload=b"codes-a", **where)
    forged = [seal_reply(k, payload=b"evil", **where) for k in (opened_b.secret, opened_b.reply_key)]

    # Assert
    assert opened_a.secret == opened_b.secret and opened_a.reply_key != opened_b.reply_key
    assert opened_a.reply_key == server_key_a
    assert open_reply(server_key_a, blob=honest, max_bytes=1024, **where) == b"codes-a"
    for blob in forged:
        with pytest.raises(EnvelopeError, match="decrypt"):
            open_reply(server_key_a, blob=blob, max_bytes=1024, **where)
    with pytest.raises(EnvelopeError, match="decrypt"):
        open_reply(opened_b.reply_key, blob=honest, max_bytes=1024, **where)


def test_reply_keys_are_per_run_round_site_and_server():
    """A reply key differs for every (run, round, site) and for another server key; it is stable for the same
    inputs (a restarted server derives it again without storing it)."""
    base = envelope.reply_key(SERVER, RUN, 3, "site-a")
    others = [
        envelope.reply_key(SERVER, bytes(16), 3, "site-a"),
        envelope.reply_key(SERVER, RUN, 4, "site-a"),
        envelope.reply_key(SERVER, RUN, 3, "site-b"),
        envelope.reply_key(make_server(), RUN, 3, "site-a"),
    ]
    assert envelope.reply_key(SERVER, RUN, 3, "site-a") == base and len(base) == 32
    assert len({base, *others}) == 5
