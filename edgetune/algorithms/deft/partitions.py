"""deft's partitions of the flat trainable vector, the per-partition budgets k_p and the bins.

Pure functions of sizes and norms (the package docstring has the formulas); the server plans
with them and the site recomputes the partitions from ``nsplit``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Partitions:
    """Contiguous ranges of the flat trainable vector, in manifest order."""

    starts: np.ndarray
    sizes: np.ndarray
    tensor: np.ndarray
    """Manifest index of the tensor each partition lies in."""
    num_chunks: int
    """N of the split rule (the number of sites when the partitions were made)."""

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def dim(self) -> int:
        return int(self.sizes.sum())

    def of(self, idx: np.ndarray) -> np.ndarray:
        """Partition id of each flat index."""
        return np.searchsorted(self.starts, idx, side="right") - 1

    def coords(self, pids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Every flat index of the partitions ``pids``, sorted."""
        parts = [np.arange(self.starts[p], self.starts[p] + self.sizes[p]) for p in sorted(pids)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def make_partitions(numels: Sequence[int], num_chunks: int) -> Partitions:
    """DEFT's two-stage partitioning: one partition per tensor, tensors above D/N cut in N chunks.

    Parameters
    ----------
    numels
        Element counts of the trainable tensors, in manifest order.
    num_chunks
        N (the number of sites); a tensor with fewer than N elements is cut into one per element.

    Returns
    -------
    Partitions
        Every flat coordinate in exactly one partition; chunk sizes of a tensor differ by <= 1.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    dim = sum(numels)
    starts, sizes, tensor = [], [], []
    offset = 0
    for t, n in enumerate(numels):
        pieces = min(num_chunks, n) if n * num_chunks > dim else 1
        for c in range(pieces):
            size = n // pieces + (1 if c < n % pieces else 0)
            starts.append(offset)
            sizes.append(size)
            tensor.append(t)
            offset += size
    return Partitions(np.array(starts, np.int64), np.array(sizes, np.int64), np.array(tensor, np.int64), num_chunks)


def allocate_k(nu: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """DEFT's norm-proportional k_p (module docstring), visiting partitions by descending ``nu``.

    Parameters
    ----------
    nu
        Non-negative weight per partition (norms; all zero falls back to the sizes).
    sizes
        s_p.
    k
        Total budget.

    Returns
    -------
    np.ndarray
        int64 k_p with 1 <= k_p <= s_p; the sum is k unless a bound binds.
    """
    nu = np.asarray(nu, dtype=np.float64)
    if not np.all(np.isfinite(nu)) or float(nu.sum()) <= 0:
        nu = sizes.astype(np.float64)
    order = np.argsort(-nu, kind="stable")
    # N_rem as suffix sums of the visiting order, so the last partition sees nu_p / N_rem = 1 exactly.
    remaining = np.cumsum(nu[order][::-1])[::-1]
    kp = np.zeros(len(sizes), dtype=np.int64)
    k_rem = int(k)
    for p, n_rem in zip(order, remaining):
        share = math.floor(k_rem * nu[p] / n_rem) if n_rem > 0 else 0
        kp[p] = min(int(sizes[p]), max(1, min(share, k_rem)))
        k_rem -= int(kp[p])
    return kp


def selection_cost(sizes: np.ndarray, kp: np.ndarray) -> np.ndarray:
    """DEFT's cost model of top-k_p on s_p values: s_p log2 k_p (k_p > 1), else s_p."""
    return np.where(kp > 1, sizes * np.log2(np.maximum(kp, 2)), sizes).astype(np.float64)


def pack_bins(costs: np.ndarray, pids: Sequence[int] | np.ndarray, num_bins: int) -> list[np.ndarray]:
    """Greedy LPT: largest cost first (ties: lower id), into the least-loaded bin (ties: lower bin).

    Returns
    -------
    list[np.ndarray]
        ``num_bins`` sorted arrays of partition ids; disjoint, covering ``pids``.
    """
    heap = [(0.0, b) for b in range(num_bins)]
    members: list[list[int]] = [[] for _ in range(num_bins)]
    for p in sorted(pids, key=lambda q: (-costs[q], q)):
        load, b = heapq.heappop(heap)
        members[b].append(int(p))
        heapq.heappush(heap, (load + float(costs[p]), b))
    return [np.array(sorted(m), dtype=np.int64) for m in members]


def rotated_bin(round_idx: int, site_pos: int, num_bins: int) -> int:
    """Bin of the site at position ``site_pos`` of the sorted site ids: (r + j) mod N."""
    return (round_idx + site_pos) % num_bins


def size_gap(kp: np.ndarray, sizes: np.ndarray) -> float:
    """Total variation between the budget shares k_p / sum k_p and the size shares s_p / D (0: k_p ~ s_p)."""
    return 0.5 * float(np.abs(kp / kp.sum() - sizes / sizes.sum()).sum())
