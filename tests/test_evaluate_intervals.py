"""Every score is printed with its 95% interval: Wilson's score interval, checked against values worked by hand."""
import pytest

import compare
from kit.evaluate import wilson, with_interval


@pytest.mark.parametrize("share,n,low,high", [
    (0.94, 200, 0.8981, 0.9653),  # 188 of 200: centre (188 + 1.92) / 203.84, half-width 1.96 * 3.4986 / 203.84
    (0.0, 10, 0.0, 0.2775),       # none right: not a zero-width interval at 0
    (1.0, 10, 0.7225, 1.0),
    (0.5, 100, 0.4038, 0.5962),
])
def test_wilson_interval_matches_the_formula_worked_by_hand(share, n, low, high):
    lo, hi = wilson(share, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_intervals_narrow_with_more_examples_and_are_printed_beside_each_score():
    assert wilson(0.9, 1000)[1] - wilson(0.9, 1000)[0] < wilson(0.9, 100)[1] - wilson(0.9, 100)[0]
    assert with_interval(0.94, 200) == "0.9400 (0.90-0.97)"
    assert compare.fmt((0.9, 0.88, 0.93), n=200) == "0.9000 (0.85-0.93) [0.880-0.930]"  # seeds' mean, min-max
    assert compare.fmt(0.9) == "0.9000"  # a loss has no binomial interval
