"""Round-indexed schedules (edgetune/schedules.py): hand-checked values and rejected spellings."""

from __future__ import annotations

import math

import pytest

from edgetune.schedules import parse


def test_values_match_the_formulas_by_hand():
    """Each kind gives the value its formula gives, at the first, a middle and the last round."""
    assert [parse("constant").value(2.0, r, 5) for r in (1, 3, 5)] == [2.0, 2.0, 2.0]
    cos = parse("cosine:0.1")
    assert cos.value(1.0, 1, 5) == pytest.approx(1.0)
    assert cos.value(1.0, 3, 5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos.value(1.0, 5, 5) == pytest.approx(0.1)
    assert parse("linear").value(4.0, 2, 3) == pytest.approx(2.0)
    assert parse("inverse").value(1.0, 4, 10) == pytest.approx(0.5)
    assert parse("inverse:1").value(3.0, 3, 10) == pytest.approx(1.0)
    assert [parse("step:2:0.5").value(8.0, r, 9) for r in (1, 2, 3, 5)] == [8.0, 8.0, 4.0, 2.0]
    assert [parse("grow-linear:3").int_value(8, r, 9) for r in (1, 2, 3, 4)] == [8, 16, 24, 24]
    assert [parse("grow-geometric:2:4").int_value(4, r, 9) for r in (1, 2, 3, 4)] == [4, 8, 16, 16]


def test_warmup_ramps_linearly_then_hands_over():
    """Warm-up over W rounds multiplies round r <= W by r / (W + 1), and leaves later rounds alone."""
    s = parse("constant")
    assert [s.value(1.0, r, 10, warmup_rounds=3) for r in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]


def test_one_round_run_and_rounds_past_the_end_are_finite():
    """A one-round run and a round beyond num_rounds (a resumed longer run) never divide by zero."""
    assert parse("cosine").value(1.0, 1, 1) == 1.0
    assert math.isfinite(parse("linear").value(1.0, 12, 10))
    with pytest.raises(ValueError, match="round 1"):
        parse("constant").value(1.0, 0, 10)


@pytest.mark.parametrize(
    "spec",
    ["", "cosin", "cosine:2", "cosine:a", "step:0:0.5", "step:2", "inverse:0", "grow-geometric", "linear:nan", "x:1"],
)
def test_bad_spellings_are_rejected_naming_the_key(spec):
    """A spelling that is not a schedule is a ValueError that names the config key."""
    with pytest.raises(ValueError, match="kavg.lr_schedule"):
        parse(spec, key="kavg.lr_schedule")
