"""Bootstrap intervals and paired comparisons."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.eval.bootstrap import Units, estimate, paired_difference


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40), st.integers(1, 50))
def test_interval_brackets_the_figure_for_equal_units(values, den):
    units = Units.of(values, [den] * len(values))
    e = estimate(units, draws=300)
    assert e.low <= e.high
    assert e.low - 1e-9 <= e.value <= e.high + 1e-9 or len(set(values)) > 1  # percentiles may miss a skewed mean
    assert min(values) / den - 1e-9 <= e.low and e.high <= max(values) / den + 1e-9


def test_ratio_of_sums_and_transforms():
    nll, count = [20.0, 30.0, 10.0], [10, 10, 5]
    assert Units.of(nll, count, "exp").value() == pytest.approx(np.exp(60 / 25))
    assert Units.of([1, 0, 1, 1], transform="percent").value() == pytest.approx(75.0)
    constant = estimate(Units.of([2.0] * 8, [1.0] * 8, "exp"))
    assert constant.low == pytest.approx(np.exp(2)) and constant.high == pytest.approx(np.exp(2))
    with pytest.raises(LowbitError):
        Units.of([1.0, 2.0], [1.0])


def test_interval_narrows_with_more_units():
    rng = np.random.default_rng(0)
    small = estimate(Units.of(rng.integers(0, 2, 50)))
    large = estimate(Units.of(rng.integers(0, 2, 5000)))
    assert (large.high - large.low) < (small.high - small.low) / 5


def test_paired_difference():
    rng = np.random.default_rng(1)
    base = rng.normal(2.0, 1.0, 200)
    same = paired_difference(Units.of(base), Units.of(base))
    assert same.delta == 0 and not same.distinguishable
    shifted = paired_difference(Units.of(base + 0.1), Units.of(base))  # tiny but consistent: paired sees it
    assert shifted.distinguishable and shifted.low > 0
    noise = paired_difference(Units.of(base + rng.normal(0, 1.0, 200) * 0.5), Units.of(base))
    assert noise.low < noise.delta < noise.high
    with pytest.raises(LowbitError):
        paired_difference(Units.of(base), Units.of(base[:10]))
