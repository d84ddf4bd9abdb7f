"""Tests for the built-in demo dataset (edgetune/data/demo.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections import Counter

import pytest

from edgetune.data.demo import (
    ALARM_HELDOUT_TEMPLATE,
    GENERAL_HELDOUT_TEMPLATE,
    MAX_SITES,
    NUM_GENERAL,
    demo_heldout,
    demo_sites,
)

CODE = re.compile(r"alarm ([A-Z]-\d{4})")
MACHINE = re.compile(r"\b[A-Z]{1,3}-\d{1,2}\b")  # "P-12", "AGV-3"; alarm codes have 4 digits
RESPONSE = re.compile(r"^Procedure PR-\d{3}: [a-z][A-Za-z /-]+ and [a-z][A-Za-z /-]+\.$")


def _dump(sites) -> bytes:
    return json.dumps([dataclasses.asdict(s) for s in sites]).encode()


def test_same_arguments_give_identical_bytes_and_seed_changes_them():
    """The data is a pure function of (num_sites, facts_per_site, seed)."""
    # Execute
    a = _dump(demo_sites(3, facts_per_site=5, seed=7))
    b = _dump(demo_sites(3, facts_per_site=5, seed=7))
    c = _dump(demo_sites(3, facts_per_site=5, seed=8))
    # Assert
    assert a == b
    assert a != c


def test_a_site_does_not_depend_on_how_many_sites_there_are():
    """Site i is keyed on (seed, i) only, so growing the federation keeps existing sites' data."""
    # Execute
    few = demo_sites(2, seed=3)
    many = demo_sites(5, seed=3)
    # Assert
    assert few == many[:2]


def test_default_sizes_and_example_shape():
    """Defaults: 24 alarm + 4 general facts, three train phrasings and one held-out per fact."""
    # Execute
    sites = demo_sites(2)
    # Assert
    for idx, site in enumerate(sites):
        assert site.site_id == f"site-{idx}"
        assert site.name.endswith(" plant")
        assert len(site.train) == 3 * (24 + NUM_GENERAL)
        assert len(site.heldout) == 24 + NUM_GENERAL
        for ex in site.train:
            assert set(ex) == {"instruction", "response", "site"}
        for ex in site.heldout:
            assert set(ex) == {"instruction", "response", "site", "mc_choices"}
        for ex in site.train + site.heldout:
            assert ex["site"] == site.site_id
            assert RESPONSE.match(ex["response"]), ex["response"]
            assert len(ex["response"].split()) <= 14


def test_heldout_phrasing_never_occurs_in_train_but_asks_a_trained_fact():
    """Held-out questions use an unseen template; their answers are facts taught in train."""
    # Prepare
    fixed_parts = [
        part
        for template in (ALARM_HELDOUT_TEMPLATE, GENERAL_HELDOUT_TEMPLATE)
        for part, *_ in string.Formatter().parse(template)
        if len(part.strip()) > 8
    ]
    # Execute
    sites = demo_sites(3, facts_per_site=10, seed=1)
    # Assert
    assert fixed_parts
    for site in sites:
        train_questions = {ex["instruction"] for ex in site.train}
        train_answers = Counter(ex["response"] for ex in site.train)
        for ex in site.heldout:
            assert ex["instruction"] not in train_questions
            assert train_answers[ex["response"]] == 3  # the same fact, three train phrasings
        for question in train_questions:
            assert not any(part in question for part in fixed_parts), question


def test_codes_are_unique_within_a_site_and_sites_differ():
    """Non-IID: every site has its own machines, alarm codes and name."""
    # Execute
    sites = demo_sites(4, facts_per_site=40, seed=0)
    # Assert
    code_sets, machine_sets = [], []
    for site in sites:
        codes = [m.group(1) for ex in site.heldout if (m := CODE.search(ex["instruction"]))]
        assert len(codes) == 40
        assert len(set(codes)) == 40
        assert len({ex["response"] for ex in site.heldout}) == 40 + NUM_GENERAL
        code_sets.append(frozenset(codes))
        machine_sets.append(frozenset(m for ex in site.train for m in MACHINE.findall(ex["instruction"])))
    assert len(set(code_sets)) == 4
    assert len(set(machine_sets)) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert len(code_sets[i] & code_sets[j]) < 5
    assert len({s.name for s in sites}) == 4


def test_all_thousand_sites_get_distinct_names():
    """The name vocabulary covers MAX_SITES sites without repeats."""
    # Execute
    sites = demo_sites(MAX_SITES, facts_per_site=1)
    # Assert
    assert len({s.name for s in sites}) == MAX_SITES


def test_demo_heldout_interleaves_sites():
    """Any prefix of num_sites held-out examples covers every site."""
    # Prepare
    sites = demo_sites(3, facts_per_site=4, seed=2)
    # Execute
    heldout = demo_heldout(3, facts_per_site=4, seed=2)
    # Assert
    assert len(heldout) == 3 * (4 + NUM_GENERAL)
    assert [ex["site"] for ex in heldout[:6]] == ["site-0", "site-1", "site-2"] * 2
    assert heldout[1] == sites[1].heldout[0]
    assert sorted(map(json.dumps, heldout)) == sorted(json.dumps(ex) for s in sites for ex in s.heldout)


@pytest.mark.parametrize(
    ("num_sites", "facts"),
    [(0, 24), (MAX_SITES + 1, 24), (2, 0), (2, 801)],
)
def test_out_of_range_arguments_raise(num_sites, facts):
    """Arguments outside the vocabularies' capacity fail with a clear message."""
    # Execute / Assert
    with pytest.raises(ValueError, match="demo data"):
        demo_sites(num_sites, facts_per_site=facts)


def test_heldout_multiple_choice_holds_the_answer_and_three_answers_of_the_same_site():
    """Each held-out fact offers 4 distinct options: its own answer and three other answers of its site."""
    from edgetune.data.demo import MC_OPTIONS, demo_sites

    site = demo_sites(2, facts_per_site=6, seed=0)[1]
    answers = {row["response"] for row in site.heldout}
    for row in site.heldout:
        options = row["mc_choices"].split("\n")
        assert len(options) == len(set(options)) == MC_OPTIONS
        assert row["response"] in options and set(options) <= answers


@pytest.mark.parametrize("source", ["demo", "triage"])
def test_a_site_builds_its_own_data_alone_and_the_same_as_among_all(monkeypatch, source):
    """A site's data depends on its index and the seed only; building site i alone gives exactly
    demo_sites(N)[i] (triage too), and a site's examples (data.sources.site_examples, what every site
    process calls) generate that one site, not all N (0.6 s per site at 1000 sites, once per site per
    process: it made simulated rounds of many sites grow with the square of the sites)."""
    from edgetune import config as cfgmod
    from edgetune.data import demo, sources, triage

    if source == "demo":
        mod, build_all, build_one = demo, demo.demo_sites, demo.demo_site
    else:
        mod, build_all, build_one = triage, triage.triage_sites, triage.triage_site
    for n in (1, 7, 40):
        everything = build_all(n, seed=3)
        for i in {0, n // 2, n - 1}:
            assert build_one(i, n, seed=3) == everything[i]
    with pytest.raises(ValueError, match="out of range"):
        build_one(5, 5)
    calls = []
    real = mod._make_site
    monkeypatch.setattr(mod, "_make_site", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = cfgmod.from_run_config({"model.path": "tiny", "data.source": source, "run.num_sites": 500})
    examples = sources.site_examples(cfg, 321, 500)
    assert calls == ["site-321"]
    assert examples and {e["site"] for e in examples} == {"site-321"}
