"""A fixed seed pool per run (FedKSeed), in exact integer coefficient space.

With ``spsa.pool_scope = "run"`` every probe of the run evaluates one of S keyed directions
z_0..z_{S-1} (keys from the run's pool secret), so the model is always::

    theta = fp32( fp64(theta_0) - q * A ),   A = sum_s n_s * z_s   (int64, per parameter)

with integer coefficients n_s (multiples of the quantum q = 2**-40). Integer sums are exact and
do not depend on their order, so a replica that applied 30 rounds one by one, a site that missed
20 of them and rebuilt A from the coefficient vector, and ``edgetune eval`` rebuilding from an
exported delta file all hold the same A, hence bitwise the same theta (one rounding from the
exact value). That is what makes catch-up and model delivery cost S integers (kilobytes) plus
the public base model, with the state hash as the proof.

Server-side optimizer, in the same coefficient space (S float64 numbers per moment, updated by
every replica with the same elementwise IEEE operations, so they agree bitwise)::

    G_s   = sum over this round's scalars on seed s of g / D          (log.pool_gradient)
    sgd:      dC = lr * G
    momentum: M = beta * M + G;                       dC = lr * M
    adam:     m = b1 m + (1 - b1) G;  v = b2 v + (1 - b2) G^2
              dC = lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + delta)
    dn = rint(dC / q)  (int64),   n += dn,   A += sum_s dn_s z_s

No bytes are added on the wire: the optimizer state is a function of the committed codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from edgetune.comm import wire
from edgetune.comm.wire import Payload, WireError
from edgetune.crypto import keystream

POOL_QUANTUM = 2.0**-40
"""Resolution of the integer coefficients (a power of two: q * n is exact in float64)."""

MAX_ABS_SUM = 2**52
"""sum_s |n_s| stays below this, so every A (and q * A) is exact in float64 and int64."""

OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class OptimizerSpec:
    """The server-side optimizer of a run-scope pool (the same on every replica)."""

    kind: str = "sgd"
    momentum: float = 0.9
    beta2: float = 0.999
    delta: float = 1e-8

    def to_text(self) -> str:
        return f"{self.kind}:{self.momentum!r}:{self.beta2!r}:{self.delta!r}"

    @classmethod
    def from_text(cls, text: str) -> OptimizerSpec:
        parts = text.split(":")
        if len(parts) != 4 or parts[0] not in OPTIMIZERS:
            raise WireError(f"bad optimizer spec {text[:40]!r}")
        try:
            momentum, beta2, delta = (float(x) for x in parts[1:])
        except ValueError as err:
            raise WireError(f"bad optimizer spec {text[:40]!r}") from err
        if not (0 <= momentum < 1 and 0 <= beta2 < 1 and 0 < delta < 1):
            raise WireError(f"optimizer spec out of range: {text[:40]!r}")
        return cls(parts[0], momentum, beta2, delta)


@dataclass
class PoolState:
    """Integer coefficients and optimizer moments of a run-scope pool after ``round_idx`` rounds."""

    size: int
    round_idx: int = 0
    n: np.ndarray = field(default=None)  # type: ignore[arg-type]
    m: np.ndarray = field(default=None)  # type: ignore[arg-type]
    v: np.ndarray = field(default=None)  # type: ignore[arg-type]
    bias1: float = 1.0
    """beta1**t, kept by repeated multiplication (no pow(): exactly rounded on every platform)."""
    bias2: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a seed pool needs at least one seed, got {self.size}")
        if self.n is None:
            self.n = np.zeros(self.size, dtype=np.int64)
        if self.m is None:
            self.m = np.zeros(self.size, dtype=np.float64)
        if self.v is None:
            self.v = np.zeros(self.size, dtype=np.float64)

    def copy(self) -> PoolState:
        return PoolState(self.size, self.round_idx, self.n.copy(), self.m.copy(), self.v.copy(), self.bias1, self.bias2)

    def step(self, grad: np.ndarray, lr: float, opt: OptimizerSpec) -> np.ndarray:
        """Advance one round with the per-seed gradient ``grad``; return the integer change dn."""
        g = np.asarray(grad, dtype=np.float64)
        if g.shape != (self.size,) or not np.all(np.isfinite(g)):
            raise ValueError(f"pool gradient must be {self.size} finite values")
        if opt.kind == "sgd":
            dc = lr * g
        elif opt.kind == "momentum":
            self.m = opt.momentum * self.m + g
            dc = lr * self.m
        else:
            self.m = opt.momentum * self.m + (1.0 - opt.momentum) * g
            self.v = opt.beta2 * self.v + (1.0 - opt.beta2) * (g * g)
            self.bias1 *= opt.momentum
            self.bias2 *= opt.beta2
            m_hat = self.m / (1.0 - self.bias1)
            v_hat = self.v / (1.0 - self.bias2)
            dc = lr * m_hat / (np.sqrt(v_hat) + opt.delta)
        dn = np.rint(dc / POOL_QUANTUM)
        if not np.all(np.abs(dn) < MAX_ABS_SUM):
            raise ValueError("seed-pool coefficient step overflows the integer range (lr far too large?)")
        dn = dn.astype(np.int64)
        n = self.n + dn
        if int(np.abs(n).sum(dtype=np.float64)) >= MAX_ABS_SUM:
            raise ValueError("seed-pool coefficients left the exact integer range (lr far too large?)")
        self.n = n
        self.round_idx += 1
        return dn

    def to_payload(self) -> Payload:
        return {
            "S": self.size,
            "r": self.round_idx,
            "n": self.n.astype("<i8").tobytes(),
            "m": self.m.astype("<f8").tobytes(),
            "v": self.v.astype("<f8").tobytes(),
            "b1": self.bias1,
            "b2": self.bias2,
        }

    @classmethod
    def from_payload(cls, p: Payload, *, size: int) -> PoolState:
        wire.require(
            p, {"S": int, "r": int, "n": bytes, "m": bytes, "v": bytes, "b1": float, "b2": float}, where="pool state"
        )
        if p["S"] != size or p["r"] < 0:
            raise WireError(f"pool state of {p['S']} seeds at round {p['r']}, expected {size} seeds")
        for key in ("n", "m", "v"):
            if len(p[key]) != 8 * size:
                raise WireError(f"pool state field {key!r} has {len(p[key])} bytes, expected {8 * size}")
        n = np.frombuffer(p["n"], dtype="<i8").astype(np.int64)
        m = np.frombuffer(p["m"], dtype="<f8").astype(np.float64)
        v = np.frombuffer(p["v"], dtype="<f8").astype(np.float64)
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(v)) and np.all(v >= 0)):
            raise WireError("pool state moments are not finite (or v < 0)")
        if float(np.abs(n.astype(np.float64)).sum()) >= MAX_ABS_SUM:
            raise WireError("pool state coefficients are out of range")
        if not (0 < p["b1"] <= 1 and 0 < p["b2"] <= 1):
            raise WireError("pool state bias corrections are out of range")
        return cls(size, p["r"], n.copy(), m.copy(), v.copy(), float(p["b1"]), float(p["b2"]))


def encode_state(state: PoolState) -> bytes:
    return wire.encode(state.to_payload())


def decode_state(blob: bytes, *, size: int) -> PoolState:
    return PoolState.from_payload(wire.decode(blob, max_bytes=32 * size + 4096), size=size)


# --------------------------------------------------------------------------------------------
# The integer accumulator A = sum_s n_s z_s, per manifest tensor
# --------------------------------------------------------------------------------------------


def _z_int(key: bytes, index: int, numel: int, mask: torch.Tensor | None) -> torch.Tensor:
    z = keystream.rademacher(key, index, numel, dtype=torch.int64)
    return z if mask is None else z * mask.view(-1).to(torch.int64)


class KeyLookup(Protocol):
    """Seed index -> seed key (a list, or a view that holds only the keys it will be asked for)."""

    def __getitem__(self, index: int, /) -> bytes: ...


def accumulate_(
    acc: Sequence[torch.Tensor],
    dn: np.ndarray,
    seed_keys: KeyLookup,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """In place, exactly: ``acc[t] += sum_s dn_s * z_s[t]`` for every tensor t (int64, host)."""
    nonzero = [int(s) for s in np.flatnonzero(dn)]
    for t, a in enumerate(acc):
        flat = a.view(-1)
        mask = None if masks is None else masks[t]
        for s in nonzero:
            flat.add_(_z_int(seed_keys[s], t, flat.numel(), mask), alpha=int(dn[s]))


def materialize(base: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Theta = fp32(fp64(base) - q * fp64(acc)) for one tensor (host, float32)."""
    exact = acc.to(torch.float64) * POOL_QUANTUM  # exact: |acc| < 2**52 and q a power of two
    return (base.to(torch.float64) - exact).to(torch.float32)


def check_range(acc: Sequence[torch.Tensor]) -> None:
    """``ValueError`` if some accumulated value left the range where float64 is exact."""
    for a in acc:
        if a.numel() and int(a.abs().max()) >= MAX_ABS_SUM:
            raise ValueError("seed-pool accumulator left the exact integer range")
