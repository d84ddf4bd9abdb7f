"""Fuzz (security.md 5.1): random and mutated payloads of every message type, in both directions.

Every message type gets uniformly random bytes (0..2x the largest acceptable size), valid payloads
with 1-8 bit flips, truncations, insertions and deletions, mutations inside one field (nested wire
payloads included: the plan inside a round message, the log of an spsa message), field-level
mutations (missing, extra, retyped and swapped fields, NaN/inf floats, negative and huge ints,
empty bytes, another message type's payload), encoding tricks (huge length prefixes, duplicate or
unsorted keys, non-minimal varints, unknown types) and valid payloads replayed to the wrong site,
round or run. Downlink messages go through ``wire.decode`` and ``client.step`` as
``InProcTransport`` calls them; uplink replies through ``federation._decode_replies`` and
``server.aggregate`` as ``run_round`` calls them.

Invariants:

* zero crashes: each call returns or raises a ``ValueError`` (``WireError``, ``CodecError``,
  ``EnvelopeError``, ``ReplyRejected``, ``MessageError`` or a plain one). The eight bugs the fuzz
  found are fixed and pinned by the ``test_bug_*`` regression tests at the end of this file;
  ``KNOWN_CRASHES`` / ``KNOWN_ACCEPTED`` are where a newly found one goes, with an xfail test,
  until it is fixed.
* zero accepted: spsa is signed (downlink) and sealed with an AEAD bound to (run, round, site)
  (uplink), so every mutated or replayed spsa payload is rejected. kavg, lowrank, dppf and deft
  payloads are not authenticated, so a mutation can give a different but well-formed payload (a
  flipped mantissa bit in a weight). An independent oracle sorts each case: a payload it calls
  malformed must be rejected (``accepted_structural == 0``); well-formed value-level changes and
  replays are counted and printed, not failed.
* the server state: a malformed reply is aggregated alone, with the run's own quorum, so if it were
  accepted the round would commit; the state hash must not move. A well-formed one is aggregated
  next to two honest replies (the norm screen needs three sites) with a quorum above the number of
  sites, so nothing commits. After the fuzz an honest round commits and lands on the hash of a run
  that never saw the fuzz.

Sizes: the weight-carrying algorithms train the tiny model's LoRA factors (1,792 values) rather than
all 107,200 weights, so a mutated copy costs microseconds; the message layout is the same. Client
halves train for real in the first ``REAL_TRAINING_CALLS`` accepted cases of a test, then through
a stand-in that builds the same optimizer (so torch still rejects a negative lr or momentum) but
skips the forward and backward passes; a plan asking for more than ``MAX_FUZZ_STEPS`` steps or
``MAX_FUZZ_BATCH`` examples is counted as accepted (``unbounded``) without running it.
Run with ``-s`` to see the per-type counts.
"""

from __future__ import annotations

import io
import math
import random
import re
import struct
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_flat
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import deft, training
from edgetune.comm import wire
from edgetune.comm.tensors import TENSOR_CODECS
from edgetune.crypto import envelope
from edgetune.crypto import keys as keymod
from edgetune.crypto.guardfile import ReplayGuard
from edgetune.federation import Failure, _decode_replies, run_round
from edgetune.flower.messages import BLOB_KEY, LARGE_KEY, SMALL_KEY, MessageError, from_content

NUM_SITES = 3
SEED = 20240501
CASES = {
    "spsa round message": 2500,
    "spsa reply": 3000,
    "kavg round message": 1500,
    "kavg reply": 2500,
    "lowrank round message": 1000,
    "lowrank reply": 600,
    "dppf round message": 800,
    "dppf reply": 1500,
    "deft indices message": 800,
    "deft indices reply": 2500,
    "deft values message": 1500,
    "deft values reply": 2000,
    "flower content": 2500,
}
"""Cases per message type (22,700 in all; replays come on top). Lower where a case costs more:
a well-formed lowrank reply goes through the dW-space screen (two QR factorisations per layer and
site, about 15 ms a call); every accepted dppf or deft indices message writes the site's copy or
accumulator to disk."""
REAL_TRAINING_CALLS = 6
MAX_FUZZ_STEPS = 8
MAX_FUZZ_BATCH = 64
COMMIT_SAMPLES = 4
"""Well-formed mutated replies per type that are also committed for real (then the state is restored)."""

LORA = {
    "model.trainable": "lora",
    "model.target_modules": "q_proj,v_proj",
    "model.lora_rank": 4,
    "model.lora_alpha": 8.0,
    "kavg.local_steps": 1,
    "kavg.lr": 0.05,
    "data.max_length": 64,
}
ALGO_FLAT = {
    "spsa": {},
    "kavg": {"algorithm": "kavg", **LORA},
    "lowrank": {"algorithm": "lowrank", "lowrank.mode": "exact", **LORA},
    "dppf": {"algorithm": "dppf", "dppf.alpha": 0.5, "dppf.lam": 0.05, **LORA},
    # "applied": rounds start at the indices phase the deft fuzz cases target (site-norms adds a norms
    # phase first, whose bad replies tests/algorithms/test_deft.py rejects case by case)
    "deft": {"algorithm": "deft", "deft.density": 0.05, "deft.allocation": "applied", **LORA},
}

KNOWN_CRASHES: dict[tuple[str, str], str] = {
    # (exception type, innermost edgetune function): xfail test that pins it; none left
}
KNOWN_ACCEPTED: dict[str, str] = {
    # oracle reason of a malformed payload that is accepted: xfail test that pins it; none left
}


# ---- a lenient encoder: the wire layout without the encoder's checks ------------------------------


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _entry(key: str, value: Any, *, declared_len: int | None = None) -> bytes:
    """One ``key type value`` entry; ints of any size, any declared length for bytes and str."""
    kb = key.encode("utf-8", "surrogatepass")
    head = _uvarint(len(kb)) + kb
    if isinstance(value, bool):
        return head + b"t" + bytes([value])
    if isinstance(value, int):
        return head + b"i" + _uvarint((value << 1) if value >= 0 else ((-value) << 1) - 1)
    if isinstance(value, float):
        return head + b"f" + struct.pack("<d", value)
    kind, data = (b"s", value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else (b"b", bytes(value))
    return head + kind + _uvarint(len(data) if declared_len is None else declared_len) + data


def _encode(payload: dict[str, Any]) -> bytes:
    """``wire.encode`` without its range checks (sorted keys, as the decoder requires)."""
    return wire.MAGIC + _uvarint(len(payload)) + b"".join(_entry(k, payload[k]) for k in sorted(payload))


# ---- mutations -----------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
FLOATS = [NAN, INF, -INF, -0.0, 0.0, 5e-324, 1e-300, 1e30, 3.5e38, 1e308, -1.0, -1e308, 0.5, 2.0]
INTS = [0, -1, 1, 2, 7, 127, 128, 255, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64]
INTS += [2**70, 2**76 + 3, -(2**70)]
STRS = ["", "all", "x" * 65, "\u00ff", "0" * 32, "ab", "site-1", "../x", "fp32", "fp16", "bf16", "int8-row"]
STRS += ["deft", "topk", "\x00", "lora_A", "lora_B", "adamw", "sgd", "Adam", "mean", "int8-sr", "log8", "\ud800"]
EXTRA_KEYS = ["x", "weight", "num_examples", "error", "codes", "delta", "idx", "values", "blob", "plan", "é", "z" * 64]


def _special(rng: random.Random, like: Any) -> Any:
    """A value of the same type as ``like``: an edge case most of the time."""
    if isinstance(like, bool):
        return not like
    if isinstance(like, int):
        return rng.choice(INTS) if rng.random() < 0.75 else like + rng.randint(-3, 3)
    if isinstance(like, float):
        return rng.choice(FLOATS) if rng.random() < 0.75 else like * rng.choice([-1.0, 0.5, 10.0, 1e6])
    if isinstance(like, str):
        return rng.choice(STRS) if rng.random() < 0.8 else like + rng.choice(["", "0", "!", "\u00e9"])
    n = len(like)
    return rng.choice(
        [
            b"",
            rng.randbytes(rng.randint(1, 64)),
            bytes(n),
            bytes(like) + bytes(like),
            bytes(like)[: n // 2],
            rng.randbytes(n),
            bytes(like) + b"\x00",
        ]
    )


def _other_type(rng: random.Random, like: Any) -> Any:
    pool: list[Any] = [True, rng.choice(INTS), rng.choice(FLOATS), rng.choice(STRS), rng.randbytes(rng.randint(0, 16))]
    return rng.choice([v for v in pool if type(v) is not type(like)])


def _bitflip(rng: random.Random, blob: bytes) -> bytes:
    if not blob:
        return b"\x01"
    out = bytearray(blob)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(rng: random.Random, blob: bytes) -> bytes:
    return blob[: rng.randrange(len(blob))] if blob else b"\x00"


def _indel(rng: random.Random, blob: bytes) -> bytes:
    out = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        if out and rng.random() < 0.5:
            del out[rng.randrange(len(out))]
        else:
            pos = rng.randint(0, len(out))
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
    return bytes(out)


def _byte_op(rng: random.Random, blob: bytes) -> bytes:
    return rng.choice([_bitflip, _bitflip, _truncate, _indel])(rng, blob)


def _field_op(rng: random.Random, payload: dict[str, Any], foreign: list[dict[str, Any]]) -> dict[str, Any]:
    """Drop, add, retype, edge-case, swap in a field of another message type, or send another type."""
    q = dict(payload)
    keys = sorted(q)
    op = rng.randrange(7)
    if op == 0 and keys:
        del q[rng.choice(keys)]
    elif op == 1:
        q[rng.choice(EXTRA_KEYS)] = _other_type(rng, None)
    elif op == 2 and keys:
        k = rng.choice(keys)
        q[k] = _other_type(rng, q[k])
    elif op in (3, 4) and keys:
        k = rng.choice(keys)
        q[k] = _special(rng, q[k])
    elif op == 5:
        other = rng.choice([f for f in foreign if f])
        k = rng.choice(sorted(other))
        q[rng.choice([k, *keys]) if keys else k] = other[k]
    else:
        q = dict(rng.choice(foreign))
    return q


def _raw_op(rng: random.Random, payload: dict[str, Any]) -> bytes:
    """Encoding tricks the canonical encoder never produces."""
    keys = sorted(payload)
    entries = [_entry(k, payload[k]) for k in keys]
    count = _uvarint(len(entries))
    trick = rng.randrange(9)
    sized = [i for i, k in enumerate(keys) if isinstance(payload[k], (bytes, str))]
    if trick == 0 and sized:  # a huge (or off-by-some) length prefix
        i = rng.choice(sized)
        claim = rng.choice([2**31, 2**40, 2**62, 2**69, len(payload[keys[i]]) + 1, len(payload[keys[i]]) + 4096])
        entries[i] = _entry(keys[i], payload[keys[i]], declared_len=claim)
    elif trick == 1 and entries:  # a duplicated key
        i = rng.randrange(len(entries))
        entries.insert(i, entries[i])
        count = _uvarint(len(entries))
    elif trick == 2 and len(entries) > 1:  # keys out of order
        entries.reverse()
    elif trick == 3:  # a wrong entry count
        count = _uvarint(rng.choice([0, len(entries) + 1, max(0, len(entries) - 1), 255, 256, 2**20, 2**63]))
    elif trick == 4:  # a non-minimal varint
        count = bytes([(len(entries) & 0x7F) | 0x80, 0x00])
    elif trick == 5 and entries:  # an unknown type tag
        i = rng.randrange(len(entries))
        kb = keys[i].encode()
        pos = len(_uvarint(len(kb))) + len(kb)
        entries[i] = entries[i][:pos] + rng.choice([b"x", b"\x00", b"B", b"d", b"\xff"]) + entries[i][pos + 1 :]
    elif trick == 6:  # trailing bytes
        entries.append(rng.randbytes(rng.randint(1, 9)))
    elif trick == 7:  # an empty, overlong or invalid UTF-8 key
        bad = rng.choice([b"", b"k" * 65, b"\xff\xfe", b"\xc0\x80"])
        entries.insert(0, _uvarint(len(bad)) + bad + b"t\x01")
        count = _uvarint(len(entries))
    else:  # a bool that is not 0/1, an overlong int varint, a truncated float
        tail = rng.choice([b"t\x02", b"i" + b"\xff" * 11 + b"\x01", b"f\x00\x00\x00"])
        entries.append(_uvarint(1) + b"~" + tail)
        count = _uvarint(len(entries))
    return wire.MAGIC + count + b"".join(entries)


@dataclass
class Mutator:
    """Seeded mutations of one message type; ``nested`` names bytes fields that hold wire payloads."""

    rng: random.Random
    foreign: list[dict[str, Any]]
    nested: tuple[str, ...] = ()

    def payload_op(self, payload: dict[str, Any], *, depth: int = 0) -> tuple[str, bytes]:
        nested = [k for k in self.nested if isinstance(payload.get(k), bytes)]
        if depth == 0 and nested and self.rng.random() < 0.4:
            k = self.rng.choice(nested)
            try:
                inner = wire.decode(payload[k], max_bytes=1 << 24)
            except wire.WireError:
                inner = None
            if inner is not None:
                op, blob = self.payload_op(inner, depth=1)
                return f"{k}:{op}", _encode({**payload, k: blob})
        choice = self.rng.random()
        if choice < 0.45:
            sized = [k for k, v in payload.items() if isinstance(v, bytes)]
            if sized:
                k = self.rng.choice(sized)
                return f"field-bytes:{k}", _encode({**payload, k: _byte_op(self.rng, payload[k])})
        if choice < 0.8:
            return "field", _encode(_field_op(self.rng, payload, self.foreign))
        return "raw", _raw_op(self.rng, payload)

    def __call__(self, blob: bytes, max_len: int, site: str = "") -> tuple[str, bytes]:
        """One mutation of ``site``'s encoded payload ``blob`` (never ``blob`` itself)."""
        while True:
            choice = self.rng.random()
            if choice < 0.12:
                n = self.rng.randint(0, 2 * max_len)
                body = self.rng.randbytes(n)
                op, out = "random", (wire.MAGIC + body if self.rng.random() < 0.5 else body)
            elif choice < 0.3:
                op, out = "bitflip", _bitflip(self.rng, blob)
            elif choice < 0.38:
                op, out = "truncate", _truncate(self.rng, blob)
            elif choice < 0.46:
                op, out = "indel", _indel(self.rng, blob)
            else:
                op, out = self.payload_op(wire.decode(blob, max_bytes=1 << 30))
            if out != blob:
                return op, out


FOREIGN: list[dict[str, Any]] = [
    {"blob": bytes(79)},
    {"codes": b"\x01\x01", "hash": bytes(16), "loss": 1.0},
    {"delta": bytes(64), "loss": 0.5},
    {"idx": b"\x01\x02\x03", "loss": 0.5},
    {"values": bytes(16)},
    {"run": bytes(16), "env": bytes(300), "log": wire.encode({"n": 0})},
    {"plan": wire.encode({"K": 1}), "params": bytes(32)},
    {"plan": b"", "params": b"", "sel": "deft", "nsplit": 3, "k": 1, "bins": b"\x00\x01"},
    {"round": 1, "run": "00" * 16, "val": "fp32", "ef": True, "n": 1, "union": b"\x00"},
    {"plan": b"", "params": b"", "alpha": 0.5, "lam": 0.05},
    {"error": "site crashed"},
    {},
]


# ---- tallies and calls -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes of one message type."""

    name: str
    cases: int = 0
    rejected: int = 0
    accepted_structural: list[str] = field(default_factory=list)
    accepted_value: int = 0
    unbounded: int = 0
    replays: int = 0
    replays_accepted: int = 0
    known: Counter = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)

    def crash(self, op: str, err: BaseException) -> None:
        key = (type(err).__name__, _innermost(err))
        if key in KNOWN_CRASHES:
            self.known[f"crash {key[0]} in {key[1]}"] += 1
        else:
            tb = "".join(traceback.format_exception(err, limit=-3))
            self.crashes.append(f"{op}: {type(err).__name__}: {err}\n{tb}")

    def accepted_bad(self, op: str, reason: str) -> None:
        if reason in KNOWN_ACCEPTED:
            self.known[f"accepted {reason}"] += 1
        else:
            self.accepted_structural.append(f"{op}: {reason}")

    def report(self) -> str:
        return (
            f"fuzz {self.name}: cases={self.cases} rejected={self.rejected} "
            f"accepted_structural={len(self.accepted_structural)} accepted_value={self.accepted_value} "
            f"(unbounded work {self.unbounded}) replays={self.replays} replays_accepted={self.replays_accepted} "
            f"known_bugs={dict(self.known)}"
        )

    def check(self, *, replays_must_fail: bool) -> None:
        print(self.report())
        assert not self.crashes, f"{len(self.crashes)} crashes, first:\n{self.crashes[0]}"
        assert not self.accepted_structural, f"malformed payloads accepted: {self.accepted_structural[:5]}"
        if replays_must_fail:
            assert self.replays_accepted == 0


def _innermost(err: BaseException) -> str:
    """Name of the innermost edgetune function in the traceback (where the crash happened)."""
    names = [f.name for f in traceback.extract_tb(err.__traceback__) if "/edgetune/" in f.filename]
    return names[-1] if names else "?"


class _UnboundedWork(Exception):
    """Raised by the guarded ``site_batches``: the site would have started a huge local round."""


@pytest.fixture
def cheap_training(monkeypatch):
    """Real local training for the first accepted cases, then the stand-in (module docstring)."""
    real_train, real_batches = training.local_train, training.site_batches
    calls = Counter()  # "armed": the fuzz has started; "train": local rounds since then

    def local_train(model, params, batches, *, lr, optimizer, momentum=0.0, weight_decay=0.0, **kwargs):
        calls["train"] += calls["armed"]
        if calls["train"] <= REAL_TRAINING_CALLS:
            return real_train(
                model,
                params,
                batches,
                lr=lr,
                optimizer=optimizer,
                momentum=momentum,
                weight_decay=weight_decay,
                **kwargs,
            )
        if optimizer == "adamw":  # the optimizers check lr, momentum and weight decay themselves
            torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return [1.0 for _ in batches]

    def site_batches(ctx, seed, round_idx, steps, batch_size):
        if steps > MAX_FUZZ_STEPS or batch_size > MAX_FUZZ_BATCH:
            raise _UnboundedWork(f"{steps} steps of {batch_size} examples")
        return real_batches(ctx, seed, round_idx, steps, batch_size)

    # every weight-carrying site trains through WeightsClient.train_plan, which looks both up in training
    monkeypatch.setattr(training, "local_train", local_train)
    monkeypatch.setattr(training, "site_batches", site_batches)
    return calls


def _client_call(transport, site: str, phase: str, blob: bytes, state: dict[str, Any]) -> tuple[str, Any]:
    """``InProcTransport.exchange`` for one site, minus its catch-all: ("accepted" | "rejected" | "crash"|...)."""
    try:
        msg = wire.decode(blob, max_bytes=transport.max_down_bytes)
        reply, _ = transport.clients[site].step(phase, msg, dict(state))
        return "accepted", wire.encode(reply)
    except ValueError as err:
        return "rejected", err
    except _UnboundedWork as err:
        return "unbounded", err
    except Exception as err:  # every other exception is what the fuzz looks for
        return "crash", err


def _aggregate(server, round_idx: int, phase: str, raw: dict[str, bytes], min_sites: int):
    """``run_round``'s decode + aggregate; returns (result, rejected site ids) or raises."""
    replies, failed = _decode_replies(dict(raw), server.max_reply_bytes(phase))
    result = server.aggregate(round_idx, phase, replies, min_sites=min_sites)
    return result, set(failed) | set(result.rejected)


# ---- federations --------------------------------------------------------------------------------------


def _cfg(algo: str, **overrides):
    return cfgmod.from_run_config(tiny_flat(**{**ALGO_FLAT[algo], **overrides}))


def _build(path: Path, cfg):
    """A federation of NUM_SITES sites; the folder name fixes the run id."""
    server, transport, recorder, _, _ = inproc.build(cfg, NUM_SITES, run_dir=path)
    return server, transport, recorder


def _exchange(server, transport, round_idx: int, phase: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """configure + honest exchange of one phase: (downlink blobs, uplink blobs)."""
    payloads = server.configure(round_idx, phase, transport.sites())
    down = {s: wire.encode(p) for s, p in payloads.items()}
    up = transport.exchange(round_idx, phase, down, timeout_s=60.0)
    assert not any(isinstance(b, Failure) for b in up.values()), up
    for s, b in up.items():
        assert set(wire.decode(b, max_bytes=1 << 30)) != {"error"}, (s, wire.decode(b, max_bytes=1 << 30))
    return down, up


def _commit(server, round_idx: int, phase: str, up: dict[str, bytes], cfg) -> None:
    result, rejected = _aggregate(server, round_idx, phase, up, cfg.run.min_sites)
    assert result.committed and not rejected, rejected


# ---- oracles: is a (decoded) payload well-formed? None if so, else the reason ----------------------------


def _decoded(blob: bytes, max_bytes: int) -> dict[str, Any] | None:
    try:
        return wire.decode(blob, max_bytes=max_bytes)
    except wire.WireError:
        return None


def _typed(payload: dict[str, Any], schema: dict[str, type]) -> str | None:
    """Exact keys; ints within int64, floats finite numbers (or ints), no bool where it isn't one.

    Returns None, "schema", or "int64" (an int outside int64, which ``wire.encode`` cannot produce).
    """
    if set(payload) != set(schema):
        return "schema"
    wide = False
    for key, kind in schema.items():
        v = payload[key]
        if kind is bool:
            ok = type(v) is bool
        elif kind is int:
            ok = type(v) is int
            wide |= ok and not -(2**63) <= v < 2**63
        elif kind is float:
            ok = type(v) in (int, float) and math.isfinite(v)
        else:
            ok = type(v) is kind
        if not ok:
            return "schema"
    return "int64" if wide else None


def _schema_reason(payload: dict[str, Any] | None, schema: dict[str, type], prefix: str) -> str | None:
    if payload is None:
        return f"{prefix}.wire"
    why = _typed(payload, schema)
    return None if why is None else f"{prefix}.{why}"


def _leb128(blob: bytes) -> list[int] | None:
    """Unsigned LEB128 values (minimal, at most 5 bytes each), or None."""
    out, value, shift, length = [], 0, 0, 0
    for byte in blob:
        value |= (byte & 0x7F) << shift
        length += 1
        if byte & 0x80:
            shift += 7
            if length >= 5:
                return None
            continue
        if length > 1 and byte == 0:
            return None
        out.append(value)
        value, shift, length = 0, 0, 0
    return None if length else out


def _indices(blob: bytes, dim: int) -> list[int] | None:
    """Decode DEFT's gap-coded sorted indices; None if malformed."""
    gaps = _leb128(blob)
    if gaps is None or any(g < 1 for g in gaps[1:]):
        return None
    idx = list(np.cumsum(gaps, dtype=np.int64)) if gaps else []
    return [int(i) for i in idx] if not idx or idx[-1] < dim else None


def _finite_tensor_bytes(blob: bytes, codec: str, shapes: list[tuple[int, ...]]) -> bool:
    """Exact length for ``codec`` and only finite values (int8-row: finite non-negative scales, no -128)."""
    numel = [math.prod(s) for s in shapes]
    if codec in ("fp32", "fp16", "bf16"):
        width = 4 if codec == "fp32" else 2
        if len(blob) != width * sum(numel):
            return False
        if codec == "bf16":
            return bool(np.isfinite((np.frombuffer(blob, "<u2").astype(np.uint32) << 16).view("<f4")).all())
        return bool(np.isfinite(np.frombuffer(blob, "<f4" if codec == "fp32" else "<f2")).all())
    if codec != "int8-row":
        return False
    pos = 0
    for shape, n in zip(shapes, numel):
        rows = shape[0] if len(shape) > 1 and n else 1
        size = 4 * rows + n
        part = blob[pos : pos + size]
        if len(part) != size:
            return False
        scales = np.frombuffer(part[: 4 * rows], "<f4")
        if (
            not np.isfinite(scales).all()
            or (scales < 0).any()
            or (np.frombuffer(part[4 * rows :], np.int8) == -128).any()
        ):
            return False
        pos += size
    return pos == len(blob)


PLAN_SCHEMA = {
    "round": int,
    "K": int,
    "lr": float,
    "opt": str,
    "mom": float,
    "wd": float,
    "down": str,
    "up": str,
    "train": str,
    "seed": int,
    "bs": int,
    "run": str,
}


def _plan_reason(
    blob: Any, names: list[str], *, train_all_only: bool, hex_run: str | None, uses_up: bool = True
) -> str | None:
    """A round plan is well-formed if a valid ``kavg`` config section could have produced it
    (``uses_up=False``: the site ignores the uplink codec, as deft's do)."""
    plan = _decoded(blob, 4096) if isinstance(blob, bytes) else None
    why = _schema_reason(plan, PLAN_SCHEMA, "plan")
    if why is not None:
        return why
    train = plan["train"]
    checks = {
        "K": plan["K"] >= 1,
        "bs": plan["bs"] >= 1,
        "wd": plan["wd"] >= 0,
        "down": plan["down"] in TENSOR_CODECS,
        "train": (train == "all" or not train_all_only) and (train == "all" or any(train in n for n in names)),
        "run": hex_run is None or re.fullmatch(hex_run, plan["run"]) is not None,
        "up": plan["up"] in TENSOR_CODECS or not uses_up,  # a crash when the site uses it (KNOWN_CRASHES)
        # the site leaves these to torch (KNOWN_ACCEPTED): checked last
        "lr": plan["lr"] > 0,
        "mom": 0 <= plan["mom"] < 1,
        "opt": plan["opt"] in ("sgd", "adamw"),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"plan.{bad[0]}" if bad else None


# ---- the fuzz loops ---------------------------------------------------------------------------------


def _fuzz_client(
    tally: Tally, transport, phase: str, down: dict[str, bytes], mutate, reason, *, training=None, after_accept=None
):
    """Mutate each site's honest message in turn and hand it to that site (with the state the honest
    exchange left it; the fuzz never changes that state). ``reason(site, blob)`` is the oracle."""
    if training is not None:
        training["armed"] = 1
    sites = sorted(down)
    for i in range(CASES[tally.name]):
        site = sites[i % len(sites)]
        op, blob = mutate(down[site], len(down[site]), site)
        tally.cases += 1
        tally.ops[op.split(":")[0]] += 1
        outcome, detail = _client_call(transport, site, phase, blob, transport.states[site])
        if outcome == "crash":
            tally.crash(op, detail)
        elif outcome == "rejected":
            tally.rejected += 1
        else:
            tally.unbounded += outcome == "unbounded"
            why = reason(site, blob)
            if why is None:
                tally.accepted_value += 1
            else:
                tally.accepted_bad(op, why)
            if after_accept is not None:
                after_accept()


def _replay_client(tally: Tally, transport, phase: str, cases: list[tuple[str, bytes]]) -> None:
    for site, blob in cases:
        tally.replays += 1
        outcome, detail = _client_call(transport, site, phase, blob, transport.states[site])
        if outcome == "crash":
            tally.crash("replay", detail)
        elif outcome != "rejected":
            tally.replays_accepted += 1


def _fuzz_server(
    tally: Tally,
    server,
    round_idx: int,
    phase: str,
    honest: dict[str, bytes],
    mutate: Mutator,
    reason,
    *,
    min_sites: int,
    restore,
) -> None:
    """Mutate each site's honest reply in turn; see the module docstring for how each is aggregated.

    ``reason(site, blob)`` is the oracle (None: well-formed). ``restore()`` undoes a commit.
    """
    sites = sorted(honest)
    baseline = server.state_hash()
    limit = server.max_reply_bytes(phase)
    commits = 0
    for i in range(CASES[tally.name]):
        site = sites[i % len(sites)]
        op, blob = mutate(honest[site], limit, site)
        tally.cases += 1
        tally.ops[op.split(":")[0]] += 1
        why = reason(site, blob)
        raw = {**honest, site: blob} if why is None else {site: blob}
        try:
            result, rejected = _aggregate(server, round_idx, phase, raw, len(sites) + 1 if why is None else min_sites)
        except Exception as err:
            tally.crash(op, err)
            continue
        if site in rejected:
            tally.rejected += 1
        elif why is None:
            tally.accepted_value += 1
            if commits < COMMIT_SAMPLES:  # commit a few for real: the apply path must not crash either
                commits += 1
                try:
                    result, rejected = _aggregate(server, round_idx, phase, raw, min_sites)
                except Exception as err:
                    tally.crash(f"commit {op}", err)
                else:
                    assert result.committed and site in result.accepted, (op, rejected)
                restore()
        else:
            tally.accepted_bad(op, why)
            if result.committed:
                restore()
        assert server.state_hash() == baseline, f"state moved after {op} (committed={result.committed})"


def _replay_server(tally: Tally, server, round_idx: int, phase: str, cases: list[tuple[str, bytes]]) -> None:
    """Replayed replies, one at a time, with a quorum that cannot be met (nothing commits)."""
    for site, blob in cases:
        tally.replays += 1
        try:
            result, rejected = _aggregate(server, round_idx, phase, {site: blob}, NUM_SITES + 1)
        except Exception as err:
            tally.crash("replay", err)
            continue
        if site not in rejected:
            tally.replays_accepted += 1


# ---- spsa -----------------------------------------------------------------------------------------


@dataclass
class SpsaWorld:
    """Run "other" (own keys) and run "fuzz", both through two honest rounds; round 2 not yet committed."""

    cfg: Any
    server: Any
    transport: Any
    down: dict[int, dict[str, bytes]]
    up: dict[int, dict[str, bytes]]
    other_down: dict[int, dict[str, bytes]]
    other_up: dict[int, dict[str, bytes]]


def _spsa_world(tmp_path: Path) -> SpsaWorld:
    cfg = _cfg("spsa")
    # the other run first: inproc.build forgets the replicas of runs built before it
    server, transport, _ = _build(tmp_path / "other" / "run-b", cfg)
    d1, u1 = _exchange(server, transport, 1, "train")
    _commit(server, 1, "train", u1, cfg)
    d2, u2 = _exchange(server, transport, 2, "train")
    other_down, other_up = {1: d1, 2: d2}, {1: u1, 2: u2}
    server, transport, _ = _build(tmp_path / "fuzz" / "same-run", cfg)
    d1, u1 = _exchange(server, transport, 1, "train")
    _commit(server, 1, "train", u1, cfg)
    d2, u2 = _exchange(server, transport, 2, "train")
    return SpsaWorld(cfg, server, transport, {1: d1, 2: d2}, {1: u1, 2: u2}, other_down, other_up)


def _spsa_accepted_reason(original: bytes, blob: bytes) -> str:
    """Why an accepted mutated spsa message is wrong: only its unsigned ``snap`` field changed, or more."""
    a, b = _decoded(original, 1 << 30), _decoded(blob, 1 << 30)
    if b is not None and a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "snap"):
        return "spsa.snap-unbound"
    return "spsa.mutated"


def test_fuzz_spsa_round_message(tmp_path):
    """No mutated or replayed spsa round message is accepted by a site (every one raises a
    ValueError): the envelope is signed, the log is bound to it by its digest, the run is bound
    into the envelope, and the replay guard refuses rounds at or below the last one."""
    # Prepare: sites hold the replay guard of round 2 (as after the honest exchange)
    w = _spsa_world(tmp_path)
    tally = Tally("spsa round message")
    mutate = Mutator(random.Random(SEED + 1), FOREIGN, nested=("log",))
    sites = w.transport.sites()
    # Execute
    _fuzz_client(tally, w.transport, "train", w.down[2], mutate, lambda s, b: _spsa_accepted_reason(w.down[2][s], b))
    _replay_client(tally, w.transport, "train", [(t, w.down[2][s]) for s in sites for t in sites if s != t])
    _replay_client(tally, w.transport, "train", [(s, w.down[1][s]) for s in sites])  # an older round
    _replay_client(tally, w.transport, "train", [(s, w.other_down[r][s]) for r in (1, 2) for s in sites])
    # Assert
    tally.check(replays_must_fail=True)


def test_fuzz_spsa_reply(tmp_path):
    """No mutated spsa reply, and no reply replayed from another site, round or run, is accepted:
    the AEAD binds (run, round, site). Malformed replies sealed with the right key (a participant
    sending garbage) are rejected too. Rounds of rejected replies leave the state hash unchanged,
    and the honest round afterwards lands on the hash of a run without the fuzz."""
    # Prepare
    w = _spsa_world(tmp_path)
    tally = Tally("spsa reply")
    rng = random.Random(SEED + 2)
    server, cfg = w.server, w.cfg

    def key(site: str) -> bytes:
        return envelope.reply_key(server.ctx.server_keys, server.run_id, 2, site)

    inner_of = {
        site: wire.decode(
            envelope.open_reply(
                key(site),
                run_id=server.run_id,
                round_idx=2,
                site_id=site,
                blob=wire.decode(blob, max_bytes=1 << 16)["blob"],
                max_bytes=1 << 16,
            ),
            max_bytes=1 << 16,
        )
        for site, blob in w.up[2].items()
    }

    def sealed_garbage(site: str) -> bytes:
        """A reply that authenticates (sealed with the site's reply key) around a malformed payload."""
        honest = inner_of[site]
        while True:
            body = _encode(_field_op(rng, honest, FOREIGN)) if rng.random() < 0.7 else _raw_op(rng, honest)
            bad = _decoded(body, 1 << 20)
            well_formed = (
                bad is not None
                and _typed(bad, {"codes": bytes, "hash": bytes, "loss": float}) is None
                and len(bad["codes"]) == len(honest["codes"])
                and 0x80 not in bad["codes"]  # int8-sr reserves -128
                and bad["hash"] == honest["hash"]
            )
            if not well_formed:  # a participant may send any well-formed codes: not a fuzz case
                break
        blob = envelope.seal_reply(key(site), run_id=server.run_id, round_idx=2, site_id=site, payload=body)
        return wire.encode({"blob": blob})

    class SpsaMutator(Mutator):
        def __call__(self, blob, max_len, site=""):
            if self.rng.random() < 0.15:
                return "sealed-inner", sealed_garbage(site)
            return super().__call__(blob, max_len, site)

    mutate = SpsaMutator(rng, FOREIGN)

    def reason(site, blob):
        return "spsa.mutated"  # every mutation must be rejected

    def restore():
        raise AssertionError("an spsa round committed with a mutated reply")

    # Execute
    _fuzz_server(tally, server, 2, "train", w.up[2], mutate, reason, min_sites=cfg.run.min_sites, restore=restore)
    sites = sorted(w.up[2])
    replays = [(t, w.up[2][s]) for s in sites for t in sites if s != t]
    replays += [(s, w.up[1][s]) for s in sites] + [(s, w.other_up[r][s]) for r in (1, 2) for s in sites]
    _replay_server(tally, server, 2, "train", replays)
    _commit(server, 2, "train", w.up[2], cfg)
    # Assert
    tally.check(replays_must_fail=True)
    ref_server, ref_transport, ref_recorder = _build(tmp_path / "ref" / "same-run", cfg)
    for r in (1, 2):
        run_round(cfg, ref_server, ref_transport, ref_recorder, r)
    assert server.state_hash() == ref_server.state_hash()


# ---- kavg, lowrank, dppf ---------------------------------------------------------------------------


def _weights_message_reason(algo: str, names: list[str], shapes: list[tuple[int, ...]]):
    schema = {"plan": bytes, "params": bytes}
    if algo == "dppf":
        schema |= {"alpha": float, "lam": float}

    def reason(site: str, blob: bytes) -> str | None:
        msg = _decoded(blob, 1 << 30)
        why = _schema_reason(msg, schema, "message")
        if why is not None:
            return why
        if algo == "dppf" and not (0 <= msg["alpha"] <= 1 and msg["lam"] >= 0):
            return "message.range"
        why = _plan_reason(
            msg["plan"], names, train_all_only=algo == "dppf", hex_run=r"[0-9a-f]{2,64}" if algo == "dppf" else None
        )
        if why is not None:
            return why
        down = wire.decode(msg["plan"], max_bytes=4096)["down"]
        return None if _finite_tensor_bytes(msg["params"], down, shapes) else "params"

    return reason


def _manifest(transport) -> tuple[list[str], list[tuple[int, ...]]]:
    client = transport.clients["site-0"]
    return [e.name for e in client.manifest], [tuple(e.shape) for e in client.manifest]


@pytest.mark.parametrize("algo", ["kavg", "lowrank", "dppf"])
def test_fuzz_weights_round_message(tmp_path, algo, cheap_training):
    """A site rejects every structurally malformed kavg/lowrank/dppf round message (schema, plan
    values a valid config could not produce, wrong-size or non-finite parameters) with a
    ValueError and never crashes. Well-formed changes (other weights, another valid plan) and
    replays are accepted: the downlink is not authenticated; they are counted."""
    # Prepare
    cfg = _cfg(algo)
    other, other_transport, _ = _build(tmp_path / "other" / "run-b", cfg)
    other_down, _ = _exchange(other, other_transport, 1, "train")
    server, transport, _ = _build(tmp_path / "fuzz" / "same-run", cfg)
    down, _ = _exchange(server, transport, 1, "train")
    names, shapes = _manifest(transport)
    tally = Tally(f"{algo} round message")
    reason = _weights_message_reason(algo, names, shapes)
    assert all(reason(s, b) is None for s, b in down.items())
    mutate = Mutator(random.Random(SEED + 10 + len(algo)), FOREIGN, nested=("plan",))
    # Execute
    _fuzz_client(tally, transport, "train", down, mutate, reason, training=cheap_training)
    sites = sorted(down)
    _replay_client(tally, transport, "train", [(t, down[s]) for s in sites for t in sites if s != t])
    _replay_client(tally, transport, "train", [(s, other_down[s]) for s in sites])
    # Assert
    tally.check(replays_must_fail=False)


def _weights_reply_reason(shapes: list[tuple[int, ...]], plans: dict[str, dict[str, Any]], names: list[str]):
    def reason(site: str, blob: bytes) -> str | None:
        reply = _decoded(blob, 1 << 30)
        why = _schema_reason(reply, {"delta": bytes, "loss": float}, "reply")
        if why is not None:
            return why
        train = plans[site]["train"]
        trained = [s for s, n in zip(shapes, names) if train == "all" or train in n]
        return None if _finite_tensor_bytes(reply["delta"], plans[site]["up"], trained) else "reply.delta"

    return reason


def _snapshot(server, folder: Path):
    """Save the server state now; the returned function restores it (``load_state``, as a resume)."""
    server.save_state(folder, 0)
    baseline = server.state_hash()

    def restore():
        server.load_state(folder)
        assert server.state_hash() == baseline

    return restore


@pytest.mark.parametrize("algo", ["kavg", "lowrank", "dppf"])
def test_fuzz_weights_reply(tmp_path, algo):
    """The server never accepts a structurally malformed kavg/lowrank/dppf reply, never crashes,
    and its state hash does not move while it rejects; an honest round afterwards lands on the hash
    of a run without the fuzz. Well-formed value-level changes that pass the norm screen, and
    replies replayed from another site or round, are accepted (not authenticated): counted."""
    # Prepare
    cfg = _cfg(algo)
    server, transport, _ = _build(tmp_path / "fuzz" / "same-run", cfg)
    down, up = _exchange(server, transport, 1, "train")
    names, shapes = _manifest(transport)
    plans = {s: wire.decode(wire.decode(b, max_bytes=1 << 30)["plan"], max_bytes=4096) for s, b in down.items()}
    tally = Tally(f"{algo} reply")
    reason = _weights_reply_reason(shapes, plans, names)
    assert all(reason(s, b) is None for s, b in up.items())
    mutate = Mutator(random.Random(SEED + 20 + len(algo)), FOREIGN)
    restore = _snapshot(server, tmp_path / "snapshot")
    # Execute
    _fuzz_server(tally, server, 1, "train", up, mutate, reason, min_sites=cfg.run.min_sites, restore=restore)
    sites = sorted(up)
    _replay_server(tally, server, 1, "train", [(t, up[s]) for s in sites for t in sites if s != t])
    _commit(server, 1, "train", up, cfg)
    after_honest = server.state_hash()
    server.configure(2, "train", sites)
    _replay_server(tally, server, 2, "train", [(s, up[s]) for s in sites])  # round 1's replies in round 2
    # Assert
    tally.check(replays_must_fail=False)
    ref_server, ref_transport, ref_recorder = _build(tmp_path / "ref" / "same-run", cfg)
    run_round(cfg, ref_server, ref_transport, ref_recorder, 1)
    assert after_honest == ref_server.state_hash() == server.state_hash()


# ---- deft ----------------------------------------------------------------------------------------------


def _deft_indices_message_reason(names, shapes, numels):
    dim = sum(numels)
    schema = {"plan": bytes, "params": bytes, "sel": str, "nsplit": int, "k": int, "bins": bytes}

    def reason(site: str, blob: bytes) -> str | None:
        msg = _decoded(blob, 1 << 30)
        why = _schema_reason(msg, schema, "message")
        if why is not None:
            return why
        if msg["sel"] not in ("deft", "topk") or not 0 <= msg["k"] <= dim:
            return "message.sel-k"
        why = _plan_reason(msg["plan"], names, train_all_only=False, hex_run=r"[0-9a-f]{8,64}", uses_up=False)
        if why is not None:
            return why
        if not _finite_tensor_bytes(msg["params"], wire.decode(msg["plan"], max_bytes=4096)["down"], shapes):
            return "params"
        if msg["sel"] == "topk":
            return None
        if msg["nsplit"] < 1:
            return "message.nsplit"
        parts = deft.make_partitions(numels, msg["nsplit"])
        pairs = _leb128(msg["bins"])
        if pairs is None or len(pairs) % 2 or len(pairs) > 2 * len(parts):
            return "message.bins"
        ids = list(np.cumsum(pairs[0::2])) if pairs else []
        kps = pairs[1::2]
        if any(b <= a for a, b in zip(ids, ids[1:])) or (ids and ids[-1] >= len(parts)):
            return "message.bins"
        if any(not 1 <= kp <= parts.sizes[p] for p, kp in zip(ids, kps)) or sum(kps) != msg["k"]:
            return "message.bins"
        return None

    return reason


def _deft_values_message_reason(dim: int):
    schema = {"round": int, "run": str, "val": str, "ef": bool, "n": int, "union": bytes}

    def reason(site: str, blob: bytes) -> str | None:
        msg = _decoded(blob, 1 << 30)
        why = _schema_reason(msg, schema, "message")
        if why is not None:
            return why
        if msg["val"] not in TENSOR_CODECS or not re.fullmatch(r"[0-9a-f]{8,64}", msg["run"]):
            return "message.val-run"
        idx = _indices(msg["union"], dim)
        return None if idx is not None and len(idx) == msg["n"] else "message.union"

    return reason


def _deft_world(tmp_path: Path):
    cfg = _cfg("deft")
    server, transport, _ = _build(tmp_path / "fuzz" / "same-run", cfg)
    return cfg, server, transport


def test_fuzz_deft_indices_message(tmp_path, cheap_training):
    """A site rejects every malformed DEFT indices message (plan, parameters, selector, k, or bins
    that are not increasing partition ids with 1 <= k_p <= s_p summing to k) without crashing;
    well-formed changes and replays are counted."""
    # Prepare
    cfg, server, transport = _deft_world(tmp_path)
    down, _ = _exchange(server, transport, 1, "indices")
    names, shapes = _manifest(transport)
    numels = [math.prod(s) for s in shapes]
    tally = Tally("deft indices message")
    reason = _deft_indices_message_reason(names, shapes, numels)
    assert all(reason(s, b) is None for s, b in down.items())
    mutate = Mutator(random.Random(SEED + 30), FOREIGN, nested=("plan",))
    # Execute
    _fuzz_client(tally, transport, "indices", down, mutate, reason, training=cheap_training)
    sites = sorted(down)
    _replay_client(tally, transport, "indices", [(t, down[s]) for s in sites for t in sites if s != t])
    # Assert
    tally.check(replays_must_fail=False)


def test_fuzz_deft_values_message(tmp_path):
    """A site rejects every malformed DEFT values message (codec, run id, a union that is not
    strictly increasing below the dimension or disagrees with n) without crashing; a values
    message for a round whose indices phase it did not run is rejected."""
    # Prepare: the indices phase ran, so every site holds its accumulated update (acc-1)
    cfg, server, transport = _deft_world(tmp_path)
    _, up = _exchange(server, transport, 1, "indices")
    _commit(server, 1, "indices", up, cfg)
    down = {s: wire.encode(p) for s, p in server.configure(1, "values", transport.sites()).items()}
    _, shapes = _manifest(transport)
    dim = sum(math.prod(s) for s in shapes)
    run = wire.decode(down["site-0"], max_bytes=1 << 20)["run"]
    stores = {s: transport.clients[s].vectors(run) for s in transport.sites()}
    acc = {s: stores[s].load("acc", 1) for s in stores}
    assert all(a is not None for a in acc.values())

    def put_back():  # an accepted values step drops acc-1 (as it should): restore it for the next case
        for s, store in stores.items():
            store.save("acc", 1, acc[s])

    tally = Tally("deft values message")
    reason = _deft_values_message_reason(dim)
    assert all(reason(s, b) is None for s, b in down.items())
    mutate = Mutator(random.Random(SEED + 31), FOREIGN)
    # Execute
    _fuzz_client(tally, transport, "values", down, mutate, reason, after_accept=put_back)
    sites = sorted(down)
    for s in sites:  # a values message for a round without an indices phase on this site
        stale = _encode({**wire.decode(down[s], max_bytes=1 << 20), "round": 2})
        _replay_client(tally, transport, "values", [(s, stale)])
    # Assert
    tally.check(replays_must_fail=True)


def _deft_indices_reply_reason(server):
    def reason(site: str, blob: bytes) -> str | None:
        reply = _decoded(blob, 1 << 30)
        why = _schema_reason(reply, {"idx": bytes, "loss": float}, "reply")
        if why is not None:
            return why
        st, parts = server.round, server.parts
        idx = _indices(reply["idx"], server.dim)
        if idx is None or len(idx) > st.budget[site]:
            return "reply.idx"
        pid = np.searchsorted(parts.starts, np.asarray(idx, dtype=np.int64), side="right") - 1
        if not set(pid.tolist()) <= set(st.bins[site].tolist()):
            return "reply.bin"
        if (np.bincount(pid, minlength=len(parts)) > st.kp).any():
            return "reply.kp"
        return None

    return reason


def test_fuzz_deft_indices_reply(tmp_path):
    """The server never accepts a malformed DEFT indices reply (bad varints, unsorted, repeated or
    out-of-range indices, indices outside the site's bin or above k_p) and never crashes; replies
    of another site fall outside its bin and are rejected. Committing one (the union) does not
    touch the weights; the honest round afterwards matches a run without the fuzz."""
    # Prepare
    cfg, server, transport = _deft_world(tmp_path)
    _, up = _exchange(server, transport, 1, "indices")
    tally = Tally("deft indices reply")
    reason = _deft_indices_reply_reason(server)
    assert all(reason(s, b) is None for s, b in up.items())
    mutate = Mutator(random.Random(SEED + 32), FOREIGN)

    def restore():  # a commit sets the union; committing the honest replies sets it back
        _commit(server, 1, "indices", up, cfg)

    # Execute
    _fuzz_server(tally, server, 1, "indices", up, mutate, reason, min_sites=cfg.run.min_sites, restore=restore)
    sites = sorted(up)
    _replay_server(tally, server, 1, "indices", [(t, up[s]) for s in sites for t in sites if s != t])
    _commit(server, 1, "indices", up, cfg)
    _, values_up = _exchange(server, transport, 1, "values")
    _commit(server, 1, "values", values_up, cfg)
    # Assert
    tally.check(replays_must_fail=False)
    ref_server, ref_transport, ref_recorder = _build(tmp_path / "ref" / "same-run", cfg)
    run_round(cfg, ref_server, ref_transport, ref_recorder, 1)
    assert server.state_hash() == ref_server.state_hash()


def test_fuzz_deft_values_reply(tmp_path):
    """The server never accepts a malformed DEFT values reply (length other than |union| values,
    non-finite values) and never crashes; the state hash moves only for sampled commits, which are
    restored. Well-formed changes and replays are counted. The honest round afterwards matches a
    run without the fuzz."""
    # Prepare
    cfg, server, transport = _deft_world(tmp_path)
    _, idx_up = _exchange(server, transport, 1, "indices")
    _commit(server, 1, "indices", idx_up, cfg)
    _, up = _exchange(server, transport, 1, "values")
    n = len(server.round.union)
    tally = Tally("deft values reply")

    def reason(site: str, blob: bytes) -> str | None:
        reply = _decoded(blob, 1 << 30)
        why = _schema_reason(reply, {"values": bytes}, "reply")
        if why is not None:
            return why
        return None if _finite_tensor_bytes(reply["values"], "fp32", [(n,)]) else "reply.values"

    assert all(reason(s, b) is None for s, b in up.items())
    mutate = Mutator(random.Random(SEED + 33), FOREIGN)
    restore = _snapshot(server, tmp_path / "snapshot")
    # Execute
    _fuzz_server(tally, server, 1, "values", up, mutate, reason, min_sites=cfg.run.min_sites, restore=restore)
    sites = sorted(up)
    _replay_server(tally, server, 1, "values", [(t, up[s]) for s in sites for t in sites if s != t])
    _commit(server, 1, "values", up, cfg)
    # Assert
    tally.check(replays_must_fail=False)
    ref_server, ref_transport, ref_recorder = _build(tmp_path / "ref" / "same-run", cfg)
    run_round(cfg, ref_server, ref_transport, ref_recorder, 1)
    assert server.state_hash() == ref_server.state_hash()


# ---- Flower records ---------------------------------------------------------------------------------

FLOWER_LIMIT = 4096
"""``from_content``'s max_bytes here: small enough that oversized cases stay cheap."""


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, p=arr)
    return buf.getvalue()


def _flower_case(rng: random.Random, blob: bytes, mutate: Mutator):
    """(op, RecordDict, well_formed): a mutated Flower wrapping of the payload ``blob``."""
    u8 = np.frombuffer(blob, dtype=np.uint8)
    op = rng.randrange(12)
    if op in (0, 1):  # the right wrapping of a mutated payload
        _, inner = mutate(blob, len(blob))
        if op == 0:
            return "small:payload", RecordDict({SMALL_KEY: ConfigRecord({BLOB_KEY: inner})}), True
        return (
            "large:payload",
            RecordDict({LARGE_KEY: ArrayRecord({BLOB_KEY: Array(np.frombuffer(inner, np.uint8))})}),
            True,
        )
    if op == 2:  # wrong record names, extra or missing records
        name = rng.choice(["", "et ", "ET", "etarr2", "p", "hello", "\u00e9t", SMALL_KEY + LARGE_KEY])
        records = {name: ConfigRecord({BLOB_KEY: blob})}
        if rng.random() < 0.5:
            records[rng.choice([SMALL_KEY, LARGE_KEY])] = ConfigRecord({BLOB_KEY: blob})
        return "record-name", RecordDict(records if rng.random() < 0.9 else {}), False
    if op == 3:  # a record of the wrong type under a right name
        rec = rng.choice(
            [
                lambda: ArrayRecord({BLOB_KEY: Array(u8.copy())}),
                lambda: MetricRecord({BLOB_KEY: 1.0}),
                lambda: ConfigRecord({BLOB_KEY: blob}),
            ]
        )()
        key = LARGE_KEY if isinstance(rec, ConfigRecord) else rng.choice([SMALL_KEY, LARGE_KEY])
        return "record-type", RecordDict({key: rec}), isinstance(rec, ArrayRecord) and key == LARGE_KEY
    if op == 4:  # a config value of the wrong type, or extra / missing fields
        value = rng.choice([blob.hex(), len(blob), 1.5, True, [blob, blob], [1, 2], [], ""])
        fields = rng.choice([{BLOB_KEY: value}, {BLOB_KEY: blob, "q": blob}, {"q": blob}, {}])
        return "config-fields", RecordDict({SMALL_KEY: ConfigRecord(fields)}), False
    if op == 5:  # too big
        big = blob + rng.randbytes(FLOWER_LIMIT + 1 - len(blob) + rng.randint(0, 64))
        if rng.random() < 0.5:
            return "small:oversize", RecordDict({SMALL_KEY: ConfigRecord({BLOB_KEY: big})}), False
        return (
            "large:oversize",
            RecordDict({LARGE_KEY: ArrayRecord({BLOB_KEY: Array(np.frombuffer(big, np.uint8))})}),
            False,
        )
    if op == 6:  # an array of another dtype or rank
        arr = rng.choice(
            [u8.astype(np.int8), u8.astype(np.float32), u8[: len(u8) // 4 * 4].reshape(-1, 4), u8.view("S1")]
        )
        return "array-dtype", RecordDict({LARGE_KEY: ArrayRecord({BLOB_KEY: Array(np.ascontiguousarray(arr))})}), False
    # ops 7..11: an Array whose metadata and data are set independently (as Flower inflates them)
    declared = rng.choice([("uint8", (len(blob),)), ("uint8", (4,)), ("uint8", (-4,)), ("float32", (len(blob),))])
    data = rng.choice(
        [
            lambda: _npy(u8),
            lambda: _bitflip(rng, _npy(u8)),
            lambda: _truncate(rng, _npy(u8)),
            lambda: b"",
            lambda: rng.randbytes(rng.randint(1, 200)),
            lambda: _npz(u8),
            lambda: _npy(np.zeros(FLOWER_LIMIT * 2, np.uint8)),
            lambda: _npy(u8.astype(np.float64)),
            lambda: _npy(u8.reshape(1, -1)),
        ]
    )()
    stype = rng.choice(["numpy.ndarray"] * 4 + ["torch.Tensor", "", "pickle"])
    arr = Array(dtype=declared[0], shape=declared[1], stype=stype, data=data)
    return "array-metadata", RecordDict({LARGE_KEY: ArrayRecord({BLOB_KEY: arr})}), _consistent(arr)


def _consistent(arr: Array) -> bool:
    """A uint8 vector whose data (a .npy) is exactly what its metadata declares."""
    if arr.stype != "numpy.ndarray" or arr.dtype != "uint8" or len(arr.shape) != 1:
        return False
    try:
        data = np.load(io.BytesIO(arr.data), allow_pickle=False)
    except Exception:  # any failure to load means "not consistent"
        return False
    return isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == tuple(arr.shape)


def test_fuzz_flower_content(tmp_path):
    """``from_content`` turns every malformed RecordDict (record names, record and value types,
    sizes, array dtype/shape/serialisation, corrupt array data) into a MessageError and never
    returns more than ``max_bytes``; what it returns goes through ``wire.decode`` and the spsa
    client as ``client_handler.handle`` does, and no mutated spsa round message is accepted."""
    # Prepare
    w = _spsa_world(tmp_path)
    tally = Tally("flower content")
    rng = random.Random(SEED + 40)
    mutate = Mutator(random.Random(SEED + 41), FOREIGN, nested=("log",))
    sites = w.transport.sites()
    states = {s: dict(w.transport.states[s]) for s in sites}
    # Execute
    for i in range(CASES[tally.name]):
        site = sites[i % len(sites)]
        original = w.down[2][site]
        op, content, wrapping_ok = _flower_case(rng, original, mutate)
        tally.cases += 1
        tally.ops[op.split(":")[0]] += 1
        try:
            blob = from_content(content, max_bytes=FLOWER_LIMIT)
        except ValueError:
            tally.rejected += 1
            continue
        except Exception as err:
            tally.crash(op, err)
            continue
        if len(blob) > FLOWER_LIMIT or not wrapping_ok:
            tally.accepted_bad(op, "flower.array-metadata" if op == "array-metadata" else "flower.wrapping")
            continue
        if blob == original:  # a faithful wrapping of the honest message: the site's resend path
            tally.accepted_value += 1
            continue
        outcome, detail = _client_call(w.transport, site, "train", blob, states[site])
        if outcome == "crash":
            tally.crash(op, detail)
        elif outcome == "rejected":
            tally.rejected += 1
        else:
            tally.accepted_bad(op, _spsa_accepted_reason(original, blob))
    # Assert
    tally.check(replays_must_fail=True)


# ---- bugs found by the fuzz, fixed, kept as regression tests ----------------------------------------


def _honest_kavg_message(tmp_path: Path, **plan_changes: Any) -> tuple[Any, dict[str, Any]]:
    """A kavg site and its honest round-1 message with some plan fields replaced."""
    cfg = _cfg("kavg")
    server, transport, _ = _build(tmp_path / "run", cfg)
    msg = server.configure(1, "train", transport.sites())["site-0"]
    plan = {**wire.decode(msg["plan"], max_bytes=4096), **plan_changes}
    return transport.clients["site-0"], {**msg, "plan": _encode(plan)}


def test_bug_plan_ints_beyond_int64_are_rejected(tmp_path, cheap_training):
    """An int outside int64 is a WireError at decoding, so a plan with one never reaches the site."""
    with pytest.raises(wire.WireError):
        wire.decode(_encode({"seed": 2**63}), max_bytes=64)
    client, msg = _honest_kavg_message(tmp_path, seed=2**63)
    with pytest.raises(ValueError):
        client.step("train", wire.decode(_encode(msg), max_bytes=1 << 30), {})


@pytest.mark.parametrize("steps", [0, -1])
def test_bug_plan_without_local_steps_is_rejected(tmp_path, cheap_training, steps):
    """A plan asking for fewer than one local step is refused with a ValueError."""
    client, msg = _honest_kavg_message(tmp_path, K=steps)
    with pytest.raises(ValueError):
        client.step("train", msg, {})


def test_bug_plan_with_unknown_up_codec_is_rejected(tmp_path, cheap_training):
    """An unknown ``up`` codec is refused with a ValueError before local training."""
    client, msg = _honest_kavg_message(tmp_path, up="fp64")
    with pytest.raises(ValueError):
        client.step("train", msg, {})


@pytest.mark.parametrize("change", [{"opt": "Adam"}, {"lr": 0.0}, {"mom": 1.5}], ids=["opt", "lr", "mom"])
def test_bug_plan_values_a_config_cannot_produce_are_rejected(tmp_path, cheap_training, change):
    """A plan is refused unless a valid ``KavgSection`` could have produced it (the config's own checks)."""
    client, msg = _honest_kavg_message(tmp_path, **change)
    with pytest.raises(ValueError):
        client.step("train", msg, {})


def _array_content(**array_fields: Any):
    fields = {"dtype": "uint8", "shape": (4,), "stype": "numpy.ndarray", "data": _npy(np.zeros(4, np.uint8))}
    return RecordDict({LARGE_KEY: ArrayRecord({BLOB_KEY: Array(**{**fields, **array_fields})})})


@pytest.mark.parametrize(
    "array_fields",
    [
        {"stype": "torch.Tensor"},
        {"data": b""},
        {"data": _npz(np.zeros(4, np.uint8))},
        {"data": _npy(np.zeros(4, np.uint8)).replace(b" \n", b"(\n")},  # an unclosed "(" in the header
    ],
    ids=["stype", "empty", "npz", "npy-header"],
)
def test_bug_from_content_rejects_malformed_arrays(array_fields):
    """Every malformed array raises a ValueError (``MessageError`` or numpy's), which the client handler
    turns into an error reply; nothing else escapes."""
    with pytest.raises(ValueError):
        from_content(_array_content(**array_fields), max_bytes=64)


@pytest.mark.parametrize(
    "data",
    [_npy(np.zeros(10_000, np.uint8)), _npy(np.zeros(8, np.float64)), _npy(np.zeros((2, 2), np.uint8))],
    ids=["larger", "float64", "2d"],
)
def test_bug_from_content_checks_the_array_data_not_its_metadata(data):
    """The size, dtype and rank checks hold for the data that is returned, not only for the metadata."""
    with pytest.raises(MessageError):
        from_content(_array_content(data=data), max_bytes=64)


def test_bug_envelope_of_another_run_does_not_reset_the_replay_guard(tmp_path):
    """Whatever a site in run A does with a signed envelope of run B (refuse it, or keep a guard per
    run), its replay guard for run A survives: round 1 of run A is still refused afterwards."""
    # Prepare: two runs signed by the same server key (a deployment's keys outlive runs)
    keymod.generate(tmp_path / "keys", [f"site-{i}" for i in range(NUM_SITES)])
    cfg = _cfg("spsa", **{"crypto.keys_dir": str(tmp_path / "keys")})
    server_b, transport_b, _ = _build(tmp_path / "run-b", cfg)
    down_b, _ = _exchange(server_b, transport_b, 1, "train")
    server, transport, _ = _build(tmp_path / "run-a", cfg)
    down_1, up_1 = _exchange(server, transport, 1, "train")
    _commit(server, 1, "train", up_1, cfg)
    _exchange(server, transport, 2, "train")
    state = dict(transport.states["site-0"])
    assert ReplayGuard.from_bytes(state["guard"]).last_round == 2
    # Execute + Assert
    outcome, _ = _client_call(transport, "site-0", "train", down_b["site-0"], state)
    if outcome == "accepted":  # the state a real site would persist after that answer
        _, state = transport.clients["site-0"].step(
            "train", wire.decode(down_b["site-0"], max_bytes=1 << 30), dict(state)
        )
    replay, _ = _client_call(transport, "site-0", "train", down_1["site-0"], state)
    assert replay == "rejected", f"run B's envelope was {outcome}, then run A's round 1 was {replay}"


def test_bug_spsa_snapshot_field_is_bound_to_the_envelope(tmp_path):
    """A round message whose ``snap`` bytes differ from what the signed plan commits to is rejected."""
    w = _spsa_world(tmp_path)
    msg = {**wire.decode(w.down[2]["site-0"], max_bytes=1 << 30), "snap": b"not a snapshot"}
    outcome, _ = _client_call(w.transport, "site-0", "train", wire.encode(msg), w.transport.states["site-0"])
    assert outcome == "rejected"
