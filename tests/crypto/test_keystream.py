"""Portable perturbation stream: golden values, seeking, thread and device invariance."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from edgetune.crypto import keystream, schedule

GOLDEN_KEY = schedule.derive(schedule.run_key(0), "test", "golden")
GOLDEN_N = 2**20 + 3
# sha256 of the float32 bytes of z = rademacher(GOLDEN_KEY, tensor 3, 2**20 + 3). Pinned: a change
# here breaks bitwise compatibility with every deployed site and every stored replay log.
GOLDEN_SHA256 = "c0c1cd41e9120e7a056516a65ce6baa9e857a7c1efe992ce94af18b6706df180"


def _z_hash(device: str = "cpu") -> str:
    z = keystream.rademacher(GOLDEN_KEY, 3, GOLDEN_N, device=device)
    return hashlib.sha256(z.cpu().numpy().tobytes()).hexdigest()


def test_golden_stream_hash():
    """The stream for a fixed key is pinned bit for bit."""
    assert _z_hash() == GOLDEN_SHA256


@pytest.mark.parametrize("threads", [1, 2])
def test_stream_independent_of_thread_count(threads):
    """The same z comes out with 1 and 2 torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _z_hash() == GOLDEN_SHA256
    finally:
        torch.set_num_threads(before)


@pytest.mark.gpu
def test_stream_identical_on_cuda():
    """z expanded on a CUDA device equals the CPU stream (integer-only pipeline)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert _z_hash("cuda") == GOLDEN_SHA256


def test_bit_order_is_lsb_first():
    """Element e is bit e % 8 (least significant first) of byte e // 8; bit 1 means +1."""
    packed = keystream.bits(GOLDEN_KEY, 3, 0, 16)
    z = keystream.rademacher(GOLDEN_KEY, 3, 16)
    expected = [1.0 if (int(packed[e // 8]) >> (e % 8)) & 1 else -1.0 for e in range(16)]
    assert z.tolist() == expected


def test_seeking_equals_full_generation():
    """Any 512-aligned chunk generated alone equals the same slice of the whole stream."""
    full = keystream.bits(GOLDEN_KEY, 7, 0, 40_000)
    for start in (0, 512, 4096, 39_424):
        part = keystream.bits(GOLDEN_KEY, 7, start, 40_000 - start)
        assert np.array_equal(part, full[start // 8 :])
    with pytest.raises(ValueError, match="multiples of 512"):
        keystream.bits(GOLDEN_KEY, 7, 100, 10)


def test_tensors_and_keys_get_independent_streams():
    """Different tensor indices or keys give different z (no reuse across tensors or probes)."""
    a = keystream.rademacher(GOLDEN_KEY, 0, 4096)
    b = keystream.rademacher(GOLDEN_KEY, 1, 4096)
    c = keystream.rademacher(schedule.derive(schedule.run_key(0), "test", "other"), 0, 4096)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    # roughly balanced signs: |sum| of 4096 fair signs is < 6 sigma = 384
    assert abs(float(a.sum())) < 384


def test_chunked_add_equals_dense_add(monkeypatch):
    """add_ over several chunks equals w + alpha * z computed densely."""
    monkeypatch.setattr(keystream, "CHUNK_ELEMS", 1024)
    w = torch.linspace(-1, 1, 5000).reshape(50, 100)
    dense = w + 2.0**-10 * keystream.rademacher(GOLDEN_KEY, 5, w.numel()).view_as(w)
    keystream.add_(w, GOLDEN_KEY, 5, 2.0**-10)
    assert torch.equal(w, dense)


def test_replay_kernel_is_sequential_per_term(monkeypatch):
    """add_many_ applies w -= c_k z_k one term at a time, in order (one rounding per term)."""
    monkeypatch.setattr(keystream, "CHUNK_ELEMS", 1024)
    keys = [schedule.derive(GOLDEN_KEY, "test", i) for i in range(3)]
    coeffs = [1e-3, -3.3e-4, 7.1e-9]
    w = torch.full((3000,), 0.1)
    expected = w.clone()
    for k, c in zip(keys, coeffs):
        expected = expected - c * keystream.rademacher(k, 2, 3000)
    keystream.add_many_(w, 2, list(zip(keys, coeffs)))
    assert torch.equal(w, expected)


@pytest.mark.parametrize("masked", [False, True])
def test_directions_apply_bitwise_like_tensor_by_tensor(monkeypatch, masked):
    """add_directions_ (one multi-tensor add per chunk of the concatenated bits) leaves every tensor
    bitwise where add_ tensor by tensor leaves it: sizes that are not multiples of 8 (padding bits
    between tensors), tensors spanning chunk borders, several tensors in one chunk, an empty one."""
    monkeypatch.setattr(keystream, "CHUNK_ELEMS", 1024)
    key = b"k" * 32
    shapes = [(37, 29), (5,), (0,), (3000,), (16, 64), (1,), (2049,)]
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=gen) for s in shapes]
    masks = [(torch.rand(s, generator=gen) < 0.5).float() for s in shapes] if masked else None
    dirs = keystream.directions(key, [w.numel() for w in base])
    for i, w in enumerate(base):
        assert torch.equal(dirs.tensor(i), keystream.tensor_bits(key, i, w.numel()))
    one = [w.clone() for w in base]
    grouped = [w.clone() for w in base]
    for alpha in (1e-3, -2e-3, 0.0, 1e-3 / 3):
        for i, w in enumerate(one):
            keystream.add_(w, key, i, alpha, mask=None if masks is None else masks[i])
        keystream.add_directions_(grouped, dirs, alpha, masks, grouped=True)
        for a, b in zip(one, grouped):
            assert torch.equal(a, b) and torch.equal(a.view(-1).view(torch.int32), b.view(-1).view(torch.int32))
    assert any(not torch.equal(a, b) for a, b in zip(one, base) if a.numel())  # it did move them


def test_directions_refuse_tensors_of_other_sizes():
    dirs = keystream.directions(b"k" * 32, [8, 9])
    with pytest.raises(ValueError, match="do not match"):
        keystream.add_directions_([torch.zeros(8), torch.zeros(10)], dirs, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        keystream.add_directions_([torch.zeros(8)], dirs, 1.0)


def test_directions_group_only_tensors_of_one_dtype_and_only_where_asked(monkeypatch):
    """Tensor by tensor (``add_``) on the CPU by default and for mixed dtypes even when grouping is asked
    for; grouped (no ``add_`` call) otherwise. Either way every tensor gets its own z."""
    calls: list[int] = []
    per_tensor = keystream.add_

    def spy(param, key, index, *args, **kwargs):
        calls.append(index)
        per_tensor(param, key, index, *args, **kwargs)

    monkeypatch.setattr(keystream, "add_", spy)
    key = b"m" * 32
    dirs = keystream.directions(key, [100, 50])
    cases = [
        ([torch.zeros(100), torch.zeros(50, dtype=torch.float64)], True, [0, 1]),  # mixed: one by one
        ([torch.zeros(100), torch.zeros(50)], None, [0, 1]),  # the CPU's default
        ([torch.zeros(100), torch.zeros(50)], True, []),  # grouped
    ]
    for ws, grouped, expected_calls in cases:
        calls.clear()
        keystream.add_directions_(ws, dirs, 0.5, grouped=grouped)
        assert calls == expected_calls
        for i, w in enumerate(ws):
            assert torch.equal(w, 0.5 * keystream.rademacher(key, i, w.numel(), dtype=w.dtype))


@pytest.mark.gpu
def test_directions_on_cuda_equal_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    key = b"g" * 32
    shapes = [(576, 576), (576, 192), (3,), (2_500_001,)]
    gen = torch.Generator().manual_seed(5)
    cpu = [torch.randn(s, generator=gen) for s in shapes]
    gpu = [w.cuda() for w in cpu]
    numels = [w.numel() for w in cpu]
    for alpha in (1e-3, -2e-3):
        keystream.add_directions_(cpu, keystream.directions(key, numels), alpha)
        keystream.add_directions_(gpu, keystream.directions(key, numels, "cuda"), alpha)  # grouped: CUDA's default
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
