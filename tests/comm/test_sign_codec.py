"""The one-bit ``sign`` codec: sizes, bounded decoding of any blob, strict padding, the magnitude rule, and the
claim that makes it worth a bit: m sign(g) is an unbiased projected gradient when g is mostly probe noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgetune.comm.codecs import CodecError, SignBlocks, codec_for, sign_magnitude, sign_magnitude_code


def _encode(codec, values: np.ndarray, uniforms: np.ndarray, scale: float) -> tuple[bytes, np.ndarray]:
    """Encode a (K, P) array step by step; the blob and what the encoder said each scalar decodes to."""
    enc = codec.encoder(scale, values.shape[1])
    out = np.concatenate([enc.step(values[k], uniforms[k]) for k in range(values.shape[0])])
    return enc.blob(), out


@pytest.mark.parametrize(("spec", "steps", "probes", "size"), [
    ("sign", 180, 8, 12 + 180),   # ceil(180 / 16) magnitude bytes + 1,440 bits
    ("sign:1", 4, 1, 4 + 1),
    ("sign:4", 5, 3, 2 + 2),      # 15 bits -> 2 bytes
    ("sign:65536", 1, 1, 1 + 1),
    ("int8-sr", 180, 8, 1440),
    ("log8", 3, 2, 6),
])  # fmt: skip
def test_blob_length_is_magnitudes_plus_packed_bits(spec, steps, probes, size):
    """The encoder writes exactly blob_len bytes, and the decoder takes exactly that many."""
    # Prepare
    codec = codec_for(spec)
    rng = np.random.default_rng(1)
    values, uniforms = rng.normal(size=(steps, probes)), rng.random((steps, probes))

    # Execute
    blob, said = _encode(codec, values, uniforms, 4.0)

    # Assert
    assert codec.blob_len(steps, probes) == len(blob) == size
    assert np.array_equal(codec.decode(blob, steps, probes, 4.0), said)  # the site's trajectory is the server's
    what = "bytes of sign codes" if spec.startswith("sign") else "one-byte scalars"
    for wrong in (blob[:-1], blob + b"\x00"):
        with pytest.raises(CodecError, match=f"expected {size} {what}.*, got {len(wrong)} bytes"):
            codec.decode(wrong, steps, probes, 4.0)


@pytest.mark.parametrize("scale", [1.0, 8.0, 2.0**-10, 1e-30, 1e30])
def test_every_magnitude_byte_decodes_finite_and_within_the_clip(scale):
    """All 256 magnitude codes: 0 is zero, 255 is the clip, neighbours a 2^(1/8) apart, all finite and <= scale."""
    # Execute
    m = np.array([sign_magnitude(c, scale) for c in range(256)])

    # Assert
    assert m[0] == 0.0 and m[255] == scale
    assert np.all(np.isfinite(m)) and np.all(m <= scale) and np.all(np.diff(m) > 0)
    assert np.allclose(m[2:] / m[1:-1], 2.0 ** (1 / 8), rtol=1e-14)


def test_any_blob_decodes_bounded_and_padding_bits_are_refused():
    """Random blobs (what a lying site could send) decode to |v| <= scale unless their padding bits are set."""
    # Prepare
    codec = SignBlocks(4)
    rng = np.random.default_rng(7)
    decoded = refused = 0

    # Execute
    for _ in range(300):
        blob = rng.integers(0, 256, codec.blob_len(9, 3), dtype=np.uint8).tobytes()  # 27 bits: 5 padding bits
        try:
            v = codec.decode(blob, 9, 3, 2.5)
        except CodecError as err:
            assert "unused bits" in str(err)
            assert blob[-1] >> 3  # only a set padding bit is refused
            refused += 1
            continue
        assert v.shape == (27,) and np.all(np.isfinite(v)) and np.all(np.abs(v) <= 2.5)
        decoded += 1

    # Assert
    assert decoded > 0 and refused > 0


def test_block_magnitude_comes_from_its_first_step_and_is_shared():
    """Steps 0-1 share the magnitude of step 0's scalars (sqrt(pi/2) x RMS on the grid), step 2 starts a block."""
    # Prepare
    codec = SignBlocks(2)
    values = np.array([[3.0, -4.0], [100.0, -0.001], [0.5, 0.5]])
    uniforms = np.full_like(values, 0.25)

    # Execute
    blob, said = _encode(codec, values, uniforms, 1e3)

    # Assert
    m0 = sign_magnitude(sign_magnitude_code(math.sqrt(math.pi / 2 * 12.5), 1e3), 1e3)
    m2 = sign_magnitude(sign_magnitude_code(math.sqrt(math.pi / 2 * 0.25), 1e3), 1e3)
    assert said.tolist() == [m0, -m0, m0, -m0, m2, m2]
    assert m0 == pytest.approx(math.sqrt(math.pi / 2 * 12.5), rel=0.045)  # half a grid step
    assert blob[:2] == bytes([sign_magnitude_code(math.sqrt(math.pi / 2 * 12.5), 1e3), blob[1]])


def test_magnitude_is_clipped_and_zero_scalars_take_their_sign_from_the_uniform():
    """A block whose RMS exceeds the clip gets the clip; g == 0 is +m for u < 0.5, -m otherwise; an all-zero
    step has m = 0; one far below the clip has the grid's smallest magnitude, not zero (the clip can follow it)."""
    # Prepare
    codec = SignBlocks(1)
    values = np.array([[50.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1e-100, -1e-100, 0.0]])
    uniforms = np.array([[0.9, 0.1, 0.7], [0.1, 0.9, 0.5], [0.0, 0.0, 0.0]])

    # Execute
    _, said = _encode(codec, values, uniforms, 2.0)

    # Assert
    assert said[:3].tolist() == [2.0, 2.0, -2.0]
    assert np.all(said[3:6] == 0.0)
    smallest = sign_magnitude(1, 2.0)
    assert said[6:].tolist() == [smallest, -smallest, smallest] and smallest == 2.0 * 2.0**-31.75


def test_sign_times_magnitude_is_an_unbiased_projection_in_the_noise_regime():
    """g = mu + noise with |mu| << noise: the mean of m sign(g) z over many probes recovers mu's direction and size
    within sampling error, as the mean of g z does (the reason one bit carries the probe)."""
    # Prepare
    rng = np.random.default_rng(3)
    d, probes, steps = 64, 8, 4000
    grad = rng.normal(size=d) * 0.05
    codec = SignBlocks(1)
    enc = codec.encoder(8.0, probes)
    est_sign, est_exact = np.zeros(d), np.zeros(d)

    # Execute
    for _ in range(steps):
        z = rng.choice([-1.0, 1.0], size=(probes, d))
        g = z @ grad + rng.normal(size=probes)  # batch noise dominates
        est_exact += (g[:, None] * z).mean(0)
        est_sign += (enc.step(g, rng.random(probes))[:, None] * z).mean(0)

    # Assert
    est_sign, est_exact = est_sign / steps, est_exact / steps
    cos = est_sign @ grad / np.linalg.norm(est_sign) / np.linalg.norm(grad)
    assert cos > 0.9
    assert np.linalg.norm(est_sign) / np.linalg.norm(est_exact) == pytest.approx(1.0, abs=0.15)


def test_plans_and_logs_refuse_unknown_codec_specs():
    """codec_for names what it refused."""
    for bad in ["sign:0", "sign:x", "bits", ""]:
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            codec_for(bad)
