"""Tests for simulation partitions (edgetune/flower/partition.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from edgetune.data.demo import demo_sites
from edgetune.flower.partition import partition


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """4 demo sites' training rows, grouped by site (as a concatenated file would be)."""
    return [ex for site in demo_sites(4, facts_per_site=24) for ex in site.train]


def _keys(parts) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for p in parts for r in p)


def _max_site_share(part) -> float:
    return max(Counter(r["site"] for r in part).values()) / len(part)


def test_iid_is_balanced_shuffled_and_complete(rows):
    """iid: sizes differ by at most one, every row lands once, and shards mix sites."""
    # Execute
    parts = partition(rows, 5, method="iid", seed=0)
    # Assert
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _keys(parts) == _keys([rows])
    for p in parts:  # without the keyed shuffle, each contiguous shard would be one site
        assert len({r["site"] for r in p}) == 4
        assert _max_site_share(p) < 0.5


def test_iid_depends_on_seed_only(rows):
    """The same seed gives the same split; another seed gives another."""
    # Execute
    a = partition(rows, 4, method="iid", seed=1)
    b = partition(rows, 4, method="iid", seed=1)
    c = partition(rows, 4, method="iid", seed=2)
    # Assert
    assert a == b
    assert a != c


def test_natural_gives_one_site_per_partition_in_first_appearance_order():
    """natural: partition k holds exactly the k-th site value, site-10 after site-9."""
    # Prepare
    rows = [{"instruction": f"q{i}", "response": "a", "site": f"site-{i % 12}"} for i in range(36)]
    # Execute
    parts = partition(rows, 12, method="natural", by="site")
    # Assert
    assert [{r["site"] for r in p} for p in parts] == [{f"site-{k}"} for k in range(12)]
    assert [len(p) for p in parts] == [3] * 12


def test_natural_with_wrong_partition_count_names_both_numbers(rows):
    """The number of distinct values must equal num_partitions."""
    # Execute / Assert
    with pytest.raises(ValueError, match="4 distinct values but num_partitions = 3"):
        partition(rows, 3, method="natural")


def test_dirichlet_is_skewed_complete_and_reproducible(rows):
    """dirichlet with small alpha concentrates sites; the same seed gives the same split."""
    # Execute
    a = partition(rows, 4, method="dirichlet", alpha=0.1, seed=0)
    b = partition(rows, 4, method="dirichlet", alpha=0.1, seed=0)
    c = partition(rows, 4, method="dirichlet", alpha=0.1, seed=5)
    iid = partition(rows, 4, method="iid", seed=0)
    # Assert
    assert a == b
    assert a != c
    assert _keys(a) == _keys([rows])
    assert all(len(p) >= 1 for p in a)
    skew = sum(_max_site_share(p) for p in a) / 4
    assert skew > 0.6 > sum(_max_site_share(p) for p in iid) / 4


def test_rows_come_back_unchanged():
    """Rows keep exactly their own fields: a missing optional field is not filled with None."""
    # Prepare
    rows = [
        {"instruction": "q0", "response": "a", "site": "x", "topic": "t"},
        {"instruction": "q1", "response": "b", "site": "y"},
    ]
    # Execute
    natural = partition(rows, 2, method="natural")
    iid = partition(rows, 2, method="iid")
    # Assert
    assert natural == [[rows[0]], [rows[1]]]
    assert _keys(iid) == _keys([rows])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_partitions": 2, "method": "shards"}, "must be one of iid, dirichlet, natural"),
        ({"num_partitions": 4, "method": "iid"}, "cannot split 3 rows into 4 partitions"),
        ({"num_partitions": 0, "method": "iid"}, "num_partitions must be >= 1"),
        ({"num_partitions": 2, "method": "natural", "by": "topic"}, "row 1 has no 'topic' field"),
        ({"num_partitions": 2, "method": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    """Unknown method, too few rows and a missing column are reported as ValueError."""
    # Prepare
    rows = [
        {"instruction": "q", "response": "a", "site": "x", "topic": "t"},
        {"instruction": "q", "response": "a", "site": "y"},
        {"instruction": "q", "response": "a", "site": "x"},
    ]
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        partition(rows, **kwargs)


def test_dirichlet_that_cannot_meet_min_size_says_what_to_change(rows):
    """An impossible min_partition_size fails with advice, not flwr-datasets' bare message."""
    # Execute / Assert
    with pytest.raises(ValueError, match="raise alpha or lower min_partition_size"):
        partition(rows, 4, method="dirichlet", alpha=0.5, min_partition_size=len(rows))
