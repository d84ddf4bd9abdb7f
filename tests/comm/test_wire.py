"""Wire format: exact layout, round trips, and rejection of every malformed payload with WireError."""

from __future__ import annotations

import math
import random
import struct

import pytest

from edgetune.comm import wire
from edgetune.comm.wire import WireError, decode, encode, require

LIMIT = 1 << 20


def varint(n: int) -> bytes:
    """Unsigned LEB128, written independently of the module under test."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n >= 0x80 else 0))
        n >>= 7
        if not n:
            return bytes(out)


def entry(key: bytes, tag: bytes, body: bytes) -> bytes:
    return varint(len(key)) + key + tag + body


def frame(*entries: bytes, count: int | None = None) -> bytes:
    return b"ET\x01" + varint(len(entries) if count is None else count) + b"".join(entries)


def rich_payload() -> dict:
    return {
        "bytes": bytes(range(256)),
        "empty": b"",
        "f": -1.5e-300,
        "i_big": 2**63 - 1,
        "i_neg": -(2**63),
        "n": 0,
        "s": "héllo, 日本語 🎉",
        "t": True,
        "u": False,
    }


# --- round trips -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, -1, 63, 64, -64, -65, 2**31, -(2**31), 2**63 - 1, -(2**63)])
def test_int_round_trip(value: int):
    """Every int64 decodes to the same int (zigzag varint), and stays an int."""
    # Execute
    out = decode(encode({"x": value}), max_bytes=LIMIT)["x"]

    # Assert
    assert out == value and type(out) is int


@pytest.mark.parametrize("value", [0.0, 1.0, -2.5, 1e-308, 5e-324, 1.7976931348623157e308, math.inf, -math.inf])
def test_float_round_trip(value: float):
    """Floats travel as 8 IEEE-754 bytes: bit-exact, including subnormals and infinities."""
    # Execute
    out = decode(encode({"x": value}), max_bytes=LIMIT)["x"]

    # Assert
    assert type(out) is float and struct.pack("<d", out) == struct.pack("<d", value)


def test_float_negative_zero_and_nan_round_trip():
    """-0.0 keeps its sign bit and NaN stays NaN (the wire does not judge finiteness; require does)."""
    # Execute
    out = decode(encode({"nan": math.nan, "z": -0.0}), max_bytes=LIMIT)

    # Assert
    assert math.copysign(1.0, out["z"]) == -1.0
    assert math.isnan(out["nan"])


@pytest.mark.parametrize("value", ["", "a", "héllo", "日本語", "emoji 🎉", "\x00nul", "x" * 10_000])
def test_str_round_trip(value: str):
    """Strings round trip through UTF-8, including empty, NUL, multi-byte and long ones."""
    # Execute
    out = decode(encode({"s": value}), max_bytes=LIMIT)["s"]

    # Assert
    assert out == value and type(out) is str


@pytest.mark.parametrize("value", [b"", b"\x00", bytes(range(256)), b"\xff" * 5000])
def test_bytes_round_trip(value: bytes):
    """Bytes round trip exactly, including empty and non-UTF-8 content."""
    # Execute
    out = decode(encode({"b": value}), max_bytes=LIMIT)["b"]

    # Assert
    assert out == value and type(out) is bytes


def test_bytes_like_values_decode_as_bytes():
    """bytearray and memoryview values are sent as their bytes and come back as bytes."""
    # Execute
    out = decode(encode({"a": bytearray(b"xy"), "m": memoryview(b"zw")}), max_bytes=LIMIT)

    # Assert
    assert out == {"a": b"xy", "m": b"zw"}
    assert all(type(v) is bytes for v in out.values())


def test_rich_payload_round_trip_keeps_types():
    """A payload with every type decodes equal, with bool staying bool and int staying int."""
    # Prepare
    payload = rich_payload()

    # Execute
    out = decode(encode(payload), max_bytes=LIMIT)

    # Assert
    assert out == payload
    assert {k: type(v) for k, v in out.items()} == {k: type(v) for k, v in payload.items()}


def test_unicode_and_max_length_keys_round_trip():
    """Keys may be any UTF-8 of 1..64 bytes; decode accepts the order encode produces for them."""
    # Prepare
    payload = {"ключ": 1, "🔑": 2, "k" * wire.MAX_KEY_BYTES: 3, "A": 4, "a": 5, "é" * 32: 6}

    # Execute
    out = decode(encode(payload), max_bytes=LIMIT)

    # Assert
    assert out == payload


def test_empty_payload_is_four_bytes():
    """An empty payload is the 3-byte header and a zero count, and decodes to {}."""
    # Execute
    blob = encode({})

    # Assert
    assert blob == b"ET\x01\x00"
    assert decode(blob, max_bytes=4) == {}


def test_max_entries_round_trip():
    """A payload with exactly MAX_ENTRIES entries round trips."""
    # Prepare
    payload = {f"k{i:03d}": i for i in range(wire.MAX_ENTRIES)}

    # Execute
    out = decode(encode(payload), max_bytes=LIMIT)

    # Assert
    assert out == payload


# --- exact layout -------------------------------------------------------------------------------------------------


def test_encoded_bytes_match_documented_layout():
    """A small payload encodes to exactly the bytes the module docstring's layout predicts (37 bytes)."""
    # Prepare: keys sorted a < bc < f < s < t; by hand:
    #   header b"ET" 0x01, count 5                                  4
    #   a : klen 1, "a", "i", zigzag(1)=2                           4
    #   bc: klen 2, "bc", "b", len 3, "xyz"                         8
    #   f : klen 1, "f", "f", 8 bytes little-endian 0.5            11
    #   s : klen 1, "s", "s", len 2, "é" = c3 a9                    6
    #   t : klen 1, "t", "t", 0x01                                  4
    expected = (
        b"ET\x01\x05"
        + b"\x01a" + b"i\x02"
        + b"\x02bc" + b"b\x03xyz"
        + b"\x01f" + b"f" + b"\x00\x00\x00\x00\x00\x00\xe0\x3f"
        + b"\x01s" + b"s\x02\xc3\xa9"
        + b"\x01t" + b"t\x01"
    )  # fmt: skip

    # Execute: insertion order differs from the sorted order on purpose
    blob = encode({"t": True, "s": "é", "f": 0.5, "bc": b"xyz", "a": 1})

    # Assert
    assert len(blob) == 37
    assert blob == expected


@pytest.mark.parametrize(
    ("value", "varint_bytes"),
    [(0, 1), (63, 1), (64, 2), (-1, 1), (-64, 1), (-65, 2), (8191, 2), (8192, 3), (2**63 - 1, 10), (-(2**63), 10)],
)
def test_int_size_is_zigzag_varint(value: int, varint_bytes: int):
    """An int entry costs klen + key + tag + varint(zigzag(v)): |v| < 64 fits one byte, 2**63 needs ten."""
    # Execute
    blob = encode({"x": value})

    # Assert: 4 header bytes, 1 klen, 1 key, 1 tag
    assert len(blob) == 4 + 3 + varint_bytes


@pytest.mark.parametrize(("length", "prefix_bytes"), [(0, 1), (127, 1), (128, 2), (16383, 2), (16384, 3)])
def test_bytes_length_prefix_is_varint(length: int, prefix_bytes: int):
    """A bytes entry costs klen + key + tag + varint(len) + len."""
    # Execute
    blob = encode({"b": b"\x07" * length})

    # Assert
    assert len(blob) == 4 + 3 + prefix_bytes + length


# --- encode rejects ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"": 1}, "1..64 bytes"),
        ({"k" * 65: 1}, "1..64 bytes"),
        ({"é" * 33: 1}, "1..64 bytes"),  # 33 chars, 66 bytes
        ({"x": None}, "unsupported type NoneType"),
        ({"x": [1, 2]}, "unsupported type list"),
        ({"x": {"a": 1}}, "unsupported type dict"),
        ({f"k{i}": 0 for i in range(wire.MAX_ENTRIES + 1)}, "at most 255"),
    ],
)
def test_encode_rejects_unencodable(payload: dict, message: str):
    """encode refuses empty/over-long keys, too many entries and unsupported types with ValueError."""
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        encode(payload)


# --- decode rejects ---------------------------------------------------------------------------------------------


def test_decode_rejects_oversized_before_parsing():
    """A blob over max_bytes is rejected on its size alone: the message is the size one, not a parse error."""
    # Prepare: 10 MB of garbage that would fail the header check if it were parsed
    blob = b"\xff" * 10_000_000

    # Execute / Assert
    with pytest.raises(WireError, match="payload of 10000000 bytes exceeds the limit of 64"):
        decode(blob, max_bytes=64)


def test_decode_limit_is_inclusive():
    """A valid payload of n bytes decodes with max_bytes=n and is rejected with max_bytes=n-1."""
    # Prepare
    blob = encode(rich_payload())

    # Execute / Assert
    assert decode(blob, max_bytes=len(blob)) == rich_payload()
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(blob, max_bytes=len(blob) - 1)


@pytest.mark.parametrize("blob", [b"", b"E", b"ET", b"ET\x01", b"XX\x01\x00", b"ET\x02\x00", b"et\x01\x00"])
def test_decode_rejects_bad_header(blob: bytes):
    """Anything not starting with b"ET" + version 1 + a count is rejected as not an edgetune payload."""
    # Execute / Assert
    with pytest.raises(WireError, match="edgetune header"):
        decode(blob, max_bytes=LIMIT)


@pytest.mark.parametrize("blob", ["ET\x01\x00", memoryview(b"ET\x01\x00"), [69, 84, 1, 0], None])
def test_decode_rejects_non_bytes(blob):
    """decode takes bytes or bytearray only; anything else is a WireError naming the type."""
    # Execute / Assert
    with pytest.raises(WireError, match="must be bytes"):
        decode(blob, max_bytes=LIMIT)


def test_decode_accepts_bytearray():
    """A bytearray carrying a valid payload decodes like the same bytes."""
    # Prepare
    blob = bytearray(encode(rich_payload()))

    # Execute / Assert
    assert decode(blob, max_bytes=LIMIT) == rich_payload()


@pytest.mark.parametrize("extra", [b"\x00", b"ET\x01\x00", b"\xff" * 7])
def test_decode_rejects_trailing_bytes(extra: bytes):
    """Bytes after the last declared entry are rejected, with their count in the message."""
    # Prepare
    blob = encode({"a": 1}) + extra

    # Execute / Assert
    with pytest.raises(WireError, match=f"{len(extra)} trailing bytes"):
        decode(blob, max_bytes=LIMIT)


def test_decode_rejects_truncation_at_every_position():
    """Every proper prefix of a valid payload (every cut position) raises WireError, and nothing else."""
    # Prepare
    blob = encode(rich_payload())
    failures = []

    # Execute
    for cut in range(len(blob)):
        try:
            decode(blob[:cut], max_bytes=LIMIT)
            failures.append((cut, "accepted"))
        except WireError:
            pass
        except Exception as err:  # the property is "WireError and nothing else"
            failures.append((cut, repr(err)))

    # Assert
    assert len(blob) > 300
    assert failures == []


@pytest.mark.parametrize(
    "entries",
    [
        [entry(b"a", b"i", b"\x02"), entry(b"a", b"i", b"\x04")],  # duplicate
        [entry(b"b", b"i", b"\x02"), entry(b"a", b"i", b"\x04")],  # descending
        [entry(b"ab", b"i", b"\x02"), entry(b"a", b"i", b"\x04")],  # prefix after longer key
        [entry(b"a", b"i", b"\x00"), entry(b"c", b"i", b"\x00"), entry(b"b", b"i", b"\x00")],
    ],
)
def test_decode_rejects_duplicate_or_unsorted_keys(entries: list[bytes]):
    """Hand-built payloads with a repeated key or keys out of byte order are rejected."""
    # Prepare
    blob = frame(*entries)

    # Execute / Assert
    with pytest.raises(WireError, match="duplicated or out of order"):
        decode(blob, max_bytes=LIMIT)


def test_decode_accepts_hand_built_sorted_keys():
    """The same hand-built entries in ascending byte order decode (the crafting helper is sound)."""
    # Prepare
    blob = frame(entry(b"a", b"i", b"\x02"), entry(b"ab", b"i", b"\x04"), entry(b"b", b"t", b"\x00"))

    # Execute / Assert
    assert decode(blob, max_bytes=LIMIT) == {"a": 1, "ab": 2, "b": False}


@pytest.mark.parametrize("tag", [b"x", b"I", b"\x00", b"\xff", b"d"])
def test_decode_rejects_unknown_type_tag(tag: bytes):
    """A type byte other than b, s, i, f, t is rejected and named."""
    # Prepare
    blob = frame(entry(b"k", tag, b"\x00"))

    # Execute / Assert
    with pytest.raises(WireError, match="unknown type"):
        decode(blob, max_bytes=LIMIT)


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_decode_rejects_bad_utf8_string(bad: bytes):
    """A str value that is not valid UTF-8 (lone byte, bad continuation, surrogate, overlong) is rejected."""
    # Prepare
    blob = frame(entry(b"s", b"s", varint(len(bad)) + bad))

    # Execute / Assert
    with pytest.raises(WireError, match="not UTF-8"):
        decode(blob, max_bytes=LIMIT)


def test_decode_rejects_bad_utf8_key():
    """A key that is not valid UTF-8 is rejected."""
    # Prepare
    blob = frame(entry(b"\xff\xfe", b"i", b"\x00"))

    # Execute / Assert
    with pytest.raises(WireError, match="key is not UTF-8"):
        decode(blob, max_bytes=LIMIT)


def test_decode_keeps_non_utf8_bytes_value():
    """The same non-UTF-8 content is fine as a bytes value."""
    # Prepare
    blob = frame(entry(b"b", b"b", b"\x02\xc3\x28"))

    # Execute / Assert
    assert decode(blob, max_bytes=LIMIT) == {"b": b"\xc3\x28"}


@pytest.mark.parametrize("byte", [b"\x02", b"\x80", b"\xff", b""])
def test_decode_rejects_bool_not_zero_or_one(byte: bytes):
    """A bool value byte must be exactly 0 or 1 (and present)."""
    # Prepare
    blob = frame(entry(b"t", b"t", byte))

    # Execute / Assert
    with pytest.raises(WireError, match="bool 't' is malformed"):
        decode(blob, max_bytes=LIMIT)


@pytest.mark.parametrize("klen", [0, wire.MAX_KEY_BYTES + 1])
def test_decode_rejects_key_length_out_of_range(klen: int):
    """A key length of 0 or above MAX_KEY_BYTES is rejected even when the bytes are present."""
    # Prepare
    blob = frame(entry(b"k" * klen, b"i", b"\x00"))

    # Execute / Assert
    with pytest.raises(WireError, match="key length out of range"):
        decode(blob, max_bytes=LIMIT)


def test_decode_rejects_entry_count_over_limit():
    """A count above MAX_ENTRIES is rejected before any entry is read."""
    # Prepare
    blob = frame(count=wire.MAX_ENTRIES + 1)

    # Execute / Assert
    with pytest.raises(WireError, match="claims 256 entries"):
        decode(blob, max_bytes=LIMIT)


def test_decode_rejects_length_past_end():
    """A bytes/str length that runs past the end is rejected with the claimed and remaining sizes."""
    # Prepare
    blob = frame(entry(b"b", b"b", varint(1000) + b"abc"))

    # Execute / Assert
    with pytest.raises(WireError, match="claims 1000 bytes, only 3 left"):
        decode(blob, max_bytes=LIMIT)


def test_decode_rejects_overlong_varint():
    """A varint of more than 11 continuation bytes is rejected without building a huge number."""
    # Prepare
    blob = b"ET\x01" + b"\xff" * 100 + b"\x00"

    # Execute / Assert
    with pytest.raises(WireError, match="number is too long"):
        decode(blob, max_bytes=LIMIT)


def test_decode_rejects_truncated_float():
    """A float with fewer than 8 bytes left is rejected."""
    # Prepare
    blob = frame(entry(b"f", b"f", b"\x00" * 7))

    # Execute / Assert
    with pytest.raises(WireError, match="float 'f' is truncated"):
        decode(blob, max_bytes=LIMIT)


# --- fuzz ---------------------------------------------------------------------------------------------------------

ALLOWED_TYPES = (bytes, str, int, float, bool)


def check_decodes_or_wire_error(blob: bytes) -> bool:
    """Return True if decoded (to a str-keyed dict of allowed types), False on WireError; anything else fails."""
    try:
        out = decode(blob, max_bytes=4096)
    except WireError:
        return False
    assert isinstance(out, dict)
    assert all(isinstance(k, str) and isinstance(v, ALLOWED_TYPES) for k, v in out.items())
    return True


def test_fuzz_random_blobs_raise_only_wire_error():
    """5,000 random blobs (half with a valid header) either decode to a dict or raise WireError."""
    # Prepare
    rng = random.Random(1234)
    num_ok = 0

    # Execute
    for i in range(5000):
        body = rng.randbytes(rng.randrange(0, 80))
        blob = (wire.MAGIC + bytes([rng.randrange(0, 4)]) + body) if i % 2 else body
        num_ok += check_decodes_or_wire_error(blob)

    # Assert: the headers and small counts let some blobs through, so both branches ran
    assert 0 < num_ok < 5000


def mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:  # flip one bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert a byte
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 2 and b:  # delete a byte
            del b[rng.randrange(len(b))]
        elif op == 3 and b:  # overwrite a byte
            b[rng.randrange(len(b))] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF])
        elif b:  # duplicate a slice
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randrange(1, 9))
            b[i:i] = b[i:j]
    return bytes(b)


def test_fuzz_mutated_payloads_raise_only_wire_error():
    """5,000 mutations of valid payloads (bit flips, inserts, deletes, overwrites) decode or raise WireError."""
    # Prepare
    rng = random.Random(99)
    corpus = [
        encode(rich_payload()),
        encode({"a": 1, "b": 2.0, "c": "x", "d": b"y", "e": True}),
        encode({"codes": bytes(16), "hash": bytes(32), "loss": 1.25, "round": 7}),
        encode({}),
    ]
    num_ok = 0

    # Execute
    for i in range(5000):
        num_ok += check_decodes_or_wire_error(mutate(rng, corpus[i % len(corpus)]))

    # Assert: mutations that only touch values still decode, so both branches ran
    assert 0 < num_ok < 5000


# --- require ------------------------------------------------------------------------------------------------------

SCHEMA = {"n": int, "x": float, "s": str, "b": bytes, "ok": bool}


def good() -> dict:
    return {"n": 3, "x": 0.5, "s": "hi", "b": b"\x00", "ok": False}


@pytest.mark.parametrize("override", [{}, {"x": 2}, {"x": -0.0}, {"n": -(2**70)}, {"b": b""}, {"s": ""}])
def test_require_accepts_matching_payload(override: dict):
    """A payload with exactly the schema's keys and types passes; an int is a valid float."""
    # Prepare
    payload = good() | override

    # Execute / Assert
    assert require(payload, SCHEMA, where="test msg") is None


def test_require_rejects_missing_and_extra_keys():
    """Missing and unexpected keys are both listed, with the message's name."""
    # Prepare
    payload = good()
    del payload["x"]
    payload["zz"] = 1

    # Execute / Assert
    with pytest.raises(WireError, match=r"site-2 reply: missing fields \['x'\], unexpected fields \['zz'\]"):
        require(payload, SCHEMA, where="site-2 reply")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("n", "3", "'n' must be int, got str"),
        ("n", 3.0, "'n' must be int, got float"),
        ("n", True, "'n' must be int, got bool"),
        ("x", False, "'x' must be float, got bool"),
        ("x", "0.5", "'x' must be float, got str"),
        ("s", b"hi", "'s' must be str, got bytes"),
        ("b", "hi", "'b' must be bytes, got str"),
        ("b", bytearray(b"x"), "'b' must be bytes, got bytearray"),
        ("ok", 1, "'ok' must be bool, got int"),
    ],
)
def test_require_rejects_wrong_types(key: str, value, message: str):
    """Each field must have its schema type; bool never passes as int or float, nor int as bool."""
    # Prepare
    payload = good() | {key: value}

    # Execute / Assert
    with pytest.raises(WireError, match=f"test msg: field {message}"):
        require(payload, SCHEMA, where="test msg")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_require_rejects_non_finite_floats(value: float):
    """A float field must be finite: NaN and infinities are rejected by name."""
    # Prepare
    payload = good() | {"x": value}

    # Execute / Assert
    with pytest.raises(WireError, match="field 'x' is not finite"):
        require(payload, SCHEMA, where="test msg")


# --- regressions: bugs found by these tests, now fixed ---


@pytest.mark.parametrize("value", [2**63, 2**64 + 5, 2**70, 2**80, -(2**63) - 1, -(2**70), -(2**100)])
def test_ints_beyond_int64_are_refused_by_encode_and_decode(value: int):
    """Past int64, encode refuses an int by name, and decode refuses the zigzag varint that would carry it
    (regression: encode used to emit payloads that decode rejected)."""
    # Execute / Assert
    with pytest.raises(ValueError, match="payload int 'x' is outside int64"):
        encode({"x": value})
    zigzag = (value << 1) if value >= 0 else ((-value) << 1) - 1
    with pytest.raises(WireError, match="outside int64|too long"):
        decode(frame(entry(b"x", b"i", varint(zigzag))), max_bytes=LIMIT)


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63), 0, -1])
def test_int64_edges_round_trip(value: int):
    """The int64 range itself, both ends included, round-trips exactly."""
    # Execute / Assert
    assert decode(encode({"x": value}), max_bytes=LIMIT) == {"x": value}


@pytest.mark.parametrize(
    "blob",
    [
        frame(entry(b"a", b"i", b"\x80\x00")),  # int 0 as two bytes
        frame(entry(b"b", b"b", b"\x81\x00x")),  # length 1 as two bytes
        b"ET\x01\x80\x00",  # count 0 as two bytes
    ],
)
def test_decode_accepts_only_canonical_encoding(blob: bytes):
    """A number written with more bytes than needed is refused, so every accepted payload is the canonical
    encoding of what it decodes to (encode(decode(b)) == b)."""
    # Execute / Assert
    with pytest.raises(WireError, match="not minimally encoded"):
        decode(blob, max_bytes=LIMIT)
