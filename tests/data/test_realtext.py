"""The real-text corpus (edgetune/data/realtext.py): installed packages' docstrings, one package per site."""

from __future__ import annotations

from edgetune.data import realtext


def test_passages_are_prose_without_code_lines_within_length_bounds():
    """Passages of the peft package: within MIN..MAX characters (a last paragraph may run over by
    one paragraph), no doctest prompts, no duplicates."""
    passages = realtext.package_passages("peft")
    assert len(passages) > 100 and len(set(passages)) == len(passages)
    for p in passages:
        assert len(p) >= realtext.MIN_CHARS
        assert ">>>" not in p


def test_sites_read_their_own_package_and_held_out_passages_are_never_trained_on():
    """Site i trains on PACKAGES[i % 4]; the held-out passages of a package are disjoint from its
    training passages; the split is keyed by the seed."""
    train = {r["response"] for r in realtext.docs_site(2, seed=0)}
    held = [r for r in realtext.docs_heldout(4, seed=0) if r["source"] == "peft"]
    assert held and not train & {r["response"] for r in held}
    assert {r["source"] for r in realtext.docs_site(2, seed=0)} == {"peft"}
    assert realtext.docs_site(2, seed=1) != realtext.docs_site(2, seed=0)
    info = realtext.corpus_info(4)
    assert set(info) >= set(realtext.PACKAGES) and len(info["sha256"]) == 64
