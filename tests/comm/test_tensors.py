"""Tensor codecs: exact sizes, error bounds, and rejection of malformed or non-finite payloads."""

from __future__ import annotations

import pytest
import torch

from edgetune.comm.codecs import CodecError
from edgetune.comm.tensors import TENSOR_CODECS, decode_tensors, encode_tensors

SHAPES = [(8, 16), (5,), (3, 4)]


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


@pytest.mark.parametrize(
    ("codec", "per_value", "max_rel_err"),
    [("fp32", 4, 0.0), ("fp16", 2, 1e-3), ("bf16", 2, 8e-3), ("int8-row", 1, 1 / 127)],
)
def test_round_trip_size_and_error(codec, per_value, max_rel_err):
    """Each codec writes its stated bytes per value (+ one fp32 scale per row for int8-row) and
    decodes within its error bound (relative to the row's largest magnitude)."""
    ts = _tensors()
    blob = encode_tensors(ts, codec)
    rows = 8 + 1 + 3 if codec == "int8-row" else 0
    assert len(blob) == per_value * sum(t.numel() for t in ts) + 4 * rows
    out = decode_tensors(blob, SHAPES, codec)
    for t, o in zip(ts, out):
        assert o.shape == t.shape and o.dtype == torch.float32
        scale = t.abs().amax(dim=-1, keepdim=True) if codec == "int8-row" else t.abs()
        assert bool(((o - t).abs() <= max_rel_err * scale + 1e-12).all())


@pytest.mark.parametrize("codec", sorted(TENSOR_CODECS))
def test_wrong_size_rejected(codec):
    """One byte too few or too many is rejected before decoding (e.g. a wrong LoRA rank)."""
    blob = encode_tensors(_tensors(), codec)
    for bad in (blob[:-1], blob + b"\x00", b""):
        with pytest.raises(CodecError, match="expected"):
            decode_tensors(bad, SHAPES, codec)


def test_non_finite_refused_both_ways():
    """NaN/inf are refused at encoding, and a NaN smuggled into the bytes is rejected at decoding."""
    ts = _tensors()
    ts[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encode_tensors(ts, "fp32")
    blob = bytearray(encode_tensors(_tensors(), "fp32"))
    blob[4:8] = b"\x00\x00\x80\x7f"  # +inf
    with pytest.raises(CodecError, match="non-finite"):
        decode_tensors(bytes(blob), SHAPES, "fp32")


def test_fp16_overflow_refused_and_max_abs_enforced():
    """Values beyond fp16's range are not silently sent as inf; decoding enforces max_abs."""
    with pytest.raises(ValueError, match="fp16"):
        encode_tensors([torch.tensor([1e5])], "fp16")
    blob = encode_tensors([torch.tensor([3.0, -250.0])], "fp32")
    with pytest.raises(CodecError, match=r"\|value\| 250"):
        decode_tensors(blob, [(2,)], "fp32", max_abs=100.0)


def test_int8_row_rejects_bad_scales_and_reserved_code():
    """int8-row: a negative or NaN scale, or the reserved code -128, is rejected."""
    blob = bytearray(encode_tensors([torch.ones(2, 3)], "int8-row"))
    neg = bytearray(blob)
    neg[0:4] = b"\x00\x00\x80\xbf"  # -1.0
    with pytest.raises(CodecError, match="scales"):
        decode_tensors(bytes(neg), [(2, 3)], "int8-row")
    reserved = bytearray(blob)
    reserved[8] = 0x80
    with pytest.raises(CodecError, match="-128"):
        decode_tensors(bytes(reserved), [(2, 3)], "int8-row")


def test_unknown_codec_rejected():
    """A codec name the receiver does not know is an error, not a guess."""
    with pytest.raises(CodecError, match="unknown"):
        decode_tensors(b"", [(1,)], "fp8")
