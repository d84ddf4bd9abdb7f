"""Simulation splits of one example list into site partitions, with flwr-datasets partitioners.

Only the row indices (and the ``by`` column) go through a ``datasets.Dataset``; the original
dicts are returned untouched, so rows with different optional fields survive the trip.
Everything runs on an in-memory dataset: nothing is downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

from edgetune.crypto import schedule

METHODS = ("iid", "dirichlet", "natural")

_ROW = "__row__"


def partition(
    rows: Sequence[Mapping[str, Any]],
    num_partitions: int,
    *,
    method: str,
    by: str = "site",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 1,
) -> list[list[dict[str, Any]]]:
    """Split ``rows`` into ``num_partitions`` partitions.

    Parameters
    ----------
    rows
        Examples (dicts); ``by`` must be a string field of every row for ``dirichlet`` and
        ``natural``.
    num_partitions
        Number of partitions (sites).
    method
        ``iid``: a keyed shuffle, then equal contiguous shards (``IidPartitioner``).
        ``dirichlet``: per value of ``by``, proportions drawn from Dir(alpha)
        (``DirichletPartitioner``, not self-balancing). ``natural``: one partition per
        distinct value of ``by`` (``NaturalIdPartitioner``).
    by
        Column for ``dirichlet`` and ``natural``.
    alpha
        Dirichlet concentration; smaller is more skewed.
    seed
        Run seed; the shuffle and the Dirichlet draws come from the ``partition`` stream.
    min_partition_size
        Dirichlet only: redraw (at most 10 times) until every partition has this many rows.

    Returns
    -------
    list[list[dict]]
        The partitions, as the original row dicts. ``natural`` partitions come in order of
        first appearance of their ``by`` value (``site-0``, ``site-1``, ... for the demo data),
        not in flwr-datasets' sorted order, where ``site-10`` would precede ``site-2``.
    """
    if method not in METHODS:
        raise ValueError(f"partition method must be one of {', '.join(METHODS)}, got {method!r}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if len(rows) < num_partitions:
        raise ValueError(f"cannot split {len(rows)} rows into {num_partitions} partitions")
    if method == "iid":
        # IidPartitioner cuts contiguous shards without shuffling; data grouped by site
        # would come back one site per shard, so shuffle with a keyed permutation first.
        order = schedule.permutation(schedule.derive(schedule.run_key(seed), "partition", "iid"), len(rows))
        shuffled = [rows[int(i)] for i in order]
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = Dataset.from_dict({_ROW: list(range(len(rows)))})
        return [[dict(shuffled[i]) for i in partitioner.load_partition(p)[_ROW]] for p in range(num_partitions)]

    values = _column(rows, by)
    dataset = Dataset.from_dict({_ROW: list(range(len(rows))), by: values})
    if method == "natural":
        distinct = list(dict.fromkeys(values))
        if len(distinct) != num_partitions:
            raise ValueError(
                f"natural partition by {by!r}: {len(distinct)} distinct values but num_partitions = {num_partitions}"
            )
        natural = NaturalIdPartitioner(partition_by=by)
        natural.dataset = dataset
        parts = [natural.load_partition(pid)[_ROW] for pid in range(num_partitions)]
        # The id -> value map is filled by the first load_partition; flwr-datasets sorts it.
        by_value = {natural.partition_id_to_natural_id[pid]: part for pid, part in enumerate(parts)}
        return [[dict(rows[i]) for i in by_value[value]] for value in distinct]

    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    # flwr-datasets draws from np.random.default_rng(seed) (a private generator, never
    # the global one); the seed itself is keyed from the run seed.
    key = schedule.derive(schedule.run_key(seed), "partition", "dirichlet")
    dirichlet = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=by,
        alpha=alpha,
        min_partition_size=min_partition_size,
        self_balancing=False,
        shuffle=True,
        seed=int.from_bytes(key[:4], "big"),
    )
    dirichlet.dataset = dataset
    try:
        with warnings.catch_warnings():
            # It warns on every redraw; the final failure below says what to change.
            warnings.simplefilter("ignore", UserWarning)
            parts = [dirichlet.load_partition(p)[_ROW] for p in range(num_partitions)]
    except ValueError as err:
        raise ValueError(
            f"dirichlet partition of {len(rows)} rows into {num_partitions} partitions by {by!r}: "
            f"no draw gave every partition >= {min_partition_size} rows with alpha = {alpha} "
            f"({err}); raise alpha or lower min_partition_size"
        ) from None
    return [[dict(rows[i]) for i in part] for part in parts]


def _column(rows: Sequence[Mapping[str, Any]], by: str) -> list[str]:
    values = []
    for i, row in enumerate(rows):
        if by not in row:
            raise ValueError(f"partition by {by!r}: row {i} has no {by!r} field")
        value = row[by]
        if not isinstance(value, str):
            raise ValueError(f"partition by {by!r}: row {i} has a {type(value).__name__}, expected a string")
        values.append(value)
    return values
