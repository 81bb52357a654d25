"""Accuracy intervals: the Wilson score interval against scipy's implementation."""

import math

import pytest
from scipy.stats import binomtest  # an independent reference (installed with mlflow)

from llmcore.eval.evaluate import wilson_interval
from llmcore.report.tables import fmt_ci


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (3, 250), (170, 200), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(ref.low, abs=2e-4) and high == pytest.approx(ref.high, abs=2e-4)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_interval_narrows_with_more_examples_and_is_shown_with_n():
    small, large = wilson_interval(30, 100), wilson_interval(300, 1000)
    assert large[1] - large[0] < small[1] - small[0]
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert fmt_ci(0.3, small, 100) == f"0.300 [{small[0]:.2f}, {small[1]:.2f}] n=100"
    assert fmt_ci(math.nan, (math.nan, math.nan), 0) == "n/a"
