"""Seeded statistics: bootstrap intervals, permutation tests, Spearman (lib.stats)."""

import numpy as np
import pytest
from scipy.stats import kstest

from lib import stats


def test_bootstrap_ci_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(2.0, 1.0, size=25)
    large = rng.normal(2.0, 1.0, size=400)
    for x in (small, large):
        low, high = stats.bootstrap_ci(x, 2000, seed=0)
        assert low < x.mean() < high
    width_small = np.subtract(*stats.bootstrap_ci(small, 2000, seed=0)[::-1])
    width_large = np.subtract(*stats.bootstrap_ci(large, 2000, seed=0)[::-1])
    assert width_large < width_small / 2.5  # ~ sqrt(400 / 25) = 4 times narrower
    # the interval of the mean is close to mean +- 1.96 sd / sqrt(n)
    se = large.std(ddof=1) / np.sqrt(large.size)
    assert width_large == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_is_seeded_and_handles_one_value():
    x = np.arange(30.0)
    assert stats.bootstrap_ci(x, 500, seed=3) == stats.bootstrap_ci(x, 500, seed=3)
    assert stats.bootstrap_ci(x, 500, seed=3) != stats.bootstrap_ci(x, 500, seed=4)
    assert stats.bootstrap_ci([1.5], 100) == (1.5, 1.5)
    with pytest.raises(ValueError, match="empty"):
        stats.bootstrap_ci([], 100)
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_ci([1.0, float("nan")], 100)


def test_summarize_fields():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0], 1000, seed=0)
    assert set(s) == {"mean", "std", "n", "ci_low", "ci_high"}
    assert s["mean"] == 2.5 and s["n"] == 4
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert 1.0 <= s["ci_low"] <= 2.5 <= s["ci_high"] <= 4.0
    assert stats.summarize([7.0])["std"] is None


@pytest.mark.parametrize("paired", [True, False])
def test_permutation_p_is_small_for_a_clear_difference(paired):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 40)
    y = x - 1.0 + rng.normal(0, 0.3, 40) if paired else rng.normal(0.0, 1.0, 40)
    res = stats.permutation_test(x, y, 2000, seed=0, paired=paired)
    assert res["p_value"] < 0.01
    assert res["p_value"] >= 1 / 2001  # never zero
    assert res["statistic"] == pytest.approx(x.mean() - y.mean())
    # one-sided: "greater" is significant, "less" is not
    assert stats.permutation_test(x, y, 2000, 0, paired, "greater")["p_value"] < 0.01
    assert stats.permutation_test(x, y, 2000, 0, paired, "less")["p_value"] > 0.9


@pytest.mark.parametrize("paired", [True, False])
def test_permutation_p_is_uniform_under_the_null(paired):
    rng = np.random.default_rng(123)
    pvals = []
    for i in range(300):
        x = rng.normal(0, 1, 15)
        y = rng.normal(0, 1, 15)
        pvals.append(stats.permutation_test(x, y, 199, seed=i, paired=paired)["p_value"])
    pvals = np.array(pvals)
    assert 0.02 <= (pvals < 0.05).mean() <= 0.09
    assert 0.40 <= (pvals < 0.5).mean() <= 0.60
    assert kstest(pvals, "uniform").pvalue > 0.001


def test_permutation_is_seeded_and_checks_inputs():
    x, y = [1.0, 2.0, 3.0, 4.0], [1.5, 1.0, 2.0, 2.5]
    assert stats.permutation_test(x, y, 500, seed=1) == stats.permutation_test(x, y, 500, seed=1)
    with pytest.raises(ValueError, match="equal length"):
        stats.permutation_test([1.0, 2.0], [1.0], paired=True)
    with pytest.raises(ValueError, match="alternative"):
        stats.permutation_test(x, y, alternative="bigger")


def test_spearman():
    x = np.arange(10.0)
    assert stats.spearman(x, x ** 3)["rho"] == pytest.approx(1.0)
    assert stats.spearman(x, -x)["rho"] == pytest.approx(-1.0)
    assert stats.spearman(x, -x)["p_value"] < 0.001
    assert stats.spearman(x, np.ones(10)) == {"rho": None, "p_value": None, "n": 10}
    assert stats.spearman([1.0, 2.0], [2.0, 1.0])["rho"] is None
    # non-finite pairs are dropped
    assert stats.spearman([1.0, 2.0, 3.0, np.nan], [1.0, 2.0, 3.0, 4.0])["n"] == 3
