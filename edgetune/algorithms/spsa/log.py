"""The replay log: what every copy of theta needs to replay a committed round, and its arithmetic.

A committed round is the list of sites whose replies were accepted and their scalars' codes
(``LogEntry``). With the round's secret, any process rebuilds the same canonical list of
perturbation keys and coefficients: ``replay_terms`` for fresh and per-round-pool directions
(applied by ``models/master.replay``), ``pool_gradient`` for the fixed per-run pool (applied in
integer coefficient space by ``pool.py``).

Coefficient of one scalar g (site i, step k, probe p), over N sites and P probes per step::

    c = lr * g / D,    D = N * P          (normalizer "mean": the average over sites and probes)
                       D = sqrt(N * P)    (normalizer "sqrt": Just One Byte's eta / sqrt(#scalars))

With ``shared`` directions the N sites' scalars of one direction are first combined by the
robust aggregator (mean, trimmed mean, median) and that value stands for all N of them.

Before either, every site's scalar vector is bounded in norm (``site_norm_factors``): a site whose
||g_i|| exceeds ``SITE_NORM_MULT`` x the lower median of the round's site norms is scaled down to
that bound. The bound is a function of the committed codes only (exactly rounded sums, one
correctly rounded square root), so every replica scales bitwise the same, and no byte is added on
the wire. With fewer than half of the sites lying, the lower median lies within the honest sites'
norms: a site sending the largest code on every probe moves the model no further than an honest
site does, whatever the clip allows it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgetune.comm import wire
from edgetune.comm.codecs import codec_for, is_codec
from edgetune.comm.wire import Payload, WireError
from edgetune.crypto import schedule

MAX_LOG_ROUNDS = 200
"""Longest replay log one message carries; a site further behind needs a snapshot."""

_ENTRY_SCHEMA: dict[str, type] = {
    "r": int,
    "K": int,
    "P": int,
    "lr": float,
    "scale": float,
    "codec": str,
    "dirs": str,
    "pool": int,
    "scope": str,
    "norm": str,
    "agg": str,
    "trim": float,
    "sites": str,
    "codes": bytes,
}


@dataclass(frozen=True)
class LogEntry:
    """Everything needed to replay one committed round (the secret travels separately)."""

    round_idx: int
    sites: tuple[str, ...]
    codes: bytes
    """Each site's codes of its K*P scalars (``codec_for(codec).blob_len(K, P)`` bytes: K*P with the
    one-byte codecs), concatenated in ``sites`` order (sorted site ids)."""
    lr: float
    scale: float
    num_steps: int
    num_probes: int
    directions: str
    seed_pool: int
    codec: str
    aggregator: str
    trim_frac: float
    pool_scope: str = "round"
    """``round``: pool seeds drawn per round; ``run``: one fixed pool for the whole run."""
    normalizer: str = "mean"

    def to_payload(self) -> Payload:
        return {
            "r": self.round_idx,
            "K": self.num_steps,
            "P": self.num_probes,
            "lr": self.lr,
            "scale": self.scale,
            "codec": self.codec,
            "dirs": self.directions,
            "pool": self.seed_pool,
            "scope": self.pool_scope,
            "norm": self.normalizer,
            "agg": self.aggregator,
            "trim": self.trim_frac,
            "sites": ",".join(self.sites),
            "codes": self.codes,
        }

    @classmethod
    def from_payload(cls, p: Payload) -> LogEntry:
        wire.require(p, _ENTRY_SCHEMA, where="replay log entry")
        sites = tuple(s for s in p["sites"].split(",") if s)
        if list(sites) != sorted(set(sites)) or not sites:
            raise WireError("replay log entry: sites are not sorted, unique and non-empty")
        if p["K"] < 1 or p["P"] < 1 or not is_codec(p["codec"]) or p["pool"] < 0:
            raise WireError("replay log entry: bad K, P, codec or pool")
        if p["K"] * p["P"] > 1 << 20:
            raise WireError("replay log entry: K x P is implausibly large")
        if p["dirs"] not in {"per-site", "shared"} or p["agg"] not in {"mean", "trimmed", "median"}:
            raise WireError("replay log entry: bad directions or aggregator")
        if p["scope"] not in {"round", "run"} or p["norm"] not in {"mean", "sqrt"}:
            raise WireError("replay log entry: bad pool scope or normalizer")
        if p["scope"] == "run" and p["pool"] < 1:
            raise WireError("replay log entry: a run-scope pool needs pool >= 1")
        if not 0.0 <= p["trim"] < 0.5 or not p["lr"] > 0 or not p["scale"] > 0:
            raise WireError("replay log entry: bad trim, lr or scale")
        if len(p["codes"]) != len(sites) * codec_for(p["codec"]).blob_len(p["K"], p["P"]):
            raise WireError("replay log entry: codes length does not match sites x the codec's length of K x P")
        return cls(
            p["r"],
            sites,
            p["codes"],
            float(p["lr"]),
            float(p["scale"]),
            p["K"],
            p["P"],
            p["dirs"],
            p["pool"],
            p["codec"],
            p["agg"],
            float(p["trim"]),
            p["scope"],
            p["norm"],
        )

    def decoded(self) -> dict[str, np.ndarray]:
        """Site -> the K*P decoded scalars (float64)."""
        codec = codec_for(self.codec)
        k, p = self.num_steps, self.num_probes
        n = codec.blob_len(k, p)
        return {s: codec.decode(self.codes[i * n : (i + 1) * n], k, p, self.scale) for i, s in enumerate(self.sites)}


def encode_log(entries: Sequence[LogEntry]) -> bytes:
    return wire.encode({"n": len(entries), **{str(i): wire.encode(e.to_payload()) for i, e in enumerate(entries)}})


def decode_log(blob: bytes) -> list[LogEntry]:
    outer = wire.decode(blob, max_bytes=64 << 20)
    n = outer.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_LOG_ROUNDS:
        raise WireError("replay log: bad entry count")
    wire.require(outer, {"n": int, **{str(i): bytes for i in range(n)}}, where="replay log")
    entries = [LogEntry.from_payload(wire.decode(outer[str(i)], max_bytes=64 << 20)) for i in range(n)]
    rounds = [e.round_idx for e in entries]
    if rounds and rounds != list(range(rounds[0], rounds[0] + n)):
        raise WireError("replay log: rounds are not consecutive")
    return entries


# --------------------------------------------------------------------------------------------
# Keys of perturbations
# --------------------------------------------------------------------------------------------


def pool_pick(
    secret: bytes, run_id: bytes, round_idx: int, site_id: str, step: int, probe: int, directions: str, seed_pool: int
) -> int:
    """Index of the pool seed that (site, step, probe) evaluates in ``round_idx`` (0 <= j < seed_pool)."""
    who = "*" if directions == "shared" else site_id
    pick = schedule.derive(secret, "pool", run_id, round_idx, "pick", who, step, probe)
    return int(schedule.integers(pick, 1, seed_pool)[0])


def run_seed_key(pool_key: bytes, run_id: bytes, index: int) -> bytes:
    """Key of seed ``index`` of a run's fixed pool (``pool_key`` is the run's pool secret)."""
    return schedule.derive(pool_key, "pool", run_id, "run-seed", index)


def probe_key(
    secret: bytes,
    run_id: bytes,
    round_idx: int,
    site_id: str,
    step: int,
    probe: int,
    directions: str,
    seed_pool: int,
    pool_scope: str = "round",
    pool_key: bytes = b"",
) -> bytes:
    """Key of the perturbation z that site ``site_id`` evaluates at (step, probe)."""
    who = "*" if directions == "shared" else site_id
    if seed_pool:
        j = pool_pick(secret, run_id, round_idx, site_id, step, probe, directions, seed_pool)
        if pool_scope == "run":
            return run_seed_key(pool_key, run_id, j)
        return schedule.derive(secret, "pool", run_id, round_idx, "seed", j)
    return schedule.derive(secret, "pert", run_id, round_idx, who, step, probe)


# --------------------------------------------------------------------------------------------
# Coefficients
# --------------------------------------------------------------------------------------------


def robust(values: list[float], aggregator: str, trim_frac: float) -> float:
    """Combine one direction's scalars across sites (float64, independent of summation order)."""
    # math.fsum is exactly rounded, so the sum does not depend on summation order or SIMD width.
    if aggregator == "median":
        return float(statistics.median(values))
    if aggregator == "trimmed":
        ordered = sorted(values)
        cut = int(math.floor(trim_frac * len(ordered)))
        kept = ordered[cut : len(ordered) - cut] or ordered
        return math.fsum(kept) / len(kept)
    return math.fsum(values) / len(values)


SITE_NORM_MULT = 2.0
"""A site's scalar vector is scaled down to at most this multiple of the round's lower-median site norm."""


def site_norm(values: np.ndarray) -> float:
    """||values||_2 in float64, exactly rounded sum of squares: the same bits on every replica."""
    return math.sqrt(math.fsum(float(x) * float(x) for x in np.asarray(values, dtype=np.float64)))


def lower_median(values: Sequence[float]) -> float:
    """The ``(n - 1) // 2``-th smallest value: an element of ``values``, never an average."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def site_norm_factors(decoded: dict[str, np.ndarray], mult: float | None = None) -> dict[str, float]:
    """Per site, the factor (<= 1) that bounds its scalars' norm by ``mult`` x the lower median site norm.

    1.0 for a site within the bound; ``bound / norm`` for one above it (a bound of 0, when at least
    half of the sites sent all-zero codes, scales every other site to 0: that round moves nothing).
    """
    mult = SITE_NORM_MULT if mult is None else mult
    norms = {s: site_norm(g) for s, g in decoded.items()}
    if not norms:
        return {}
    bound = mult * lower_median(list(norms.values()))
    return {s: (bound / n if n > bound else 1.0) for s, n in norms.items()}


def bounded_scalars(entry: LogEntry) -> dict[str, np.ndarray]:
    """Site -> its decoded scalars, scaled by ``site_norm_factors`` (what the round applies)."""
    decoded = entry.decoded()
    factors = site_norm_factors(decoded)
    return {s: g if factors[s] == 1.0 else g * factors[s] for s, g in decoded.items()}


def _denominator(entry: LogEntry) -> float:
    count = len(entry.sites) * entry.num_probes
    return float(count) if entry.normalizer == "mean" else math.sqrt(count)


def unit_contributions(entry: LogEntry) -> list[tuple[str, int, int, float]]:
    """Canonical (who, step, probe, g / D) of a committed round, without the learning rate.

    ``who`` is the site id (per-site directions) or ``"*"`` (shared); the order is (site, step,
    probe) for per-site directions and (step, probe) for shared ones.
    """
    decoded = bounded_scalars(entry)
    k_steps, n_probes = entry.num_steps, entry.num_probes
    denom = _denominator(entry)
    out: list[tuple[str, int, int, float]] = []
    if entry.directions == "shared":
        n_sites = len(entry.sites)
        for k in range(k_steps):
            for p in range(n_probes):
                g = robust(
                    [float(decoded[s][k * n_probes + p]) for s in entry.sites], entry.aggregator, entry.trim_frac
                )
                out.append(("*", k, p, g * n_sites / denom))
    else:
        for s in entry.sites:
            for k in range(k_steps):
                for p in range(n_probes):
                    out.append((s, k, p, float(decoded[s][k * n_probes + p]) / denom))
    return out


def replay_terms(entry: LogEntry, secret: bytes, run_id: bytes) -> list[tuple[bytes, float]]:
    """The canonical (key, fp32 coefficient) list of a round with fresh or per-round-pool directions."""
    if entry.pool_scope == "run":
        raise ValueError("a run-scope pool round is replayed in coefficient space (pool_gradient)")
    contributions = [
        (
            probe_key(secret, run_id, entry.round_idx, who, k, p, entry.directions, entry.seed_pool),
            entry.lr * u,
        )
        for who, k, p, u in unit_contributions(entry)
    ]
    if entry.seed_pool:
        # FedKSeed: one coefficient per pool seed, summed exactly in float64, in seed order.
        sums: dict[bytes, list[float]] = {}
        for key, c in contributions:
            sums.setdefault(key, []).append(c)
        return [(key, float(np.float32(math.fsum(cs)))) for key, cs in sorted(sums.items())]
    return [(key, float(np.float32(c))) for key, c in contributions]


def pool_gradient(entry: LogEntry, secret: bytes, run_id: bytes) -> np.ndarray:
    """Per seed of a run-scope pool, the round's summed g / D (float64, exactly rounded sums)."""
    if entry.pool_scope != "run":
        raise ValueError("pool_gradient is for run-scope pools")
    sums: dict[int, list[float]] = {}
    for who, k, p, u in unit_contributions(entry):
        j = pool_pick(secret, run_id, entry.round_idx, who, k, p, entry.directions, entry.seed_pool)
        sums.setdefault(j, []).append(u)
    g = np.zeros(entry.seed_pool, dtype=np.float64)
    for j, us in sums.items():
        g[j] = math.fsum(us)
    return g
