"""The triage data (edgetune/data/triage.py): deterministic, non-IID, held-out symptoms never trained on."""

from __future__ import annotations

from collections import Counter

import pytest

from edgetune.data.triage import CATEGORIES, SYMPTOMS, TRAIN_SYMPTOMS, triage_heldout, triage_sites


def test_same_arguments_give_identical_data_and_site_i_does_not_depend_on_num_sites():
    """Keyed generation: same seed -> same rows; site 1 of 2 equals site 1 of 5; another seed differs."""
    assert triage_sites(2, seed=0) == triage_sites(2, seed=0)
    assert triage_sites(2, seed=0)[1] == triage_sites(5, seed=0)[1]
    assert triage_sites(2, seed=1)[0].train != triage_sites(2, seed=0)[0].train


def test_held_out_reports_use_symptom_phrasings_that_no_training_report_uses():
    """Every held-out report carries one of its category's held-out symptoms and no training report
    carries any of them: held-out accuracy measures routing of unseen descriptions."""
    sites = triage_sites(4, seed=0)
    held_out_symptoms = {s for c in CATEGORIES for s in SYMPTOMS[c][TRAIN_SYMPTOMS:]}
    for site in sites:
        for row in site.train:
            assert not any(s in row["instruction"].lower() for s in held_out_symptoms)
        for row in site.heldout:
            assert any(s in row["instruction"].lower() for s in SYMPTOMS[row["response"]][TRAIN_SYMPTOMS:])
        texts = [r["instruction"] for r in site.train + site.heldout]
        assert len(set(texts)) == len(texts)


def test_sites_are_non_iid_with_their_own_categories_and_frequencies():
    """Each site routes to its own 5 of 10 categories, answers are always among them, and label
    frequencies differ between sites."""
    sites = triage_sites(4, seed=0)
    assert len({s.categories for s in sites}) > 1
    for site in sites:
        assert len(site.categories) == 5
        counts = Counter(r["response"] for r in site.train)
        assert set(counts) <= set(site.categories)
        for row in site.train[:5]:
            assert row["choices"].split("\n") == list(site.categories)
            assert row["answer_prefix"] == "Category:"
            assert ", ".join(site.categories) in row["instruction"]
    assert Counter(r["response"] for r in sites[0].train) != Counter(r["response"] for r in sites[1].train)


def test_symptom_pools_are_disjoint_and_complete():
    """Every category has 16 distinct symptoms, and no phrasing is shared between categories."""
    everything = [s for c in CATEGORIES for s in SYMPTOMS[c]]
    assert all(len(SYMPTOMS[c]) == 16 for c in CATEGORIES)
    assert len(set(everything)) == len(everything)


def test_heldout_interleaves_sites_and_bad_sizes_are_refused():
    """Any prefix of num_sites held-out rows covers every site; 0 sites is an error."""
    held = triage_heldout(3, seed=0)
    assert {r["site"] for r in held[:3]} == {"site-0", "site-1", "site-2"}
    with pytest.raises(ValueError, match="num_sites"):
        triage_sites(0)
