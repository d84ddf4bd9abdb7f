"""One-byte scalar codecs: bounded decode of every byte, unbiased rounding inside the clip, strict lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgetune.comm.codecs import SCALAR_CODECS, CodecError, Int8SR, Log8
from edgetune.config import SpsaSection

CODECS = [Int8SR(), Log8()]
IDS = [c.name for c in CODECS]
SCALES = [1.0, 8.0, 0.3, 2.0**-10, 1e-30, 1e30]
N = 20_000


def roundtrip(codec, values: np.ndarray, uniforms: np.ndarray, scale: float) -> np.ndarray:
    return codec.decode(codec.encode(values, uniforms, scale), values.size, scale)


# --- every byte decodes to a bounded, finite value ----------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
def test_int8sr_every_byte_is_bounded_or_rejected(scale: float):
    """Every byte but 0x80 decodes to a finite value with |v| <= scale; 0x80 (-128) raises CodecError."""
    # Prepare
    codec = Int8SR()
    values = {}

    # Execute
    for b in range(256):
        if b == 0x80:
            with pytest.raises(CodecError, match="-128 is reserved"):
                codec.decode(bytes([b]), 1, scale)
            continue
        values[b] = codec.decode(bytes([b]), 1, scale)[0]

    # Assert
    v = np.array(list(values.values()))
    assert len(v) == 255 and np.all(np.isfinite(v)) and np.all(np.abs(v) <= scale)
    assert len(set(v.tolist())) == 255  # no two codes waste a level
    assert values[127] == pytest.approx(scale, rel=1e-15) and values[0x81] == pytest.approx(-scale, rel=1e-15)
    assert values[0] == 0.0


def test_int8sr_rejects_reserved_code_inside_a_longer_blob():
    """One -128 byte anywhere in a blob rejects the whole blob."""
    # Prepare
    blob = bytes([1, 2, 3, 0x80, 5])

    # Execute / Assert
    with pytest.raises(CodecError, match="reserved"):
        Int8SR().decode(blob, 5, 1.0)


@pytest.mark.parametrize("scale", SCALES)
def test_log8_every_byte_is_bounded(scale: float):
    """All 256 Log8 codes decode to finite values with |v| <= scale, 255 distinct values (+0 and -0 equal)."""
    # Prepare
    blob = bytes(range(256))

    # Execute
    v = Log8().decode(blob, 256, scale)

    # Assert
    assert v.shape == (256,) and v.dtype == np.float64
    assert np.all(np.isfinite(v)) and np.all(np.abs(v) <= scale)
    assert len(set(v.tolist())) == 255


def test_log8_grid_is_two_to_the_eighth_root():
    """Log8 magnitudes: code 0 is 0, code 127 is the scale, neighbours differ by 2**(1/8), sign bit mirrors."""
    # Prepare
    scale = 8.0

    # Execute
    pos = Log8().decode(bytes(range(128)), 128, scale)
    neg = Log8().decode(bytes(range(128, 256)), 128, scale)

    # Assert
    assert pos[0] == 0.0 and pos[127] == scale
    assert pos[1] == pytest.approx(scale * 2.0 ** (-126 / 8), rel=1e-15)
    np.testing.assert_allclose(pos[2:] / pos[1:-1], 2.0 ** (1 / 8), rtol=1e-13)
    np.testing.assert_array_equal(neg, -pos)


# --- stochastic rounding is unbiased inside the clip --------------------------------------------------------------

INSIDE = [0.0, 1e-6, -3.7e-5, 0.0337, -0.5, 1.0, 2.718281828, -6.1, 7.99, -8.0, 8.0]


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@pytest.mark.parametrize("value", INSIDE)
def test_unbiased_inside_clip_random_uniforms(codec, value: float):
    """Mean of decode(encode(v, u)) over 20,000 uniform u is within 5 standard errors of v (scale 8)."""
    # Prepare
    rng = np.random.default_rng(20240611)
    u = rng.random(N)
    values = np.full(N, value)

    # Execute
    out = roundtrip(codec, values, u, 8.0)

    # Assert: exact when v is on the grid (zero spread), else within 5 SE
    se = out.std(ddof=1) / math.sqrt(N)
    assert abs(out.mean() - value) <= 5 * se + 1e-12
    assert len(np.unique(out)) <= 2  # only the two neighbouring levels are ever sent


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@pytest.mark.parametrize("value", INSIDE)
def test_unbiased_inside_clip_stratified_uniforms(codec, value: float):
    """With evenly spaced uniforms the mean hits v to within one level width / N: no bias of any size hides."""
    # Prepare: the widest gap between the two levels around v
    scale = 8.0
    if codec.name == "int8-sr":
        width = scale / 127
    else:
        width = max(abs(value) * (2.0 ** (1 / 8) - 1), scale * 2.0 ** (-126 / 8))
    u = (np.arange(N) + 0.5) / N
    values = np.full(N, value)

    # Execute
    out = roundtrip(codec, values, u, scale)

    # Assert
    assert abs(out.mean() - value) <= width / N + 1e-12


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_decoded_value_is_a_neighbouring_level(codec):
    """Each decoded value is one of the two grid levels around v: Int8SR within one step, Log8 within 2**(1/8)."""
    # Prepare
    rng = np.random.default_rng(7)
    scale = 4.0
    values = rng.uniform(-scale, scale, 5000)
    values = values[np.abs(values) > scale * 2.0**-15]  # Log8's relative bound holds above its smallest level

    # Execute
    out = roundtrip(codec, values, rng.random(values.size), scale)

    # Assert: never the wrong sign (Int8SR may round small values to 0)
    assert np.all(out * values >= 0)
    if codec.name == "int8-sr":
        assert np.all(np.abs(out - values) < scale / 127 * (1 + 1e-9))
    else:
        ratio = out / values
        assert np.all((ratio >= 2.0 ** (-1 / 8) * (1 - 1e-12)) & (ratio <= 2.0 ** (1 / 8) * (1 + 1e-12)))


# --- outside the clip: saturation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@pytest.mark.parametrize("value", [8.0001, 9.0, 1e6, 1e300, -8.0001, -1e300])
def test_outside_clip_saturates(codec, value: float):
    """Values beyond +-scale decode to exactly the signed clip, whatever the uniform."""
    # Prepare: (u within 2**-47 of 1 is left out: -127 + u then rounds to -126 in float64)
    u = np.array([0.0, 0.25, 0.5, 0.999999, 1 - 2.0**-40])
    values = np.full(u.size, value)

    # Execute
    out = roundtrip(codec, values, u, 8.0)

    # Assert
    np.testing.assert_allclose(out, math.copysign(8.0, value), rtol=1e-15)


# --- encode / decode input checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_rejects_non_finite(codec, bad: float):
    """A NaN or infinite scalar cannot be encoded (ValueError), even among finite ones."""
    # Prepare
    values = np.array([0.5, bad, -0.5])

    # Execute / Assert
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(values, np.full(3, 0.5), 1.0)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf])
def test_bad_scale_rejected_both_ways(codec, scale: float):
    """A scale that is not finite and positive is refused by encode (ValueError) and decode (CodecError)."""
    # Execute / Assert
    with pytest.raises(ValueError, match="scale must be finite and positive"):
        codec.encode(np.array([0.1]), np.array([0.5]), scale)
    with pytest.raises(CodecError, match="scale must be finite and positive"):
        codec.decode(b"\x01", 1, scale)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_encode_rejects_mismatched_uniforms(codec):
    """Values and uniforms must have the same shape."""
    # Execute / Assert
    with pytest.raises(ValueError, match="uniforms"):
        codec.encode(np.zeros(3), np.zeros(2), 1.0)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@pytest.mark.parametrize(("count", "blob"), [(4, b"\x01\x02\x03"), (4, b"\x01" * 5), (4, b""), (0, b"\x01")])
def test_decode_rejects_wrong_length(codec, count: int, blob: bytes):
    """decode needs exactly one byte per expected scalar: short, long and empty blobs raise CodecError."""
    # Execute / Assert
    with pytest.raises(CodecError, match=f"expected {count} one-byte scalars, got {len(blob)} bytes"):
        codec.decode(blob, count, 1.0)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@pytest.mark.parametrize("blob", ["\x01", [1], np.array([1], dtype=np.uint8), memoryview(b"\x01")])
def test_decode_rejects_non_bytes(codec, blob):
    """decode takes bytes or bytearray only."""
    # Execute / Assert
    with pytest.raises(CodecError, match="must be bytes"):
        codec.decode(blob, 1, 1.0)


# --- size and determinism -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_exactly_one_byte_per_scalar(codec, n: int):
    """encode of n scalars is n bytes, and decode returns n float64 values (empty included)."""
    # Prepare
    rng = np.random.default_rng(n)
    values = rng.normal(0, 3, n)

    # Execute
    blob = codec.encode(values, rng.random(n), 8.0)
    out = codec.decode(blob, n, 8.0)

    # Assert
    assert isinstance(blob, bytes) and len(blob) == n
    assert out.shape == (n,) and out.dtype == np.float64


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_deterministic_for_fixed_uniforms(codec):
    """The same values and uniforms give the same bytes (fresh instance too); other uniforms change them."""
    # Prepare
    rng = np.random.default_rng(3)
    values = rng.uniform(-2, 2, 256)
    u1, u2 = rng.random(256), rng.random(256)

    # Execute
    a = codec.encode(values, u1, 2.0)
    b = type(codec)().encode(values.copy(), u1.copy(), 2.0)
    c = codec.encode(values, u2, 2.0)

    # Assert
    assert a == b
    assert a != c


def test_registry_matches_config_choices():
    """SCALAR_CODECS is keyed by each codec's name, and spsa.scalar_codec accepts exactly those names and sign[:B]."""
    # Execute
    accepted = set()
    names = ["int8-sr", "log8", "float16", "int8", "Log8", "sign", "sign:1", "sign:65536", "sign:0", "sign:016"]
    for name in [*names, "sign:65537", "sign:", "sign:-1", "sign:1.5", "signs", "SIGN"]:
        try:
            SpsaSection(scalar_codec=name)
            accepted.add(name)
        except ValueError:
            pass

    # Assert
    assert {k: c.name for k, c in SCALAR_CODECS.items()} == {"int8-sr": "int8-sr", "log8": "log8"}
    assert accepted == {*SCALAR_CODECS, "sign", "sign:1", "sign:65536"}


# --- regressions: bugs found by these tests, now fixed ---


def test_int8sr_bound_holds_to_the_ulp():
    """|decode(b)| <= scale holds exactly (not within an ulp) for every scale, as the docstring promises."""
    # Prepare: 1.9929834067948615 is one scale where 127 * (s / 127) rounds up past s
    scales = [1.9929834067948615, *np.random.default_rng(0).uniform(0.5, 2.0, 2000).tolist()]

    # Execute
    top = np.array([Int8SR().decode(b"\x7f", 1, s)[0] for s in scales])

    # Assert
    assert np.all(top <= np.array(scales))


def test_encode_rejects_scalar_value_with_array_uniforms():
    """A 0-d value with 2 uniforms is a shape mismatch reported as ValueError, not a crash in the message."""
    # Execute / Assert
    with pytest.raises(ValueError, match="uniforms"):
        Int8SR().encode(np.float64(1.0), np.array([0.5, 0.5]), 1.0)
